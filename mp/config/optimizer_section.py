"""The optimizer's keys of the ``training`` section (`OptimizerFields`, which
`mp.config.training_section.TrainingConfig` inherits): the update rule and its
hyper-parameters, the distributed optimizer and the precision-aware optimizer.

Field names follow Megatron-LM's arguments (``--muon-num-ns-steps`` is ``muon_num_ns_steps``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mp.config.coerce import ConfigError
from mp.config.section import Section
from mp.instance_layout import check_instances
from mp.optim.muon import MuonSettings
from mp.optim.update_rules import OPTIMIZERS

#: The precision-aware optimizer's dtype keys -> the values mp takes (Megatron's names).
_STATE_DTYPE_KEYS = {"main_params_dtype": ("fp32",), "main_grads_dtype": ("fp32", "bf16"),
                     "exp_avg_dtype": ("fp32", "bf16", "fp16"),
                     "exp_avg_sq_dtype": ("fp32", "bf16", "fp16")}
#: (key, value) Megatron takes that mp refuses -> why.
_STATE_DTYPE_REFUSED = {
    **dict.fromkeys((("exp_avg_dtype", "fp8"), ("exp_avg_sq_dtype", "fp8")),
                    "Megatron's fp8 states need Transformer Engine's per-tensor fp8 scaling, "
                    "which mp does not implement; use bf16 or fp16"),
    ("main_params_dtype", "fp16"): "fp16 master weights are not implemented in mp (the "
                                   "masters stay fp32); use fp32",
}
logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class OptimizerFields(Section):
    """The optimizer's keys of `TrainingConfig` (its docstring tells the others).

    ``optimizer`` is Megatron's ``--optimizer``: ``adam`` (AdamW), ``sgd`` (torch's SGD with
    momentum ``sgd_momentum``, weight decay added to the gradient) or ``muon`` (Muon for the
    linear layers' matrices, AdamW with the ``adam_*`` keys for the rest: `mp.optim.muon`).
    Muon with ``use_distributed_optimizer`` runs Megatron's layer-wise distributed optimizer
    (`mp.optim.layer_wise`: whole parameters dealt over the DP x CP ranks, gradients
    all-reduced; ``overlap_param_gather`` does not apply to it); Megatron's deprecated
    ``dist_muon`` becomes exactly that, with a notice. Muon's keys are Megatron's
    ``--muon-*`` flags with their defaults: ``muon_momentum``, ``muon_use_nesterov``,
    ``muon_num_ns_steps`` Newton-Schulz steps with ``muon_coefficient_type`` coefficients
    (quintic: a multiple of 5 steps), ``muon_scale_mode``, ``muon_extra_scale_factor``,
    ``muon_fp32_matmul_prec`` (medium: the iteration in bf16), ``muon_tp_mode`` (blockwise,
    duplicated or distributed) and ``muon_split_qkv`` (false: ``--muon-no-split-qkv``). Muon
    takes neither FSDP, DeepSpeed, fp16 nor the precision-aware optimizer, as Megatron, nor
    several distributed-optimizer instances; SGD neither DeepSpeed nor the precision-aware
    optimizer.

    ``use_distributed_optimizer`` shards the fp32 master weights and the optimizer's state over
    the data-parallel ranks (Megatron's distributed optimizer); ``overlap_param_gather`` then
    overlaps the all-gather of updated parameters with the next forward;
    ``num_distributed_optimizer_instances`` N (Megatron's flag) shards them over DP x CP / N
    consecutive ranks only, N copies (it must divide DP x CP: `check_optimizer_instances`).
    ``optimizer_impl="apex"`` steps with NVIDIA apex's ``FusedAdam`` (``FusedSGD`` for SGD)
    when apex is importable (a notice and torch's otherwise). ``use_precision_aware_optimizer``
    (Megatron's flag) steps with `mp.optim.PrecisionAwareAdamW`, storing AdamW's moments in
    ``exp_avg_dtype`` / ``exp_avg_sq_dtype`` (fp32, bf16, fp16); ``main_grads_dtype="bf16"``
    is Megatron's spelling of ``grad_reduce_in_bf16`` (it sets it: bf16 models only) and
    ``main_params_dtype`` stays fp32. Without the flag every one of them must be fp32, as
    Megatron checks; unlike Megatron, mp does not require the distributed optimizer.

    ``optimizer_cpu_offload`` (Megatron's ``--optimizer-cpu-offload``) keeps the fp32 masters
    and the update rule's state of the first ``optimizer_offload_fraction`` of this rank's
    optimizer elements (whole shards in order, as Megatron's ``HybridDeviceOptimizer``) in
    host memory and steps them there (`mp.optim.optimizer.ParamShard`); AdamW or SGD with
    torch's implementation only. Unlike Megatron, it needs neither the distributed nor the
    precision-aware optimizer.
    """

    optimizer: str = "adam"  # adam | sgd | muon (Megatron's --optimizer; dist_muon: muon)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    muon_momentum: float = 0.9
    muon_use_nesterov: bool = False
    muon_num_ns_steps: int = 5
    muon_coefficient_type: str = "quintic"  # quintic | simple
    muon_scale_mode: str = "spectral"  # spectral | unit_rms_norm | shape_scaling
    muon_extra_scale_factor: float = 1.0
    muon_fp32_matmul_prec: str = "medium"  # medium (bf16 iteration) | high
    muon_tp_mode: str = "blockwise"  # blockwise | duplicated | distributed
    muon_split_qkv: bool = True
    use_distributed_optimizer: bool = False
    overlap_param_gather: bool = True  # distributed optimizer: all-gather during forward
    num_distributed_optimizer_instances: int = 1  # distributed optimizer: copies of its state
    optimizer_impl: str = "torch"  # torch | apex (FusedAdam, FusedSGD)
    use_precision_aware_optimizer: bool = False  # AdamW's states in the dtypes below
    main_params_dtype: str = "fp32"  # fp32 (Megatron's fp16 is refused)
    main_grads_dtype: str = "fp32"  # fp32 | bf16 (= grad_reduce_in_bf16)
    exp_avg_dtype: str = "fp32"  # fp32 | bf16 | fp16 (Megatron's fp8 is refused)
    exp_avg_sq_dtype: str = "fp32"  # fp32 | bf16 | fp16
    optimizer_cpu_offload: bool = False  # masters and state of a fraction in host memory
    optimizer_offload_fraction: float = 1.0  # of this rank's optimizer elements, in [0, 1]

    @property
    def muon_settings(self) -> MuonSettings:
        """The ``muon_*`` keys as `mp.optim.MuonSettings`."""
        return MuonSettings(
            momentum=self.muon_momentum, use_nesterov=self.muon_use_nesterov,
            num_ns_steps=self.muon_num_ns_steps, coefficient_type=self.muon_coefficient_type,
            scale_mode=self.muon_scale_mode, extra_scale_factor=self.muon_extra_scale_factor,
            fp32_matmul_prec=self.muon_fp32_matmul_prec, tp_mode=self.muon_tp_mode,
            split_qkv=self.muon_split_qkv)

    def _check_optimizer(self, deepspeed: bool, use_torch_fsdp2: bool) -> None:
        """The optimizer's own rules, and those against ``deepspeed`` and FSDP
        (``use_torch_fsdp2``), the training section's keys."""
        self._positive("adam_eps")
        self._below_one("adam_beta1")
        self._below_one("adam_beta2")
        self._one_of("optimizer_impl", ("torch", "apex"))
        self._check_update_rule(deepspeed, use_torch_fsdp2)
        self._check_instances(deepspeed)
        self._check_precision_aware()
        self._check_cpu_offload(deepspeed, use_torch_fsdp2)

    def _check_cpu_offload(self, deepspeed: bool, use_torch_fsdp2: bool) -> None:
        """``optimizer_offload_fraction`` in [0, 1]; the offload with torch's AdamW or SGD on
        mp's own data parallelism only."""
        fraction = self.optimizer_offload_fraction
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"training.optimizer_offload_fraction={fraction!r} must be a "
                              "number in [0, 1] (the share of the optimizer offloaded)")
        if not self.optimizer_cpu_offload:
            return
        refused = {"optimizer": (self.optimizer if self.optimizer == "muon" else None,
                                 "Muon's Newton-Schulz runs collectives on the masters"),
                   "optimizer_impl": (self.optimizer_impl if self.optimizer_impl != "torch"
                                      else None, "apex's fused kernels step CUDA tensors only"),
                   "use_torch_fsdp2": (use_torch_fsdp2 or None, "FSDP updates its rows in "
                                       "place"),
                   "deepspeed": (deepspeed or None, "DeepSpeed's engine owns the optimizer; "
                                 "use its offload_optimizer")}
        for name, (value, why) in refused.items():
            if value is not None:
                raise ConfigError(f"training.optimizer_cpu_offload=true with training.{name}="
                                  f"{value!r}: not supported ({why}); drop one of them")

    @property
    def use_layer_wise_distributed_optimizer(self) -> bool:
        """Megatron's name: Muon with the distributed optimizer, which is then the layer-wise
        one (`mp.optim.layer_wise`), over chunks that all-reduce their gradients."""
        return self.optimizer == "muon" and self.use_distributed_optimizer

    def _check_update_rule(self, deepspeed: bool, use_torch_fsdp2: bool) -> None:
        if self.optimizer == "dist_muon":  # Megatron-LM's deprecated spelling, mapped as there
            logger.warning("notice: training.optimizer='dist_muon' is deprecated (as in "
                           "Megatron-LM): it runs as --optimizer muon --use-distributed-optimizer")
            self.optimizer, self.use_distributed_optimizer = "muon", True
        self._one_of("optimizer", OPTIMIZERS)
        self._at_least("sgd_momentum", 0.0)
        try:
            self.muon_settings
        except ValueError as error:
            raise ConfigError(f"training.muon_* keys: {error}") from None
        if self.optimizer == "adam":
            return
        refused = {"deepspeed": (deepspeed, "DeepSpeed's engine builds AdamW only"),
                   "use_precision_aware_optimizer": (self.use_precision_aware_optimizer,
                                                     "the precision-aware optimizer is AdamW's "
                                                     "(Megatron's rule)")}
        if self.optimizer == "muon":
            instances = self.num_distributed_optimizer_instances
            refused["num_distributed_optimizer_instances"] = (
                instances if instances > 1 else 0, "the layer-wise distributed optimizer keeps "
                "one copy of the state over every data-parallel rank")
            refused["use_torch_fsdp2"] = (use_torch_fsdp2, "FSDP shards the matrices by rows "
                                          "(Megatron refuses it too)")
        for name, (value, why) in refused.items():
            if value:
                raise ConfigError(f"training.optimizer={self.optimizer!r} with training.{name}="
                                  f"{value!r}: not supported ({why}); drop one of them")

    def _check_precision_aware(self) -> None:
        """Megatron's rules for the state dtypes (``OptimizerConfig.__post_init__``)."""
        for name, allowed in _STATE_DTYPE_KEYS.items():
            value = getattr(self, name)
            if value in allowed:
                continue
            why = _STATE_DTYPE_REFUSED.get((name, value))
            raise ConfigError(f"training.{name}={value!r} " + (
                f"is not supported: {why}" if why else f"must be one of {', '.join(allowed)}"))
        if not self.use_precision_aware_optimizer:
            for name in _STATE_DTYPE_KEYS:
                if getattr(self, name) != "fp32":
                    raise ConfigError(f"training.{name}={getattr(self, name)!r} needs "
                                      "training.use_precision_aware_optimizer=true (without "
                                      "it the optimizer's tensors stay fp32, as in Megatron)")
        elif self.optimizer_impl != "torch":
            raise ConfigError(f"training.use_precision_aware_optimizer=true with training."
                              f"optimizer_impl={self.optimizer_impl!r}: the precision-aware "
                              "step replaces apex's FusedAdam; drop one of them")

    def _check_instances(self, deepspeed: bool) -> None:
        """``num_distributed_optimizer_instances``: a positive count; above 1 it shards the
        distributed optimizer (not DeepSpeed's ZeRO)."""
        n = self.num_distributed_optimizer_instances
        self._at_least("num_distributed_optimizer_instances", 1)
        if n > 1 and deepspeed:
            raise ConfigError(f"training.deepspeed=true with training.num_distributed_optimizer_"
                              f"instances={n}: not supported (ZeRO shards DeepSpeed's optimizer "
                              "state its own way); drop one of them")
        if n > 1 and not self.use_distributed_optimizer:
            raise ConfigError(f"training.num_distributed_optimizer_instances={n} needs "
                              "training.use_distributed_optimizer=true (the instances are "
                              "copies of its state)")

    def check_optimizer_instances(self, data_parallel_size: int, context_parallel_size: int = 1,
                                  expert_model_parallel_size: int = 1) -> None:
        """The rule that needs the layout: ``num_distributed_optimizer_instances`` divides
        DP x CP (and the experts' DP x CP / EP), checked before any process group exists."""
        try:
            check_instances(self.num_distributed_optimizer_instances, data_parallel_size,
                            context_parallel_size, expert_model_parallel_size)
        except ValueError as error:
            raise ConfigError(f"training.{error}") from None
