"""The model side of the Hugging Face Llama family (`mp.checkpointing.hf_llama`): which family
a ``config.json`` or an mp model is, and the one config as the other (``config_from_hf``,
``hf_config``), sliding windows included."""

from __future__ import annotations

from typing import NamedTuple

from mp.checkpointing.hf_tensors import check_expressible, common_fields, rope_parameters
from mp.model.config import TransformerConfig


class Experts(NamedTuple):
    """How a mixture-of-experts family names a layer's experts."""

    block: str  # the MLP's module: the router is ``<block>.gate``
    projections: tuple[str, str, str]  # an expert's gate, up and down projections


class Family(NamedTuple):
    name: str
    architecture: str
    qk_layernorm: bool  # whether its heads have q/k norms
    experts: Experts | None = None  # its MLPs' experts (None: dense MLPs)
    qkv_bias: bool = False  # whether q_proj, k_proj and v_proj have biases (Qwen2-MoE: as
    # its config's qkv_bias says)
    shared_expert: bool = False  # whether a MoE layer has a gated shared expert
    windows: str | None = None  # how its config.json gives sliding windows (`_windows_from_hf`):
    # "every" (``sliding_window``, W or null, on every layer), "flag" (on every layer when
    # ``use_sliding_window``), "layers" (``use_sliding_window``, and per layer ``layer_types``
    # or, without, ``max_window_layers``); None: every layer attends fully


#: ``model_type`` -> the family
FAMILIES = {"llama": Family("Llama", "LlamaForCausalLM", False),
            "mistral": Family("Mistral", "MistralForCausalLM", False, windows="every"),
            "qwen2": Family("Qwen2", "Qwen2ForCausalLM", False, qkv_bias=True,
                            windows="layers"),
            "qwen3": Family("Qwen3", "Qwen3ForCausalLM", True, windows="layers"),
            "mixtral": Family("Mixtral", "MixtralForCausalLM", False,
                              Experts("block_sparse_moe", ("w1", "w3", "w2")), windows="every"),
            "qwen3_moe": Family("Qwen3-MoE", "Qwen3MoeForCausalLM", True,
                                Experts("mlp", ("gate_proj", "up_proj", "down_proj")),
                                windows="flag"),
            "qwen2_moe": Family("Qwen2-MoE", "Qwen2MoeForCausalLM", False,
                                Experts("mlp", ("gate_proj", "up_proj", "down_proj")),
                                qkv_bias=True, shared_expert=True, windows="layers")}


def model_type(config: TransformerConfig) -> str:
    """The family an mp model converts to: with experts Qwen2-MoE (shared experts or
    ``add_qkv_bias``), Qwen3-MoE (``qk_layernorm``) or Mixtral, else Qwen2 (``add_qkv_bias``),
    Qwen3 (``qk_layernorm``), Mistral (sliding windows) or Llama."""
    if config.num_moe_experts is not None:
        if config.moe_shared_expert_intermediate_size is not None or config.add_qkv_bias:
            return "qwen2_moe"
        return "qwen3_moe" if config.qk_layernorm else "mixtral"
    if config.add_qkv_bias:
        return "qwen2"
    if config.qk_layernorm:
        return "qwen3"
    return "mistral" if any(_sliding_layers(config)) else "llama"


def _sliding_layers(config: TransformerConfig) -> list[bool]:
    """Whether each layer (0-based) of an mp model attends through a sliding window."""
    return [config.attention_window(i + 1) is not None for i in range(config.num_layers)]


def _derived_layer_types(kind: str, layers: int, first: int) -> list[bool]:
    """Which layers slide, as transformers 5 derives ``layer_types`` from
    ``max_window_layers = first`` when a config has ``use_sliding_window`` and no
    ``layer_types``: Qwen2 and Qwen3 slide the layers from ``first`` on, Qwen2-MoE the even
    (0-based) ones before ``first``."""
    if kind == "qwen2_moe":
        return [i % 2 == 0 and i < first for i in range(layers)]
    return [i >= first for i in range(layers)]


_SLIDING, _FULL = "sliding_attention", "full_attention"


def _windows_from_hf(hf: dict, kind: str) -> dict:
    """mp's ``window_size`` and ``window_attn_skip_freq`` (a 0/1 per layer, None when every
    layer slides) of a ``kind`` config's sliding windows, as transformers 5 reads them; none
    when every layer attends fully. Hugging Face's ``sliding_window = W`` lets a query see
    the keys less than ``W`` positions back (its own included): mp's ``window_size = [W - 1,
    0]``. ValueError for what mp cannot express."""
    style, layers, name = FAMILIES[kind].windows, hf["num_hidden_layers"], FAMILIES[kind].name
    # transformers drops the window without use_sliding_window; the defaults are its configs'
    on = style == "every" or style is not None and bool(hf.get("use_sliding_window"))
    width = hf.get("sliding_window", None if kind == "mixtral" else 4096) if on else None
    slides = [width is not None] * layers
    if style == "layers":
        types = hf.get("layer_types")
        if types is not None:
            slides = sliding_from_layer_types(types, layers, name)
            if any(slides) and not on:
                raise ValueError(f"layer_types={types!r} with use_sliding_window="
                                 f"{hf.get('use_sliding_window')!r}: mp's {name} slides the "
                                 f"'{_SLIDING}' layers with use_sliding_window=true")
        elif width is not None:
            slides = _derived_layer_types(kind, layers, hf.get("max_window_layers", 28))
    return window_fields(slides, width, name)


def sliding_from_layer_types(types: list[str], layers: int, name: str) -> list[bool]:
    """Whether each layer slides, as a config's ``layer_types`` says; ValueError for a list
    that does not name ``'full_attention'`` or ``'sliding_attention'`` for every layer."""
    if len(types) != layers or not set(types) <= {_SLIDING, _FULL}:
        raise ValueError(f"layer_types={types!r}: mp's {name} needs '{_FULL}' or "
                         f"'{_SLIDING}' for each of the num_hidden_layers={layers} layers")
    return [t == _SLIDING for t in types]


def window_fields(slides: list[bool], width, name: str) -> dict:
    """mp's ``window_size`` and ``window_attn_skip_freq`` (a 0/1 per layer, None when every
    layer slides) for the layers ``slides`` names sliding through Hugging Face's
    ``sliding_window = width``; none when no layer slides. ValueError for a width mp cannot
    take."""
    if not any(slides):
        return {}
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"sliding_window={width!r}: mp's {name} needs an integer >= 1 for "
                         f"its layers of '{_SLIDING}' (a query sees the keys less than "
                         "sliding_window positions back)")
    return {"window_size": [width - 1, 0],
            "window_attn_skip_freq": None if all(slides) else [int(s) for s in slides]}


def layer_types(config: TransformerConfig) -> list[str]:
    """Hugging Face's ``layer_types`` of mp model ``config``: each layer's
    ``'sliding_attention'`` or ``'full_attention'``."""
    return [_SLIDING if s else _FULL for s in _sliding_layers(config)]


def _windows_to_hf(config: TransformerConfig, kind: str) -> dict:
    """The sliding-window fields of a ``kind`` ``config.json`` for mp model ``config``
    (``sliding_window = window_size[0] + 1``; the inverse of `_windows_from_hf`); ValueError
    for a pattern of sliding layers the family cannot express (Mistral, Mixtral and Qwen3-MoE
    slide every layer or none)."""
    style, slides = FAMILIES[kind].windows, _sliding_layers(config)
    if not any(slides):
        return {"every": {"sliding_window": None}, "flag": {"use_sliding_window": False},
                "layers": {"use_sliding_window": False}}.get(style, {})
    if style != "layers" and not all(slides):
        raise ValueError(f"model.window_attn_skip_freq={config.window_attn_skip_freq!r}: "
                         f"{FAMILIES[kind].name} has a sliding window in every layer or none "
                         "(window_attn_skip_freq=None)")
    width = {"sliding_window": config.window_size[0] + 1}
    if style == "every":
        return width
    if style == "flag":
        return {"use_sliding_window": True, **width}
    # transformers 5 reads layer_types; max_window_layers too where it alone gives the layers
    first = next((n for n in range(config.num_layers + 1)
                  if _derived_layer_types(kind, config.num_layers, n) == slides), None)
    return {"use_sliding_window": True, **width,
            "layer_types": layer_types(config),
            **({} if first is None else {"max_window_layers": first})}


# Llama 3.1's RoPE scaling as mp has it (`mp.model.rope`): only the factor may vary.
_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _rope(hf: dict) -> dict:
    """mp's RoPE fields of a config (``rope_theta`` and ``rope_scaling``, or transformers 5's
    ``rope_parameters``); ValueError for a scaling mp does not have."""
    kind, base, parameters = rope_parameters(hf)
    if kind == "default":
        return {"rotary_base": base}
    if kind == "linear":  # positions divided by the factor
        return {"rotary_base": base,
                "rotary_seq_len_interpolation_factor": float(parameters["factor"])}
    llama3 = {k: parameters.get(k) for k in _LLAMA3_SCALING}
    if kind != "llama3" or llama3 != _LLAMA3_SCALING:
        raise ValueError(f"RoPE scaling {parameters!r}: mp's RoPE has Llama 3.1's scaling "
                         f"(rope_type 'llama3' with {_LLAMA3_SCALING}), linear position "
                         "interpolation (rope_type 'linear') or none")
    return {"rotary_base": base, "use_rope_scaling": True,
            "rope_scaling_factor": float(parameters["factor"])}


def config_from_hf(hf: dict, *, tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1,
                   make_vocab_size_divisible_by: int = 128,
                   seq_length: int | None = None) -> TransformerConfig:
    """The mp model of a `FAMILIES` ``config.json`` (its ``model_type``, default llama);
    ValueError for what mp cannot express."""
    kind = hf.get("model_type", "llama")
    if kind not in FAMILIES:
        raise ValueError(f"model_type={kind!r} must be one of {', '.join(map(repr, FAMILIES))}")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    for key, value in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                       ("pretraining_tp", 1), ("router_jitter_noise", 0.0)):
        if hf.get(key, value) != value:
            raise ValueError(f"{key}={hf[key]!r}: mp's {FAMILIES[kind].name} needs "
                             f"{key}={value!r}")
    positions = hf["max_position_embeddings"]
    experts = _experts_from_hf(hf, kind)
    return TransformerConfig(**experts,
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        kv_channels=hf.get("head_dim") or hidden // heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"], seq_length=seq_length or positions,
        max_position_embeddings=positions, ffn_hidden_size=hf["intermediate_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        normalization="RMSNorm", layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu", position_embedding_type="rope", **_rope(hf),
        qk_layernorm=FAMILIES[kind].qk_layernorm,
        add_qkv_bias=hf.get("qkv_bias", FAMILIES[kind].qkv_bias),
        **_windows_from_hf(hf, kind),
        **common_fields(hf, tensor_model_parallel_size, pipeline_model_parallel_size))


def _experts_from_hf(hf: dict, kind: str) -> dict:
    """mp's MoE fields of a Mixtral, Qwen3-MoE or Qwen2-MoE config (none for a dense
    family)."""
    if kind == "mixtral":
        return dict(num_moe_experts=hf["num_local_experts"],
                    moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["intermediate_size"])
    if kind not in ("qwen3_moe", "qwen2_moe"):
        return {}
    shared = {"moe_shared_expert_intermediate_size": hf["shared_expert_intermediate_size"],
              "moe_shared_expert_gate": True} if FAMILIES[kind].shared_expert else {}
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    pattern = [int(i not in dense and (i + 1) % step == 0)
               for i in range(hf["num_hidden_layers"])]
    experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]  # 5.x
    return dict(num_moe_experts=experts, moe_router_topk=hf["num_experts_per_tok"], **shared,
                moe_layer_freq=1 if all(pattern) else pattern,
                moe_ffn_hidden_size=hf["moe_intermediate_size"],
                moe_router_pre_softmax=not hf.get("norm_topk_prob", False))


def _experts_to_hf(config: TransformerConfig, kind: str) -> dict:
    """The MoE fields of a Mixtral, Qwen3-MoE or Qwen2-MoE ``config.json`` (none for a dense
    family)."""
    if kind == "mixtral":
        return {"num_local_experts": config.num_moe_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "router_jitter_noise": 0.0, "intermediate_size": config.moe_ffn_hidden_size}
    if kind not in ("qwen3_moe", "qwen2_moe"):
        return {}
    shared = {"shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
              "qkv_bias": config.add_qkv_bias} if FAMILIES[kind].shared_expert else {}
    return {**shared, "num_experts": config.num_moe_experts,
            "num_experts_per_tok": config.moe_router_topk,
            "moe_intermediate_size": config.moe_ffn_hidden_size,
            "norm_topk_prob": not config.moe_router_pre_softmax, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(config.num_layers)
                                if not config.is_moe_layer(i)]}


def hf_config(config: TransformerConfig) -> dict:
    """The `FAMILIES` ``config.json`` (`model_type`'s family) of mp model ``config``, its
    sliding windows included; ValueError for an mp model none can express."""
    kind = model_type(config)
    needs = {"normalization": ("RMSNorm",), "activation": ("swiglu",),
             "position_embedding_type": ("rope",), "rotary_percent": (1.0,),
             "rotary_interleaved": (False,), "add_bias_linear": (False,),
             "qk_layernorm": (FAMILIES[kind].qk_layernorm,), "qk_l2_norm": (False,),
             "no_rope_freq": (None,), "activation_func_clamp_value": (None,),
             "glu_linear_offset": (0.0,), "softmax_type": ("vanilla",),
             "add_qkv_bias": (True, False) if kind == "qwen2_moe" else (FAMILIES[kind].qkv_bias,),
             "moe_shared_expert_gate": (FAMILIES[kind].shared_expert,),
             "rope_type": ("rope",), "moe_router_bias": (False,),
             "moe_apply_probs_on_input": (False,)}
    if kind == "mixtral":  # routed as Mixtral routes
        needs.update(moe_router_pre_softmax=(False,))
    if FAMILIES[kind].experts is not None:
        needs.update(moe_router_score_function=("softmax",),
                     moe_router_topk_scaling_factor=(None,))
    check_expressible(config, needs, FAMILIES[kind].name)
    if kind == "mixtral" and not all(map(config.is_moe_layer, range(config.num_layers))):
        raise ValueError(f"model.moe_layer_freq={config.moe_layer_freq!r}: Mixtral has experts "
                         "in every layer")
    interpolation = config.rotary_seq_len_interpolation_factor
    if config.use_rope_scaling and interpolation is not None:
        raise ValueError("use_rope_scaling with rotary_seq_len_interpolation_factor: a Hugging "
                         "Face config holds one RoPE scaling")
    scaling = {}
    if config.use_rope_scaling:
        scaling = {"rope_scaling": {"rope_type": "llama3", "factor": config.rope_scaling_factor,
                                    **_LLAMA3_SCALING}}
    elif interpolation is not None:
        scaling = {"rope_scaling": {"rope_type": "linear", "factor": interpolation}}
    return {**scaling, **_windows_to_hf(config, kind),
            "architectures": [FAMILIES[kind].architecture], "model_type": kind,
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.ffn_hidden_size, **_experts_to_hf(config, kind),
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_query_groups, "head_dim": config.kv_channels,
            "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.layernorm_epsilon, "rope_theta": config.rotary_base,
            "attention_bias": False, "mlp_bias": False,
            "attention_dropout": config.attention_dropout,
            "initializer_range": config.init_method_std,
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights}
