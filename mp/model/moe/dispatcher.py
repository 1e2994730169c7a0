"""Token routing of a mixture-of-experts layer: each token's copies to their experts' ranks
and the experts' outputs back.

With ``E`` experts over ``P`` expert-parallel ranks, rank ``j`` holds experts
``[j E / P, (j + 1) E / P)``. `dispatch`:

1. the ``N k`` (token, choice) pairs are sorted by expert (stable), so the rows for rank
   ``j`` are contiguous and in expert order;
2. the ranks trade their per-expert counts (one all-to-all of ``E`` integers), then the rows
   (`mp.tensor_parallel.all_to_all_by_sizes`); what arrives is grouped by source rank, then
   expert;
3. the rows are regrouped by local expert (then source rank), which the experts take.

`combine` undoes 3, 2 and 1 and sums each token's ``k`` outputs weighted by its router
probabilities (in fp32, keeping the outputs for backward in their own dtype). Counts leave
the device once a layer (the exchange sizes), as in Megatron's all-to-all dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mp.model.moe.aux_loss import at_least_fp32
from mp.tensor_parallel import all_to_all_by_sizes


@dataclass
class Routing:
    """What `combine` needs to undo a `dispatch`."""

    order: torch.Tensor  # [N k]: the pairs (token x k + choice) sorted by expert
    sent: list[int]  # rows sent to each EP rank
    received: list[int]  # rows received from each EP rank
    regroup: torch.Tensor | None  # [M]: received rows in local-expert order (None: P = 1)


class TokenDispatcher:
    """Moves token copies between the ``expert_group`` ranks (None: one rank holds all
    ``num_experts``)."""

    def __init__(self, num_experts: int, expert_group=None):
        self.num_experts, self.group = num_experts, expert_group
        self.ranks = 1 if expert_group is None else dist.get_world_size(expert_group)
        self.local = num_experts // self.ranks

    def dispatch(self, tokens: torch.Tensor, experts: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], Routing]:
        """``tokens [N, h]``, ``experts [N, k]`` -> (rows ``[M, h]`` grouped by this rank's
        experts, the rows of each local expert, the `Routing`)."""
        k = experts.size(1)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        rows = tokens.index_select(0, order // k)
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self.ranks == 1:
            return rows, counts.tolist(), Routing(order, [], [], None)
        incoming = torch.empty_like(counts)  # [P x local]: from each rank, per local expert
        dist.all_to_all_single(incoming, counts, group=self.group)
        sizes = torch.stack((counts, incoming)).view(2, self.ranks, self.local).cpu()
        sent, received = sizes[0].sum(1).tolist(), sizes[1].sum(1).tolist()
        rows = all_to_all_by_sizes(rows, received, sent, group=self.group)
        # each received row's block (source j, expert l) is j x local + l; order by (l, j)
        block = torch.repeat_interleave(torch.arange(self.ranks * self.local),
                                        sizes[1].flatten()).to(rows.device)
        regroup = torch.argsort(block % self.local * self.ranks + block // self.local,
                                stable=True)
        per_expert = sizes[1].sum(0).tolist()
        return rows.index_select(0, regroup), per_expert, Routing(order, sent, received,
                                                                  regroup)

    def combine(self, outputs: torch.Tensor, probs: torch.Tensor,
                routing: Routing) -> torch.Tensor:
        """The experts' ``outputs [M, h]`` (as `dispatch` gave the rows) -> ``[N, h]``:
        ``sum_i probs[t, i] x`` the output for token ``t``'s ``i``-th choice."""
        if routing.regroup is not None:
            outputs = outputs.index_select(0, torch.argsort(routing.regroup))
            outputs = all_to_all_by_sizes(outputs, routing.sent, routing.received,
                                          group=self.group)
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
