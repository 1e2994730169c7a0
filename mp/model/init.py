"""Weight initialisers for GPT (Megatron's ``init_method_normal`` family)."""

from __future__ import annotations

import functools
import math

from torch import nn


def init_method_normal(std: float):
    """``N(0, std)`` for most weights."""
    return functools.partial(nn.init.normal_, mean=0.0, std=std)


def scaled_init_method_normal(std: float, num_layers: int):
    """``N(0, std / sqrt(2 * num_layers))`` for the projections that feed the residual stream
    (attention output, second MLP layer), as in GPT-2 and Megatron."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))
