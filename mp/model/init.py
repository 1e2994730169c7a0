"""Weight initialisers for GPT (Megatron's ``init_method_normal`` family)."""

from __future__ import annotations

import functools
import math

from torch import nn

from mp.model.config import TransformerConfig


def init_method_normal(std: float):
    """``N(0, std)`` for most weights."""
    return functools.partial(nn.init.normal_, mean=0.0, std=std)


def scaled_init_method_normal(std: float, num_layers: int):
    """``N(0, std / sqrt(2 * num_layers))`` for the projections that feed the residual stream
    (attention output, second MLP layer), as in GPT-2 and Megatron."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def init_method(config: TransformerConfig):
    """The model's weights but the residual projections: ``N(0, init_method_std)``, or
    ``U(-a, a)`` with Glorot's ``a = sqrt(6 / (fan_in + fan_out))`` of each full (unsharded)
    weight with ``init_method_xavier_uniform`` (Megatron's ``--init-method-xavier-uniform``)."""
    if config.init_method_xavier_uniform:
        return nn.init.xavier_uniform_
    return init_method_normal(config.init_method_std)


def output_init_method(config: TransformerConfig):
    """The residual projections (attention output, second MLP layer): the scaled normal, or
    Glorot's uniform like every weight with ``init_method_xavier_uniform``, as in Megatron."""
    if config.init_method_xavier_uniform:
        return nn.init.xavier_uniform_
    return scaled_init_method_normal(config.init_method_std, config.num_layers)


def embedding_init_method(config: TransformerConfig):
    """The word and position embeddings: ``N(0, embedding_init_method_std)`` when it is set and
    differs from ``init_method_std`` (Megatron's ``--embedding-init-method-std``; ~1.0 against
    loss spikes, arXiv 2312.16903), else `init_method`'s, as Megatron-Core's
    ``TransformerConfig`` decides (an equal std keeps Glorot's uniform with
    ``init_method_xavier_uniform``). The output layer, untied, keeps `init_method`'s."""
    std = config.embedding_init_method_std
    if std is not None and std != config.init_method_std:
        return init_method_normal(std)
    return init_method(config)
