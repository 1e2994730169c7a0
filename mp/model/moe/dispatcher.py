"""Token routing of a mixture-of-experts layer: each token's copies to their experts' ranks
and the experts' outputs back.

With ``E`` experts over ``P`` expert-parallel ranks, rank ``j`` holds experts
``[j E / P, (j + 1) E / P)``, each split over the ``t`` ranks of its expert tensor-parallel
group (the TP group, or with ``expert_tensor_parallel_size=1`` none: ``t = 1``, whole experts,
the TP ranks then among the ``P`` EP ranks, and step 3 and its undoing skipped).
`dispatch`:

1. the ``N k`` (token, choice) pairs of the rank's ``N`` tokens are sorted by expert
   (stable), so the rows for EP rank ``j`` are contiguous and in expert order; pairs an
   expert dropped (expert ``-1``, `mp.model.moe.capacity`) sort last and stay home;
2. the EP ranks trade their per-expert counts (one all-to-all of ``E`` integers), then the
   rows (`mp.tensor_parallel.all_to_all_by_sizes`); what arrives is grouped by source rank,
   then expert;
3. when the tokens are split over TP (sequence parallelism: each TP rank routes its own
   ``1 / t`` of them), the TP ranks gather each other's counts and rows, since each holds
   ``1 / t`` of every local expert and so needs every row (an all-to-all of the rank's rows
   to every TP rank, which takes uneven sizes);
4. the rows are regrouped by local expert (then source), which the experts take.

`combine` undoes 4, sums the TP ranks' partial outputs back onto the rank whose rows they
are (the all-to-all back, then a sum: an uneven reduce-scatter), undoes 2 and 1, and sums each
token's ``k`` outputs weighted by its router probabilities (in fp32, keeping the outputs for
backward in their own dtype). Counts leave the device once a layer (the exchange sizes), as
in Megatron's all-to-all dispatcher, which also trades rows over EP before gathering them
over TP, so each routed copy crosses the EP links once, not ``t`` times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mp.comm import all_gather_single
from mp.model.moe.aux_loss import at_least_fp32
from mp.tensor_parallel import all_to_all_by_sizes


@dataclass
class Routing:
    """What `combine` needs to undo a `dispatch`."""

    order: torch.Tensor  # [N k]: the pairs (token x k + choice) sorted by expert, dropped last
    sent: list[int]  # rows sent to each EP rank
    received: list[int]  # rows received from each EP rank
    gathered: list[int]  # rows received over EP by each TP rank (empty: tokens not split)
    regroup: torch.Tensor | None  # the rows in local-expert order (None: one source)


class TokenDispatcher:
    """Moves token copies between the ``expert_group`` ranks (None: one rank holds all
    ``num_experts``) and, when each rank of ``tensor_group`` (the expert TP group) routes its
    own tokens (sequence parallelism), between those (None: every TP rank routes the same
    tokens, or the experts are whole)."""

    def __init__(self, num_experts: int, expert_group=None, tensor_group=None):
        self.num_experts, self.group, self.tensor_group = num_experts, expert_group, tensor_group
        self.ranks = 1 if expert_group is None else dist.get_world_size(expert_group)
        self.tp = 1 if tensor_group is None else dist.get_world_size(tensor_group)
        self.local = num_experts // self.ranks

    def dispatch(self, tokens: torch.Tensor, experts: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], Routing]:
        """``tokens [N, h]``, ``experts [N, k]`` (-1: a dropped copy) -> (rows ``[M, h]``
        grouped by this rank's experts, the rows of each local expert, the `Routing`)."""
        k = experts.size(1)
        flat = experts.flatten()
        flat = flat.masked_fill(flat < 0, self.num_experts)
        order = torch.argsort(flat, stable=True)  # the dropped last
        counts = torch.bincount(flat, minlength=self.num_experts + 1)[:self.num_experts]
        if self.ranks == 1 and self.tp == 1:
            per_expert = counts.tolist()
            rows = tokens.index_select(0, order[:sum(per_expert)] // k)
            return rows, per_expert, Routing(order, [], [], [], None)
        incoming = counts  # [P x local]: from each EP rank, per local expert
        if self.ranks > 1:
            incoming = torch.empty_like(counts)
            dist.all_to_all_single(incoming, counts, group=self.group)
        blocks = incoming  # [t x P x local]: also what each TP rank received
        if self.tp > 1:
            blocks = incoming.new_empty(self.tp * incoming.numel())
            all_gather_single(blocks, incoming, group=self.tensor_group)
        host = torch.cat((counts, blocks)).cpu()  # the one wait for the device
        sent = host[:self.num_experts].view(self.ranks, self.local).sum(1).tolist()
        rows = tokens.index_select(0, order[:sum(sent)] // k)
        blocks = host[self.num_experts:].view(self.tp, self.ranks, self.local)
        mine = blocks[0 if self.tp == 1 else dist.get_rank(self.tensor_group)]
        received = mine.sum(1).tolist()
        if self.ranks > 1:
            rows = all_to_all_by_sizes(rows, received, sent, group=self.group)
        gathered = []
        if self.tp > 1:  # every TP rank's rows to every TP rank
            gathered = blocks.sum((1, 2)).tolist()
            rows = all_to_all_by_sizes(rows.repeat(self.tp, 1), gathered,
                                       [rows.size(0)] * self.tp, group=self.tensor_group)
        # block (TP rank, EP source, expert l) in arrival order; order the rows by (l, source)
        sources = self.tp * self.ranks
        block = torch.repeat_interleave(torch.arange(sources * self.local),
                                        blocks.flatten()).to(rows.device)
        regroup = torch.argsort(block % self.local * sources + block // self.local,
                                stable=True)
        per_expert = blocks.sum((0, 1)).tolist()
        return rows.index_select(0, regroup), per_expert, Routing(order, sent, received,
                                                                  gathered, regroup)

    def combine(self, outputs: torch.Tensor, probs: torch.Tensor,
                routing: Routing) -> torch.Tensor:
        """The experts' ``outputs [M, h]`` (as `dispatch` gave the rows; partial sums over
        TP) -> ``[N, h]``: ``sum_i probs[t, i] x`` the output for token ``t``'s ``i``-th
        choice."""
        if routing.regroup is not None:
            outputs = outputs.index_select(0, torch.argsort(routing.regroup))
        if routing.gathered:  # each TP rank's partial outputs of this rank's rows, summed
            mine = routing.gathered[dist.get_rank(self.tensor_group)]
            outputs = all_to_all_by_sizes(outputs, [mine] * self.tp, routing.gathered,
                                          group=self.tensor_group)
            outputs = outputs.view(self.tp, mine, -1).sum(0)
        if self.ranks > 1:
            outputs = all_to_all_by_sizes(outputs, routing.sent, routing.received,
                                          group=self.group)
        dropped = probs.numel() - outputs.size(0)
        if dropped:  # their outputs are zero, in their places at the end of the order
            outputs = torch.cat((outputs, outputs.new_zeros(dropped, outputs.size(-1))))
        pairs = outputs.index_select(0, torch.argsort(routing.order))  # [N k, h]
        return _WeightedSum.apply(pairs.view(*probs.shape, -1), probs)


class _WeightedSum(torch.autograd.Function):
    """``pairs [N, k, h]``, ``probs [N, k]`` -> ``sum_i probs[:, i] x pairs[:, i]`` in
    ``pairs``' dtype, computed in fp32 (or wider) both ways; saves ``pairs`` as they are
    rather than autograd's fp32 copy of them, which is twice the size for 16-bit models."""

    @staticmethod
    def forward(ctx, pairs, probs):
        ctx.save_for_backward(pairs, probs)
        return (at_least_fp32(pairs) * probs.unsqueeze(-1)).sum(1).to(pairs.dtype)

    @staticmethod
    def backward(ctx, grad):
        pairs, probs = ctx.saved_tensors
        wide = at_least_fp32(grad).unsqueeze(1)  # [N, 1, h]
        grad_pairs = (wide * probs.unsqueeze(-1)).to(pairs.dtype)
        grad_probs = (at_least_fp32(pairs) * wide).sum(-1).to(probs.dtype)
        return grad_pairs, grad_probs
