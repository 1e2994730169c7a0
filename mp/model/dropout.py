"""Dropout on the hidden (residual-stream) activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mp.tensor_parallel import get_cuda_rng_tracker


def hidden_dropout(x: torch.Tensor, p: float, training: bool,
                   sequence_parallel: bool) -> torch.Tensor:
    """Dropout on ``[s, b, h]`` (replicated over TP: the default stream, identical masks on
    every TP rank) or on ``[s / t, b, h]`` under sequence parallelism (each rank holds other
    tokens: the TP-specific stream, so the ranks' masks differ like a serial model's would)."""
    if not training or p == 0.0:
        return x
    if not sequence_parallel:
        return F.dropout(x, p, True)
    with get_cuda_rng_tracker().fork():
        return F.dropout(x, p, True)
