"""`JobConfig`: everything a pretraining job reads, in four sections, and the rules that join
them to the world size.

A config is plain data in and out: `JobConfig.from_dict` builds one from nested mappings (with
the checks of `mp.config.coerce` and of each section) and `JobConfig.to_dict` gives back only
builtin types, so that it can be printed (`format_config`) and saved inside a checkpoint that
is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

from mp import launch_env
from mp.config.batch_schedule import BatchSchedule
from mp.config.coerce import ConfigError, build_dataclass, field_annotations, unknown_key_message
from mp.config.sections import DataConfig, LoggingConfig
from mp.config.training_section import TrainingConfig
from mp.model.aux_losses import tracked_names
from mp.model.config import TransformerConfig
from mp.model.fp8_layers import check_fp8_tokens
from mp.rank_layout import check_rank_order


@dataclass
class JobConfig:
    """A pretraining job: the model (shape, parallel layout, precision), the training loop,
    the data and the logging. See ``configs/*.yaml`` for the YAML form."""

    model: TransformerConfig
    training: TrainingConfig
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # --- derived sizes ---------------------------------------------------------------------

    def data_parallel_size(self, world_size: int) -> int:
        """``world_size / (TP x PP x CP)``; an error unless it divides exactly."""
        _check_world_size(world_size)
        tp = self.model.tensor_model_parallel_size
        pp = self.model.pipeline_model_parallel_size
        cp = self.model.context_parallel_size
        if world_size % (tp * pp * cp):
            cp_text = (" x context_parallel_size", f" x {cp}") if cp > 1 else ("", "")
            raise ConfigError(
                f"world_size={world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size{cp_text[0]} = {tp} x {pp}{cp_text[1]} = "
                f"{tp * pp * cp}")
        return world_size // (tp * pp * cp)

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per iteration on each data-parallel rank:
        ``global_batch_size / (micro_batch_size x DP)``; an error unless it divides exactly."""
        dp = self.data_parallel_size(world_size)
        gbs, mbs = self.training.global_batch_size, self.training.micro_batch_size
        if gbs % (mbs * dp):
            raise ConfigError(
                f"training.global_batch_size={gbs} is not divisible by training.micro_batch_size "
                f"x data_parallel_size = {mbs} x {dp} = {mbs * dp} (world_size={world_size})"
            )
        return gbs // (mbs * dp)

    def batch_schedule(self, world_size: int) -> BatchSchedule:
        """The global batch size at each point of the run (constant, or
        ``training.rampup_batch_size``); an error unless every batch size it takes divides
        into micro-batches over the data-parallel ranks."""
        tr = self.training
        rampup = None if tr.rampup_batch_size is None else tuple(tr.rampup_batch_size)
        self.num_microbatches(world_size)  # the full batch's error names the world size
        return BatchSchedule(tr.global_batch_size, tr.micro_batch_size,
                             self.data_parallel_size(world_size), rampup)

    def train_iterations(self, world_size: int) -> int:
        """The run's iterations: ``training.train_iters``, or as many as fit whole in
        ``training.train_samples`` (`BatchSchedule.iterations`)."""
        tr = self.training
        if not tr.counts_samples:
            return tr.train_iters
        return self.batch_schedule(world_size).iterations(tr.train_samples)

    def validate(self, world_size: int) -> None:
        """The rules that need the world size (each section checked itself when built): TP x PP
        divides it, micro-batch x DP divides every global batch size of the run, with virtual
        pipeline stages the micro-batches fit Megatron's interleaved schedule (a multiple of
        PP, or with micro-batch groups `interleaved_microbatches_rule`), expert parallelism
        fits (`_check_experts`), the distributed optimizer's instances divide DP x CP
        (`TrainingConfig.check_optimizer_instances`), FSDP goes with the model
        (`_check_fsdp`), the TP-PP-DP rank order has no CP or EP, a run counted in samples
        holds at least one iteration, ``training.grad_reduce_in_bf16`` goes with a bf16 model,
        DeepSpeed jobs do not ask for the norms and counts only mp's optimizer measures, an
        FP8 model's micro-batches hold a multiple of 16 tokens a rank, and the ranks to profile
        exist."""
        schedule = self.batch_schedule(world_size)
        step = schedule.micro_batch_size * schedule.data_parallel_size
        for batch in schedule.batch_sizes():
            rule = self.model.interleaved_microbatches_rule(batch // step)
            if rule is not None:
                where = "training.global_batch_size" if batch == schedule.global_batch_size \
                    else f"a step of training.rampup_batch_size={self.training.rampup_batch_size}"
                raise ConfigError(
                    f"the interleaved pipeline schedule needs the number of micro-batches "
                    f"({batch // step} = global batch {batch} ({where}) / "
                    f"(training.micro_batch_size x data_parallel_size = {step})) {rule}"
                )
        if self.train_iterations(world_size) < 1:
            raise ConfigError(
                f"training.train_samples={self.training.train_samples} holds no whole iteration "
                f"(the first takes {schedule.global_batch_size_at(0)} samples)")
        self._check_experts(world_size)
        self._check_fsdp()
        m = self.model
        check_rank_order(self.training.use_tp_pp_dp_mapping, m.context_parallel_size,
                         m.expert_model_parallel_size)
        self.training.check_optimizer_instances(self.data_parallel_size(world_size),
                                                m.context_parallel_size,
                                                m.expert_model_parallel_size)
        self._check_auxiliary_losses()
        try:
            check_fp8_tokens(m, self.training.micro_batch_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.training.grad_reduce_in_bf16 and self.model.precision != "bf16":
            raise ConfigError(f"training.grad_reduce_in_bf16=true needs model.precision='bf16' "
                              f"(got {self.model.precision!r}): fp32 and fp16 runs reduce "
                              "their gradients in fp32")
        if self.training.optimizer == "muon" and self.model.precision == "fp16":
            raise ConfigError("training.optimizer='muon' with model.precision='fp16': not "
                              "supported (Megatron's Muon takes no loss scaling); use bf16")
        for name in ("log_params_norm", "log_num_zeros_in_grad"):
            if self.training.deepspeed and getattr(self.logging, name):
                raise ConfigError(f"logging.{name}=true is not supported with "
                                  "training.deepspeed=true (DeepSpeed's engine holds the "
                                  "gradients and optimizer state); drop one of them")
        outside = [r for r in self.logging.profile_ranks if not 0 <= r < world_size]
        if self.logging.profile and outside:
            raise ConfigError(f"logging.profile_ranks={self.logging.profile_ranks} names ranks "
                              f"{outside} outside the world of {world_size} ranks")

    def _check_auxiliary_losses(self) -> None:
        """The per-token loss has no weight for the routers' auxiliary losses nor for
        multi-token prediction's; DeepSpeed's loop does not scale them."""
        names = tracked_names(self.model)
        if names and self.training.calculate_per_token_loss:
            raise ConfigError(f"training.calculate_per_token_loss=true is not supported with "
                              f"auxiliary losses ({', '.join(names)}; from "
                              "model.moe_aux_loss_coeff, model.moe_z_loss_coeff, "
                              "model.mtp_num_layers): drop them, or the per-token loss")
        if self.model.mtp_num_layers is not None and self.training.deepspeed:
            raise ConfigError(f"model.mtp_num_layers={self.model.mtp_num_layers} is not "
                              "supported with training.deepspeed=true; train with mp's "
                              "optimizer")

    def _check_fsdp(self) -> None:
        """FSDP2 (``training.use_torch_fsdp2``) trains fp32 or bf16 models without expert
        parallelism (Megatron refuses fp16 and EP too)."""
        m = self.model
        if not self.training.use_torch_fsdp2:
            return
        if m.precision == "fp16":
            raise ConfigError("training.use_torch_fsdp2=true with model.precision='fp16': not "
                              "supported (FSDP's shards are fp32 masters, so the loss scaler "
                              "would not act; Megatron refuses it too); use bf16")
        if m.num_moe_experts is not None and m.expert_model_parallel_size > 1:
            raise ConfigError(f"training.use_torch_fsdp2=true with model."
                              f"expert_model_parallel_size={m.expert_model_parallel_size}: not "
                              "supported (experts would need a sharding group of their own); "
                              "use expert_model_parallel_size=1")

    def _check_experts(self, world_size: int) -> None:
        """Expert-TP x EP divides a stage's TP x DP x CP ranks (DP x CP when the experts are
        split over TP as the layer is); whole experts (ETP 1 under TP > 1) take one
        distributed-optimizer instance; DeepSpeed's engine has no expert groups."""
        m = self.model
        if m.num_moe_experts is None:
            return
        ep, dp = m.expert_model_parallel_size, self.data_parallel_size(world_size)
        tp, cp = m.tensor_model_parallel_size, m.context_parallel_size
        etp = tp if m.expert_tensor_parallel_size is None else m.expert_tensor_parallel_size
        if (tp * dp * cp) % (etp * ep):
            raise ConfigError(f"model.expert_model_parallel_size={ep} x expert_tensor_parallel_"
                              f"size={etp} does not divide tensor_model_parallel_size={tp} x "
                              f"data_parallel_size={dp} x context_parallel_size={cp} "
                              f"(world_size={world_size}): the experts are laid out over a "
                              "stage's TP x DP x CP ranks")
        instances = self.training.num_distributed_optimizer_instances
        if etp != tp and instances > 1:
            raise ConfigError(f"training.num_distributed_optimizer_instances={instances} with "
                              f"model.expert_tensor_parallel_size={etp} != tensor_model_"
                              f"parallel_size={tp}: not supported; use one instance")
        if self.training.deepspeed:
            raise ConfigError(f"model.num_moe_experts={m.num_moe_experts} is not supported "
                              "with training.deepspeed=true (its engine would average the "
                              "experts over data parallelism); train with mp's optimizer")

    # --- plain data ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """``{section: {key: value}}`` of builtin types only (every default filled in)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, sections: Mapping) -> JobConfig:
        """Build and check a config from ``{section: {key: value}}`` (`to_dict`'s form, or a
        YAML file's). Unknown sections or keys, values of the wrong type and missing required
        keys are errors."""
        check_keys(sections)
        built = {name: build_dataclass(section_cls, name, sections.get(name) or {})
                 for name, section_cls in SECTIONS.items()}
        return cls(**built)


#: The sections of a `JobConfig` and the dataclass each one builds.
SECTIONS: dict[str, type] = {
    "model": TransformerConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "logging": LoggingConfig,
}


@functools.cache
def known_keys() -> tuple[str, ...]:
    """Every ``section.key`` a config may set, in schema order."""
    return tuple(f"{name}.{key}" for name, section_cls in SECTIONS.items()
                 for key in field_annotations(section_cls))


def check_keys(sections: Mapping, source: str | None = None) -> None:
    """Reject a top level that is not a mapping of known sections, a section that is not a
    mapping, and unknown keys (suggesting the closest known one)."""
    where = f"{source}: " if source else ""
    if not isinstance(sections, Mapping):
        raise ConfigError(f"{where}a config must be a mapping of the sections "
                          f"{', '.join(SECTIONS)}; got {type(sections).__name__}")
    known = known_keys()
    for name, values in sections.items():
        if name not in SECTIONS:
            raise ConfigError(where + unknown_key_message("section", str(name), SECTIONS))
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}section {name!r} must be a mapping of keys to values; "
                              f"got {type(values).__name__}")
        for key in values:
            if f"{name}.{key}" not in known:
                raise ConfigError(where + unknown_key_message("key", f"{name}.{key}", known))


def resolve_world_size(world_size: int | None = None,
                       environ: Mapping[str, str] = os.environ) -> int:
    """``world_size`` if given, else ``WORLD_SIZE`` from the environment (torchrun sets it),
    else the size an MPI launcher announces (`mp.launch_env.launcher_world_size`), else 1."""
    if world_size is None:
        text = environ.get("WORLD_SIZE")
        if text is None:
            return launch_env.launcher_world_size(environ) or 1
        try:
            world_size = int(text)
        except ValueError:
            raise ConfigError(f"the environment's WORLD_SIZE={text!r} is not an integer") from None
    _check_world_size(world_size)
    return world_size


def _check_world_size(world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be a positive integer")


def format_config(cfg: JobConfig) -> str:
    """The resolved config as YAML, every default filled in: printed at the start of a job,
    and read back by `mp.config.load_config` to rerun it."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
