"""One collective call's record, and its time on the wire.

A `Collective` is one kind of call over one group, its bytes summed over an iteration on one
rank, as `mp.estimate.measure.CollectiveMeter` counts them: an all-reduce moves its tensor;
an all-gather its gathered output; a reduce-scatter its full input. On the wire, a ring
all-reduce over ``n`` ranks sends ``2 (n - 1) / n`` of that per rank, an all-gather,
reduce-scatter or all-to-all ``(n - 1) / n``, a send all of it (`seconds`), at NVLink's
bandwidth when the group shares a node and the network's otherwise (`group_bandwidth`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mp.estimate.attention_calls import exchange_sizes
from mp.estimate.hardware import GPUSpec
from mp.estimate.setup import Setup

FP64 = 8
GROUPS = ("tp", "cp", "cp_a2a", "cp_p2p", "dp", "dp_cp", "ep", "edp", "expert_norm", "pp",
          "embedding", "mp", "world", "intra_dp_cp", "intra_edp", "inter_dist_opt",
          "intra_dist_opt")  # the last four: the distributed optimizer's instances;
# ``expert_norm`` the EP ranks at one TP rank (`mp.parallel_state.get_expert_grad_norm_group`);
# ``cp_a2a`` and ``cp_p2p`` ``a2a+p2p``'s levels
# (`mp.parallel_state.get_hierarchical_context_parallel_groups`)
WIRE_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
               "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
               "broadcast": lambda n: (n - 1) / n,  # the layer-wise optimizer's owners'
               "send": lambda n: 1.0,
               "recv": lambda n: 0.0}  # a send's bytes are on the wire once, counted at send


@dataclass(frozen=True)
class Collective:
    """One kind of call over one group: ``bytes`` summed over an iteration on one rank."""

    what: str
    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all | send | recv
    group: str  # one of GROUPS
    bytes: float


def group_size(setup: Setup, group: str) -> int:
    heads, ring = exchange_sizes(setup.model)
    return {"tp": setup.tp, "cp": setup.cp, "cp_a2a": heads, "cp_p2p": ring,
            "dp": setup.data_parallel_size,
            "dp_cp": setup.gradient_group_size, "ep": setup.ep,
            "edp": setup.expert_data_parallel_size,
            "expert_norm": setup.ep * setup.etp // setup.tp, "pp": setup.pp, "embedding": 2,
            "mp": setup.tp * setup.pp, "world": setup.world_size,
            "intra_dp_cp": setup.optimizer_shard_size,
            "intra_edp": setup.expert_optimizer_shard_size,
            "inter_dist_opt": setup.distributed_optimizer_instances,
            "intra_dist_opt": setup.world_size // setup.distributed_optimizer_instances}[group]


def group_bandwidth(setup: Setup, group: str, gpu: GPUSpec) -> float:
    """Bytes/s per rank for ``group``'s traffic: NVLink when the whole group shares a node
    (ranks are laid out TP fastest, then CP, then DP, then PP; ``a2a+p2p``'s a2a group is A
    consecutive CP ranks, its p2p group every A-th one, across the CP group; the
    expert-parallel ranks are the data-parallel ranks next to each other, or with whole
    experts, ETP 1, EP consecutive ranks; with ``tp_pp_dp_mapping`` TP fastest, then PP,
    then DP), InfiniBand otherwise."""
    inner_pp = setup.tp_pp_dp_mapping  # a pipeline's ranks within tp x pp consecutive ones
    stage = setup.tp * setup.pp if inner_pp else setup.world_size  # pipeline groups' span
    data = setup.world_size if inner_pp else setup.tp * setup.cp * setup.data_parallel_size
    experts = setup.etp * setup.ep  # one copy of a stage's experts
    instance = data // setup.distributed_optimizer_instances
    span = {"tp": setup.tp, "cp": setup.tp * setup.cp,
            "cp_a2a": setup.tp * exchange_sizes(setup.model)[0], "cp_p2p": setup.tp * setup.cp,
            "dp": data, "dp_cp": data,
            "ep": experts, "edp": data, "expert_norm": experts,
            "pp": stage, "embedding": stage, "mp": stage, "world": setup.world_size,
            # an instance is DP x CP / N consecutive data-parallel ranks (of every stage)
            "intra_dp_cp": instance, "intra_edp": instance, "inter_dist_opt": data,
            "intra_dist_opt": (setup.world_size if setup.pp > 1 and not inner_pp
                               else instance)}[group]
    gbps = gpu.intra_node_gbps if span <= gpu.gpus_per_node else gpu.inter_node_gbps
    return gbps * 1e9


def seconds(setup: Setup, collective: Collective, gpu: GPUSpec) -> float:
    """Time on the wire of ``collective`` (bandwidth only; no latency, no overlap)."""
    n = group_size(setup, collective.group)
    wire = collective.bytes * WIRE_FACTOR[collective.kind](n)
    return wire / group_bandwidth(setup, collective.group, gpu)
