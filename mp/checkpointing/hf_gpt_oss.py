"""Hugging Face gpt-oss (``GptOssForCausalLM``, ``model_type: gpt_oss``: OpenAI's gpt-oss-20b
and gpt-oss-120b) weights and config to and from mp's global parameter names.

gpt-oss is mp's GPT with RMSNorm, rotary embeddings (the rotate-half form, mp's own) with
YaRN's frequencies, grouped-query attention whose heads are ``head_dim`` wide (mp's
``kv_channels``), biases on q, k, v and the output projection, a learned sink logit per
head in every softmax (mp's ``softmax_type: learnable``), a sliding window on the layers
``layer_types`` names, and in every layer a mixture of experts with a biased router and
biased experts whose gated unit is a clamped quick GeGLU. Pure tensor functions (no
``transformers`` import); ``tools/convert_checkpoint.py`` reads and writes the files.

- ``q_proj``, ``k_proj``, ``v_proj`` (weights and biases) are fused into mp's
  ``query_key_value`` as Llama's are (`mp.checkpointing.hf_tensors.qkv_to_mp`); ``o_proj``
  is ``self_attention.dense`` (``add_bias_linear``), ``self_attn.sinks [a]`` is
  ``self_attention.core_attention.softmax_offset``, ``post_attention_layernorm`` is
  ``pre_mlp_layernorm``.
- ``layer_types`` and ``sliding_window = W``: a query of a ``sliding_attention`` layer sees
  the keys less than ``W`` positions back, its own included, mp's ``window_size = [W - 1,
  0]`` on the layers ``window_attn_skip_freq`` (a 0/1 per layer) names.
- ``rope_parameters``: YaRN (gpt-oss's ``factor`` 32 over ``original_max_position_embeddings``
  4096, ``beta_fast`` 32, ``beta_slow`` 1) is mp's ``rope_type: yarn``; its ``truncate:
  false`` (the ramp's ends left fractional) is mp's ``yarn_correction_range_round_to_int:
  false``. transformers scales the rotated channels by ``0.1 ln(factor) + 1`` and not the
  scores: mp's ``yarn_mscale`` 1 with ``yarn_mscale_all_dim`` 0.
- ``mlp.router`` (``weight [E, h]``, ``bias [E]``) is mp's ``mlp.router`` with
  ``moe_router_bias``; it takes the softmax over the top ``num_experts_per_tok`` logits, mp's
  default routing.
- The experts are stored as ``x @ W``, transposed against ``nn.Linear``:
  ``experts.gate_up_proj [E, h, 2f]`` holds gate and up interleaved along its last dim
  (the gate's channel ``j`` at ``2j``, the up's at ``2j + 1``), its bias
  ``gate_up_proj_bias [E, 2f]`` alike, ``down_proj [E, f, h]`` and ``down_proj_bias [E,
  h]``: mp's ``gate_weight``, ``fc1_weight [E, f, h]``, ``fc2_weight [E, h, f]`` and their
  biases. The unit is ``g sigmoid(1.702 g) (u + 1)`` with ``g`` clamped to at most
  ``swiglu_limit`` and ``u`` to ``[-swiglu_limit, swiglu_limit]`` after the biases: mp's
  ``quick_geglu`` with ``activation_func_clamp_value`` and ``glu_linear_offset`` 1.
- mp pads the vocabulary to ``padded_vocab_size`` rows (zeros, never a target); a
  zero-centred mp model (``layernorm_zero_centered_gamma``) stores each norm weight minus 1.

Refused by name: a quantized checkpoint (``quantization_config``: the experts of the released
gpt-oss weights are MXFP4 blocks and scales; dequantize them first), ``attention_bias:
false``, a ``swiglu_alpha`` other than quick GeLU's 1.702, RoPE scalings other than YaRN
with transformers' own attention factor; and by `hf_config` an mp model gpt-oss cannot
express (no sinks, another activation or norm, dense layers, an unbiased router, ...). The
auxiliary loss's coefficient is a training setting and is not carried over.
"""

from __future__ import annotations

import torch

from mp.checkpointing.hf_llama_config import layer_types, sliding_from_layer_types, window_fields
from mp.checkpointing.hf_tensors import (
    check_expressible,
    check_keys,
    common_fields,
    llama_ends_to_mp,
    qkv_to_hf,
    qkv_to_mp,
    rope_parameters,
    shift_norm_weights,
    yarn_from_hf,
    yarn_to_hf,
)
from mp.model.config import TransformerConfig
from mp.model.mlp import QUICK_GELU_ALPHA

__all__ = ["config_from_hf", "hf_config", "hf_to_mp", "mp_to_hf"]

_NAME = "gpt-oss"
# GptOssConfig's defaults for what a config.json leaves out
_DEFAULT_THETA, _DEFAULT_WINDOW, _DEFAULT_HEAD_DIM = 150000.0, 128, 64
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}
_PREFIX = "model."
_QKV = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
_LAYER_PAIRS = (  # (gpt-oss suffix, mp suffix) of the tensors copied as they are
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attn.o_proj.weight", "self_attention.dense.weight"),
    ("self_attn.o_proj.bias", "self_attention.dense.bias"),
    ("self_attn.sinks", "self_attention.core_attention.softmax_offset"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
    ("mlp.router.weight", "mlp.router.weight"),
    ("mlp.router.bias", "mlp.router.bias"),
    ("mlp.experts.down_proj_bias", "mlp.experts.fc2_bias"),
)
_EXPERTS = "mlp.experts."  # the experts' module, in both
_HF_EXPERTS = ("gate_up_proj", "gate_up_proj_bias", "down_proj")  # rearranged both ways
_MP_EXPERTS = ("gate_weight", "fc1_weight", "gate_bias", "fc1_bias", "fc2_weight")


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate, up [..., f]`` -> ``[..., 2f]``, the gate's channel ``j`` at ``2j``, the up's at
    ``2j + 1`` (gpt-oss's ``gate_up_proj``)."""
    return torch.stack((gate, up), dim=-1).flatten(-2)


def _layer_names(i: int) -> tuple[list[tuple[str, str]], list[tuple[list[str], str]]]:
    """Layer ``i``'s ``([(gpt-oss name less model., mp name)] copied as they are, [([q, k, v
    names], mp's fused name)])``."""
    src, dst = f"layers.{i}.", f"decoder.layers.{i}."
    return ([(src + hf, dst + mp) for hf, mp in _LAYER_PAIRS],
            [([f"{src}{name}.{kind}" for name in _QKV],
              f"{dst}self_attention.query_key_value.{kind}") for kind in ("weight", "bias")])


def hf_to_mp(state_dict: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """``GptOssForCausalLM`` (or ``GptOssModel``) weights to mp's global names and layout."""
    hf = {k.removeprefix(_PREFIX): v for k, v in state_dict.items()}
    head = hf.pop("lm_head.weight", None)
    layers = [_layer_names(i) for i in range(config.num_layers)]
    check_keys(set(hf), {"embed_tokens.weight", "norm.weight"} | {
        name for i, (pairs, qkv) in enumerate(layers) for name in (
            *(hf_name for hf_name, _ in pairs), *(n for names, _ in qkv for n in names),
            *(f"layers.{i}.{_EXPERTS}{e}" for e in _HF_EXPERTS))}, f"{_NAME} state dict")
    mp = llama_ends_to_mp(hf, head, config)
    for i, (pairs, qkv) in enumerate(layers):
        mp.update({mp_name: hf[hf_name] for hf_name, mp_name in pairs})
        mp.update({mp_name: qkv_to_mp(*(hf[n] for n in names), config.num_query_groups)
                   for names, mp_name in qkv})
        gate_up, bias, down = (hf[f"layers.{i}.{_EXPERTS}{e}"] for e in _HF_EXPERTS)
        gate_up = gate_up.transpose(1, 2)  # [E, 2f, h], gate and up rows interleaved
        mp.update(zip((f"decoder.layers.{i}.{_EXPERTS}{e}" for e in _MP_EXPERTS), (
            gate_up[:, 0::2], gate_up[:, 1::2], bias[:, 0::2], bias[:, 1::2],
            down.transpose(1, 2))))
    return shift_norm_weights({k: v.contiguous().clone() for k, v in mp.items()}, config, -1.0)


def mp_to_hf(weights: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """mp's global weights to ``GptOssForCausalLM.state_dict()``'s keys, shapes and layout
    (``lm_head.weight`` included; with tied embeddings it is ``embed_tokens``' tensor)."""
    hf_config(config)  # raises for models gpt-oss cannot express
    tied = not config.untie_embeddings_and_output_weights
    layers = [_layer_names(i) for i in range(config.num_layers)]
    check_keys(set(weights), {
        "embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
        *(() if tied else ("output_layer.weight",))} | {
        name for i, (pairs, qkv) in enumerate(layers) for name in (
            *(mp_name for _, mp_name in pairs + qkv),
            *(f"decoder.layers.{i}.{_EXPERTS}{e}" for e in _MP_EXPERTS))}, "mp checkpoint")
    weights = shift_norm_weights(weights, config, 1.0)
    vocab = config.vocab_size
    hf = {"embed_tokens.weight": weights["embedding.word_embeddings.weight"][:vocab],
          "norm.weight": weights["decoder.final_layernorm.weight"]}
    for i, (pairs, qkv) in enumerate(layers):
        hf.update({hf_name: weights[mp_name] for hf_name, mp_name in pairs})
        for names, mp_name in qkv:
            hf.update(zip(names, qkv_to_hf(weights[mp_name], config.num_attention_heads,
                                           config.num_query_groups)))
        gate, up, gate_bias, up_bias, down = (weights[f"decoder.layers.{i}.{_EXPERTS}{e}"]
                                              for e in _MP_EXPERTS)
        hf.update(zip((f"layers.{i}.{_EXPERTS}{e}" for e in _HF_EXPERTS), (
            _interleave(gate.transpose(1, 2), up.transpose(1, 2)),
            _interleave(gate_bias, up_bias), down.transpose(1, 2))))
    hf = {_PREFIX + k: v.contiguous().clone() for k, v in hf.items()}
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"] if tied else \
        weights["output_layer.weight"][:vocab].contiguous().clone()
    return hf


def _rope(hf: dict) -> dict:
    """mp's RoPE fields of a gpt-oss config: plain, or YaRN with transformers' own attention
    factor; ValueError for another scaling."""
    given = hf.get("rope_parameters") or hf.get("rope_scaling")
    kind, base, parameters = rope_parameters(
        hf if given else {**hf, "rope_parameters": _DEFAULT_ROPE}, _DEFAULT_THETA)
    if kind == "default":
        return {"rotary_base": base}
    if kind != "yarn" or parameters.get("attention_factor") is not None or (
            parameters.get("mscale") and parameters.get("mscale_all_dim")):
        raise ValueError(f"RoPE scaling {parameters!r}: mp's {_NAME} has YaRN (rope_type "
                         "'yarn' scaling the rotated channels by 0.1 ln(factor) + 1: no "
                         "attention_factor, nor both mscale and mscale_all_dim) or none")
    return {"rotary_base": base, **yarn_from_hf(parameters), "yarn_mscale": 1.0,
            "yarn_mscale_all_dim": 0.0}


def config_from_hf(hf: dict, *, tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1,
                   make_vocab_size_divisible_by: int = 128,
                   seq_length: int | None = None) -> TransformerConfig:
    """The mp model of a gpt-oss ``config.json``; ValueError for what mp cannot express."""
    if hf.get("quantization_config") is not None:
        raise ValueError(
            f"quantization_config={hf['quantization_config']!r}: mp converts unquantized "
            f"weights, and the released {_NAME} checkpoints hold their experts in MXFP4. "
            "Dequantize them first: load the model with transformers (GptOssForCausalLM."
            "from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), "
            "dtype=torch.bfloat16)) and save_pretrained it, then convert that directory")
    for key, value in (("attention_bias", True), ("swiglu_alpha", QUICK_GELU_ALPHA)):
        if hf.get(key, value) != value:
            raise ValueError(f"{key}={hf[key]!r}: mp's {_NAME} needs {key}={value!r}")
    heads, hidden, layers = hf["num_attention_heads"], hf["hidden_size"], hf["num_hidden_layers"]
    positions, width = hf["max_position_embeddings"], hf["intermediate_size"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                      for i in range(layers)]  # transformers' default
    windows = window_fields(sliding_from_layer_types(types, layers, _NAME),
                            hf.get("sliding_window", _DEFAULT_WINDOW), _NAME)
    fields = {**common_fields(hf, tensor_model_parallel_size, pipeline_model_parallel_size),
              "add_bias_linear": True}  # q, k, v, o, the experts and (by name) the router
    return TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        kv_channels=hf.get("head_dim", _DEFAULT_HEAD_DIM) or hidden // heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"], seq_length=seq_length or positions,
        max_position_embeddings=positions, ffn_hidden_size=width,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        normalization="RMSNorm", layernorm_epsilon=hf.get("rms_norm_eps", 1e-5),
        activation="quick_geglu", activation_func_clamp_value=float(hf.get("swiglu_limit", 7.0)),
        glu_linear_offset=1.0, softmax_type="learnable", position_embedding_type="rope",
        num_moe_experts=hf["num_local_experts"], moe_router_topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=width, moe_router_bias=True, **_rope(hf), **windows, **fields)


def hf_config(config: TransformerConfig) -> dict:
    """The gpt-oss ``config.json`` of mp model ``config``; ValueError for an mp model gpt-oss
    cannot express."""
    check_expressible(config, {
        "normalization": ("RMSNorm",), "activation": ("quick_geglu",),
        "glu_linear_offset": (1.0,), "softmax_type": ("learnable",),
        "position_embedding_type": ("rope",), "rotary_percent": (1.0,),
        "rotary_interleaved": (False,), "use_rope_scaling": (False,),
        "rotary_seq_len_interpolation_factor": (None,), "yarn_mscale": (1.0,),
        "yarn_mscale_all_dim": (0.0,), "no_rope_freq": (None,), "add_bias_linear": (True,),
        "qk_layernorm": (False,), "qk_l2_norm": (False,), "multi_latent_attention": (False,),
        "mtp_num_layers": (None,), "moe_router_bias": (True,),
        "moe_router_score_function": ("softmax",), "moe_router_pre_softmax": (False,),
        "moe_router_topk_scaling_factor": (None,), "moe_router_num_groups": (None,),
        "moe_shared_expert_intermediate_size": (None,), "moe_apply_probs_on_input": (False,)},
        _NAME)
    clamp = config.activation_func_clamp_value
    if clamp is None or config.num_moe_experts is None or not all(
            map(config.is_moe_layer, range(config.num_layers))):
        raise ValueError(f"model.activation_func_clamp_value={clamp!r}, num_moe_experts="
                         f"{config.num_moe_experts!r}, moe_layer_freq="
                         f"{config.moe_layer_freq!r}: {_NAME} clamps its gated unit "
                         "(swiglu_limit) and has experts in every layer")
    rope = {"rope_type": "default"}
    if config.rope_type == "yarn":  # gpt-oss's configs say truncate either way
        rope = {**yarn_to_hf(config), "truncate": config.yarn_correction_range_round_to_int}
    windows = layer_types(config)
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.moe_ffn_hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_query_groups, "head_dim": config.kv_channels,
            "num_local_experts": config.num_moe_experts,
            "num_experts_per_tok": config.moe_router_topk,
            "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.layernorm_epsilon,
            "rope_parameters": {"rope_theta": config.rotary_base, **rope},
            "layer_types": windows, "sliding_window": config.window_size[0] + 1
            if "sliding_attention" in windows else None,
            "swiglu_limit": clamp, "swiglu_alpha": QUICK_GELU_ALPHA, "attention_bias": True,
            "attention_dropout": config.attention_dropout,
            "initializer_range": config.init_method_std,
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights}
