"""Megatron-Core GPT checkpoints (Megatron-LM's ``--ckpt-format torch_dist`` and ``torch``) to
mp's global parameter names: the model's config from Megatron-LM's ``args``, and the weights.

The files (``torch_dist``, legacy ``torch``) are read, safely, by `mp.checkpointing.megatron_files`;
the other direction, mp to ``torch_dist``, is `mp.checkpointing.megatron_export`, which reads
the same name table (`megatron_names`, `fused_gate`).

Megatron-Core's names (``decoder.layers.<i>.``, the TE spec's, which ``torch_dist`` also uses
for the local spec) and mp's: ``self_attention.linear_qkv.layer_norm_weight`` /
``_bias`` is ``input_layernorm``, ``linear_qkv`` is ``query_key_value`` (both lay the rows
per query group, ``[g, a / g + 2, d]``: the group's queries, its key, its value),
``linear_proj`` is ``dense``, ``mlp.linear_fc1.layer_norm_*`` is ``pre_mlp_layernorm``; the
local spec's legacy files say ``input_layernorm`` and ``pre_mlp_layernorm`` themselves.
``--softmax-type learnable``'s sink logits are ``self_attention.core_attention.softmax_offset``
``[a]`` in both. SwiGLU's (and quick GeGLU's) ``linear_fc1`` fuses the gate and the up
projection: ``torch_dist`` stores the
global ``[gate (ffn rows); up (ffn rows)]`` (Megatron's ``apply_swiglu_sharded_factory``),
a legacy file a rank's ``[gate shard; up shard]``; mp has them apart, ``linear_gate`` and
``linear_fc1``. The vocabulary keeps Megatron's padded rows (they are trained weights, and
they enter the softmax).

Mixtures of experts (``--num-experts``; the layers ``moe_layer_freq`` picks): ``torch_dist``
holds each layer's experts stacked in global expert order whatever the EP size and whichever
module ran them (SequentialMLP, GroupedMLP, TEGroupedMLP save alike),
``mlp.experts.experts.linear_fc1.weight [E, 2 f, h]`` (SwiGLU: ``[gate; up]`` per expert) and
``linear_fc2.weight [E, h, f]``: mp's ``mlp.experts.gate_weight``, ``fc1_weight`` and
``fc2_weight``; ``mlp.router.weight`` and ``expert_bias`` are mp's ``mlp.router``'s, and
``mlp.shared_experts`` (``linear_fc1`` as a dense MLP's, the gate's ``gate_weight``) keeps
its names. The TE spec's MoE layers keep their norm apart (``pre_mlp_layernorm``). Legacy
files of experts (local indices, ``mp_rank_TT_EEE``) are refused by name.
"""

from __future__ import annotations

import argparse
import re

import torch

from mp.checkpointing.hf_tensors import check_keys
from mp.model.config import TransformerConfig

#: SwiGLU's ``[gate; up]``: a dense MLP's or shared experts' ``linear_fc1``, the experts'
_FUSED_GATE = re.compile(r"\.(mlp|shared_experts)\.linear_fc1\.|\.experts\.fc1_weight$")
#: Megatron-LM argument -> (its value when args lack it, the values mp converts)
_REFUSED_ARGS = {
    "multi_latent_attention": (False, (False,)),
    "mtp_num_layers": (None, (None, 0)),
    "apply_residual_connection_post_layernorm": (False, (False,)),
    "softmax_scale": (None, (None,)),
    "heterogeneous_layers_config_path": (None, (None,)),
    "normalization": ("LayerNorm", ("LayerNorm", "RMSNorm")),
    "moe_input_jitter_eps": (None, (None,))}
#: Megatron-LM's MoE arguments mp's config takes as they are, with Megatron-LM's defaults
MOE_ARGS = {"moe_router_topk": 2, "moe_ffn_hidden_size": None, "moe_layer_freq": 1,
            "moe_router_score_function": "softmax", "moe_router_pre_softmax": False,
            "moe_router_enable_expert_bias": False, "moe_router_bias_update_rate": 1e-3,
            "moe_router_dtype": None, "moe_shared_expert_intermediate_size": None,
            "moe_shared_expert_gate": False, "moe_grouped_gemm": False,
            "moe_z_loss_coeff": None, "moe_token_drop_policy": "probs",
            "moe_apply_probs_on_input": False}
_POSITIONS = ("learned_absolute", "rope", "none")


# --- the model ------------------------------------------------------------------------------

def config_from_args(args: argparse.Namespace, *, tensor_model_parallel_size: int | None = None,
                     make_vocab_size_divisible_by: int | None = None,
                     vocab_size: int | None = None) -> TransformerConfig:
    """The mp model of Megatron-LM's ``args`` (as Megatron-Core's GPT reads them,
    ``core_transformer_config_from_args``); ValueError naming what mp cannot express.

    The vocabulary: ``args.padded_vocab_size`` rows, all kept; ``vocab_size`` (the
    tokenizer's, default the padded size: Megatron's args do not hold it) padded by
    ``make_vocab_size_divisible_by`` x ``tensor_model_parallel_size`` (default the
    checkpoint's) must give that many rows."""
    positions = _position_embedding_type(args)
    for name, (default, allowed) in {**_REFUSED_ARGS, "position_embedding_type": (
            positions, _POSITIONS)}.items():
        value = getattr(args, name, default)
        if value not in allowed:
            raise ValueError(f"{name}={value!r} in the Megatron checkpoint's args: mp converts "
                             f"{name} in {allowed!r}")
    try:
        return _config(args, positions, tensor_model_parallel_size,
                       make_vocab_size_divisible_by, vocab_size)
    except AttributeError as error:
        raise ValueError(f"the Megatron checkpoint's args have no {error.name}") from error


def _config(args, positions: str, tensor_model_parallel_size: int | None,
            make_vocab_size_divisible_by: int | None, vocab_size: int | None
            ) -> TransformerConfig:
    rows, window = args.padded_vocab_size, getattr(args, "window_size", None)
    tp = tensor_model_parallel_size or args.tensor_model_parallel_size
    multiple = make_vocab_size_divisible_by or args.make_vocab_size_divisible_by
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=getattr(args, "kv_channels", None), ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=vocab_size or rows, make_vocab_size_divisible_by=multiple,
        seq_length=args.seq_length, max_position_embeddings=args.max_position_embeddings,
        normalization=getattr(args, "normalization", "LayerNorm"),
        layernorm_epsilon=getattr(args, "norm_epsilon", getattr(args, "layernorm_epsilon", 1e-5)),
        layernorm_zero_centered_gamma=getattr(args, "apply_layernorm_1p", False),
        activation=("swiglu" if args.swiglu else "squared_relu"
                    if getattr(args, "squared_relu", False) else "quick_geglu"
                    if getattr(args, "quick_geglu", False) else "gelu"),
        activation_func_clamp_value=getattr(args, "activation_func_clamp_value", None),
        glu_linear_offset=getattr(args, "glu_linear_offset", 0.0),
        softmax_type=getattr(args, "softmax_type", "vanilla"),
        qk_l2_norm=getattr(args, "qk_l2_norm", False),
        # Megatron builds the L2 norm in the q/k layernorms' place: no q/k norm weights then
        qk_layernorm=getattr(args, "qk_layernorm", False) and not getattr(args, "qk_l2_norm",
                                                                          False),
        no_rope_freq=getattr(args, "no_rope_freq", None) or None,  # Megatron: 0 or [] is off
        position_embedding_type=positions,
        rotary_base=float(getattr(args, "rotary_base", 10000)),
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_interleaved=getattr(args, "rotary_interleaved", False),
        use_rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
        rotary_seq_len_interpolation_factor=getattr(
            args, "rotary_seq_len_interpolation_factor", None),
        window_size=None if window is None else list(window),
        window_attn_skip_freq=getattr(args, "window_attn_skip_freq", None),
        add_bias_linear=args.add_bias_linear, add_qkv_bias=getattr(args, "add_qkv_bias", False),
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, tensor_model_parallel_size=tp,
        embedding_init_method_std=getattr(args, "embedding_init_method_std", None),
        **_moe_fields(args))
    if config.padded_vocab_size != rows:
        raise ValueError(
            f"padded_vocab_size={rows} in the Megatron checkpoint, but vocab_size="
            f"{config.vocab_size} padded to a multiple of make_vocab_size_divisible_by x "
            f"tensor_model_parallel_size = {multiple} x {tp} is {config.padded_vocab_size}: "
            f"mp keeps Megatron's {rows} rows, so pick sizes whose product divides {rows}")
    return config


def _moe_fields(args) -> dict:
    """mp's mixture-of-experts fields from Megatron-LM's ``--num-experts`` and ``--moe-*``
    (none without experts), read as Megatron's router does: the deprecated
    ``moe_router_topk_limited_devices`` is group-limited routing over
    ``expert_model_parallel_size`` groups, groups without ``moe_router_group_topk`` none, a
    top-k scaling factor of 0 none, a negative capacity factor dropless, and
    ``moe_router_pre_softmax`` only counts for softmax scores; one load-balancing type (and
    coefficient) given as a list is taken out of it."""
    experts = getattr(args, "num_experts", None)
    if not experts:
        return {}
    fields = {name: getattr(args, name, default) for name, default in MOE_ARGS.items()}
    groups = getattr(args, "moe_router_num_groups", None)
    group_topk = getattr(args, "moe_router_group_topk", None)
    limited = getattr(args, "moe_router_topk_limited_devices", None)
    if limited and not group_topk:
        groups, group_topk = getattr(args, "expert_model_parallel_size", 1), limited
    if not group_topk:
        groups = group_topk = None
    if fields["moe_router_score_function"] != "softmax":
        fields["moe_router_pre_softmax"] = False
    capacity = getattr(args, "moe_expert_capacity_factor", None)
    balancing, coefficient = (_one(args, name, default) for name, default in (
        ("moe_router_load_balancing_type", "aux_loss"), ("moe_aux_loss_coeff", 0.0)))
    if balancing == "sinkhorn":
        raise ValueError("moe_router_load_balancing_type='sinkhorn' in the Megatron "
                         "checkpoint's args: mp routes by the top k scores (aux_loss, "
                         "seq_aux_loss, global_aux_loss, none)")
    return dict(fields, num_moe_experts=experts, moe_router_num_groups=groups,
                moe_router_group_topk=group_topk,
                moe_router_topk_scaling_factor=getattr(
                    args, "moe_router_topk_scaling_factor", None) or None,
                moe_expert_capacity_factor=None if capacity is None or capacity < 0
                else capacity,
                moe_router_load_balancing_type=balancing, moe_aux_loss_coeff=coefficient)


def _one(args, name: str, default):
    """``args.<name>``, a list of one value as that value; ValueError for a longer list."""
    value = getattr(args, name, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{name}={value!r} in the Megatron checkpoint's args: mp's router "
                             "takes one load-balancing loss")
        value = value[0]
    return value


def _position_embedding_type(args) -> str:
    """``args.position_embedding_type``, or from Megatron-LM before it had one."""
    legacy = "rope" if getattr(args, "use_rotary_position_embeddings", False) \
        else "learned_absolute"
    return getattr(args, "position_embedding_type", legacy)


def _layer_pairs(config: TransformerConfig, layer: int) -> list[tuple[str, str]]:
    """(Megatron-Core name, mp name) of layer ``layer``'s parameters, under
    ``decoder.layers.<i>.``; SwiGLU's fused ``linear_fc1`` is left to `fused_gate`."""
    norm = ("weight", "bias") if config.normalization == "LayerNorm" else ("weight",)
    linear = ("weight", "bias") if config.add_bias_linear else ("weight",)
    qkv = ("weight", "bias") if config.add_bias_linear or config.add_qkv_bias else ("weight",)
    pairs = [(f"self_attention.linear_qkv.layer_norm_{p}", f"input_layernorm.{p}")
             for p in norm]
    pairs += [(f"self_attention.linear_qkv.{p}", f"self_attention.query_key_value.{p}")
              for p in qkv]
    if config.qk_layernorm:
        pairs += [(f"self_attention.{n}.{p}", f"self_attention.{n}.{p}")
                  for n in ("q_layernorm", "k_layernorm") for p in norm]
    if config.softmax_type == "learnable":  # the sinks' logits, one per head
        pairs.append(("self_attention.core_attention.softmax_offset",
                      "self_attention.core_attention.softmax_offset"))
    pairs += [(f"self_attention.linear_proj.{p}", f"self_attention.dense.{p}") for p in linear]
    pairs += [(f"mlp.linear_fc1.layer_norm_{p}", f"pre_mlp_layernorm.{p}") for p in norm]
    if not config.is_moe_layer(layer):
        return pairs + [(f"mlp.{n}.{p}", f"mlp.{n}.{p}") for n in ("linear_fc1", "linear_fc2")
                        for p in linear]
    pairs += [("mlp.router.weight", "mlp.router.weight"),
              ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.fc1_weight"),
              ("mlp.experts.experts.linear_fc2.weight", "mlp.experts.fc2_weight")]
    if config.moe_router_enable_expert_bias:
        pairs.append(("mlp.router.expert_bias", "mlp.router.expert_bias"))
    if config.moe_shared_expert_intermediate_size is not None:
        pairs += [(f"mlp.shared_experts.{n}.weight", f"mlp.shared_experts.{n}.weight")
                  for n in ("linear_fc1", "linear_fc2")]
    if config.moe_shared_expert_gate:
        pairs.append(("mlp.shared_experts.gate_weight", "mlp.shared_experts.gate_weight"))
    return pairs


def megatron_names(config: TransformerConfig) -> dict[str, str]:
    """Megatron-Core name -> mp name of every weight of ``config``'s model (one key per layer,
    ``decoder.layers.<i>.``; SwiGLU's fused ``linear_fc1`` is named as mp's up projection,
    `fused_gate` names its gate). The table both directions read."""
    names = {"embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
             "decoder.final_layernorm.weight": "decoder.final_layernorm.weight"}
    if config.normalization == "LayerNorm":
        names["decoder.final_layernorm.bias"] = "decoder.final_layernorm.bias"
    if config.position_embedding_type == "learned_absolute":
        names["embedding.position_embeddings.weight"] = "embedding.position_embeddings.weight"
    if config.untie_embeddings_and_output_weights:
        names["output_layer.weight"] = "output_layer.weight"
    names.update({f"decoder.layers.{i}.{src}": f"decoder.layers.{i}.{dst}"
                  for i in range(config.num_layers) for src, dst in _layer_pairs(config, i)})
    return names


def fused_gate(config: TransformerConfig, mp_name: str) -> tuple[str, int] | None:
    """(mp's gate name, the dimension Megatron stacks ``[gate; up]`` along) when Megatron
    fuses mp's ``mp_name`` (an up projection of a gated model: SwiGLU, quick GeGLU) with its
    gate; else None."""
    if not config.gated_linear_unit or not _FUSED_GATE.search(mp_name):
        return None
    experts = mp_name.endswith("fc1_weight")
    gate = mp_name.replace("fc1_weight", "gate_weight") if experts \
        else mp_name.replace("linear_fc1", "linear_gate")
    return gate, 1 if experts else 0


def megatron_to_mp(weights: dict[str, torch.Tensor],
                   config: TransformerConfig) -> dict[str, torch.Tensor]:
    """`read_checkpoint`'s weights to mp's global names and layout. The tensors keep their
    values: QKV rows are laid alike, norm weights are zero-centred in both with
    ``--apply-layernorm-1p``; SwiGLU's ``linear_fc1 [2 ffn, h]`` (``[gate; up]``) becomes
    ``linear_gate [ffn, h]`` and ``linear_fc1 [ffn, h]`` (biases alike), the experts'
    ``[E, 2 f, h]`` ``gate_weight`` and ``fc1_weight`` ``[E, f, h]``."""
    names = megatron_names(config)
    check_keys(set(weights), set(names), "Megatron checkpoint (for its args)")
    mp = {dst: weights[src] for src, dst in names.items()}
    heads = (config.num_attention_heads,)
    for key in [k for k in mp if k.endswith("core_attention.softmax_offset")]:
        if mp[key].numel() != heads[0]:  # one per head (a legacy file's TP shard has fewer)
            raise ValueError(f"{key} has shape {tuple(mp[key].shape)} in the Megatron "
                             f"checkpoint: learnable softmax offsets are one per head, {heads}")
        mp[key] = mp[key].reshape(heads)
    for key in list(mp):
        gate = fused_gate(config, key)
        if gate is not None:
            mp[gate[0]], mp[key] = mp[key].chunk(2, dim=gate[1])
    return {k: v.contiguous().clone() for k, v in mp.items()}
