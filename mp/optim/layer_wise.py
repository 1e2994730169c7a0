"""Megatron's layer-wise distributed optimizer: Muon's state sharded over data parallel by
whole parameters (``--optimizer muon --use-distributed-optimizer``; ``dist_muon`` before).

Muon orthogonalizes whole matrices, which the distributed optimizer's flat bucket shards
(`mp.optim.DistributedOptimizer`) cut apart. Megatron-Core's ``LayerWiseDistributedOptimizer``
deals whole parameters to the data-parallel ranks instead. One iteration:

1. backward: `mp.distributed.DistributedDataParallel`, built *without*
   ``use_distributed_optimizer``, all-reduces the gradients as for the plain optimizer, so
   every rank holds every data-parallel mean gradient;
2. `step`: each rank updates only the parameters it owns, with their fp32 masters (bf16
   parameters) and state (Muon's momentum, AdamW's moments for the other parameters). The
   parameters are dealt round-robin in the order of the param groups, over the DP x CP ranks,
   experts' over the expert-data-parallel ranks (one turn counter for each, running on across
   the groups, as Megatron's). A Muon unit (`mp.optim.muon.muon_units`: a QKV weight, or a
   gate and its up projection, which are one fused ``fc1`` in Megatron but two parameters in
   mp) is dealt as one card, so it is orthogonalized whole on one rank. Every TP (and expert
   TP) rank of one data-parallel index deals the same parameters in the same order, so they
   own the same units and the collectives of ``muon_tp_mode`` duplicated and distributed
   pair up. The gradient norm sums each rank's own parameters over every rank (each element
   once, as the distributed optimizer's);
3. `copy_main_params_to_model`: the owners write their masters into their parameters, and
   each owner's updated parameters are broadcast over the group they were dealt in.

The broadcast (Megatron: one ``broadcast`` per parameter, its "allgatherv") is here one per
owner and dtype: an owner's parameters flattened into one tensor, so a step issues D
broadcasts per group (DP x CP, expert DP) and dtype, of exactly the parameter bytes, with no
padding: each rank receives the parameters it does not own, ``(D - 1) / D`` of its chunks'
parameter bytes when the deal is even, as an all-gather would.

A rank's optimizer state covers its own parameters only (`mp.estimate.layer_wise` counts
it). A checkpoint holds the same global tensors as the plain optimizer's, each parameter's
state written by its owner (`mp.checkpointing.state`): it loads with plain Muon at any
data-parallel size, and plain Muon's loads here. ``overlap_param_gather`` does not apply: the
broadcasts end the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.optim.muon import MuonUnit
from mp.optim.optimizer import MixedPrecisionOptimizer


class LayerWiseDistributedOptimizer(MixedPrecisionOptimizer):
    """`MixedPrecisionOptimizer` (Muon) over the whole parameters dealt to this rank.

    Args:
        param_groups: the chunks' parameters in ``torch.optim`` groups, Muon's marked
            (`mp.optim.factory`).
        model_chunks: this rank's `DistributedDataParallel` chunks, built without
            ``use_distributed_optimizer`` (they all-reduce the gradients).
        muon_units: `mp.optim.muon.muon_units` of the chunks; each is dealt whole.
        data_parallel_group: where dense parameters are dealt; default the DP x CP group.
        expert_data_parallel_group: where experts' are; default
            ``parallel_state.get_expert_data_parallel_group()`` (read only with experts).
        grad_norm_group: the ranks whose parameters make up the whole model; default every
            rank.
        **kwargs: `MixedPrecisionOptimizer`'s (lr, clip_grad, optimizer="muon", muon, ...).
    """

    def __init__(self, param_groups: list[dict], model_chunks: Sequence[nn.Module], *,
                 muon_units: Sequence[MuonUnit] = (), data_parallel_group=None,
                 expert_data_parallel_group=None, grad_norm_group=None, **kwargs):
        if kwargs.get("optimizer") != "muon":
            raise ValueError(f"LayerWiseDistributedOptimizer is Muon's (optimizer='muon'), not "
                             f"optimizer={kwargs.get('optimizer')!r}: AdamW and SGD shard "
                             "with DistributedOptimizer")
        for chunk in model_chunks:
            if getattr(chunk, "use_distributed_optimizer", False):
                raise ValueError("LayerWiseDistributedOptimizer needs model chunks wrapped in "
                                 "DistributedDataParallel(..., use_distributed_optimizer="
                                 "False): it all-reduces the gradients and deals whole "
                                 "parameters")
        params = [p for g in param_groups for p in g["params"]]
        experts = any(_is_expert(p) for p in params)
        self._groups = {
            False: (parallel_state.get_data_parallel_group(with_context_parallel=True)
                    if data_parallel_group is None else data_parallel_group),
            True: (parallel_state.get_expert_data_parallel_group()
                   if expert_data_parallel_group is None and experts
                   else expert_data_parallel_group)}
        self._rank = {kind: dist.get_rank(group) if group is not None else 0
                      for kind, group in self._groups.items()}
        sizes = {kind: dist.get_world_size(group) if group is not None else 1
                 for kind, group in self._groups.items()}
        self.owner = deal_parameters(param_groups, muon_units, sizes)
        #: per kind, the parameters of each owner in dealing order (what it broadcasts)
        self._by_owner = {kind: [[] for _ in range(size)] for kind, size in sizes.items()}
        for param, owner in self.owner.items():
            self._by_owner[_is_expert(param)][owner].append(param)
        super().__init__(param_groups, muon_units=muon_units,
                         model_parallel_group=(dist.group.WORLD if grad_norm_group is None
                                               else grad_norm_group), **kwargs)

    _experts_need_their_group = False  # the norm sums over every rank already

    def _ranges(self, param: nn.Parameter) -> list[tuple[int, int]]:
        mine = self.owner[param] == self._rank[_is_expert(param)]
        return [(0, param.numel())] if mine else []

    @torch.no_grad()
    def copy_main_params_to_model(self) -> None:
        """Write the masters into this rank's parameters, then broadcast every owner's
        parameters (one flat tensor per owner and dtype) over the group they were dealt in."""
        super().copy_main_params_to_model()
        for kind, group in self._groups.items():
            if group is None or dist.get_world_size(group) == 1:
                continue
            for owner, params in enumerate(self._by_owner[kind]):
                for same in _by_dtype(params).values():
                    _broadcast_flat(same, owner, self._rank[kind] == owner, group)


def deal_parameters(param_groups: list[dict], muon_units: Sequence[MuonUnit],
                    sizes: dict[bool, int]) -> dict[nn.Parameter, int]:
    """``{param: owner}``: the groups' parameters dealt round-robin in order, a unit's tensors
    together, over ``sizes[False]`` ranks (dense) and ``sizes[True]`` ranks (experts), one
    turn counter for each running on across the groups (module doc)."""
    together = {t: unit.tensors for unit in muon_units for t in unit.tensors}
    owner: dict[nn.Parameter, int] = {}
    turn = {False: 0, True: 0}
    for group in param_groups:
        for param in group["params"]:
            if param in owner:
                continue
            kind = _is_expert(param)
            for tensor in together.get(param, (param,)):
                owner[tensor] = turn[kind]
            turn[kind] = (turn[kind] + 1) % sizes[kind]
    return owner


def _is_expert(param: nn.Parameter) -> bool:
    """Whether ``param`` is an expert's (Megatron's ``allreduce = False`` marker)."""
    return not getattr(param, "allreduce", True)


def _by_dtype(params: list[nn.Parameter]) -> dict[torch.dtype, list[nn.Parameter]]:
    """``params`` by dtype, in order of first appearance (the same on every rank)."""
    out: dict[torch.dtype, list[nn.Parameter]] = {}
    for param in params:
        out.setdefault(param.dtype, []).append(param)
    return out


def _broadcast_flat(params: list[nn.Parameter], owner: int, mine: bool, group) -> None:
    """Broadcast ``params`` (one dtype) from group rank ``owner`` as one flat tensor."""
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params]) if mine else \
        torch.empty(sum(sizes), dtype=params[0].dtype, device=params[0].device)
    dist.broadcast(flat, group=group, group_src=owner)
    if not mine:
        torch._foreach_copy_([p.detach() for p in params],
                             [part.view_as(p) for part, p in zip(flat.split(sizes), params)])
