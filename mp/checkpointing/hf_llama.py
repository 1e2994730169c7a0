"""Hugging Face Llama (``LlamaForCausalLM``), Mistral (``MistralForCausalLM``), Qwen2 and
Qwen2.5 (``Qwen2ForCausalLM``), Qwen3 (``Qwen3ForCausalLM``), Mixtral
(``MixtralForCausalLM``), Qwen3-MoE (``Qwen3MoeForCausalLM``) and Qwen2-MoE
(``Qwen2MoeForCausalLM``) weights to and from mp's global parameter names.

A Llama is mp's GPT with RMSNorm, SwiGLU, rotary embeddings (the rotate-half form, mp's own),
no linear biases, untied embeddings unless ``tie_word_embeddings``, and grouped-query
attention: ``num_key_value_heads`` is mp's ``num_query_groups``. Pure tensor functions (no
``transformers`` import); ``tools/convert_checkpoint.py`` reads and writes the files; the
configs' side (the families, ``config_from_hf``, ``hf_config``) is
`mp.checkpointing.hf_llama_config`. What differs between the two:

- ``q_proj [a d, h]``, ``k_proj`` and ``v_proj [g d, h]`` are three weights; mp's fused
  ``query_key_value`` lays their rows per query group, ``[g, a / g + 2, d]`` (the group's
  ``a / g`` queries, its key, its value), so a tensor-parallel slice holds whole groups.
- ``gate_proj``, ``up_proj`` and ``down_proj`` are mp's ``linear_gate``, ``linear_fc1`` and
  ``linear_fc2``; the norms are ``input_layernorm`` and ``pre_mlp_layernorm``.
- mp pads the vocabulary to ``padded_vocab_size`` rows (zeros, never a target).

Llama 3.1's RoPE scaling (``rope_type: llama3``, the factor free, the other constants
Meta's) is mp's ``use_rope_scaling`` and ``rope_scaling_factor``; ``head_dim`` is mp's
``kv_channels`` (``hidden_size / num_attention_heads`` when absent). A zero-centred mp model
(``layernorm_zero_centered_gamma``) stores each norm weight minus 1
(`mp.checkpointing.hf_tensors.shift_norm_weights`). What one side cannot express is refused
by name: other RoPE scalings (linear, dynamic, YaRN, ...), biases, an activation other than
SiLU; an mp model that rotates part of each head (``rotary_percent < 1``; Llama rotates whole
heads).

Qwen2 (and Qwen2.5, the same architecture) is a Llama whose ``q_proj``, ``k_proj`` and
``v_proj`` have biases (``o_proj`` none): mp's ``add_qkv_bias``, the three biases fused into
``query_key_value.bias`` in the weight's row order.

Qwen3 is a Llama whose attention normalizes each query and key head over its ``head_dim``
channels before RoPE with an RMSNorm shared by the heads (``q_norm``, ``k_norm``): mp's
``qk_layernorm`` (``self_attention.q_layernorm``, ``k_layernorm``). The config's
``model_type`` picks the family one way, ``qk_layernorm`` the other.
``attention_bias=True`` (biases on the attention projections only) is refused by name.

Mixtral is a Llama whose every MLP is a mixture of ``num_local_experts`` SwiGLU experts with
a top-``num_experts_per_tok`` router: mp's MoE layer (`mp.model.moe`) with
``moe_layer_freq=1``. Its router takes the softmax over every expert, keeps the top ``k`` and
renormalizes them, which is mp's default routing (a softmax over the top ``k`` logits). Files
hold each expert apart (``block_sparse_moe.experts.<e>.w1`` the gate, ``w3`` the up and ``w2``
the down projection, as ``save_pretrained`` writes them); mp stacks them into
``mlp.experts.gate_weight``, ``fc1_weight`` and ``fc2_weight`` (``[E, ...]``), and the router
``block_sparse_moe.gate`` is ``mlp.router``. Router jitter noise is refused by name; the
auxiliary loss's coefficient is a training setting and is not carried over
(``--moe-aux-loss-coeff``).

Qwen3-MoE is a Qwen3 with Mixtral's mixture of experts (``num_experts``, which
transformers 5 writes ``num_local_experts``, of width
``moe_intermediate_size``), named ``mlp.gate`` and ``mlp.experts.<e>.gate_proj``,
``up_proj``, ``down_proj``. With ``norm_topk_prob`` its top ``k`` are renormalized (mp's
default routing); without, they are the softmax's own (mp's ``moe_router_pre_softmax``).
Its dense layers (``mlp_only_layers``, and those ``decoder_sparse_step`` skips) have Llama's
MLP of ``intermediate_size``; mp's ``moe_layer_freq`` holds the pattern, and ``mp-to-hf``
writes it as ``mlp_only_layers``.

Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) is a Qwen2 (``qkv_bias`` in its config, on by
default) with Qwen3-MoE's experts and routing, and in every layer with experts a shared
expert (``mlp.shared_expert``, ``shared_expert_intermediate_size`` wide: mp's
``shared_experts``) whose output is scaled per token by ``sigmoid(shared_expert_gate x)``:
mp's ``moe_shared_expert_gate`` (``shared_experts.gate_weight``).

Mistral is a Llama whose every layer may attend through a sliding window. Sliding windows
are config fields only (the weights do not change): Hugging Face's ``sliding_window = W``
lets a query see the keys less than ``W`` positions back, its own included, which is mp's
``window_size = [W - 1, 0]`` (Megatron's ``--window-size``). Mistral and Mixtral slide every
layer when ``sliding_window`` is not null, Qwen3-MoE every layer with ``use_sliding_window``;
Qwen2, Qwen3 and Qwen2-MoE with ``use_sliding_window`` slide the layers ``layer_types``
names ``sliding_attention`` (derived from ``max_window_layers`` when absent, as transformers 5
does), mp's per-layer ``window_attn_skip_freq``. ``mp-to-hf`` writes Mistral for a dense
Llama-like model with windows, and refuses a pattern of sliding layers the family cannot
express (Mistral, Mixtral and Qwen3-MoE: every layer or none).
"""

from __future__ import annotations

import torch

from mp.checkpointing.hf_llama_config import FAMILIES, config_from_hf, hf_config, model_type
from mp.checkpointing.hf_tensors import (
    check_keys,
    llama_ends_to_mp,
    qkv_to_hf,
    qkv_to_mp,
    shift_norm_weights,
)
from mp.model.config import TransformerConfig

__all__ = ["FAMILIES", "config_from_hf", "hf_config", "hf_to_mp", "mp_to_hf"]

_PREFIX = "model."
_QKV = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
_LAYER_PAIRS = (  # (Llama suffix, mp suffix)
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attn.o_proj.weight", "self_attention.dense.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
    ("mlp.gate_proj.weight", "mlp.linear_gate.weight"),
    ("mlp.up_proj.weight", "mlp.linear_fc1.weight"),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight"),
)
_QK_NORM_PAIRS = (("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
                  ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"))
_SHARED_EXPERT_PAIRS = (  # Qwen2-MoE's gated shared expert
    ("mlp.shared_expert.gate_proj.weight", "mlp.shared_experts.linear_gate.weight"),
    ("mlp.shared_expert.up_proj.weight", "mlp.shared_experts.linear_fc1.weight"),
    ("mlp.shared_expert.down_proj.weight", "mlp.shared_experts.linear_fc2.weight"),
    ("mlp.shared_expert_gate.weight", "mlp.shared_experts.gate_weight"),
)
_IGNORED_BUFFERS = ("rotary_emb.inv_freq",)  # older checkpoints saved the RoPE frequencies


_EXPERT_WEIGHTS = ("gate_weight", "fc1_weight", "fc2_weight")  # mp's gate, up, down


def _layer_pairs(config: TransformerConfig, layer: int) -> tuple[tuple[str, str], ...]:
    """(Hugging Face suffix, mp suffix) of ``layer``'s parameters other than q, k, v (and
    the experts): a dense MLP's as Llama names them, or a MoE layer's router (and shared
    expert)."""
    family = FAMILIES[model_type(config)]
    if not config.is_moe_layer(layer):
        mlp = _LAYER_PAIRS[3:]
    else:
        mlp = ((f"{family.experts.block}.gate.weight", "mlp.router.weight"),
               *(_SHARED_EXPERT_PAIRS if family.shared_expert else ()))
    return _LAYER_PAIRS[:3] + mlp + (_QK_NORM_PAIRS if config.qk_layernorm else ())


def _expert_names(config: TransformerConfig, layer: int) -> list[tuple[list[str], str]]:
    """``([Hugging Face name of each expert], mp name)`` of a MoE layer's stacked weights."""
    experts = FAMILIES[model_type(config)].experts
    if not config.is_moe_layer(layer):
        return []
    return [([f"layers.{layer}.{experts.block}.experts.{e}.{hf}.weight"
              for e in range(config.num_moe_experts)], f"decoder.layers.{layer}.mlp.experts.{mp}")
            for hf, mp in zip(experts.projections, _EXPERT_WEIGHTS)]


def _qkv_parameters(config: TransformerConfig) -> tuple[str, ...]:
    """What q, k and v each have: a weight, and with ``add_qkv_bias`` a bias."""
    return ("weight", "bias") if config.add_qkv_bias else ("weight",)


def hf_to_mp(state_dict: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A `FAMILIES` model's weights (``LlamaForCausalLM``'s, ..., or its ``...Model``'s) to mp's
    global names and layout."""
    hf = {k.removeprefix(_PREFIX): v for k, v in state_dict.items()
          if not k.endswith(_IGNORED_BUFFERS)}
    head = hf.pop("lm_head.weight", None)
    check_keys(set(hf), {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{name}" for i in range(config.num_layers)
        for name in (pair[0] for pair in _layer_pairs(config, i))} | {
        f"layers.{i}.{name}.{kind}" for i in range(config.num_layers) for name in _QKV
        for kind in _qkv_parameters(config)} | {
        name for i in range(config.num_layers) for names, _ in _expert_names(config, i)
        for name in names}, f"{FAMILIES[model_type(config)].name} state dict")
    mp = llama_ends_to_mp(hf, head, config)
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"decoder.layers.{i}."
        for kind in _qkv_parameters(config):
            mp[f"{dst}self_attention.query_key_value.{kind}"] = qkv_to_mp(
                *(hf[f"{src}{name}.{kind}"] for name in _QKV), config.num_query_groups)
        for hf_name, mp_name in _layer_pairs(config, i):
            mp[dst + mp_name] = hf[src + hf_name]
        for names, mp_name in _expert_names(config, i):
            mp[mp_name] = torch.stack([hf[name] for name in names])
    return shift_norm_weights({k: v.contiguous().clone() for k, v in mp.items()}, config, -1.0)


def mp_to_hf(weights: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """mp's global weights to ``LlamaForCausalLM.state_dict()``'s keys, shapes and layout
    (``Qwen2ForCausalLM``'s with ``add_qkv_bias``, ``Qwen3ForCausalLM``'s with
    ``qk_layernorm``; Mixtral's and Qwen3-MoE's as their files
    hold them, a tensor per expert; ``lm_head.weight`` included; with tied embeddings it is
    ``embed_tokens``' tensor)."""
    hf_config(config)  # raises for models no family expresses
    tied = not config.untie_embeddings_and_output_weights
    vocab = config.vocab_size
    weights = shift_norm_weights(weights, config, 1.0)
    check_keys(set(weights), {
        "embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
        *(() if tied else ("output_layer.weight",))} | {
        f"decoder.layers.{i}.{name}" for i in range(config.num_layers)
        for name in (pair[1] for pair in _layer_pairs(config, i))} | {
        f"decoder.layers.{i}.self_attention.query_key_value.{kind}"
        for i in range(config.num_layers) for kind in _qkv_parameters(config)} | {
        mp_name for i in range(config.num_layers) for _, mp_name in _expert_names(config, i)},
        "mp checkpoint")
    hf = {"model.embed_tokens.weight": weights["embedding.word_embeddings.weight"][:vocab],
          "model.norm.weight": weights["decoder.final_layernorm.weight"]}
    for i in range(config.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in _qkv_parameters(config):
            qkv = qkv_to_hf(weights[f"{src}self_attention.query_key_value.{kind}"],
                            config.num_attention_heads, config.num_query_groups)
            hf.update({f"{dst}{name}.{kind}": t for name, t in zip(_QKV, qkv)})
        for hf_name, mp_name in _layer_pairs(config, i):
            hf[dst + hf_name] = weights[src + mp_name]
        for names, mp_name in _expert_names(config, i):
            hf.update({"model." + name: t for name, t in zip(names, weights[mp_name])})
    hf = {k: v.contiguous().clone() for k, v in hf.items()}
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"] if tied else \
        weights["output_layer.weight"][:vocab].contiguous().clone()
    return hf
