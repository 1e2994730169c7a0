"""The update rule a `MixedPrecisionOptimizer` applies to its fp32 masters: Megatron's
``--optimizer adam`` (AdamW), ``sgd`` (torch's SGD with momentum) or ``muon`` (Muon for the
linear layers' matrices, AdamW for the rest: `mp.optim.muon`).

SGD is ``torch.optim.SGD(lr, weight_decay, momentum)`` as Megatron builds it: weight decay
added to the gradient (L2, per group: none on biases and norms), no dampening, no Nesterov;
apex's ``FusedSGD`` (the same rule) with ``impl="apex"`` when apex is importable.

Per-element state, by rule (`state_items`): AdamW ``exp_avg``, ``exp_avg_sq`` and a ``step``
count; SGD and Muon one ``momentum_buffer``. Muon's optimizer is a `ChainedOptimizer` of
`TensorParallelMuon` and AdamW, which the schedule sees as one (its ``param_groups``).
"""

from __future__ import annotations

import torch

from mp.apex import fused_adam_class, fused_sgd_class
from mp.optim.muon import MuonSettings, MuonUnit, TensorParallelMuon
from mp.optim.precision_aware import MOMENTS, PrecisionAwareAdamW

OPTIMIZERS = ("adam", "sgd", "muon")
ADAM_ITEMS = (*MOMENTS, "step")
MOMENTUM_ITEMS = ("momentum_buffer",)


def state_items(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The state a checkpoint keeps for each of ``optimizer``'s tensors: AdamW's moments and
    step (``step`` a scalar), or SGD's and Muon's momentum buffer."""
    return ADAM_ITEMS if "betas" in optimizer.defaults else MOMENTUM_ITEMS


def rule_of_items(items: set[str]) -> str | None:
    """The update rule whose state is ``items`` (a checkpoint's, besides the masters):
    "adam", "sgd", "muon" (both kinds), or None for no state."""
    adam, momentum = bool(items & set(MOMENTS)), bool(items & set(MOMENTUM_ITEMS))
    return {(True, False): "adam", (False, True): "sgd", (True, True): "muon"}.get(
        (adam, momentum))


def build_adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                impl: str) -> torch.optim.Optimizer:
    """AdamW over ``groups``: apex's ``FusedAdam`` for ``impl="apex"`` when importable, else
    torch's (fused where the device has the kernel, else foreach)."""
    if impl == "apex":
        fused_adam = fused_adam_class()
        if fused_adam is not None:
            return fused_adam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except RuntimeError:  # no fused kernel for this device
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def build_sgd(groups: list[dict], lr: float, momentum: float, impl: str
              ) -> torch.optim.Optimizer:
    """SGD with ``momentum`` over ``groups`` (their ``weight_decay``): apex's ``FusedSGD`` for
    ``impl="apex"`` when importable, else torch's."""
    fused_sgd = fused_sgd_class() if impl == "apex" else None
    cls = torch.optim.SGD if fused_sgd is None else fused_sgd
    return cls(groups, lr=lr, momentum=momentum)


class ChainedOptimizer:
    """Several ``torch.optim`` optimizers stepped as one (Megatron's ``ChainedOptimizer``):
    ``param_groups`` and ``state`` are theirs together."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def optimizer_of(self, tensor: torch.Tensor) -> torch.optim.Optimizer:
        """The optimizer that updates ``tensor``."""
        return next(opt for opt in self.optimizers
                    if any(p is tensor for g in opt.param_groups for p in g["params"]))

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        return {"chained": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, saved in zip(self.optimizers, state["chained"], strict=True):
            opt.load_state_dict(saved)


def check_update_rule(optimizer: str, impl: str, precision_aware: bool,
                      exp_avg_dtype: torch.dtype, exp_avg_sq_dtype: torch.dtype) -> None:
    """`build_update_rule`'s arguments checked, before the masters are made."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
    if precision_aware and optimizer != "adam":
        raise ValueError(f"optimizer={optimizer!r} with use_precision_aware_optimizer=True: "
                         "the precision-aware optimizer is AdamW's (Megatron's rule)")
    if not precision_aware and (exp_avg_dtype, exp_avg_sq_dtype) != (torch.float32,
                                                                      torch.float32):
        raise ValueError(f"exp_avg_dtype={exp_avg_dtype}, exp_avg_sq_dtype={exp_avg_sq_dtype}: "
                         "moments other than fp32 need use_precision_aware_optimizer=True")
    if precision_aware and impl != "torch":
        raise ValueError(f"impl={impl!r} with use_precision_aware_optimizer=True: the "
                         "precision-aware step replaces apex's FusedAdam; use impl='torch'")


def build_update_rule(groups: list[dict], *, optimizer: str, lr: float,
                      betas: tuple[float, float], eps: float, impl: str,
                      precision_aware: bool, exp_avg_dtype: torch.dtype,
                      exp_avg_sq_dtype: torch.dtype, sgd_momentum: float,
                      muon: MuonSettings | None, muon_units: list[MuonUnit]):
    """The optimizer over the masters' ``groups`` for rule ``optimizer`` (module doc). For
    Muon the groups marked ``"muon": True`` hold the tensors of ``muon_units`` (the masters
    of the units `mp.optim.muon.muon_units` found)."""
    if optimizer == "sgd":
        return build_sgd(groups, lr, sgd_momentum, impl)
    adam_groups = [g for g in groups if not g.get("muon")]
    adamw = PrecisionAwareAdamW(
        adam_groups, lr=lr, betas=betas, eps=eps, exp_avg_dtype=exp_avg_dtype,
        exp_avg_sq_dtype=exp_avg_sq_dtype) if precision_aware \
        else build_adamw(adam_groups, lr, betas, eps, impl)
    if optimizer == "adam":
        return adamw
    muon_groups = [g for g in groups if g.get("muon")]
    return ChainedOptimizer([TensorParallelMuon(muon_groups, muon_units, muon, lr), adamw])
