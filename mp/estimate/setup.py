"""`Setup`: what an estimate is of: a model split one way over a number of GPUs, fed one way.

The model and its split (TP, CP, PP, virtual stages, EP, sequence parallelism, recompute,
precision) are a `mp.model.TransformerConfig`, which checks its own rules; the rest is the
data-parallel size, the batch and the optimizer. `Setup.from_job` takes them from a job
config, so that the estimator reads the same YAML files (and overrides) as the training job.
"""

from __future__ import annotations

from dataclasses import dataclass

from mp.config import JobConfig
from mp.instance_layout import check_instances
from mp.rank_layout import check_rank_order

#: Bytes per element of an AdamW moment stored in each dtype (the precision-aware optimizer).
STATE_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
from mp.estimate.storage import expert_tensor_parallel_size
from mp.model.config import TransformerConfig
from mp.model.pipeline_split import uneven_stages_text
from mp.optim.muon import MuonSettings
from mp.optim.update_rules import OPTIMIZERS


@dataclass(frozen=True)
class Setup:
    """A model, its parallel layout and its batch, as one training job would run them.

    Args:
        model: shape, TP/CP/PP/virtual-stage sizes, sequence parallelism, recompute,
            precision; for a mixture-of-experts model the experts, EP and ETP (ETP x EP
            divides TP x DP x CP: the experts' ranks are a stage's; with ETP = TP, EP divides
            DP x CP).
        data_parallel_size: DP; the job runs on ``TP x CP x PP x DP`` GPUs.
        micro_batch_size: sequences per micro-batch on one data-parallel rank.
        num_microbatches: micro-batches per iteration on each data-parallel rank
            (``global batch / (micro_batch_size x DP)``).
        distributed_optimizer: optimizer state (fp32 master weights and Adam moments) sharded
            over the DP (x CP) ranks (Megatron's distributed optimizer,
            `mp.optim.DistributedOptimizer`).
        grad_reduce_in_bf16: gradients accumulated and reduced in bf16, not fp32 (Megatron's
            ``--grad-reduce-in-bf16``; bf16 models only).
        distributed_optimizer_instances: N copies of the distributed optimizer's state, each
            sharded over DP x CP / N ranks (Megatron's ``--num-distributed-optimizer-
            instances``; N divides DP x CP and the experts' EDP).
        exp_avg_dtype, exp_avg_sq_dtype: the AdamW moments' storage dtypes, fp32, bf16 or
            fp16 (Megatron's precision-aware optimizer, `mp.optim.PrecisionAwareAdamW`).
        optimizer: the update rule, ``adam`` (two moments per parameter), ``sgd`` (one
            fp32 momentum buffer, no step counter) or ``muon`` (SGD's buffer for the layers'
            matrices, AdamW's state for the rest; without the distributed optimizer and
            FSDP, as Megatron's rule).
        fully_sharded: FSDP2 (Megatron's ``--use-torch-fsdp2``, `mp.distributed.torch_fsdp2`):
            weights, gradients and optimizer state sharded over DP x CP, the weights gathered
            for each forward; ``reshard_after_forward`` gathers them again for each backward.
        muon: Muon's settings (`mp.optim.MuonSettings`, the job's ``muon_*`` keys): its
            Newton-Schulz steps, TP mode, QKV split and matmul precision set the step's
            matrix products (`mp.estimate.newton_schulz`).
        tp_pp_dp_mapping: ranks laid out TP fastest, then PP, then DP (Megatron's
            ``--use-tp-pp-dp-mapping``; no CP or EP): which groups share a node
            (`mp.estimate.collective.group_bandwidth`).
        optimizer_offload_fraction: the first F of each rank's optimizer elements keep their
            fp32 masters and moments in host memory (Megatron's ``--optimizer-cpu-offload``
            with ``--optimizer-offload-fraction F``, `mp.optim.MixedPrecisionOptimizer`'s
            ``cpu_offload``); 0: none. Not with Muon or FSDP (the job's rule).
    """

    model: TransformerConfig
    data_parallel_size: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    distributed_optimizer: bool = False
    grad_reduce_in_bf16: bool = False
    distributed_optimizer_instances: int = 1
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    optimizer: str = "adam"
    fully_sharded: bool = False
    reshard_after_forward: bool = True
    muon: MuonSettings = MuonSettings()
    optimizer_offload_fraction: float = 0.0
    tp_pp_dp_mapping: bool = False

    def __post_init__(self):
        check_rank_order(self.tp_pp_dp_mapping, self.cp, self.ep)
        offload = self.optimizer_offload_fraction
        if not 0 <= offload <= 1:
            raise ValueError(f"optimizer_offload_fraction={offload} must be in [0, 1]")
        if offload and (self.optimizer == "muon" or self.fully_sharded):
            raise ValueError(f"optimizer_offload_fraction={offload} needs an optimizer other "
                             f"than Muon and no FSDP; got optimizer={self.optimizer!r}, "
                             f"fully_sharded={self.fully_sharded}")
        if self.fully_sharded and (self.distributed_optimizer or self.ep > 1
                                   or self.model.precision == "fp16"):
            raise ValueError(f"fully_sharded=True (FSDP2) needs distributed_optimizer=False, "
                             f"expert_model_parallel_size=1 and no fp16; got "
                             f"{self.distributed_optimizer}, {self.ep} and "
                             f"{self.model.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.optimizer == "muon" and self.fully_sharded:
            raise ValueError("optimizer='muon' needs fully_sharded=False (FSDP cuts Muon's "
                             "matrices); got True")
        for name in ("exp_avg_dtype", "exp_avg_sq_dtype"):
            if getattr(self, name) not in STATE_DTYPE_BYTES:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of "
                                 f"{', '.join(STATE_DTYPE_BYTES)}")
        for name in ("data_parallel_size", "micro_batch_size", "num_microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        rule = self.model.interleaved_microbatches_rule(self.num_microbatches)
        if rule is not None:  # with N = PP the rule reads as divisibility
            pp = self.model.pipeline_model_parallel_size
            raise ValueError(
                f"num_microbatches={self.num_microbatches} is not divisible by "
                f"pipeline_model_parallel_size={pp} (the interleaved schedule's rule)"
                if self.model.microbatch_group_size == pp else
                f"the interleaved schedule needs num_microbatches={self.num_microbatches} {rule}")
        if self.grad_reduce_in_bf16 and self.model.precision != "bf16":
            raise ValueError(f"grad_reduce_in_bf16=True needs a bf16 model, not precision="
                             f"{self.model.precision!r}")
        ep, etp, n = self.ep, self.etp, self.distributed_optimizer_instances
        if (self.tp * self.gradient_group_size) % (etp * ep):
            raise ValueError(f"expert_tensor_parallel_size={etp} x expert_model_parallel_size="
                             f"{ep} does not divide tensor-parallel x data-parallel x "
                             f"context-parallel size={self.tp * self.gradient_group_size}")
        if etp != self.tp and n > 1:
            raise ValueError(f"distributed_optimizer_instances={n} with expert_tensor_parallel_"
                             f"size={etp} != tensor_model_parallel_size={self.tp}: not "
                             "supported (the job's rule); use one instance")
        check_instances(n, self.data_parallel_size, self.cp, ep)
        if n > 1 and not self.distributed_optimizer:
            raise ValueError(f"distributed_optimizer_instances={n} needs "
                             "distributed_optimizer=True (the instances are copies of its state)")

    @classmethod
    def from_job(cls, job: JobConfig, world_size: int) -> Setup:
        """The setup of ``job`` on ``world_size`` GPUs (checked by ``job.validate``)."""
        job.validate(world_size)
        return cls(model=job.model, data_parallel_size=job.data_parallel_size(world_size),
                   micro_batch_size=job.training.micro_batch_size,
                   num_microbatches=job.num_microbatches(world_size),
                   distributed_optimizer=job.training.use_distributed_optimizer,
                   grad_reduce_in_bf16=job.training.grad_reduce_in_bf16,
                   distributed_optimizer_instances=(
                       job.training.num_distributed_optimizer_instances),
                   exp_avg_dtype=job.training.exp_avg_dtype,
                   exp_avg_sq_dtype=job.training.exp_avg_sq_dtype,
                   optimizer=job.training.optimizer,
                   fully_sharded=job.training.use_torch_fsdp2,
                   reshard_after_forward=job.training.torch_fsdp2_reshard_after_forward,
                   muon=job.training.muon_settings,
                   optimizer_offload_fraction=job.training.optimizer_offload_fraction
                   if job.training.optimizer_cpu_offload else 0.0,
                   tp_pp_dp_mapping=job.training.use_tp_pp_dp_mapping)

    # --- derived sizes ---------------------------------------------------------------------

    @property
    def tp(self) -> int:
        return self.model.tensor_model_parallel_size

    @property
    def cp(self) -> int:
        return self.model.context_parallel_size

    @property
    def pp(self) -> int:
        return self.model.pipeline_model_parallel_size

    @property
    def vpp(self) -> int:
        """Model chunks per pipeline rank (1 without interleaving)."""
        return self.model.virtual_pipeline_model_parallel_size or 1

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.data_parallel_size

    @property
    def gradient_group_size(self) -> int:
        """The ranks that reduce gradients together and share the distributed optimizer's
        state: DP x CP (each CP rank holds the gradients of its part of the sequences)."""
        return self.data_parallel_size * self.cp

    @property
    def ep(self) -> int:
        """Expert-parallel size (1 for a dense model)."""
        return self.model.expert_model_parallel_size

    @property
    def etp(self) -> int:
        """Expert tensor-parallel size: the ranks that split each expert, TP or 1
        (`mp.estimate.storage.expert_tensor_parallel_size`)."""
        return expert_tensor_parallel_size(self.model)

    @property
    def expert_data_parallel_size(self) -> int:
        """The ranks holding the same experts, which reduce their gradients and share their
        distributed optimizer state: TP x DP x CP / (ETP x EP), DP x CP / EP with ETP = TP
        (`mp.parallel_state`'s expert layout)."""
        return self.tp * self.gradient_group_size // (self.etp * self.ep)

    @property
    def optimizer_shard_size(self) -> int:
        """The ranks one copy of the distributed optimizer's state is sharded over: DP x CP /
        N (one instance)."""
        return self.gradient_group_size // self.distributed_optimizer_instances

    @property
    def expert_optimizer_shard_size(self) -> int:
        """The same for the experts' state: EDP / N."""
        return self.expert_data_parallel_size // self.distributed_optimizer_instances

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.data_parallel_size

    @property
    def grad_bytes(self) -> int:
        """Bytes per element of the gradient buffers and their reductions: 4, or 2 when
        ``grad_reduce_in_bf16``."""
        return 2 if self.grad_reduce_in_bf16 else 4

    @property
    def moment_bytes(self) -> int:
        """Bytes per element of AdamW's two moments together: 8 in fp32, 4 in bf16/fp16 (with
        Muon: for the parameters AdamW updates); SGD's fp32 momentum buffer: 4."""
        if self.optimizer == "sgd":
            return 4
        return STATE_DTYPE_BYTES[self.exp_avg_dtype] + STATE_DTYPE_BYTES[self.exp_avg_sq_dtype]

    @property
    def activation_bytes(self) -> int:
        """Bytes per element of activations (and of the parameters): the model's precision."""
        return 4 if self.model.precision == "fp32" else 2

    def describe(self) -> str:
        """``TP8 PP16 (v2) DP8, mbs 1 x 192, SP, recompute full, distributed optimizer``
        (``recompute selective (layernorm, moe_act)`` names the selective modules other than
        Megatron's default, the attention core);
        an uneven pipeline split adds each stage's layers: ``PP2 (v2, layers 34+46)``;
        context parallelism shows as ``TP8 CP4 PP2 DP4``, expert parallelism as
        ``TP2 PP1 DP8 EP4`` (``TP2 PP1 DP8 EP4 ETP1`` with whole experts); an offload adds
        ``optimizer state 50% in host memory``."""
        cfg = self.model
        pipeline = ", ".join(part for part in (f"v{self.vpp}" if self.vpp > 1 else "",
                                               uneven_stages_text(cfg.chunk_layer_counts)) if part)
        parts = [f"TP{self.tp}" + (f" CP{self.cp}" if self.cp > 1 else "") + f" PP{self.pp}"
                 + (f" ({pipeline})" if pipeline else "")
                 + f" DP{self.data_parallel_size}" + (f" EP{self.ep}" if self.ep > 1 else "")
                 + (f" ETP{self.etp}" if self.etp != self.tp else ""),
                 f"mbs {self.micro_batch_size} x {self.num_microbatches}"]
        if cfg.sequence_parallel:
            parts.append("SP")
        recompute = cfg.recompute_granularity or "none"
        if recompute == "selective" and cfg.recompute_modules != ["core_attn"]:
            recompute += f" ({', '.join(cfg.recompute_modules)})"
        parts.append(f"recompute {recompute}")
        if self.distributed_optimizer:
            n = self.distributed_optimizer_instances
            parts.append("distributed optimizer" + (f" x{n} instances" if n > 1 else ""))
        if self.fully_sharded:
            parts.append("FSDP" + ("" if self.reshard_after_forward else " (no reshard)"))
        if (self.exp_avg_dtype, self.exp_avg_sq_dtype) != ("fp32", "fp32"):
            parts.append(f"Adam moments {self.exp_avg_dtype}/{self.exp_avg_sq_dtype}")
        if self.optimizer_offload_fraction:
            parts.append(f"optimizer state {self.optimizer_offload_fraction:.0%} in host memory")
        return ", ".join(parts)
