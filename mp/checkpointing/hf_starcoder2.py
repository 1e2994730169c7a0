"""Hugging Face StarCoder2 (``Starcoder2ForCausalLM``, ``model_type: starcoder2``) weights and
config to and from mp's global parameter names.

StarCoder2 is mp's GPT with LayerNorm (weights and biases; ``norm_epsilon``), rotary
embeddings (the rotate-half form, mp's own; ``rope_parameters``' ``rope_theta``),
grouped-query attention (``num_key_value_heads`` is mp's ``num_query_groups``), a GeLU MLP
(``mlp.c_fc`` and ``mlp.c_proj``: mp's ``linear_fc1`` and ``linear_fc2``), biases on every
linear layer with ``use_bias`` (its default: mp's ``add_bias_linear``; without, only the norms
have biases) and embeddings tied unless ``tie_word_embeddings`` is false. Pure tensor
functions (no ``transformers`` import); ``tools/convert_checkpoint.py`` reads and writes the
files. What differs between the two:

- ``q_proj``, ``k_proj`` and ``v_proj`` (weights and biases) are fused into mp's
  ``query_key_value`` as Llama's are (`mp.checkpointing.hf_tensors.qkv_to_mp`: per query
  group, the group's queries, its key, its value); ``o_proj`` is ``self_attention.dense``,
  ``post_attention_layernorm`` is ``pre_mlp_layernorm``.
- ``hidden_act``: ``gelu_pytorch_tanh`` (its default; ``gelu_new`` and ``gelu_fast`` are the
  same tanh approximation) is mp's ``gelu_tanh``, ``gelu`` the exact one.
- ``sliding_window: W`` (null: none) slides every layer: a query sees the keys less than
  ``W`` positions back, its own included, mp's ``window_size = [W - 1, 0]``.
- Dropouts: ``residual_dropout`` (on the attention's and the MLP's output) and
  ``embedding_dropout`` are both mp's ``hidden_dropout``, which drops at the same places, so
  they must be equal; ``attention_dropout`` is mp's.
- ``head_dim``, when the config has it (transformers 5 reads it), is mp's ``kv_channels``
  (``hidden_size / num_attention_heads`` when absent, and then not written back).
- mp pads the vocabulary to ``padded_vocab_size`` rows (zeros, never a target); a
  zero-centred mp model (``layernorm_zero_centered_gamma``) stores each norm weight minus 1
  (`mp.checkpointing.hf_tensors.shift_norm_weights`).

Refused by name: RoPE scalings (``rope_type`` other than ``default``), another activation,
a ``sliding_window`` that is not an integer >= 1, ``residual_dropout`` and
``embedding_dropout`` that differ; and by `hf_config` an mp model StarCoder2 cannot express
(RMSNorm, SwiGLU, learned positions, part-rotated heads, q/k norms, experts, a window on
some layers only, q, k, v biases without the other linear layers').
"""

from __future__ import annotations

import torch

from mp.checkpointing.hf_tensors import (
    check_expressible,
    check_keys,
    check_output_layer,
    pad_rows,
    qkv_to_hf,
    qkv_to_mp,
    rope_parameters,
    shift_norm_weights,
)
from mp.model.config import TransformerConfig

__all__ = ["config_from_hf", "hf_config", "hf_to_mp", "mp_to_hf"]

#: ``hidden_act`` -> mp's ``activation`` (``gelu_pytorch_tanh`` is StarCoder2's default)
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_PREFIX = "model."
_QKV = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
_NORMS = (("input_layernorm", "input_layernorm"),  # (StarCoder2 module, mp module)
          ("post_attention_layernorm", "pre_mlp_layernorm"))
_LINEARS = (("self_attn.o_proj", "self_attention.dense"), ("mlp.c_fc", "mlp.linear_fc1"),
            ("mlp.c_proj", "mlp.linear_fc2"))
_IGNORED_BUFFERS = ("rotary_emb.inv_freq",)  # older checkpoints saved the RoPE frequencies


def _window(hf: dict) -> dict:
    """mp's ``window_size`` of ``sliding_window`` (every layer's; none when null)."""
    width = hf.get("sliding_window")
    if width is None:
        return {}
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"sliding_window={width!r}: mp's StarCoder2 needs null or an integer "
                         ">= 1 (a query sees the keys less than sliding_window positions back)")
    return {"window_size": [width - 1, 0]}


def config_from_hf(hf: dict, *, tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1,
                   make_vocab_size_divisible_by: int = 128,
                   seq_length: int | None = None) -> TransformerConfig:
    """The mp model of a StarCoder2 ``config.json`` (absent fields take transformers'
    defaults); ValueError for what mp cannot express."""
    activation = hf.get("hidden_act", "gelu_pytorch_tanh")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={activation!r}: mp's StarCoder2 MLP takes one of "
                         f"{', '.join(map(repr, _ACTIVATIONS))}")
    kind, base, parameters = rope_parameters(hf)
    if kind != "default":
        raise ValueError(f"RoPE scaling {parameters!r}: mp's StarCoder2 has RoPE without "
                         "scaling (rope_type 'default')")
    residual, embedding = hf.get("residual_dropout", 0.0), hf.get("embedding_dropout", 0.0)
    if residual != embedding:
        raise ValueError(f"residual_dropout={residual!r} with embedding_dropout={embedding!r}: "
                         "mp's StarCoder2 drops both with its hidden_dropout, so they must be "
                         "equal")
    heads, hidden, positions = (hf["num_attention_heads"], hf["hidden_size"],
                                hf["max_position_embeddings"])
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        kv_channels=hf.get("head_dim") or hidden // heads,
        num_query_groups=hf.get("num_key_value_heads", 2),  # transformers' default
        vocab_size=hf["vocab_size"], seq_length=seq_length or positions,
        max_position_embeddings=positions, ffn_hidden_size=hf["intermediate_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        normalization="LayerNorm", layernorm_epsilon=hf.get("norm_epsilon", 1e-5),
        activation=_ACTIVATIONS[activation], position_embedding_type="rope", rotary_base=base,
        add_bias_linear=hf.get("use_bias", True), **_window(hf),
        hidden_dropout=residual, attention_dropout=hf.get("attention_dropout", 0.0),
        init_method_std=hf.get("initializer_range", 0.018042),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size)


def hf_config(config: TransformerConfig) -> dict:
    """A StarCoder2 ``config.json`` for mp model ``config``; ValueError for an mp model
    StarCoder2 cannot express."""
    needs = {"normalization": ("LayerNorm",), "activation": tuple(_HF_ACTIVATION),
             "position_embedding_type": ("rope",), "rope_type": ("rope",),
             "rotary_percent": (1.0,), "rotary_interleaved": (False,),
             "use_rope_scaling": (False,),
             "rotary_seq_len_interpolation_factor": (None,), "qk_layernorm": (False,),
             "qk_l2_norm": (False,), "no_rope_freq": (None,),
             # q, k, v biases come with use_bias, which gives every linear layer one
             "add_qkv_bias": (False, True) if config.add_bias_linear else (False,),
             "num_moe_experts": (None,), "multi_latent_attention": (False,),
             "mtp_num_layers": (None,), "softmax_type": ("vanilla",)}
    check_expressible(config, needs, "StarCoder2")
    windows = {config.attention_window(i + 1) for i in range(config.num_layers)}
    if len(windows) > 1:
        raise ValueError(f"model.window_attn_skip_freq={config.window_attn_skip_freq!r}: "
                         "StarCoder2 has a sliding window in every layer or none "
                         "(window_attn_skip_freq=None)")
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = {} if config.kv_channels * heads == hidden else {"head_dim": config.kv_channels}
    return {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
            "vocab_size": config.vocab_size, "hidden_size": hidden,
            "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": heads, "num_key_value_heads": config.num_query_groups,
            **head_dim, "hidden_act": _HF_ACTIVATION[config.activation],
            "max_position_embeddings": config.max_position_embeddings,
            "norm_epsilon": config.layernorm_epsilon, "use_bias": config.add_bias_linear,
            "rope_theta": config.rotary_base,  # for transformers 4; 5 reads rope_parameters
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
            "sliding_window": None if config.window_size is None else config.window_size[0] + 1,
            "residual_dropout": config.hidden_dropout, "embedding_dropout": config.hidden_dropout,
            "attention_dropout": config.attention_dropout,
            "initializer_range": config.init_method_std,
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights}


def _pairs(config: TransformerConfig) -> list[tuple[str, str]]:
    """(StarCoder2 name less ``model.``, mp name) of every tensor but q, k, v and the output
    layer: the embedding (mp's padded), the norms' weights and biases, the other linear
    layers' weights and, with ``add_bias_linear``, biases."""
    biased = ("weight", "bias") if config.add_bias_linear else ("weight",)
    pairs = [("embed_tokens.weight", "embedding.word_embeddings.weight"),
             ("norm.weight", "decoder.final_layernorm.weight"),
             ("norm.bias", "decoder.final_layernorm.bias")]
    for i in range(config.num_layers):
        pairs += [(f"layers.{i}.{hf}.{p}", f"decoder.layers.{i}.{mp}.{p}")
                  for modules, kinds in ((_NORMS, ("weight", "bias")), (_LINEARS, biased))
                  for hf, mp in modules for p in kinds]
    return pairs


def _qkv_names(config: TransformerConfig) -> list[tuple[list[str], str]]:
    """([StarCoder2's q, k, v names less ``model.``], mp's fused name) of each layer's
    weights and, with ``add_bias_linear``, biases."""
    return [([f"layers.{i}.{name}.{p}" for name in _QKV],
             f"decoder.layers.{i}.self_attention.query_key_value.{p}")
            for i in range(config.num_layers)
            for p in (("weight", "bias") if config.add_bias_linear else ("weight",))]


def hf_to_mp(state_dict: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """``Starcoder2ForCausalLM`` (or ``Starcoder2Model``) weights to mp's global names and
    layout."""
    hf = {k.removeprefix(_PREFIX): v for k, v in state_dict.items()
          if not k.endswith(_IGNORED_BUFFERS)}
    head = hf.pop("lm_head.weight", None)
    tied = not config.untie_embeddings_and_output_weights
    pairs, qkv = _pairs(config), _qkv_names(config)
    check_keys(set(hf), {name for name, _ in pairs} | {n for names, _ in qkv for n in names},
               "StarCoder2 state dict")
    check_output_layer(head, hf["embed_tokens.weight"], tied, "embed_tokens")
    mp = {mp_name: hf[hf_name] for hf_name, mp_name in pairs}
    mp.update({mp_name: qkv_to_mp(*(hf[n] for n in names), config.num_query_groups)
               for names, mp_name in qkv})
    embedding, rows = "embedding.word_embeddings.weight", config.padded_vocab_size
    mp[embedding] = pad_rows(mp[embedding], rows)
    if not tied:
        mp["output_layer.weight"] = pad_rows(head, rows)
    return shift_norm_weights({k: v.contiguous().clone() for k, v in mp.items()}, config, -1.0)


def mp_to_hf(weights: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """mp's global weights to ``Starcoder2ForCausalLM.state_dict()``'s keys, shapes and
    layout (``lm_head.weight`` included; with tied embeddings it is ``embed_tokens``'
    tensor)."""
    hf_config(config)  # raises for models StarCoder2 cannot express
    tied = not config.untie_embeddings_and_output_weights
    pairs, qkv = _pairs(config), _qkv_names(config)
    check_keys(set(weights), {mp_name for _, mp_name in pairs + qkv}
               | (set() if tied else {"output_layer.weight"}), "mp checkpoint")
    weights = shift_norm_weights(weights, config, 1.0)
    hf = {hf_name: weights[mp_name] for hf_name, mp_name in pairs}
    hf["embed_tokens.weight"] = hf["embed_tokens.weight"][:config.vocab_size]
    for names, mp_name in qkv:
        hf.update(zip(names, qkv_to_hf(weights[mp_name], config.num_attention_heads,
                                       config.num_query_groups)))
    hf = {_PREFIX + k: v.contiguous().clone() for k, v in hf.items()}
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"] if tied else \
        weights["output_layer.weight"][:config.vocab_size].contiguous().clone()
    return hf
