"""The distributed optimizer's instances as rank arithmetic (Megatron-Core's
``num_distributed_optimizer_instances``; `mp.parallel_state` creates the groups from it).

N instances cut each DP x CP group (as `mp.rank_layout.RankLayout.data_with_context` lists it)
into N slices of ``DP x CP / N`` consecutive ranks, and each expert-data-parallel group into N
slices of ``EDP / N``. An instance shards the optimizer state over its slice and the instances
hold copies of it, reduced together across instances by the rank at the same place in each.
"""

from __future__ import annotations

from dataclasses import dataclass

from mp.rank_layout import RankLayout


@dataclass(frozen=True)
class InstanceLayout:
    """Every group of each kind, as lists of global ranks."""

    intra_partial_data: list[list[int]]  # DP x CP / N consecutive ranks of a DP x CP group
    intra_partial_expert_data: list[list[int]]  # EDP / N consecutive ranks of an EDP group
    inter_instance: list[list[int]]  # the N ranks at the same place in each instance
    intra_instance: list[list[int]]  # every rank of one instance (world / N)


def check_instances(num_distributed_optimizer_instances: int, data_parallel_size: int,
                    context_parallel_size: int = 1, expert_model_parallel_size: int = 1) -> None:
    """Raise ValueError unless N is a positive integer dividing DP x CP, and (experts) EDP =
    DP x CP / EP (Megatron-Core's rules)."""
    n, dp, cp, ep = (num_distributed_optimizer_instances, data_parallel_size,
                     context_parallel_size, expert_model_parallel_size)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_distributed_optimizer_instances={n!r} must be a positive integer")
    if (dp * cp) % n:
        raise ValueError(f"num_distributed_optimizer_instances={n} does not divide "
                         f"data_parallel_size x context_parallel_size = {dp} x {cp} = {dp * cp}: "
                         "each instance is an equal slice of the data-parallel ranks")
    if (dp * cp // ep) % n:
        raise ValueError(f"num_distributed_optimizer_instances={n} does not divide the expert "
                         f"data-parallel size = {dp} x {cp} / expert_model_parallel_size={ep} = "
                         f"{dp * cp // ep}: each instance holds an equal slice of the ranks "
                         "that share an expert")


def instance_layout(layout: RankLayout, num_distributed_optimizer_instances: int
                    ) -> InstanceLayout:
    """The instance groups of ``layout`` for N instances (checked by `check_instances`)."""
    n = num_distributed_optimizer_instances
    dp_cp = layout.data_with_context
    check_instances(n, len(dp_cp[0]), 1, len(dp_cp[0]) // len(layout.expert_data[0]))
    size = len(dp_cp[0]) // n
    expert_size = len(layout.expert_data[0]) // n
    place = {rank: i for group in dp_cp for i, rank in enumerate(group)}  # in DP x CP
    instances: dict[int, list[int]] = {}
    for rank in sorted(place):
        instances.setdefault(place[rank] // size, []).append(rank)
    return InstanceLayout(
        intra_partial_data=[g[i * size:(i + 1) * size] for g in dp_cp for i in range(n)],
        intra_partial_expert_data=[g[i * expert_size:(i + 1) * expert_size]
                                   for g in layout.expert_data for i in range(n)],
        inter_instance=[g[i::size] for g in dp_cp for i in range(size)],
        intra_instance=[instances[i] for i in range(n)])
