"""Megatron's rank layout: which global ranks form each group, as pure arithmetic (no
processes; `mp.parallel_state` creates the groups from it).

Ranks are laid out TP fastest, then CP, then DP, then PP; experts' ranks over the same ranks
of a stage as the expert TP ranks (ETP) fastest, then EP, then the expert-data-parallel ranks,
then PP (Megatron's "parallel folding"; `mp.parallel_state`'s doc has the formulas). Given
``hierarchical_context_parallel_sizes``, each CP group splits into levels too
(`hierarchical_groups`). With ``tp_pp_dp`` (Megatron's ``--use-tp-pp-dp-mapping``, its order
``tp-pp-dp``, without CP or EP) TP is fastest, then PP, then DP: rank ``t + TP (p + PP d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RankLayout:
    """Every group of each kind, as lists of global ranks (pure arithmetic, no processes)."""

    tensor: list[list[int]]
    context: list[list[int]]
    data: list[list[int]]
    data_with_context: list[list[int]]  # DP x CP: the ranks that reduce gradients together
    pipeline: list[list[int]]
    model: list[list[int]]
    embedding: list[list[int]]
    expert: list[list[int]]  # EP: the ranks that hold the different experts of a layer
    expert_data: list[list[int]]  # EDP: the ranks that hold the same experts
    expert_tensor: list[list[int]]  # ETP: the ranks that split each expert
    expert_tensor_and_model: list[list[int]]  # ETP x EP: one copy of a stage's experts
    expert_norm: list[list[int]]  # the EP ranks at one TP rank (`mp.parallel_state`)
    hierarchical_context: tuple[list[list[int]], ...] = ()  # each level's groups
    # (`hierarchical_groups`); none without hierarchical_context_parallel_sizes


def rank_layout(world_size: int, tensor_model_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1,
                context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                expert_tensor_parallel_size: int | None = None,
                hierarchical_context_parallel_sizes: list[int] | None = None,
                tp_pp_dp: bool = False) -> RankLayout:
    """Megatron's group layout for ``world_size`` ranks (``expert_tensor_parallel_size``
    None: TP; ``hierarchical_context_parallel_sizes`` None: no hierarchical CP groups;
    ``tp_pp_dp``: the module doc's other order); raises ValueError on impossible sizes."""
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    ep = expert_model_parallel_size
    etp = tp if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    for name, value in (("world_size", world_size), ("tensor_model_parallel_size", tp),
                        ("pipeline_model_parallel_size", pp), ("context_parallel_size", cp),
                        ("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world_size={world_size} is not divisible by tensor_model_parallel_size={tp} "
            f"x pipeline_model_parallel_size={pp}" + (
                f" x context_parallel_size={cp}" if cp > 1 else "") + f" = {tp * pp * cp}")
    check_hierarchical_sizes(hierarchical_context_parallel_sizes, cp)
    check_rank_order(tp_pp_dp, cp, ep)
    dp = world_size // (tp * pp * cp)
    if etp == tp and (dp * cp) % ep:
        raise ValueError(f"expert_model_parallel_size={ep} does not divide data_parallel_size x "
                         f"context_parallel_size = {dp} x {cp} = {dp * cp} (world_size="
                         f"{world_size}): the expert-parallel ranks are data-parallel ones")
    if (tp * dp * cp) % (etp * ep):
        raise ValueError(f"expert_tensor_parallel_size={etp} x expert_model_parallel_size={ep} "
                         f"does not divide tensor_model_parallel_size x data_parallel_size x "
                         f"context_parallel_size = {tp} x {dp} x {cp} = {tp * dp * cp} "
                         f"(world_size={world_size}): the experts' ranks are a stage's")
    coords = [(t, c, d, p) for p in range(pp) for d in range(dp) for c in range(cp)
              for t in range(tp)]  # in rank order
    if tp_pp_dp:
        coords.sort(key=lambda xs: (xs[2], xs[3], xs[0]))  # d slowest, then p, t fastest
    # experts' coordinates: (expert t, e, edp, p) from a stage's flat index t + TP (c + CP d)
    flat = [t + tp * (c + cp * d) for t, c, d, _ in coords]
    expert_coords = [(i % etp, i // etp % ep, i // (etp * ep), p)
                     for i, (_, _, _, p) in zip(flat, coords)]
    # the norm's: the EP ranks at one TP rank (the EP group itself with ETP = TP)
    norm_coords = [(t, e, edp, p) for (t, _, _, _), (_, e, edp, p) in zip(coords, expert_coords)]

    def groups(*varying: int, of: list[tuple] = coords) -> list[list[int]]:
        """The groups whose ranks differ only in the coordinates ``varying`` (0 t, 1 c, 2 d,
        3 p; experts' 1 e, 2 edp), each in rank order, the groups ordered by their first
        rank."""
        found: dict[tuple, list[int]] = {}
        for rank, xs in enumerate(of):
            key = tuple(x for i, x in enumerate(xs) if i not in varying)
            found.setdefault(key, []).append(rank)
        return sorted(found.values())

    pipeline, context = groups(3), groups(1)
    levels = hierarchical_context_parallel_sizes
    return RankLayout(tensor=groups(0), context=context, data=groups(2),
                      data_with_context=groups(1, 2), pipeline=pipeline, model=groups(0, 3),
                      embedding=[sorted({g[0], g[-1]}) for g in pipeline],
                      expert=groups(1, of=expert_coords), expert_data=groups(2, of=expert_coords),
                      expert_tensor=groups(0, of=expert_coords),
                      expert_tensor_and_model=groups(0, 1, of=expert_coords),
                      expert_norm=groups(1, of=norm_coords),
                      hierarchical_context=() if levels is None
                      else hierarchical_groups(context, levels))


def check_rank_order(tp_pp_dp: bool, context_parallel_size: int,
                     expert_model_parallel_size: int) -> None:
    """ValueError when the TP-PP-DP order (``tp_pp_dp``, Megatron's ``--use-tp-pp-dp-mapping``)
    meets context or expert parallelism, which it does not take (Megatron's rule)."""
    cp, ep = context_parallel_size, expert_model_parallel_size
    if tp_pp_dp and (cp > 1 or ep > 1):
        raise ValueError(f"the TP-PP-DP rank order (use_tp_pp_dp_mapping) takes neither context "
                         f"nor expert parallelism (Megatron's rule); got context_parallel_size="
                         f"{cp}, expert_model_parallel_size={ep}")


def check_hierarchical_sizes(sizes: list[int] | None, context_parallel_size: int) -> None:
    """ValueError unless ``sizes`` (Megatron's ``--hierarchical-context-parallel-sizes``) is
    None or positive integers whose product is ``context_parallel_size`` (Megatron's rule)."""
    if sizes is None:
        return
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError(f"hierarchical_context_parallel_sizes={sizes!r} must be a list of "
                         "positive integers")
    if math.prod(sizes) != context_parallel_size:
        raise ValueError(f"hierarchical_context_parallel_sizes={list(sizes)} multiply to "
                         f"{math.prod(sizes)}, not context_parallel_size="
                         f"{context_parallel_size}")


def hierarchical_groups(context: list[list[int]], sizes: list[int]
                        ) -> tuple[list[list[int]], ...]:
    """Each level's groups of the CP groups ``context`` split by ``sizes`` ``[s_0, s_1, ..]``
    (their product the CP size), as Megatron-Core's ``create_hierarchical_groups``
    (megatron/core/parallel_state.py) forms them: with a CP group's index written in the
    digits ``s_0`` (fastest), ``s_1``, ..., a level-``l`` group is the ranks of one CP group
    whose indices differ in digit ``l`` only. For ``[A, P]`` (``--cp-comm-type a2a+p2p``)
    the first level, all-to-all's, is ``A`` consecutive CP ranks ``[r_0 .. r_{A-1}]``,
    ``[r_A .. r_{2A-1}]``, ..., and the second, the ring's, every ``A``-th one ``[r_0, r_A,
    r_{2A}, ..]``, ``[r_1, r_{A+1}, ..]``, ... Each group in CP order, the groups of a level
    ordered by their first rank."""
    levels = []
    for level, size in enumerate(sizes):
        inner = math.prod(sizes[:level])  # the stride of digit ``level``
        levels.append(sorted([ranks[base + offset + inner * i] for i in range(size)]
                             for ranks in context
                             for base in range(0, len(ranks), inner * size)
                             for offset in range(inner)))
    return tuple(levels)
