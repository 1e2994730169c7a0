"""This rank's process groups, created from the rank layout (`mp.rank_layout`,
`mp.instance_layout`); `mp.parallel_state` keeps them and answers the queries about them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import timedelta

import torch.distributed as dist

from mp.instance_layout import InstanceLayout
from mp.rank_layout import RankLayout

_KINDS = ("tensor", "context", "data", "data_with_context", "pipeline", "model", "embedding",
          "expert", "expert_data", "expert_tensor", "expert_tensor_and_model", "expert_norm")
_INSTANCE_KINDS = ("intra_partial_data", "intra_partial_expert_data", "inter_instance",
                   "intra_instance")

# the expert kinds that are None when each has one rank, and the groups each may equal
_NONE_WHEN_ONE_RANK = ("expert", "expert_tensor", "expert_tensor_and_model", "expert_norm")
_SAME_RANKS = {"expert_data": ("data_with_context",), "expert_tensor": ("tensor",),
               "expert_tensor_and_model": ("tensor", "expert"), "expert_norm": ("expert",)}

GroupAndRanks = tuple[dist.ProcessGroup | None, list[int]]


@dataclass
class Groups:
    """This rank's groups and the global ranks in each."""

    tensor: dist.ProcessGroup
    tensor_ranks: list[int]
    context: dist.ProcessGroup
    context_ranks: list[int]
    data: dist.ProcessGroup
    data_ranks: list[int]
    data_with_context: dist.ProcessGroup
    data_with_context_ranks: list[int]
    pipeline: dist.ProcessGroup
    pipeline_ranks: list[int]
    model: dist.ProcessGroup
    model_ranks: list[int]
    embedding: dist.ProcessGroup | None  # None on ranks that hold no embedding
    embedding_ranks: list[int]
    expert: dist.ProcessGroup | None  # None with EP=1
    expert_ranks: list[int]
    expert_data: dist.ProcessGroup
    expert_data_ranks: list[int]
    expert_tensor: dist.ProcessGroup | None  # ETP; None with ETP=1
    expert_tensor_ranks: list[int]
    expert_tensor_and_model: dist.ProcessGroup | None  # ETP x EP; None when one rank
    expert_tensor_and_model_ranks: list[int]
    expert_norm: dist.ProcessGroup | None  # the EP ranks at this TP rank; None when one rank
    expert_norm_ranks: list[int]
    intra_partial_data: dist.ProcessGroup  # one distributed-optimizer instance: the DP x CP
    intra_partial_data_ranks: list[int]  # group with N=1
    intra_partial_expert_data: dist.ProcessGroup  # ... of the EDP group (N=1: the EDP group)
    intra_partial_expert_data_ranks: list[int]
    inter_instance: dist.ProcessGroup | None  # across the instances; None with N=1
    inter_instance_ranks: list[int]
    intra_instance: dist.ProcessGroup  # every rank of the instance; N=1: the world
    intra_instance_ranks: list[int]
    virtual_pipeline_world_size: int | None
    virtual_pipeline_rank: int | None
    # a group per level of the hierarchical CP sizes (``[a2a, p2p]``); none without them
    hierarchical_context: list[dist.ProcessGroup] = field(default_factory=list)
    hierarchical_context_ranks: list[list[int]] = field(default_factory=list)

    def process_groups(self) -> list[dist.ProcessGroup]:
        """The groups created for this rank (not None, not the world)."""
        values = [getattr(self, f.name) for f in fields(self)]
        return [group for value in values for group in
                (value if isinstance(value, list) else [value])
                if isinstance(group, dist.ProcessGroup) and group is not dist.group.WORLD]


def create_groups(layout: RankLayout, instances: InstanceLayout, backend: str | None,
                  timeout: timedelta, virtual_pipeline_world_size: int | None) -> Groups:
    """Create every group of ``layout`` and ``instances`` (collective: every rank creates
    every group, in the same order) and return this rank's."""
    me = dist.get_rank()
    mine: dict[str, GroupAndRanks] = {}
    for kind in _KINDS:
        mine[kind] = (None, [])  # only "embedding" can stay empty (middle stages)
        same = [k for k in _SAME_RANKS.get(kind, ())
                if getattr(layout, k) == getattr(layout, kind)]
        if kind in _NONE_WHEN_ONE_RANK and len(getattr(layout, kind)[0]) == 1:
            mine[kind] = (None, [me])  # no groups of a single rank each (EP=1, ETP=1)
        elif same:  # the ranks of a group made already (EDP = DP x CP with EP=1, ETP = TP)
            mine[kind] = mine[same[0]]
        else:
            mine[kind] = _create(getattr(layout, kind), me, backend, timeout)
    made = _instance_groups(instances, mine, me, backend, timeout)
    levels = [mine["context"] if level == layout.context  # a level of every CP rank
              else _create(level, me, backend, timeout) for level in layout.hierarchical_context]
    vpp = virtual_pipeline_world_size
    return Groups(*(part for kind in _KINDS for part in mine[kind]),
                  *(part for kind in _INSTANCE_KINDS for part in made[kind]),
                  virtual_pipeline_world_size=vpp,
                  virtual_pipeline_rank=0 if vpp is not None else None,
                  hierarchical_context=[group for group, _ in levels],
                  hierarchical_context_ranks=[ranks for _, ranks in levels])


def _create(all_ranks: list[list[int]], me: int, backend, timeout) -> GroupAndRanks:
    """Create a group for each of ``all_ranks``; return the one holding ``me``."""
    found: GroupAndRanks = (None, [])
    for ranks in all_ranks:
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        if me in ranks:
            found = (group, ranks)
    return found


def _instance_groups(layout: InstanceLayout, mine: dict[str, GroupAndRanks], me: int,
                     backend, timeout) -> dict[str, GroupAndRanks]:
    """This rank's distributed-optimizer instance groups and their ranks by kind; with one
    instance the groups they equal (`mp.parallel_state`'s doc), none created."""
    if len(layout.intra_instance) == 1:
        return {"intra_partial_data": mine["data_with_context"],
                "intra_partial_expert_data": mine["expert_data"],
                "inter_instance": (None, [me]),
                "intra_instance": (dist.group.WORLD, list(range(dist.get_world_size())))}
    made = {}
    for kind in _INSTANCE_KINDS:
        if kind == "intra_partial_expert_data" and mine["expert"][0] is None:
            made[kind] = made["intra_partial_data"]  # EP=1: the same ranks
        else:
            made[kind] = _create(getattr(layout, kind), me, backend, timeout)
    return made
