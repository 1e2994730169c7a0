"""Ring attention: context parallelism's ``p2p`` exchange (Megatron's default ``--cp-comm-type``).

The CP ranks pass their keys and values around a ring: at step ``i`` rank ``r`` holds the
block of rank ``r - i`` (its chunks ``j`` and ``2c - 1 - j``, `mp.model.context_parallel`)
while it sends on the one it holds and receives the next, so no rank ever holds more than two
blocks. Each of its query chunks attends to each key chunk before it (whole), to its own chunk
(causally), and not to later ones; under a sliding window (``window`` earlier keys at most) a
block wholly out of the window is skipped and the others are masked by distance. The partial
results merge by their log-sum-exp (the online softmax of Milakov and Gimelshein 2018, as
flash attention and Liu et al. 2023's ring attention merge them). Backward passes the blocks
around again, each with the gradients of its keys and values accumulating as it goes (in
fp32), and a last step returns those to their owner.

Each block pair runs as plain matrix products in the inputs' dtype with the softmax statistics
in fp32 (no flash kernel: torch's take no log-sum-exp in and out through a public API), a
tile of at most `QUERY_TILE` query rows at a time, so one ``[tile, L]`` block of scores per
head exists at once (`tile_bytes`); what is kept for backward is q, k, v, the output and the
fp32 log-sum-exp: no rank saves the whole sequence's keys and values. Attention dropout is not
supported here (`mp.model.config.TransformerConfig` refuses it).

Attention sinks (``sinks``, a logit ``s_h`` per head, `mp.model.attention.CoreAttention`) join
once all blocks are merged: each row's log-sum-exp takes ``exp(s_h)`` into its sum and the
output is rescaled to the new denominator. Backward then reads each key's probability against
that log-sum-exp, and the sink's, ``p = exp(s_h - lse)``, gives ``d s_h = -sum p rowsum(dO
O)`` over this rank's rows (the sink adds no value): a partial sum, as every CP-replicated
parameter's gradient is, that the DP x CP reduction completes.

Shapes: ``q [2L, b, np, d]``, ``k [2L, b, ng, d]``, ``v [2L, b, ng, dv]`` (``L = s / (2c)``,
``ng`` dividing ``np``, ``dv = d`` but under multi-latent attention), a boolean
``attention_mask [b or 1, 1, 2L, s]`` (True = masked; the rank's query rows against every key)
or None for causal; ``sinks [np]`` or None; the output is ``[2L, b, np * dv]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEG_INF = float("-inf")
QUERY_TILE = 1024  # query rows of one block of scores


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attention_mask: torch.Tensor | None, scale: float,
                   group: dist.ProcessGroup, tile: int = QUERY_TILE,
                   window: int | None = None, sinks: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Causal attention of this CP rank's queries over the whole sequence (module doc), the
    scores ``tile`` query rows at a time; with ``window``, over the ``window`` keys before
    each query and its own; with ``sinks [np]``, each head's sink logit in every row's
    softmax."""
    return _RingAttention.apply(q, k, v, attention_mask, scale, group, tile, window, sinks)


def tile_bytes(micro_batch: int, heads: int, chunk: int, tile: int = QUERY_TILE,
               element_bytes: int = 2) -> int:
    """The working memory of one block of scores at its largest (backward): the fp32
    probabilities and score gradients of ``heads`` heads, ``[b, heads, min(tile, L), L]``
    each, and a copy of one in the inputs' dtype for a matrix product."""
    return micro_batch * heads * min(tile, chunk) * chunk * (2 * 4 + element_bytes)


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
    """This rank's place in the ring, the chunks each block holds, and the tiles of rows."""

    def __init__(self, group: dist.ProcessGroup, chunk: int, tile: int, window: int | None):
        self.group, self.chunk, self.tile, self.window = group, chunk, tile, window
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def chunks(self, owner: int) -> tuple[int, int]:
        """The sequence chunks CP rank ``owner`` holds, in its order."""
        return owner, 2 * self.size - 1 - owner

    def blocks(self, owner: int):
        """``(query rows, key half, key chunk, first query's position)`` of each block of
        scores this rank computes against the keys of rank ``owner``: a tile of query rows (of
        this rank's ``2L``) against the ``L`` keys of a chunk no later than theirs, some of
        them within the window."""
        for qh, qc in enumerate(self.chunks(self.rank)):
            for kh, kc in enumerate(self.chunks(owner)):
                for first in range(0, self.chunk, self.tile):
                    position = qc * self.chunk + first
                    nearest = position - (kc + 1) * self.chunk + 1  # to the chunk's last key
                    if kc > qc or (self.window is not None and nearest > self.window):
                        continue
                    rows = slice(qh * self.chunk + first,
                                 qh * self.chunk + min(first + self.tile, self.chunk))
                    yield rows, kh, kc, position

    def masked(self, rows: int, kc: int, position: int, device) -> torch.Tensor | None:
        """``[rows, L]`` boolean, True where key chunk ``kc``'s key comes after the query
        (``rows`` queries from ``position`` on) or before its window; None when none does."""
        if kc * self.chunk + self.chunk - 1 <= position and (
                self.window is None or position + rows - 1 - kc * self.chunk <= self.window):
            return None
        distance = (torch.arange(position, position + rows, device=device)[:, None]
                    - torch.arange(kc * self.chunk, (kc + 1) * self.chunk, device=device))
        if self.window is None:
            return distance < 0
        return (distance < 0) | (distance > self.window)

    def half(self, x: torch.Tensor, h: int) -> torch.Tensor:
        """Half ``h`` (chunk ``h`` of a rank's two) of ``x``'s second-to-last dimension."""
        return x[..., h * self.chunk:(h + 1) * self.chunk, :]

    def start_exchange(self, tensors: list[torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
        """Send ``tensors`` to the next rank and receive as many from the previous one;
        returns the requests and the receive buffers."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        return dist.batch_isend_irecv(ops), received


def _scores(ring: _Ring, q: torch.Tensor, k: torch.Tensor, scale: float, position: int,
            attention_mask: torch.Tensor | None, rows: slice, kc: int) -> torch.Tensor:
    """fp32 scores ``[b, g, r, rows, L]`` of one block (its first query at ``position``), -inf
    where masked: keys after their query or out of its window (`_Ring.masked`), and where
    ``attention_mask`` (the rank's rows against every key) says."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    masked = ring.masked(scores.size(-2), kc, position, q.device)
    if masked is not None:
        scores.masked_fill_(masked, NEG_INF)
    if attention_mask is not None:
        keys = slice(kc * ring.chunk, (kc + 1) * ring.chunk)
        scores.masked_fill_(attention_mask[:, :, rows, keys].unsqueeze(2), NEG_INF)
    return scores


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf (rows that kept no key) as 0, to subtract without NaN."""
    return lse.masked_fill(lse == NEG_INF, 0.0)


def _sink_logits(sinks: torch.Tensor, groups: int) -> torch.Tensor:
    """``sinks [np]`` as fp32 ``[1, g, r, 1]``, beside a ``[b, g, r, 2L]`` log-sum-exp."""
    return sinks.float().view(1, groups, -1, 1)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attention_mask, scale, group, tile, window, sinks):
        ring = _Ring(group, q.size(0) // 2, tile, window)
        groups = k.size(2)
        qg, kg, vg = _grouped(q, groups), _grouped(k, groups), _grouped(v, groups)
        out = torch.zeros((*qg.shape[:-1], v.size(-1)), dtype=torch.float32, device=q.device)
        lse = torch.full(qg.shape[:-1], NEG_INF, dtype=torch.float32, device=q.device)
        block = [kg, vg]
        for step in range(ring.size):
            if step < ring.size - 1:  # the next block travels while this one is used
                requests, received = ring.start_exchange(block)
            owner = (ring.rank - step) % ring.size
            for rows, kh, kc, position in ring.blocks(owner):
                scores = _scores(ring, qg[..., rows, :], ring.half(block[0], kh), scale,
                                 position, attention_mask, rows, kc)
                part_lse = torch.logsumexp(scores, dim=-1)
                probs = scores.sub_(_finite(part_lse).unsqueeze(-1)).exp_()
                part = torch.matmul(probs.to(v.dtype), ring.half(block[1], kh)).float()
                new_lse = torch.logaddexp(lse[..., rows], part_lse)
                shift = _finite(new_lse)
                out[..., rows, :] = (out[..., rows, :] * (lse[..., rows] - shift).exp_()[..., None]
                                     + part * (part_lse - shift).exp_()[..., None])
                lse[..., rows] = new_lse
            if step < ring.size - 1:
                for request in requests:
                    request.wait()
                block = received
        if sinks is not None:  # exp(s_h) joins every row's denominator
            total = torch.logaddexp(lse, _sink_logits(sinks, groups))
            out.mul_((lse - total).exp_()[..., None])
            lse = total
        t, b = q.shape[:2]
        result = _ungrouped(out, q.dtype).reshape(t, b, -1)  # [2L, b, np * dv]
        ctx.save_for_backward(q, k, v, result, lse, attention_mask, sinks)
        ctx.scale, ctx.group, ctx.tile, ctx.window = scale, group, tile, window
        return result

    @staticmethod
    def backward(ctx, grad):
        q, k, v, result, lse, attention_mask, sinks = ctx.saved_tensors
        ring = _Ring(ctx.group, q.size(0) // 2, ctx.tile, ctx.window)
        groups = k.size(2)
        qg, kg, vg = _grouped(q, groups), _grouped(k, groups), _grouped(v, groups)
        dout, out = (_grouped(x.reshape(*q.shape[:-1], v.size(-1)), groups)
                     for x in (grad, result))
        delta = (dout.float() * out.float()).sum(-1)  # rowsum(dO * O), [b, g, r, 2L]
        dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
        block = [kg, vg, torch.zeros(kg.shape, dtype=torch.float32, device=q.device),
                 torch.zeros(vg.shape, dtype=torch.float32, device=q.device)]
        for step in range(ring.size):
            owner = (ring.rank - step) % ring.size
            kb, vb, dk, dv = block
            for rows, kh, kc, position in ring.blocks(owner):
                q_r, dout_r = qg[..., rows, :], dout[..., rows, :]
                k_h, v_h = ring.half(kb, kh), ring.half(vb, kh)
                probs = _scores(ring, q_r, k_h, ctx.scale, position, attention_mask, rows,
                                kc).sub_(lse[..., rows].unsqueeze(-1)).exp_()  # [b, g, r, T, L]
                ring.half(dv, kh).add_(torch.matmul(probs.to(v.dtype).transpose(-1, -2), dout_r
                                                    ).float().sum(2, keepdim=True))
                dscores = torch.matmul(dout_r, v_h.transpose(-1, -2)).float()
                dscores.sub_(delta[..., rows].unsqueeze(-1)).mul_(probs).mul_(ctx.scale)
                dscores = dscores.to(q.dtype)
                dq[..., rows, :] += torch.matmul(dscores, k_h).float()
                ring.half(dk, kh).add_(torch.matmul(dscores.transpose(-1, -2), q_r).float()
                                       .sum(2, keepdim=True))
            # pass the block on with its gradients; after the last step only the gradients,
            # which then reach their owner
            requests, received = ring.start_exchange(block if step < ring.size - 1
                                                     else block[2:])
            for request in requests:
                request.wait()
            block = received if step < ring.size - 1 else [None, None, *received]
        dk, dv = block[2], block[3]
        dsinks = None
        if sinks is not None:  # p_sink (dP_sink - delta), dP_sink = 0: the sink has no value
            p_sink = (_sink_logits(sinks, groups) - lse).exp_()
            dsinks = -(p_sink * delta).sum((0, 3)).reshape(-1).to(sinks.dtype)
        return (_ungrouped(dq, q.dtype), _ungrouped(dk, k.dtype), _ungrouped(dv, v.dtype),
                None, None, None, None, None, dsinks)
