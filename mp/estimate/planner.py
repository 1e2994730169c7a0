"""The layout planner: every valid way to split a job over N GPUs, the ones that fit, fastest
first.

A layout is a tensor-parallel size ``t`` (a divisor of N no larger than a node, so TP traffic
stays on NVLink), a context-parallel size ``c`` (from ``context_parallel_sizes``: 1 unless
asked, as it pays only for long sequences; with ``c > 1``, each of ``cp_comm_types``, by
default the job's, ``a2a+p2p`` at each ``[A, P]`` with ``A P = c``, both above 1:
`hierarchical_splits`), a pipeline size ``p`` (dividing ``N / (t c)``), virtual stages ``v`` (with
``p > 1``), a micro-batch size, a recompute mode (`recompute_fields`: none; selective
recompute of the attention core, Megatron's default; of the modules that free outputs
instead of keeping them, which rerun no matrix product but multi-latent attention's up
projections; of every part a layer's selective recompute can take; full with one layer per
checkpoint: `default_recompute_modes`) and sequence parallelism (on with ``t > 1`` by
default: it only saves memory).
With ``uneven_splits`` the planner also tries Megatron's uneven pipeline splits that count the
embedding and/or the loss as a layer (`PIPELINE_SPLITS`): they balance the first and last
stages, and they let ``p v`` divide ``L + 1`` or ``L + 2`` when it does not divide ``L``.
Data parallelism takes the rest, ``N / (t c p)``; a mixture-of-experts model also tries each
expert-parallel size ``e`` (from ``expert_parallel_sizes``, by default every one its experts
and ``DP x CP`` allow). Each candidate is built as the training job
would be built, through `mp.model.TransformerConfig` and `mp.config.JobConfig.validate`, so
the planner knows the same rules (heads divisible by ``t``, the sequence by ``2 c``, layers by
``p v``, experts and ``DP x CP`` by ``e``, the global batch
by ``micro-batch x DP``, micro-batches by ``p`` when interleaving); a candidate that breaks
one is not a layout. The rest are estimated, those whose busiest rank exceeds
``memory_fraction`` of the GPU's memory are dropped, and the others are ranked by predicted
tokens per second; among equals, the one recomputing least (`recompute_work`), then the one
using less memory.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from mp.config import JobConfig
from mp.estimate.estimate import Estimate, estimate, fits
from mp.estimate.hardware import GPUSpec
from mp.estimate.memory import stage_memory
from mp.estimate.setup import Setup
from mp.estimate.step_time import DEFAULT_EFFICIENCY
from mp.estimate.storage import CUDA, Kernels
from mp.model.config import TransformerConfig
from mp.model.config_rules import RECOMPUTE_MODULES
from mp.model.pipeline_split import UNEVEN_SPLIT_FIELDS

RECOMPUTE_MODES = ("none", "selective", "full")  # and selective modules joined by "+"
#: The pipeline splits the planner can try -> the `TransformerConfig` fields that make them.
PIPELINE_SPLITS = {
    "even": {},
    "emb": {"account_for_embedding_in_pipeline_split": True},
    "loss": {"account_for_loss_in_pipeline_split": True},
    "emb+loss": {"account_for_embedding_in_pipeline_split": True,
                 "account_for_loss_in_pipeline_split": True},
}
DEFAULT_MICRO_BATCH_SIZES = (1, 2, 4, 8)
DEFAULT_MEMORY_FRACTION = 0.9  # allocator fragmentation, CUDA context, NCCL buffers


@dataclass(frozen=True)
class PlanResult:
    """The planner's answer: the layouts that fit, fastest first, and how many were tried."""

    fitting: list[Estimate]
    valid: int  # layouts that the job's rules allow
    too_big: int  # of those, layouts that do not fit memory


def recompute_fields(mode: str) -> dict:
    """The `TransformerConfig` recompute fields of a planner mode: ``"none"``; ``"full"``
    (uniform, one layer a checkpoint); ``"selective"`` (``core_attn``, Megatron's default); or
    `RECOMPUTE_MODULES` joined by ``+`` (``"layernorm+moe_act"``: selective recompute of
    those)."""
    fields = {"recompute_granularity": None, "recompute_modules": None,
              "recompute_method": None, "recompute_num_layers": None}
    if mode == "none":
        return fields
    if mode == "full":
        return {**fields, "recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    modules = ["core_attn"] if mode == "selective" else mode.split("+")
    for module in modules:
        if module not in RECOMPUTE_MODULES:
            raise ValueError(f"recompute mode {mode!r}: {module!r} is none of "
                             f"{', '.join(RECOMPUTE_MODES)} or {', '.join(RECOMPUTE_MODULES)}")
    return {**fields, "recompute_granularity": "selective", "recompute_modules": modules}


def recompute_mode(cfg: TransformerConfig) -> str:
    """``cfg``'s recompute as a planner mode (`recompute_fields`)."""
    if cfg.recompute_granularity != "selective":
        return cfg.recompute_granularity or "none"
    return "selective" if cfg.recompute_modules == ["core_attn"] \
        else "+".join(cfg.recompute_modules)


def default_recompute_modes(cfg: TransformerConfig) -> tuple[str, ...]:
    """The modes the planner tries for ``cfg``'s model: none; ``selective`` (the attention
    core); the output-freeing modules it has (``layernorm``, ``moe_act`` with experts,
    ``mla_up_proj`` with multi-latent attention: they rerun norms, activations and the up
    projections only); every part selective recompute can take (those with ``moe`` for
    ``moe_act``, ``mlp`` where a layer is dense, ``core_attn``); full."""
    moe = cfg.num_moe_experts is not None
    mla = ["mla_up_proj"] if cfg.multi_latent_attention else []
    cheap = ["layernorm", *(["moe_act"] if moe else []), *mla]
    dense = not moe or not all(map(cfg.is_moe_layer, range(cfg.num_layers)))
    every = ["layernorm", *(["moe"] if moe else []), *(["mlp"] if dense else []), *mla,
             "core_attn"]
    return ("none", "selective", "+".join(cheap), "+".join(every), "full")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def hierarchical_splits(cp: int, comm: str) -> list[list[int] | None]:
    """The ``hierarchical_context_parallel_sizes`` tried for exchange ``comm`` at CP ``cp``:
    for ``a2a+p2p`` under CP every ``[A, P]``, all-to-all in groups of ``A`` and the ring
    across ``P`` of them, ``A P = cp``, both above 1 (one of them 1 is ``p2p`` or ``a2a``);
    none for the other exchanges."""
    if comm != "a2a+p2p" or cp == 1:
        return [None]
    return [[a, cp // a] for a in _divisors(cp) if 1 < a < cp]


def candidate_setups(job: JobConfig, world_size: int,
                     micro_batch_sizes: tuple[int, ...] = DEFAULT_MICRO_BATCH_SIZES,
                     recompute_modes: tuple[str, ...] | None = None,
                     sequence_parallel: tuple[bool, ...] = (True,),
                     max_tensor_parallel: int = 8,
                     distributed_optimizer: bool | None = None,
                     uneven_splits: bool = False,
                     context_parallel_sizes: tuple[int, ...] = (1,),
                     cp_comm_types: tuple[str, ...] | None = None,
                     expert_parallel_sizes: tuple[int, ...] | None = None,
                     expert_tensor_parallel_sizes: tuple[int | None, ...] | None = None,
                     tp_pp_dp_orders: tuple[bool, ...] | None = None) -> list[Setup]:
    """Every layout of ``job``'s model on ``world_size`` GPUs that its rules allow.
    ``sequence_parallel`` lists the values tried when ``t > 1`` (``t = 1`` has none);
    ``distributed_optimizer`` defaults to the job's ``training.use_distributed_optimizer``;
    ``uneven_splits`` adds `PIPELINE_SPLITS` beyond the even one; ``context_parallel_sizes``
    lists the CP sizes tried, each ``c > 1`` with every one of ``cp_comm_types`` (default: the
    job's ``model.cp_comm_type``); ``expert_parallel_sizes`` the EP sizes (default: every
    divisor of ``world_size`` for a mixture-of-experts model, 1 otherwise),
    ``expert_tensor_parallel_sizes`` the ETP sizes (None: TP; default the job's);
    ``tp_pp_dp_orders`` the rank orders (True: Megatron's TP-PP-DP, without CP or EP; default
    the job's ``training.use_tp_pp_dp_mapping``);
    ``recompute_modes`` the `recompute_fields` modes (default `default_recompute_modes`)
    (module doc)."""
    if recompute_modes is None:
        recompute_modes = default_recompute_modes(job.model)
    for mode in recompute_modes:
        recompute_fields(mode)  # a ValueError for a mode that is none
    if distributed_optimizer is None:
        distributed_optimizer = job.training.use_distributed_optimizer
    splits = PIPELINE_SPLITS if uneven_splits else {"even": {}}
    comms = cp_comm_types or (job.model.cp_comm_type,)
    if expert_parallel_sizes is None:
        expert_parallel_sizes = (1,) if job.model.num_moe_experts is None \
            else tuple(_divisors(world_size))
    if expert_tensor_parallel_sizes is None:
        expert_tensor_parallel_sizes = (job.model.expert_tensor_parallel_size,)
    if tp_pp_dp_orders is None:
        tp_pp_dp_orders = (job.training.use_tp_pp_dp_mapping,)
    setups, seen = [], set()
    layouts = ((cp, comm, levels, tp) for cp in context_parallel_sizes if world_size % cp == 0
               for comm in (comms if cp > 1 else comms[:1])
               for levels in hierarchical_splits(cp, comm)
               for tp in _divisors(world_size // cp) if tp <= max_tensor_parallel)
    for cp, comm, levels, tp in layouts:
        for pp, split in itertools.product(_divisors(world_size // (tp * cp)), splits.values()):
            layers = job.model.num_layers + len(split)  # each counted part is one "layer"
            if layers % pp or (pp == 1 and split):
                continue
            vpps = [None] + ([v for v in _divisors(layers // pp) if v > 1] if pp > 1 else [])
            sps = sequence_parallel if tp > 1 else (False,)
            etps = {None if etp == tp else etp for etp in expert_tensor_parallel_sizes}
            for vpp, sp, ep, etp, mbs, mode, order in itertools.product(
                    vpps, sps, expert_parallel_sizes, sorted(etps, key=str), micro_batch_sizes,
                    recompute_modes, tp_pp_dp_orders):
                setup = _setup(job, world_size, mbs, distributed_optimizer, order, {
                    **UNEVEN_SPLIT_FIELDS, **split, "tensor_model_parallel_size": tp,
                    "context_parallel_size": cp, "cp_comm_type": comm,
                    "hierarchical_context_parallel_sizes": levels,
                    "expert_model_parallel_size": ep, "expert_tensor_parallel_size": etp,
                    "pipeline_model_parallel_size": pp,
                    "virtual_pipeline_model_parallel_size": vpp, "sequence_parallel": sp,
                    **recompute_fields(mode), "distribute_saved_activations": False})
                if setup is None:
                    continue
                # an uneven split that puts the layers where the even one does is the same
                key = (tp, cp, comm, levels and tuple(levels), pp, vpp, sp, ep, etp, mbs, mode,
                       order, setup.model.chunk_layer_counts)
                if key not in seen:
                    seen.add(key)
                    setups.append(setup)
    return setups


def split_name(setup: Setup) -> str:
    """The `PIPELINE_SPLITS` name of ``setup``'s pipeline split."""
    model = setup.model
    return next(name for name, fields in PIPELINE_SPLITS.items()
                if all(getattr(model, key) == fields.get(key, False) for key in
                       PIPELINE_SPLITS["emb+loss"]))


def _setup(job: JobConfig, world_size: int, mbs: int, distributed_optimizer: bool,
           tp_pp_dp: bool, model_fields: dict) -> Setup | None:
    """The layout (``model_fields`` of the job's model, in the rank order ``tp_pp_dp``) as a
    job would build it, or None when a rule of the job forbids it."""
    try:
        model = dataclasses.replace(job.model, **model_fields)
        training = dataclasses.replace(job.training, micro_batch_size=mbs,
                                       use_distributed_optimizer=distributed_optimizer,
                                       use_tp_pp_dp_mapping=tp_pp_dp)
        return Setup.from_job(dataclasses.replace(job, model=model, training=training),
                              world_size)
    except ValueError:  # TransformerConfig's and JobConfig's rules (ConfigError is one)
        return None


def recompute_work(cfg: TransformerConfig) -> int:
    """How much a config recomputes, for ranking equally fast layouts: 0 without recompute,
    the number of selective modules, more than all of them for full recompute. The step-time
    estimate counts matrix products only, so the norms' and activations' reruns look free;
    they are not."""
    if cfg.recompute_granularity == "full":
        return len(RECOMPUTE_MODULES) + 1
    return len(cfg.recompute_modules or ()) if cfg.recompute_granularity else 0


def plan(job: JobConfig, world_size: int, gpu: GPUSpec, *,
         efficiency: float = DEFAULT_EFFICIENCY,
         memory_fraction: float = DEFAULT_MEMORY_FRACTION, kernels: Kernels = CUDA,
         **candidates) -> PlanResult:
    """Estimate every `candidate_setups` layout (``candidates`` are its keyword arguments),
    keep those that fit in ``memory_fraction`` of ``gpu``'s memory, fastest first."""
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction={memory_fraction} must be in (0, 1]")
    setups = candidate_setups(job, world_size, **candidates)
    fitting = []
    for setup in setups:  # memory first, stage by stage: the rest only for a layout that fits
        stages = []
        for pp_rank in range(setup.pp):
            stages.append(stage_memory(setup, pp_rank, kernels))
            if not fits(stages[-1:], gpu, memory_fraction):
                break
        else:
            fitting.append(estimate(setup, gpu, efficiency, kernels, stages=stages))
    fitting.sort(key=lambda e: (-e.tokens_per_second, recompute_work(e.setup.model),
                                e.peak_bytes))
    return PlanResult(fitting=fitting, valid=len(setups), too_big=len(setups) - len(fitting))
