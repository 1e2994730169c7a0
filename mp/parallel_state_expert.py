"""The expert-parallel groups' getters, re-exported by `mp.parallel_state` (which keeps the
groups: this module holds no state of its own).

Expert parallelism (EP, `mp.model.moe`) splits the experts of each mixture-of-experts layer
over EP ranks taken from DP x CP, as Megatron-Core lays them out for experts (TP fastest, then
EP, then the expert-data-parallel ranks, then PP, with the expert TP size equal to TP)::

    rank = tp_rank + TP * (ep_rank + EP * (edp_rank + EDP * pp_rank)),  EDP = DP x CP / EP

so an EP group is EP consecutive DP ranks of one TP rank and stage. Expert weights are
replicated over the EDP ranks only, and their gradients are reduced there
(``get_expert_data_parallel_group``). With EP=1 no expert group is created (the EP group is
None) and the EDP group is the DP x CP group.

With ``expert_tensor_parallel_size`` ETP = 1 under TP > 1 (Megatron's "parallel folding":
each expert whole on one rank) the experts' coordinates run over a stage's TP x CP x DP ranks
with the expert TP rank fastest, then EP, then EDP::

    tp_rank + TP * (cp_rank + CP * dp_rank) = etp_rank + ETP * (ep_rank + EP * edp_rank),
    EDP = TP x CP x DP / (ETP x EP)

so the TP ranks serve as EP ranks too (EP up to TP x CP x DP). The expert TP group
(``get_expert_tensor_parallel_group``) is the TP group with ETP = TP and None with ETP = 1;
``get_expert_tensor_and_model_parallel_group`` is ETP x EP, one copy of a stage's experts.
The experts' squared gradient norm is summed over ``get_expert_grad_norm_group`` (the EP
ranks at this rank's TP rank: the EP group with ETP = TP), then with the rest over TP x PP,
so each expert element counts once (with ETP = 1, EP a multiple of TP).
"""

from __future__ import annotations

import torch.distributed as dist

from mp.parallel_groups import Groups


def _groups() -> Groups:
    """`mp.parallel_state`'s groups (imported here, when called: that module imports this
    one)."""
    from mp.parallel_state import _groups

    return _groups()


def get_expert_model_parallel_group() -> dist.ProcessGroup | None:
    """The ranks that split the experts of a layer between them (None with EP=1)."""
    return _groups().expert


def get_expert_data_parallel_group(partial_expert_data_parallel: bool = False
                                   ) -> dist.ProcessGroup:
    """The ranks that hold the same experts and reduce their gradients together, or with
    ``partial_expert_data_parallel`` this rank's distributed-optimizer instance of them."""
    groups = _groups()
    return groups.intra_partial_expert_data if partial_expert_data_parallel \
        else groups.expert_data


def get_expert_tensor_parallel_group() -> dist.ProcessGroup | None:
    """The ranks that split each expert (ETP): the TP group, or None with ETP=1."""
    return _groups().expert_tensor


def get_expert_tensor_and_model_parallel_group() -> dist.ProcessGroup | None:
    """ETP x EP: the ranks that together hold one copy of a stage's experts (None: one)."""
    return _groups().expert_tensor_and_model


def get_expert_grad_norm_group() -> dist.ProcessGroup | None:
    """The EP ranks at this rank's TP rank (the EP group with ETP = TP; None: one rank): the
    experts' squared gradient norm, summed here, then with the rest over TP x PP, counts each
    expert element once (module doc)."""
    return _groups().expert_norm


def get_expert_model_parallel_world_size() -> int:
    return len(_groups().expert_ranks)


def get_expert_model_parallel_rank() -> int:
    return _groups().expert_ranks.index(dist.get_rank())


def _expert_data_ranks(partial_expert_data_parallel: bool) -> list[int]:
    groups = _groups()
    return groups.intra_partial_expert_data_ranks if partial_expert_data_parallel \
        else groups.expert_data_ranks


def get_expert_data_parallel_world_size(partial_expert_data_parallel: bool = False) -> int:
    return len(_expert_data_ranks(partial_expert_data_parallel))


def get_expert_data_parallel_rank(partial_expert_data_parallel: bool = False) -> int:
    return _expert_data_ranks(partial_expert_data_parallel).index(dist.get_rank())


def get_expert_tensor_parallel_world_size() -> int:
    return len(_groups().expert_tensor_ranks)


def get_expert_tensor_parallel_rank() -> int:
    return _groups().expert_tensor_ranks.index(dist.get_rank())


def get_expert_tensor_and_model_parallel_world_size() -> int:
    return len(_groups().expert_tensor_and_model_ranks)


def get_expert_tensor_and_model_parallel_rank() -> int:
    return _groups().expert_tensor_and_model_ranks.index(dist.get_rank())
