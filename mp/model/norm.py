"""``build_norm``: the model's LayerNorm or RMSNorm, mp's or apex's, over the hidden dim or a
head's channels."""

from __future__ import annotations

from torch import nn

from mp.apex import norm_class, zero_centered
from mp.device import get_device
from mp.fused import FusedLayerNorm, FusedRMSNorm
from mp.model.config import TransformerConfig


def build_norm(config: TransformerConfig, size: int | None = None,
               partial_grads: bool | None = None) -> nn.Module:
    """LayerNorm or RMSNorm over the last dim, ``size`` wide (default ``hidden_size``); its
    parameters are replicated over TP and marked ``sequence_parallel`` when their gradients
    are partial over the TP group (``partial_grads``, by default ``config.sequence_parallel``:
    each rank saw part of the sequence), so that `mp.distributed.finalize_model_grads` sums
    them there.

    ``normalization_impl="apex"`` uses NVIDIA apex's fused module when apex is importable
    (`mp.apex.norm_class`; a notice and mp's norm otherwise), with the same shape, eps, dtype,
    device and ``sequence_parallel`` marks as mp's. With ``layernorm_zero_centered_gamma``
    either stores its weight centred on 0 and scales by ``1 + weight``."""
    size = config.hidden_size if size is None else size
    partial = config.sequence_parallel if partial_grads is None else partial_grads
    zero_centered_gamma = config.layernorm_zero_centered_gamma
    apex_cls = norm_class(config.normalization) if config.normalization_impl == "apex" else None
    if apex_cls is None:
        cls = FusedLayerNorm if config.normalization == "LayerNorm" else FusedRMSNorm
        return cls(size, eps=config.layernorm_epsilon, sequence_parallel=partial,
                   params_dtype=config.params_dtype, zero_centered_gamma=zero_centered_gamma)
    if zero_centered_gamma:
        apex_cls = zero_centered(apex_cls)
    norm = apex_cls(size, eps=config.layernorm_epsilon)
    norm.to(device=get_device(), dtype=config.params_dtype)
    norm.sequence_parallel = partial
    for param in norm.parameters():
        param.sequence_parallel = partial
    return norm
