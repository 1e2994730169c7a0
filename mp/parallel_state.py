"""Process groups for tensor (TP), context (CP), pipeline (PP) and data (DP) parallelism.

This module holds the only global state in ``mp``. Ranks are laid out as Megatron-Core does,
TP fastest, then CP, then DP, then PP::

    rank = tp_rank + TP * (cp_rank + CP * (dp_rank + DP * pp_rank)),
    DP = world_size / (TP * CP * PP)

so that the ranks of one TP group are adjacent (same node, fastest links). For 16 ranks with
TP=2, PP=4: TP groups [0,1] [2,3] ...; DP groups [0,2] [1,3] [4,6] ...; PP groups
[0,4,8,12] [1,5,9,13] ...; embedding groups (first and last stage) [0,12] [1,13] ...
Megatron's other order (``use_tp_pp_dp_mapping``, ``--use-tp-pp-dp-mapping``; no CP or EP)
puts PP inside DP, ``rank = tp_rank + TP * (pp_rank + PP * dp_rank)``: for the same 16 ranks
PP groups [0,2,4,6] [1,3,5,7] [8,10,12,14] ..., DP groups [0,8] [1,9] ...

Context parallelism (`mp.model.context_parallel`) splits each sequence over the CP ranks;
they hold the same weights, so gradients are reduced over DP x CP together
(``get_data_parallel_group(with_context_parallel=True)``), while the data loader shards
samples over DP alone. With CP=1 (the default) the two groups are the same. Given
``hierarchical_context_parallel_sizes`` ``[A, P]`` (Megatron's, for ``--cp-comm-type
a2a+p2p``) each CP group also splits into groups of A consecutive CP ranks (all-to-all's) and
groups of every A-th one (the ring's): `get_hierarchical_context_parallel_groups`, laid out
by `mp.rank_layout.hierarchical_groups`.

Expert parallelism's groups and their getters: `mp.parallel_state_expert` (re-exported
here).

Several distributed-optimizer instances (Megatron-Core's
``num_distributed_optimizer_instances`` N, `mp.optim.DistributedOptimizer`) cut each DP x CP
group into N instances of DP x CP / N consecutive ranks of it: the optimizer state is sharded
inside an instance (``get_data_parallel_group(with_context_parallel=True,
partial_data_parallel=True)``, Megatron's intra-partial data-parallel group, and for experts
``get_expert_data_parallel_group(partial_expert_data_parallel=True)``: EDP / N consecutive EDP
ranks) and replicated across the instances (``get_inter_distributed_optimizer_instance_group``:
the N ranks at the same place in each instance, every (DP x CP / N)-th rank of the DP x CP
group; the same ranks for experts). ``get_intra_distributed_optimizer_instance_group`` is every
rank of this rank's instance (all TP, PP, EP ranks of its DP x CP slice): one copy of the whole
optimizer state. For 8 ranks at DP 8, N 2: intra [0,1,2,3] [4,5,6,7], inter [0,4] [1,5] ...
With N=1 (the default) no group is created: the intra groups are the DP x CP and EDP groups,
the inter group is None and the instance group is the world.

The getters carry Megatron's names so ported code runs unchanged, and the module doubles as
DeepSpeed's ``mpu``: DeepSpeed calls ``get_model_parallel_{world_size,rank,group}`` and
``get_data_parallel_{world_size,rank,group}``. "Model parallel" means TP x PP together, as in
Megatron-Core (with PP=1 it is the TP group, which is what older DeepSpeed code expects).
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from mp.instance_layout import instance_layout
from mp.parallel_groups import Groups, create_groups
from mp.parallel_state_expert import (  # noqa: F401  (Megatron's getters, here too)
    get_expert_data_parallel_group,
    get_expert_data_parallel_rank,
    get_expert_data_parallel_world_size,
    get_expert_grad_norm_group,
    get_expert_model_parallel_group,
    get_expert_model_parallel_rank,
    get_expert_model_parallel_world_size,
    get_expert_tensor_and_model_parallel_group,
    get_expert_tensor_and_model_parallel_rank,
    get_expert_tensor_and_model_parallel_world_size,
    get_expert_tensor_parallel_group,
    get_expert_tensor_parallel_rank,
    get_expert_tensor_parallel_world_size,
)
from mp.rank_layout import RankLayout, rank_layout  # noqa: F401  (``ps.rank_layout`` too)

_GROUPS: Groups | None = None


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: int | None = None,
                              *, context_parallel_size: int = 1,
                              hierarchical_context_parallel_sizes: list[int] | None = None,
                              expert_model_parallel_size: int = 1,
                              expert_tensor_parallel_size: int | None = None,
                              backend: str | None = None,
                              distributed_timeout_minutes: float = 10.0,
                              num_distributed_optimizer_instances: int = 1,
                              use_tp_pp_dp_mapping: bool = False) -> None:
    """Create the TP, CP, DP, DP x CP, PP, model-parallel and embedding groups over the
    default group, with ``hierarchical_context_parallel_sizes`` (product CP) the hierarchical
    CP groups, with ``expert_model_parallel_size`` > 1 the EP and EDP groups, and with
    ``num_distributed_optimizer_instances`` > 1 the distributed optimizer's instance groups
    (module doc; it must divide DP x CP and EDP).

    Every rank must call this with the same arguments (``torch.distributed`` must already be
    initialized). Sizes are checked before any collective. ``backend`` defaults to the default
    group's backend (``expert_tensor_parallel_size`` None: TP, module doc). A collective in
    any of the groups that waits longer than
    ``distributed_timeout_minutes`` for a peer fails instead of hanging (Megatron's
    ``--distributed-timeout-minutes``, the ``timeout`` of each group). With
    ``use_tp_pp_dp_mapping`` ranks are laid out TP fastest, then PP, then DP (Megatron's
    ``--use-tp-pp-dp-mapping``; no CP or EP; `mp.rank_layout`).
    """
    global _GROUPS
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group before initialize_model_parallel")
    if _GROUPS is not None:
        raise RuntimeError("model parallel groups are already initialized; "
                           "call destroy_model_parallel first")
    if not distributed_timeout_minutes > 0:
        raise ValueError(f"distributed_timeout_minutes={distributed_timeout_minutes!r} must be "
                         "> 0")
    vpp = virtual_pipeline_model_parallel_size
    if vpp is not None:
        if not isinstance(vpp, int) or vpp < 1:
            raise ValueError(f"virtual_pipeline_model_parallel_size={vpp!r} must be a positive "
                             "integer or None")
        if pipeline_model_parallel_size < 2:
            raise ValueError(
                f"virtual_pipeline_model_parallel_size={vpp} needs "
                f"pipeline_model_parallel_size > 1, got {pipeline_model_parallel_size}")
    layout = rank_layout(dist.get_world_size(), tensor_model_parallel_size,
                         pipeline_model_parallel_size, context_parallel_size,
                         expert_model_parallel_size, expert_tensor_parallel_size,
                         hierarchical_context_parallel_sizes, use_tp_pp_dp_mapping)
    etp, n = expert_tensor_parallel_size, num_distributed_optimizer_instances
    if etp not in (None, tensor_model_parallel_size) and n > 1:
        raise ValueError(f"num_distributed_optimizer_instances={n} with "
                         f"expert_tensor_parallel_size={etp} != "
                         f"tensor_model_parallel_size={tensor_model_parallel_size}: not "
                         "supported; use one instance")
    instances = instance_layout(layout, num_distributed_optimizer_instances)
    _GROUPS = create_groups(layout, instances, backend,
                            timedelta(minutes=distributed_timeout_minutes), vpp)


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


_WRITERS: dist.ProcessGroup | None = None  # `get_checkpoint_writer_group`'s


def get_checkpoint_writer_group() -> dist.ProcessGroup:
    """A gloo group of every rank for checkpoint writes in the background
    (`mp.checkpointing.async_save`), apart from training's collectives; made on the first
    call (collective then: every rank calls it) and forgotten with the other groups."""
    global _WRITERS
    _groups()  # model parallelism must be initialized
    if _WRITERS is None:
        _WRITERS = dist.new_group(backend="gloo")
    return _WRITERS


def destroy_model_parallel() -> None:
    """Forget the groups (the default group stays). Safe to call when not initialized."""
    global _GROUPS, _WRITERS
    if _WRITERS is not None:
        dist.destroy_process_group(_WRITERS)
        _WRITERS = None
    if _GROUPS is None:
        return
    groups = {id(g): g for g in _GROUPS.process_groups()}
    _GROUPS = None
    for group in groups.values():
        dist.destroy_process_group(group)


def _groups() -> Groups:
    if _GROUPS is None:
        raise RuntimeError("model parallel groups are not initialized: call "
                           "mp.parallel_state.initialize_model_parallel first")
    return _GROUPS


# --- groups -------------------------------------------------------------------------------

def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    return _groups().tensor


def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
    return _groups().pipeline


def get_context_parallel_group() -> dist.ProcessGroup:
    """The ranks that hold the parts of the same sequences (`mp.model.context_parallel`)."""
    return _groups().context


def get_hierarchical_context_parallel_groups() -> list[dist.ProcessGroup]:
    """This rank's group at each level of ``hierarchical_context_parallel_sizes``, ``[a2a
    group, p2p group]`` for ``[A, P]`` (module doc; Megatron-Core's getter, which Transformer
    Engine's ``attn_forward_func_with_cp`` takes as ``cp_group`` under ``a2a+p2p``)."""
    groups = _groups()
    if not groups.hierarchical_context:
        raise RuntimeError("no hierarchical context-parallel groups: initialize_model_parallel "
                           "was called without hierarchical_context_parallel_sizes")
    return list(groups.hierarchical_context)


def _partial(with_context_parallel: bool, partial_data_parallel: bool) -> bool:
    if partial_data_parallel and not with_context_parallel:
        raise ValueError("partial_data_parallel=True needs with_context_parallel=True: the "
                         "distributed optimizer's instances are slices of DP x CP (Megatron's "
                         "rule)")
    return partial_data_parallel


def get_data_parallel_group(with_context_parallel: bool = False,
                            partial_data_parallel: bool = False) -> dist.ProcessGroup:
    """The data-parallel ranks (which read different samples), or with
    ``with_context_parallel`` the DP x CP ranks, which reduce gradients together, or with
    ``partial_data_parallel`` too this rank's distributed-optimizer instance of them
    (Megatron's intra-partial group; module doc)."""
    groups = _groups()
    if _partial(with_context_parallel, partial_data_parallel):
        return groups.intra_partial_data
    return groups.data_with_context if with_context_parallel else groups.data


def get_inter_distributed_optimizer_instance_group() -> dist.ProcessGroup | None:
    """The ranks at this rank's place in each distributed-optimizer instance, which all-reduce
    their shards of the gradients (dense and experts'); None with one instance."""
    return _groups().inter_instance


get_inter_partial_data_parallel_group = get_inter_distributed_optimizer_instance_group  # older


def get_intra_distributed_optimizer_instance_group() -> dist.ProcessGroup:
    """Every rank of this rank's distributed-optimizer instance, which together hold one copy
    of the optimizer state (the world with one instance)."""
    return _groups().intra_instance


def get_num_distributed_optimizer_instances() -> int:
    """N: how many copies of the distributed optimizer's state the world holds."""
    return dist.get_world_size() // len(_groups().intra_instance_ranks)


def get_model_parallel_group() -> dist.ProcessGroup:
    """TP x PP ranks that together hold one replica of the model."""
    return _groups().model


def get_embedding_group() -> dist.ProcessGroup | None:
    """First and last pipeline stage (tied word embeddings); None on other stages."""
    return _groups().embedding


def is_rank_in_embedding_group() -> bool:
    return _groups().embedding is not None




# --- sizes and ranks ----------------------------------------------------------------------

def get_tensor_model_parallel_world_size() -> int:
    return len(_groups().tensor_ranks)


def get_tensor_model_parallel_rank() -> int:
    return _groups().tensor_ranks.index(dist.get_rank())


def get_pipeline_model_parallel_world_size() -> int:
    return len(_groups().pipeline_ranks)


def get_pipeline_model_parallel_rank() -> int:
    return _groups().pipeline_ranks.index(dist.get_rank())


def get_context_parallel_world_size() -> int:
    return len(_groups().context_ranks)


def get_context_parallel_rank() -> int:
    return _groups().context_ranks.index(dist.get_rank())


def get_context_parallel_global_ranks() -> list[int]:
    return list(_groups().context_ranks)


def _data_ranks(with_context_parallel: bool, partial_data_parallel: bool = False) -> list[int]:
    groups = _groups()
    if _partial(with_context_parallel, partial_data_parallel):
        return groups.intra_partial_data_ranks
    return groups.data_with_context_ranks if with_context_parallel else groups.data_ranks


def get_data_parallel_world_size(with_context_parallel: bool = False,
                                 partial_data_parallel: bool = False) -> int:
    return len(_data_ranks(with_context_parallel, partial_data_parallel))


def get_data_parallel_rank(with_context_parallel: bool = False,
                           partial_data_parallel: bool = False) -> int:
    return _data_ranks(with_context_parallel, partial_data_parallel).index(dist.get_rank())



def get_model_parallel_world_size() -> int:
    return len(_groups().model_ranks)


def get_model_parallel_rank() -> int:
    return _groups().model_ranks.index(dist.get_rank())


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (the source of TP broadcasts)."""
    return _groups().tensor_ranks[0]


def get_data_parallel_src_rank() -> int:
    return _groups().data_ranks[0]


def get_tensor_model_parallel_ranks() -> list[int]:
    return list(_groups().tensor_ranks)


def get_data_parallel_ranks() -> list[int]:
    return list(_groups().data_ranks)


def get_pipeline_model_parallel_ranks() -> list[int]:
    return list(_groups().pipeline_ranks)


# --- pipeline neighbours and stages -------------------------------------------------------

def get_pipeline_model_parallel_first_rank() -> int:
    return _groups().pipeline_ranks[0]


def get_pipeline_model_parallel_last_rank() -> int:
    return _groups().pipeline_ranks[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wraps around from the last stage to the first)."""
    ranks = _groups().pipeline_ranks
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous stage (wraps around from the first stage to the last)."""
    ranks = _groups().pipeline_ranks
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on the first stage; with virtual stages, only while model chunk 0 is current."""
    if not ignore_virtual and get_virtual_pipeline_model_parallel_world_size() is not None:
        if get_virtual_pipeline_model_parallel_rank() != 0:
            return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the last stage; with virtual stages, only while the last chunk is current."""
    vpp = get_virtual_pipeline_model_parallel_world_size()
    if not ignore_virtual and vpp is not None:
        if get_virtual_pipeline_model_parallel_rank() != vpp - 1:
            return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


# --- virtual pipeline stages (interleaved schedule) ---------------------------------------

def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    return _groups().virtual_pipeline_world_size


def get_virtual_pipeline_model_parallel_rank() -> int | None:
    return _groups().virtual_pipeline_rank


def set_virtual_pipeline_model_parallel_rank(rank: int) -> None:
    """Select the current model chunk (the interleaved schedule calls this before each step)."""
    vpp = get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        raise RuntimeError("no virtual pipeline stages: initialize_model_parallel was called "
                           "without virtual_pipeline_model_parallel_size")
    if not 0 <= rank < vpp:
        raise ValueError(f"virtual pipeline rank {rank} is outside [0, {vpp})")
    _groups().virtual_pipeline_rank = rank


# --- names DeepSpeed's ``mpu`` protocol adds ------------------------------------------------

def get_data_parallel_group_ranks() -> list[int]:
    """DeepSpeed's name for `get_data_parallel_ranks` (its checkpoint writers ask for it)."""
    return get_data_parallel_ranks()
