"""Hugging Face DeepSeek-V3 (``DeepseekV3ForCausalLM``) and DeepSeek-V2 (``DeepseekV2ForCausalLM``:
DeepSeek-V2-Lite, DeepSeek-V2) weights to and from mp's global parameter names.

DeepSeek-V3 is mp's GPT with RMSNorm, SwiGLU, no linear biases, untied embeddings,
multi-latent attention (`mp.model.mla`) and, after its first ``first_k_dense_replace`` dense
layers, mixtures of experts with shared experts (`mp.model.moe`). The names:

- attention: ``q_proj`` (no query latent) or ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``;
  ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj`` are mp's
  ``linear_q_proj`` or ``linear_q_down_proj``, ``q_layernorm``, ``linear_q_up_proj``;
  ``linear_kv_down_proj``, ``kv_layernorm``, ``linear_kv_up_proj``, ``dense``.
- With ``rope_interleave`` (DeepSeek's own layout) a head's RoPE channels rotate in adjacent
  pairs ``(2i, 2i + 1)``; mp's rotate-half form pairs ``(i, i + dr / 2)``. The rows of the
  query's and the key's RoPE channels are reordered (evens, then odds), which leaves every
  query-key product, and so the model, unchanged.
- MLPs: ``mlp.gate_proj``, ``up_proj``, ``down_proj`` (dense layers and
  ``mlp.shared_experts``) are mp's ``linear_gate``, ``linear_fc1``, ``linear_fc2``; each
  expert's three are stacked into ``mlp.experts.gate_weight``, ``fc1_weight``, ``fc2_weight``;
  the router ``mlp.gate`` is ``mlp.router`` and its ``e_score_correction_bias`` the router's
  ``expert_bias``.
- Routing (``noaux_tc``): sigmoid scores, the choice by score plus bias within the best
  ``topk_group`` of ``n_group`` groups ranked by their top two (mp's group-limited routing
  ranks by the top ``k / topk_group``: the two must be 2), the weights renormalized
  (``norm_topk_prob``) and times ``routed_scaling_factor``.
- RoPE is plain or YaRN (mp's ``rope_type='yarn'``, `mp.model.rope.yarn_frequencies`), whose
  ``mscale_all_dim`` also scales the scores.

DeepSeek-V2 is the same model with another routing (``topk_method: greedy``): a softmax over
every expert, its top ``k`` as they are (mp's ``moe_router_pre_softmax``; not renormalized:
``norm_topk_prob`` must be false, as transformers ignores it), times
``routed_scaling_factor``; no score-correction bias, no prediction depths. Its RoPE channels
are always paired, so ``mp-to-hf`` writes them paired again. An mp model converts to
DeepSeek-V2 when it routes by softmax, to DeepSeek-V3 when by sigmoid with an expert bias.

The next-token-prediction modules of DeepSeek-V3's own files (layers past
``num_hidden_layers``) are not part of the model transformers loads, nor of mp's: they are
dropped. Quantized (FP8) files, other routings and an ``rms_norm_eps`` other than the latent
norms' fixed 1e-6 are refused by name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mp.checkpointing.hf_tensors import (
    check_expressible,
    check_keys,
    check_output_layer,
    common_fields,
    pad_rows,
    rope_parameters,
    shift_norm_weights,
    yarn_from_hf,
    yarn_to_hf,
)
from mp.model.config import TransformerConfig

_PREFIX = "model."
_NORMS = (("input_layernorm", "input_layernorm"),
          ("post_attention_layernorm", "pre_mlp_layernorm"))
_ATTENTION = (("o_proj", "dense"), ("kv_a_layernorm", "kv_layernorm"),
              ("kv_b_proj", "linear_kv_up_proj"))
_Q_LATENT = (("q_a_proj", "linear_q_down_proj"), ("q_a_layernorm", "q_layernorm"))
_MLP = (("gate_proj", "linear_gate"), ("up_proj", "linear_fc1"), ("down_proj", "linear_fc2"))
_EXPERTS = (("gate_proj", "gate_weight"), ("up_proj", "fc1_weight"), ("down_proj", "fc2_weight"))
_PREDICTION = (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
               ("shared_head.norm", "final_layernorm"))


V3, V2 = "deepseek_v3", "deepseek_v2"
_NAMES = {V3: ("DeepSeek-V3", "DeepseekV3ForCausalLM"),
          V2: ("DeepSeek-V2", "DeepseekV2ForCausalLM")}


def config_from_hf(hf: dict, *, tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1,
                   make_vocab_size_divisible_by: int = 128,
                   seq_length: int | None = None) -> TransformerConfig:
    """The mp model of a DeepSeek-V3 or DeepSeek-V2 ``config.json`` (its ``model_type``,
    default V3); ValueError for what mp cannot express."""
    version = hf.get("model_type", V3)
    name = _NAMES[version][0]
    routing = ((("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"), ("norm_topk_prob", True))
               if version == V3 else (("topk_method", "greedy"), ("norm_topk_prob", False)))
    for key, value in (("hidden_act", "silu"), ("attention_bias", False),
                       ("quantization_config", None),
                       ("num_key_value_heads", hf["num_attention_heads"]), *routing):
        if hf.get(key, value) != value:
            raise ValueError(f"{key}={hf[key]!r}: mp's {name} needs {key}={value!r}")
    if hf.get("rms_norm_eps", 1e-6) != 1e-6:
        raise ValueError(f"rms_norm_eps={hf['rms_norm_eps']!r}: {name}'s latent norms "
                         "take 1e-6 whatever it says, and mp's norms share one epsilon: it must "
                         "be 1e-6")
    layers, dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 0)
    positions = hf["max_position_embeddings"]
    shared = hf.get("n_shared_experts") or 0
    return TransformerConfig(
        num_layers=layers, hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], vocab_size=hf["vocab_size"],
        seq_length=seq_length or positions, max_position_embeddings=positions,
        ffn_hidden_size=hf["intermediate_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        normalization="RMSNorm", layernorm_epsilon=1e-6,
        activation="swiglu", position_embedding_type="rope", **_rope(hf),
        multi_latent_attention=True, q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"], qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        num_moe_experts=hf["n_routed_experts"], moe_router_topk=hf["num_experts_per_tok"],
        moe_layer_freq=[int(i >= dense) for i in range(layers)],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=shared * hf["moe_intermediate_size"] or None,
        **(_v3_routing(hf) if version == V3 else _v2_routing(hf)),
        **common_fields(hf, tensor_model_parallel_size, pipeline_model_parallel_size))


def _v3_routing(hf: dict) -> dict:
    """mp's routing fields of DeepSeek-V3's ``noaux_tc``: sigmoid scores with the
    score-correction bias, group-limited, renormalized and scaled."""
    k, groups, chosen = hf["num_experts_per_tok"], hf.get("n_group", 1), hf.get("topk_group", 1)
    if groups > 1 and k != 2 * chosen:
        raise ValueError(f"num_experts_per_tok={k}, topk_group={chosen}: DeepSeek-V3 ranks "
                         "its groups by their top 2 scores, mp's by their top "
                         "num_experts_per_tok / topk_group: it must be 2")
    return dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                moe_router_num_groups=groups if groups > 1 else None,
                moe_router_group_topk=chosen if groups > 1 else None)


def _v2_routing(hf: dict) -> dict:
    """mp's routing fields of DeepSeek-V2's ``greedy``: the top ``k`` of a softmax over every
    expert, scaled."""
    factor = float(hf.get("routed_scaling_factor", 1.0))
    return dict(moe_router_pre_softmax=True,
                moe_router_topk_scaling_factor=None if factor == 1.0 else factor)


def _version(config: TransformerConfig) -> str:
    """DeepSeek-V3 for an mp model routing by sigmoid, else DeepSeek-V2."""
    return V3 if config.moe_router_score_function == "sigmoid" else V2


def _rope(hf: dict) -> dict:
    """mp's RoPE fields of a config (``rope_scaling``, or transformers 5's
    ``rope_parameters``): plain or YaRN; ValueError for another scaling."""
    kind, base, parameters = rope_parameters(hf)
    fields = {"rotary_base": base}
    if kind == "default":
        return fields
    if kind != "yarn" or parameters.get("attention_factor") is not None:
        raise ValueError(f"RoPE scaling {parameters!r}: mp's DeepSeek has YaRN (rope_type "
                         "'yarn', its attention factor from mscale and mscale_all_dim) or none")
    return {**fields, **yarn_from_hf(parameters),
            "yarn_mscale": float(parameters.get("mscale", 1.0)),
            "yarn_mscale_all_dim": float(parameters.get("mscale_all_dim", 0.0))}


def _check(config: TransformerConfig) -> None:
    """ValueError for an mp model neither DeepSeek model can express."""
    version = _version(config)
    routing = ({"moe_router_enable_expert_bias": (True,), "moe_router_pre_softmax": (False,)}
               if version == V3 else
               {"moe_router_pre_softmax": (True,), "moe_router_num_groups": (None,),
                "mtp_num_layers": (None,)})
    name = _NAMES[version][0]
    check_expressible(config, {
        "multi_latent_attention": (True,), "normalization": ("RMSNorm",),
        "activation": ("swiglu",), "add_bias_linear": (False,), "layernorm_epsilon": (1e-6,),
        "untie_embeddings_and_output_weights": (True,), "window_size": (None,),
        "rotary_interleaved": (False,), "activation_func_clamp_value": (None,),
        "glu_linear_offset": (0.0,), "softmax_type": ("vanilla",), "moe_router_bias": (False,),
        "moe_apply_probs_on_input": (False,), **routing},
        name)
    pattern = [int(config.is_moe_layer(i)) for i in range(config.num_layers)]
    if config.num_moe_experts is None or pattern != sorted(pattern):
        raise ValueError(f"model.num_moe_experts={config.num_moe_experts}, moe_layer_freq="
                         f"{config.moe_layer_freq!r}: {name} has dense layers first, then "
                         "mixtures of experts")
    groups = config.moe_router_num_groups
    if groups is not None and config.moe_router_topk != 2 * config.moe_router_group_topk:
        raise ValueError(f"model.moe_router_topk={config.moe_router_topk}, "
                         f"moe_router_group_topk={config.moe_router_group_topk}: DeepSeek-V3 "
                         "ranks groups by their top 2 scores (their ratio must be 2)")
    shared = config.moe_shared_expert_intermediate_size or 0
    if shared % config.moe_ffn_hidden_size:
        raise ValueError(f"model.moe_shared_expert_intermediate_size={shared} is not a "
                         f"multiple of moe_ffn_hidden_size={config.moe_ffn_hidden_size}: "
                         "DeepSeek-V3 counts its shared experts")


def hf_config(config: TransformerConfig) -> dict:
    """A DeepSeek-V3 ``config.json`` for mp model ``config``, DeepSeek-V2's for one routing
    by softmax; ValueError for an mp model neither can express."""
    _check(config)
    version = _version(config)
    rope = {"rope_type": "default", "rope_theta": config.rotary_base}
    if config.rope_type == "yarn":
        rope.update(**yarn_to_hf(config), mscale=config.yarn_mscale,
                    mscale_all_dim=config.yarn_mscale_all_dim)
    groups = config.moe_router_num_groups
    routing = ({"n_group": groups or 1, "topk_group": config.moe_router_group_topk or 1,
                "norm_topk_prob": True, "rope_interleave": False,
                "num_nextn_predict_layers": config.mtp_num_layers or 0}
               if version == V3 else {"topk_method": "greedy", "norm_topk_prob": False})
    return {"architectures": [_NAMES[version][1]], "model_type": version, **routing,
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.ffn_hidden_size,
            "moe_intermediate_size": config.moe_ffn_hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_attention_heads,
            "n_shared_experts": (config.moe_shared_expert_intermediate_size or 0)
            // config.moe_ffn_hidden_size,
            "n_routed_experts": config.num_moe_experts,
            "routed_scaling_factor": config.moe_router_topk_scaling_factor or 1.0,
            "kv_lora_rank": config.kv_lora_rank, "q_lora_rank": config.q_lora_rank,
            "qk_rope_head_dim": config.qk_pos_emb_head_dim, "v_head_dim": config.v_head_dim,
            "qk_nope_head_dim": config.qk_head_dim,
            "num_experts_per_tok": config.moe_router_topk,
            "first_k_dense_replace": sum(not config.is_moe_layer(i)
                                         for i in range(config.num_layers)),
            "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.layernorm_epsilon, "rope_parameters": rope,
            "attention_bias": False, "attention_dropout": config.attention_dropout,
            "initializer_range": config.init_method_std, "tie_word_embeddings": False}


def _deinterleave(rows: torch.Tensor, width: int, heads: int,
                  inverse: bool = False) -> torch.Tensor:
    """``rows [heads x (n + width), ...]`` with each head's last ``width`` rows reordered from
    DeepSeek's adjacent pairs to rotate-half's: evens, then odds (``inverse``: back)."""
    per_head = rows.view(heads, -1, *rows.shape[1:])
    rope = per_head[:, -width:]
    order = torch.cat((torch.arange(0, width, 2), torch.arange(1, width, 2)))
    if inverse:
        order = torch.argsort(order)
    return torch.cat((per_head[:, :-width], rope[:, order]), dim=1).flatten(0, 1)


class _Layer(NamedTuple):
    """A transformer layer's names in the two: DeepSeek numbers the prediction depths' layers
    after the decoder's."""

    hf: str  # its Hugging Face prefix, "layers.<i>."
    mp: str  # its mp prefix
    moe: bool  # whether it has experts


def _layers(config: TransformerConfig) -> list[_Layer]:
    """The decoder's layers, then each multi-token prediction depth's."""
    layers, depths = config.num_layers, config.mtp_num_layers or 0
    last = config.is_moe_layer(layers - 1)  # the depths' layers are alike
    return ([_Layer(f"layers.{i}.", f"decoder.layers.{i}.", config.is_moe_layer(i))
             for i in range(layers)]
            + [_Layer(f"layers.{layers + d}.", f"mtp.layers.{d}.transformer_layer.", last)
               for d in range(depths)])


def _pairs(config: TransformerConfig) -> list[tuple[str, str]]:
    """(Hugging Face name, mp name) of every weight but the embedding, output layer, final
    norm and stacked experts."""
    attention = [*_ATTENTION, ("kv_a_proj_with_mqa", "linear_kv_down_proj"),
                 *(_Q_LATENT + (("q_b_proj", "linear_q_up_proj"),)
                   if config.q_lora_rank is not None else (("q_proj", "linear_q_proj"),))]
    pairs = []
    for src, dst, moe in _layers(config):
        pairs += [(f"{src}{hf}.weight", f"{dst}{mp}.weight") for hf, mp in _NORMS]
        pairs += [(f"{src}self_attn.{hf}.weight", f"{dst}self_attention.{mp}.weight")
                  for hf, mp in attention]
        if not moe:
            pairs += [(f"{src}mlp.{hf}.weight", f"{dst}mlp.{mp}.weight") for hf, mp in _MLP]
            continue
        pairs.append((f"{src}mlp.gate.weight", f"{dst}mlp.router.weight"))
        if config.moe_router_enable_expert_bias:
            pairs.append((f"{src}mlp.gate.e_score_correction_bias",
                          f"{dst}mlp.router.expert_bias"))
        if config.moe_shared_expert_intermediate_size:
            pairs += [(f"{src}mlp.shared_experts.{hf}.weight",
                       f"{dst}mlp.shared_experts.{mp}.weight") for hf, mp in _MLP]
    layers = config.num_layers
    for d in range(config.mtp_num_layers or 0):
        pairs += [(f"layers.{layers + d}.{hf}.weight", f"mtp.layers.{d}.{mp}.weight")
                  for hf, mp in _PREDICTION]
    return pairs


def _experts(config: TransformerConfig) -> list[tuple[list[str], str]]:
    """``([Hugging Face name of each expert], mp name)`` of the MoE layers' stacked weights."""
    return [([f"{src}mlp.experts.{e}.{hf}.weight" for e in range(config.num_moe_experts)],
             f"{dst}mlp.experts.{mp}")
            for src, dst, moe in _layers(config) if moe for hf, mp in _EXPERTS]


def _rope_rows(config: TransformerConfig) -> dict[str, int]:
    """mp names of the weights whose rows hold RoPE channels -> how many heads they hold."""
    q = "linear_q_up_proj" if config.q_lora_rank is not None else "linear_q_proj"
    return {f"{layer.mp}self_attention.{name}.weight": heads for layer in _layers(config)
            for name, heads in ((q, config.num_attention_heads), ("linear_kv_down_proj", 1))}


def _copies(config: TransformerConfig) -> dict[str, str]:
    """The prediction depths' copies of the embedding and output layer in DeepSeek's files ->
    the main model's Hugging Face name (mp's depths use the model's own)."""
    layers = config.num_layers
    return {name: main for d in range(config.mtp_num_layers or 0)
            for name, main in ((f"layers.{layers + d}.embed_tokens.weight", "embed_tokens.weight"),
                               (f"layers.{layers + d}.shared_head.head.weight", "lm_head.weight"))}


def prediction_depths(hf: dict, state_dict: dict[str, torch.Tensor]) -> int | None:
    """The multi-token prediction depths ``state_dict`` holds: DeepSeek's own files hold
    ``num_nextn_predict_layers`` (numbered after the decoder's layers), transformers' none."""
    first = f"{_PREFIX}layers.{hf['num_hidden_layers']}.eh_proj.weight"
    return (hf.get("num_nextn_predict_layers") or None) if first in state_dict else None


def hf_to_mp(state_dict: dict[str, torch.Tensor], config: TransformerConfig,
             rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """``DeepseekV3ForCausalLM`` (or ``DeepseekV2ForCausalLM``) weights to mp's global names
    and layout; ``rope_interleave`` as the config says (DeepSeek's default; V2's always); with
    ``mtp_num_layers`` the prediction depths' too (`prediction_depths`), whose copies of the
    embedding and output layer must equal the model's."""
    _check(config)
    last = config.num_layers + (config.mtp_num_layers or 0)
    hf = {k.removeprefix(_PREFIX): v for k, v in state_dict.items() if not _extra_layer(k, last)}
    pairs, experts, copies = _pairs(config), _experts(config), _copies(config)
    check_keys(set(hf), {"embed_tokens.weight", "norm.weight", "lm_head.weight", *copies}
               | {name for name, _ in pairs} | {n for names, _ in experts for n in names},
               f"{_NAMES[_version(config)][0]} state dict")
    check_output_layer(hf["lm_head.weight"], hf["embed_tokens.weight"], False, "embed_tokens")
    for name, main in copies.items():
        if not torch.equal(hf[name], hf[main]):
            raise ValueError(f"{name} differs from {main}: mp's prediction depths use the "
                             "model's own embedding and output layer")
    rows = config.padded_vocab_size
    mp = {"embedding.word_embeddings.weight": pad_rows(hf["embed_tokens.weight"], rows),
          "output_layer.weight": pad_rows(hf["lm_head.weight"], rows),
          "decoder.final_layernorm.weight": hf["norm.weight"]}
    mp.update({mp_name: hf[hf_name] for hf_name, mp_name in pairs})
    mp.update({mp_name: torch.stack([hf[n] for n in names]) for names, mp_name in experts})
    if rope_interleave:
        for name, heads in _rope_rows(config).items():
            mp[name] = _deinterleave(mp[name], config.qk_pos_emb_head_dim, heads)
    return shift_norm_weights({k: v.contiguous().clone() for k, v in mp.items()}, config, -1.0)


def _extra_layer(name: str, layers: int) -> bool:
    """Whether ``name`` is a weight of a layer past ``layers`` (DeepSeek-V3's prediction
    depths, when mp's model has none)."""
    parts = name.removeprefix(_PREFIX).split(".")
    return parts[0] == "layers" and int(parts[1]) >= layers


def mp_to_hf(weights: dict[str, torch.Tensor],
             config: TransformerConfig) -> dict[str, torch.Tensor]:
    """mp's global weights to ``DeepseekV3ForCausalLM.state_dict()``'s keys as its files hold
    them (a tensor per expert; the prediction depths' after the decoder's layers, with their
    copies of the embedding and output layer), for `hf_config`'s ``rope_interleave: false``;
    DeepSeek-V2's (whose RoPE channels are always paired) with them paired again."""
    _check(config)
    weights = shift_norm_weights(weights, config, 1.0)
    pairs, experts = _pairs(config), _experts(config)
    check_keys(set(weights), {"embedding.word_embeddings.weight", "output_layer.weight",
                              "decoder.final_layernorm.weight"}
               | {mp_name for _, mp_name in pairs} | {mp_name for _, mp_name in experts},
               "mp checkpoint")
    vocab = config.vocab_size
    hf = {"embed_tokens.weight": weights["embedding.word_embeddings.weight"][:vocab],
          "lm_head.weight": weights["output_layer.weight"][:vocab],
          "norm.weight": weights["decoder.final_layernorm.weight"]}
    hf.update({hf_name: weights[mp_name] for hf_name, mp_name in pairs})
    for names, mp_name in experts:
        hf.update(zip(names, weights[mp_name]))
    hf.update({name: hf[main] for name, main in _copies(config).items()})
    if _version(config) == V2:  # its RoPE channels paired again
        rope = _rope_rows(config)
        for hf_name, mp_name in pairs:
            if mp_name in rope:
                hf[hf_name] = _deinterleave(hf[hf_name], config.qk_pos_emb_head_dim,
                                            rope[mp_name], inverse=True)
    return {(k if k == "lm_head.weight" else _PREFIX + k): v.contiguous().clone()
            for k, v in hf.items()}
