"""Dropout on the hidden (residual-stream) activations, and the fused bias-dropout-add.

Which random stream a hidden dropout draws from depends on sequence parallelism: ``[s, b, h]``
is replicated over TP, so every TP rank must draw the same mask (the default stream, seeded
alike on the TP ranks); ``[s / t, b, h]`` under sequence parallelism holds other tokens on each
rank, so the ranks' masks must differ like a serial model's would (the TP-specific stream of
`get_cuda_rng_tracker`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mp.jit import jit_fuser
from mp.tensor_parallel import get_cuda_rng_tracker


def _rng_stream(p: float, training: bool, sequence_parallel: bool):
    """The context a hidden dropout runs in (see the module doc)."""
    if training and p > 0.0 and sequence_parallel:
        return get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()


def hidden_dropout(x: torch.Tensor, p: float, training: bool,
                   sequence_parallel: bool) -> torch.Tensor:
    """Dropout on ``[s, b, h]``, or on ``[s / t, b, h]`` under sequence parallelism."""
    with _rng_stream(p, training, sequence_parallel):
        return F.dropout(x, p, training)


def _bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                      p: float, training: bool) -> torch.Tensor:
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p, training)


_bias_dropout_add_fused = jit_fuser(_bias_dropout_add)


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                     p: float, training: bool, sequence_parallel: bool,
                     fused: bool) -> torch.Tensor:
    """``residual + dropout(x + bias)`` for ``x, residual [s, b, h]`` (``[s / t, b, h]`` under
    sequence parallelism) and ``bias [h]`` or None. ``fused`` runs it as one compiled kernel
    (`mp.jit`; Megatron's ``bias_dropout_fusion``), which reads ``x``, ``bias`` and ``residual``
    once and writes the sum and the dropout mask, instead of three kernels and two
    intermediates. The compiled kernel draws its mask from the same stream as eager dropout
    would, but not the same bits."""
    training = training and p > 0.0
    fn = _bias_dropout_add_fused if fused else _bias_dropout_add
    with _rng_stream(p, training, sequence_parallel):
        return fn(x, bias, residual, p, training)
