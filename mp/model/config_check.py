"""`complete_and_check`: what `TransformerConfig.__post_init__` does, before any process
group exists: fill the sizes left to their defaults (``ffn_hidden_size``,
``max_position_embeddings``, ``num_query_groups``, ``kv_channels``, ``recompute_num_layers``)
and check every rule, with messages that name the value and the rule (each feature's rules:
`mp.model.config_rules`, the parallel layout's: `mp.model.parallel_rules`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from mp.model.config_rules import (
    check_fp32_residual_connection,
    check_glu_and_softmax_type,
    check_mla,
    check_moe,
    check_mtp,
    check_qk_l2_norm_and_no_rope,
    check_recompute_modules,
    check_rope,
    check_window,
    check_yarn,
    divisible,
    one_of,
    positive_int,
)
from mp.model.fp8_layers import check_fp8
from mp.model.parallel_rules import check_parallel_layout

if TYPE_CHECKING:
    from mp.model.config import TransformerConfig

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def complete_and_check(config: TransformerConfig) -> None:
    """Fill ``config``'s defaulted sizes and check it (module doc); ValueError names the
    value and the rule."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                 "seq_length", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "context_parallel_size"):
        positive_int(name, getattr(config, name))
    if config.ffn_hidden_size is None:
        config.ffn_hidden_size = (_swiglu_ffn(config.hidden_size) if config.activation == "swiglu"
                                else 4 * config.hidden_size)
    if config.max_position_embeddings is None:
        config.max_position_embeddings = config.seq_length
    if config.num_query_groups is None:
        config.num_query_groups = config.num_attention_heads
    positive_int("num_query_groups", config.num_query_groups)
    if config.kv_channels is None and config.multi_latent_attention:  # a query head's width
        config.kv_channels = config.qk_head_dim + config.qk_pos_emb_head_dim
    if config.kv_channels is None:
        divisible("hidden_size", config.hidden_size, "num_attention_heads",
                  config.num_attention_heads)
        config.kv_channels = config.hidden_size // config.num_attention_heads
    positive_int("kv_channels", config.kv_channels)
    positive_int("ffn_hidden_size", config.ffn_hidden_size)
    one_of("normalization", config.normalization, ("LayerNorm", "RMSNorm"))
    one_of("normalization_impl", config.normalization_impl, ("mp", "apex"))
    one_of("activation", config.activation,
           ("gelu", "gelu_tanh", "swiglu", "squared_relu", "quick_geglu"))
    one_of("position_embedding_type", config.position_embedding_type,
           ("learned_absolute", "rope", "none"))
    one_of("attention_backend", config.attention_backend, ("sdpa", "unfused"))
    one_of("precision", config.precision, tuple(PRECISIONS))
    one_of("recompute_granularity", config.recompute_granularity, (None, "full", "selective"))
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name}={getattr(config, name)} must be in [0, 1)")
    tp = config.tensor_model_parallel_size
    divisible("num_attention_heads", config.num_attention_heads,
              "tensor_model_parallel_size", tp)
    divisible("num_attention_heads", config.num_attention_heads, "num_query_groups",
              config.num_query_groups)
    divisible("num_query_groups", config.num_query_groups, "tensor_model_parallel_size", tp)
    divisible("ffn_hidden_size", config.ffn_hidden_size, "tensor_model_parallel_size", tp)
    check_rope(config)
    std = config.embedding_init_method_std
    if std is not None and not std > 0:
        raise ValueError(f"embedding_init_method_std={std} must be > 0 (or None: "
                         "init_method_std's)")
    if config.seq_length > config.max_position_embeddings:
        raise ValueError(f"seq_length={config.seq_length} exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}")
    check_moe(config)
    check_mla(config)
    check_yarn(config)
    check_mtp(config)
    check_window(config)
    check_qk_l2_norm_and_no_rope(config)
    check_glu_and_softmax_type(config)
    check_fp32_residual_connection(config)
    check_fp8(config)
    check_parallel_layout(config)
    largest_chunk = max(max(stage) for stage in config.chunk_layer_counts)
    if config.recompute_granularity == "full":
        one_of("recompute_method", config.recompute_method, ("uniform", "block"))
        if config.recompute_num_layers is None:
            config.recompute_num_layers = 1
        positive_int("recompute_num_layers", config.recompute_num_layers)
        if config.recompute_num_layers > largest_chunk:
            raise ValueError(f"recompute_num_layers={config.recompute_num_layers} exceeds the "
                             f"{largest_chunk} layers of the largest pipeline chunk")
    elif config.recompute_method is not None:
        raise ValueError(f"recompute_method={config.recompute_method!r} needs "
                         "recompute_granularity='full'")
    check_recompute_modules(config)


def _swiglu_ffn(hidden: int) -> int:
    """8h/3 (about the parameters of a 4h GeLU MLP) rounded up to a multiple of 64; it does not
    depend on the TP size, so a model is the same model at every layout."""
    return math.ceil(8 * hidden / 3 / 64) * 64
