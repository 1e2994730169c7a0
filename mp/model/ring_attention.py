"""Ring attention: context parallelism's ``p2p`` exchange (Megatron's default ``--cp-comm-type``).

The CP ranks pass their keys and values around a ring: at step ``i`` rank ``r`` holds the
block of rank ``r - i`` (its chunks ``j`` and ``2c - 1 - j``, `mp.model.context_parallel`)
while it sends on the one it holds and receives the next, so no rank ever holds more than two
blocks. Each of its query chunks attends to each key chunk before it (whole), to its own chunk
(causally), and not to later ones; the partial results merge by their log-sum-exp (the
online softmax of Milakov and Gimelshein 2018, as flash attention and Liu et al. 2023's ring
attention merge them). Backward passes the blocks around again, each with the gradients of
its keys and values accumulating as it goes (in fp32), and a last step returns those to their
owner.

Each block's product runs as plain matrix products with the softmax statistics in fp32 (no
flash kernel: they take no log-sum-exp in and out through a public API), so the ``[L, L]``
scores of one block pair exist at a time; what is kept for backward is q, k, v, the output and
the fp32 log-sum-exp: no rank saves the whole sequence's keys and values. Attention dropout is
not supported here (`mp.model.config.TransformerConfig` refuses it).

Shapes: ``q [2L, b, np, d]``, ``k, v [2L, b, ng, d]`` (``L = s / (2c)``, ``ng`` dividing
``np``), a boolean ``attention_mask [b or 1, 1, 2L, s]`` (True = masked; the rank's query rows
against every key) or None for causal; the output is ``[2L, b, np * d]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEG_INF = float("-inf")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attention_mask: torch.Tensor | None, scale: float,
                   group: dist.ProcessGroup) -> torch.Tensor:
    """Causal attention of this CP rank's queries over the whole sequence (module doc)."""
    return _RingAttention.apply(q, k, v, attention_mask, scale, group)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[2L, b, heads, d]`` -> ``[b, groups, heads / groups, 2L, d]`` (head ``i`` in group
    ``i // (heads / groups)``, as the QKV projection lays them out)."""
    t, b, heads, d = x.shape
    return x.permute(1, 2, 0, 3).reshape(b, groups, heads // groups, t, d)


def _ungrouped(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `_grouped`, in ``dtype``."""
    b, groups, per_group, t, d = x.shape
    return x.reshape(b, groups * per_group, t, d).permute(2, 0, 1, 3).to(dtype)


class _Ring:
    """This rank's place in the ring and the chunks each block holds."""

    def __init__(self, group: dist.ProcessGroup, chunk: int):
        self.group, self.chunk = group, chunk
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def chunks(self, owner: int) -> tuple[int, int]:
        """The sequence chunks CP rank ``owner`` holds, in its order."""
        return owner, 2 * self.size - 1 - owner

    def pairs(self, owner: int):
        """``(query half, key half, key chunk, causal)`` for the blocks of rank ``owner`` that
        this rank's queries attend to."""
        for qh, qc in enumerate(self.chunks(self.rank)):
            for kh, kc in enumerate(self.chunks(owner)):
                if kc <= qc:
                    yield qh, kh, kc, kc == qc

    def rows(self, h: int) -> slice:
        """The tokens of half ``h`` (chunk ``h`` of this rank's two)."""
        return slice(h * self.chunk, (h + 1) * self.chunk)

    def half(self, x: torch.Tensor, h: int) -> torch.Tensor:
        """Half ``h`` of ``x``'s second-to-last (token) dimension."""
        return x[..., self.rows(h), :]

    def start_exchange(self, tensors: list[torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
        """Send ``tensors`` to the next rank and receive as many from the previous one;
        returns the requests and the receive buffers."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        return dist.batch_isend_irecv(ops), received


def _scores(ring: _Ring, q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
            mask: torch.Tensor | None) -> torch.Tensor:
    """fp32 scores ``[b, g, r, L, L]`` of one block pair, -inf where masked."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if causal:
        above = torch.ones(ring.chunk, ring.chunk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, NEG_INF)
    if mask is not None:
        scores = scores.masked_fill(mask, NEG_INF)
    return scores


def _block_mask(ring: _Ring, attention_mask: torch.Tensor | None, qh: int, kc: int
                ) -> torch.Tensor | None:
    """The mask of query half ``qh`` against key chunk ``kc``, ``[b or 1, 1, 1, L, L]``."""
    if attention_mask is None:
        return None
    keys = slice(kc * ring.chunk, (kc + 1) * ring.chunk)
    return attention_mask[:, :, ring.rows(qh), keys].unsqueeze(2)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attention_mask, scale, group):
        ring = _Ring(group, q.size(0) // 2)
        groups = k.size(2)
        qg, kg, vg = _grouped(q, groups), _grouped(k, groups), _grouped(v, groups)
        out = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qg.shape[:-1], NEG_INF, dtype=torch.float32, device=q.device)
        block = [kg, vg]
        for step in range(ring.size):
            if step < ring.size - 1:  # the next block travels while this one is used
                requests, received = ring.start_exchange(block)
            owner = (ring.rank - step) % ring.size
            for qh, kh, kc, causal in ring.pairs(owner):
                scores = _scores(ring, ring.half(qg, qh), ring.half(block[0], kh), scale,
                                 causal, _block_mask(ring, attention_mask, qh, kc))
                part_lse = torch.logsumexp(scores, dim=-1)
                safe = part_lse.masked_fill(part_lse == NEG_INF, 0.0)
                probs = torch.exp(scores - safe.unsqueeze(-1))
                part = torch.matmul(probs.to(v.dtype), ring.half(block[1], kh)).float()
                old_out, old_lse = ring.half(out, qh), lse[..., ring.rows(qh)]
                new_lse = torch.logaddexp(old_lse, part_lse)
                safe = new_lse.masked_fill(new_lse == NEG_INF, 0.0)
                old_out.copy_(old_out * torch.exp(old_lse - safe).unsqueeze(-1)
                              + part * torch.exp(part_lse - safe).unsqueeze(-1))
                old_lse.copy_(new_lse)
            if step < ring.size - 1:
                for request in requests:
                    request.wait()
                block = received
        t, b = q.shape[:2]
        result = _ungrouped(out, q.dtype).reshape(t, b, -1)  # [2L, b, np * d]
        ctx.save_for_backward(q, k, v, result, lse, attention_mask)
        ctx.scale, ctx.group = scale, group
        return result

    @staticmethod
    def backward(ctx, grad):
        q, k, v, result, lse, attention_mask = ctx.saved_tensors
        ring = _Ring(ctx.group, q.size(0) // 2)
        groups = k.size(2)
        qg, kg, vg = _grouped(q, groups), _grouped(k, groups), _grouped(v, groups)
        dout, out = (_grouped(x.reshape(q.shape), groups) for x in (grad, result))
        delta = (dout.float() * out.float()).sum(-1)  # rowsum(dO * O), [b, g, r, 2L]
        dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
        block = [kg, vg, torch.zeros(kg.shape, dtype=torch.float32, device=q.device),
                 torch.zeros(vg.shape, dtype=torch.float32, device=q.device)]
        for step in range(ring.size):
            owner = (ring.rank - step) % ring.size
            kb, vb, dk, dv = block
            for qh, kh, kc, causal in ring.pairs(owner):
                q_h, k_h, v_h = ring.half(qg, qh), ring.half(kb, kh), ring.half(vb, kh)
                rows = ring.rows(qh)
                scores = _scores(ring, q_h, k_h, ctx.scale, causal,
                                 _block_mask(ring, attention_mask, qh, kc))
                probs = torch.exp(scores - lse[..., rows].unsqueeze(-1))  # [b, g, r, L, L]
                dout_h = ring.half(dout, qh)
                ring.half(dv, kh).add_(torch.matmul(probs.transpose(-1, -2),
                                                    dout_h.float()).sum(2, keepdim=True))
                dprobs = torch.matmul(dout_h, v_h.transpose(-1, -2)).float()
                dscores = probs * (dprobs - delta[..., rows].unsqueeze(-1)) * ctx.scale
                ring.half(dq, qh).add_(torch.matmul(dscores, k_h.float()))
                ring.half(dk, kh).add_(torch.matmul(dscores.transpose(-1, -2),
                                                    q_h.float()).sum(2, keepdim=True))
            # pass the block on with its gradients; after the last step only the gradients,
            # which then reach their owner
            requests, received = ring.start_exchange(block if step < ring.size - 1
                                                     else block[2:])
            for request in requests:
                request.wait()
            block = received if step < ring.size - 1 else [None, None, *received]
        dk, dv = block[2], block[3]
        return (_ungrouped(dq, q.dtype), _ungrouped(dk, k.dtype), _ungrouped(dv, v.dtype),
                None, None, None)
