"""Hugging Face GPT-2 (``GPT2LMHeadModel``) weights to and from mp's global parameter names.

Pure tensor functions (no ``transformers`` import); ``tools/convert_checkpoint.py`` reads and
writes the files. What differs between the two:

- GPT-2's ``Conv1D`` computes ``x @ W + b`` with ``W [in, out]``; mp's linear layers hold
  ``[out, in]``: every projection weight is transposed.
- ``c_attn`` (fused QKV) lays its ``3h`` outputs as ``[q; k; v]``, each ``h = heads x
  head_dim`` wide across all heads; mp's ``query_key_value`` lays them per head,
  ``[heads, 3, head_dim]``, so that a contiguous tensor-parallel slice holds whole heads. The
  weight's rows and the bias are permuted between the two.
- mp pads the vocabulary to ``padded_vocab_size`` rows (zeros here; they are never a target);
  GPT-2 has exactly ``vocab_size``.
- The MLP activation: GPT-2's ``gelu_new`` (also named ``gelu_pytorch_tanh``, ``gelu_fast``:
  the same tanh approximation) is mp's ``activation="gelu_tanh"``; ``gelu`` is the exact one.
- A zero-centred mp model (``layernorm_zero_centered_gamma``) stores each LayerNorm weight
  minus 1 (`mp.checkpointing.hf_tensors.shift_norm_weights`).

GPT-2's heads are ``n_embd / n_head`` wide: an mp model with another ``kv_channels`` is refused.
"""

from __future__ import annotations

import torch

from mp.checkpointing.hf_tensors import (
    check_expressible,
    check_keys,
    check_output_layer,
    pad_rows,
    shift_norm_weights,
)
from mp.model.config import TransformerConfig

#: GPT-2 ``activation_function`` -> mp's ``activation`` (``gelu_new`` is GPT-2's default)
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh"}
_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_PREFIX = "transformer."
_LAYER_PAIRS = (  # (GPT-2 suffix, mp suffix, transposed Conv1D weight)
    ("ln_1", "input_layernorm", False),
    ("attn.c_proj", "self_attention.dense", True),
    ("ln_2", "pre_mlp_layernorm", False),
    ("mlp.c_fc", "mlp.linear_fc1", True),
    ("mlp.c_proj", "mlp.linear_fc2", True),
)
_IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks older versions saved


def config_from_hf(hf: dict, *, tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1,
                   make_vocab_size_divisible_by: int = 128,
                   seq_length: int | None = None) -> TransformerConfig:
    """The mp model of a GPT-2 ``config.json``; ValueError for what mp cannot express."""
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation_function={activation!r}: mp's GPT-2 MLP takes one of "
                         f"{', '.join(map(repr, _ACTIVATIONS))}")
    for key, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if hf.get(key, value) != value:
            raise ValueError(f"{key}={hf[key]!r}: mp's attention needs {key}={value!r}")
    positions = hf["n_positions"]
    return TransformerConfig(
        num_layers=hf["n_layer"], hidden_size=hf["n_embd"], num_attention_heads=hf["n_head"],
        vocab_size=hf["vocab_size"], seq_length=seq_length or positions,
        max_position_embeddings=positions, ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation=_ACTIVATIONS[activation],
        hidden_dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
        init_method_std=hf.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size)


def hf_config(config: TransformerConfig) -> dict:
    """A GPT-2 ``config.json`` for mp model ``config``; ValueError for an mp model GPT-2
    cannot express."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    needs = {"normalization": ("LayerNorm",), "activation": tuple(_HF_ACTIVATION),
             "position_embedding_type": ("learned_absolute",), "add_bias_linear": (True,),
             "num_query_groups": (heads,),  # GPT-2 has one key per head
             "kv_channels": (hidden // heads,) if hidden % heads == 0 else (),
             "qk_layernorm": (False,), "qk_l2_norm": (False,), "num_moe_experts": (None,),
             "window_size": (None,), "softmax_type": ("vanilla",)}
    check_expressible(config, needs, "GPT-2")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.max_position_embeddings,
            "n_embd": config.hidden_size, "n_layer": config.num_layers,
            "n_head": config.num_attention_heads, "n_inner": config.ffn_hidden_size,
            "activation_function": _HF_ACTIVATION[config.activation],
            "layer_norm_epsilon": config.layernorm_epsilon,
            "resid_pdrop": config.hidden_dropout, "embd_pdrop": config.hidden_dropout,
            "attn_pdrop": config.attention_dropout,
            "initializer_range": config.init_method_std,
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights}


def _qkv_to_mp(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[3 (q,k,v), heads, head_dim, ...]`` -> ``[heads, 3, head_dim, ...]`` on dim 0."""
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _qkv_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def hf_to_mp(state_dict: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or ``GPT2Model``) weights to mp's global names and layout."""
    hf = {k.removeprefix(_PREFIX): v for k, v in state_dict.items()
          if not k.endswith(_IGNORED_BUFFERS)}
    head = hf.pop("lm_head.weight", None)
    tied = not config.untie_embeddings_and_output_weights
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} | {
        f"h.{i}.{name}.{p}" for i in range(config.num_layers) for p in ("weight", "bias")
        for name in ("attn.c_attn", *(pair[0] for pair in _LAYER_PAIRS))}
    check_keys(set(hf), expected, "GPT-2 state dict")
    check_output_layer(head, hf["wte.weight"], tied, "wte")
    rows, heads = config.padded_vocab_size, config.num_attention_heads
    mp = {"embedding.word_embeddings.weight": pad_rows(hf["wte.weight"], rows),
          "embedding.position_embeddings.weight": hf["wpe.weight"],
          "decoder.final_layernorm.weight": hf["ln_f.weight"],
          "decoder.final_layernorm.bias": hf["ln_f.bias"]}
    if not tied:
        mp["output_layer.weight"] = pad_rows(head, rows)
    for i in range(config.num_layers):
        src, dst = f"h.{i}.", f"decoder.layers.{i}."
        mp[dst + "self_attention.query_key_value.weight"] = _qkv_to_mp(
            hf[src + "attn.c_attn.weight"].t(), heads)
        mp[dst + "self_attention.query_key_value.bias"] = _qkv_to_mp(
            hf[src + "attn.c_attn.bias"], heads)
        for hf_name, mp_name, conv1d in _LAYER_PAIRS:
            weight = hf[f"{src}{hf_name}.weight"]
            mp[f"{dst}{mp_name}.weight"] = weight.t() if conv1d else weight
            mp[f"{dst}{mp_name}.bias"] = hf[f"{src}{hf_name}.bias"]
    return shift_norm_weights({k: v.contiguous().clone() for k, v in mp.items()}, config, -1.0)


def mp_to_hf(weights: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """mp's global weights to ``GPT2LMHeadModel.state_dict()``'s keys, shapes and layout
    (``lm_head.weight`` included; with tied embeddings it is ``wte``'s tensor)."""
    hf_config(config)  # raises for models GPT-2 cannot express
    tied = not config.untie_embeddings_and_output_weights
    heads, vocab = config.num_attention_heads, config.vocab_size
    layer_names = {f"decoder.layers.{i}.{name}.{p}" for i in range(config.num_layers)
                   for p in ("weight", "bias")
                   for name in ("self_attention.query_key_value",
                                *(pair[1] for pair in _LAYER_PAIRS))}
    check_keys(set(weights), layer_names | {
        "embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
        "decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
        *(() if tied else ("output_layer.weight",))}, "mp checkpoint")
    w = {k: v.contiguous() for k, v in shift_norm_weights(weights, config, 1.0).items()}
    hf = {"transformer.wte.weight": w["embedding.word_embeddings.weight"][:vocab],
          "transformer.wpe.weight": w["embedding.position_embeddings.weight"]}
    for i in range(config.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        hf[dst + "attn.c_attn.weight"] = _qkv_to_hf(
            w[src + "self_attention.query_key_value.weight"], heads).t()
        hf[dst + "attn.c_attn.bias"] = _qkv_to_hf(w[src + "self_attention.query_key_value.bias"],
                                                  heads)
        for hf_name, mp_name, conv1d in _LAYER_PAIRS:
            weight = w[f"{src}{mp_name}.weight"]
            hf[f"{dst}{hf_name}.weight"] = weight.t() if conv1d else weight
            hf[f"{dst}{hf_name}.bias"] = w[f"{src}{mp_name}.bias"]
    hf["transformer.ln_f.weight"] = w["decoder.final_layernorm.weight"]
    hf["transformer.ln_f.bias"] = w["decoder.final_layernorm.bias"]
    hf = {k: v.contiguous().clone() for k, v in hf.items()}
    hf["lm_head.weight"] = hf["transformer.wte.weight"] if tied else \
        w["output_layer.weight"][:vocab].clone()
    return hf
