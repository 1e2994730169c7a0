"""NVIDIA apex, when importable: its ``FusedAdam`` and its fused LayerNorm/RMSNorm.

apex is never a dependency. A config that asks for it (``training.optimizer_impl: apex``,
``--apex-fused-adam``; ``model.normalization_impl: apex``, ``--apex-layer-norm``) gets apex's
class when ``import apex...`` works, and otherwise ``None`` after a one-line notice on the
``mp.apex`` logger (once per process and feature) saying that mp's own implementation runs
instead: torch's AdamW, and `mp.fused`'s norms (its CUDA kernel when built, torch otherwise).
apex's modules keep the parameter names of torch's (``weight``, ``bias``), so checkpoints move
between the two. Nothing here imports apex until a config asks for it.

With ``model.layernorm_zero_centered_gamma`` (``--apply-layernorm-1p``) apex's norm class is
subclassed (`zero_centered`): its weight starts at zeros and its own ``forward`` runs with
``1 + weight`` in the weight's place, as mp's norms do.
"""

from __future__ import annotations

import functools
import importlib
import logging

from torch import nn

logger = logging.getLogger("mp.apex")

#: mp's ``model.normalization`` -> the class in ``apex.normalization``.
NORM_CLASSES = {"LayerNorm": "FusedLayerNorm", "RMSNorm": "FusedRMSNorm"}


def _find(module: str, name: str, asked_for: str, fallback: str):
    """``module.name`` from apex, or None after the notice."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        reason = f"{type(error).__name__}: {error}"
    logger.warning("mp.apex: NVIDIA apex was asked for (%s) but %s.%s is not importable (%s); "
                   "%s runs instead", asked_for, module, name, reason, fallback)
    return None


@functools.cache
def fused_adam_class():
    """``apex.optimizers.FusedAdam``, or None (torch's AdamW then runs)."""
    return _find("apex.optimizers", "FusedAdam", "training.optimizer_impl=apex",
                 "torch's AdamW")


@functools.cache
def fused_sgd_class():
    """``apex.optimizers.FusedSGD``, or None (torch's SGD then runs)."""
    return _find("apex.optimizers", "FusedSGD", "training.optimizer_impl=apex", "torch's SGD")


@functools.cache
def norm_class(normalization: str):
    """apex's ``FusedLayerNorm`` or ``FusedRMSNorm`` for mp's ``normalization`` ("LayerNorm" |
    "RMSNorm"), or None (mp's norm then runs). Constructed as
    ``cls(hidden_size, eps=eps)``, like ``torch.nn.LayerNorm``."""
    if normalization not in NORM_CLASSES:
        raise ValueError(f"normalization={normalization!r} is not one of {sorted(NORM_CLASSES)}")
    return _find("apex.normalization", NORM_CLASSES[normalization],
                 "model.normalization_impl=apex", f"mp's {normalization}")


@functools.cache
def zero_centered(norm_cls: type) -> type:
    """``norm_cls`` (apex's ``FusedLayerNorm`` or ``FusedRMSNorm``) storing its weight centred on
    0: initialised to zeros, and ``norm_cls.forward`` runs with ``1 + weight`` where it reads
    ``self.weight`` (autograd carries the gradient back to the stored weight). Parameter names
    stay ``weight`` and ``bias``."""

    class ZeroCentered(norm_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            nn.init.zeros_(self.weight)

        def forward(self, x):
            return norm_cls.forward(_OnePlusWeight(self), x)

    ZeroCentered.__name__ = ZeroCentered.__qualname__ = f"ZeroCentered{norm_cls.__name__}"
    return ZeroCentered


class _OnePlusWeight:
    """Stands for a norm module inside its class's ``forward``: ``weight`` is the module's
    ``1 + weight``, every other attribute the module's own."""

    def __init__(self, norm: nn.Module):
        self._norm, self.weight = norm, norm.weight + 1

    def __getattr__(self, name: str):
        return getattr(self._norm, name)
