"""The rules a `TransformerConfig` must follow that are long enough to read on their own, and
the checks they are written with: each names the value and the rule it breaks."""

from __future__ import annotations

from mp.model.layer_pattern import layer_pattern


def positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, allowed))}")


def divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ValueError(f"{name}={value} is not divisible by {by_name}={by}")


def check_moe(config) -> None:
    """The mixture-of-experts fields of a `TransformerConfig` (fills ``moe_ffn_hidden_size`` and
    parses ``moe_layer_freq``)."""
    e, tp = config.num_moe_experts, config.tensor_model_parallel_size
    ep = config.expert_model_parallel_size
    positive_int("expert_model_parallel_size", ep)
    if config.moe_shared_expert_gate and (e is None or
                                          config.moe_shared_expert_intermediate_size is None):
        raise ValueError("moe_shared_expert_gate=True needs num_moe_experts and "
                         "moe_shared_expert_intermediate_size (shared experts to gate)")
    if e is None:
        for name in ("moe_router_bias", "moe_input_jitter_eps",
                     "moe_router_force_load_balancing", "moe_apply_probs_on_input"):
            if getattr(config, name) not in (None, False):
                raise ValueError(f"{name}={getattr(config, name)} needs num_moe_experts (a "
                                 "mixture-of-experts model)")
        if ep > 1:
            raise ValueError(f"expert_model_parallel_size={ep} needs num_moe_experts (a "
                             "mixture-of-experts model)")
        return
    positive_int("num_moe_experts", e)
    positive_int("moe_router_topk", config.moe_router_topk)
    config.moe_layer_freq = _layer_frequency(config, "moe_layer_freq", "0 (dense) or 1 (MoE)")
    if config.moe_router_topk > e:
        raise ValueError(f"moe_router_topk={config.moe_router_topk} exceeds "
                         f"num_moe_experts={e}")
    if config.moe_apply_probs_on_input and config.moe_router_topk != 1:
        raise ValueError(f"moe_apply_probs_on_input=True needs moe_router_topk=1, not "
                         f"{config.moe_router_topk} (a token's copies would each carry one "
                         "probability, and their outputs add up unweighted)")
    if config.moe_ffn_hidden_size is None:
        config.moe_ffn_hidden_size = config.ffn_hidden_size
    positive_int("moe_ffn_hidden_size", config.moe_ffn_hidden_size)
    etp = _expert_tensor_parallel_size(config)
    divisible("moe_ffn_hidden_size", config.moe_ffn_hidden_size,
              "expert_tensor_parallel_size", etp)
    divisible("num_moe_experts", e, "expert_model_parallel_size", ep)
    shared = config.moe_shared_expert_intermediate_size
    if shared is not None:
        positive_int("moe_shared_expert_intermediate_size", shared)
        divisible("moe_shared_expert_intermediate_size", shared,
                  "tensor_model_parallel_size", tp)
    one_of("moe_router_load_balancing_type", config.moe_router_load_balancing_type,
           ("aux_loss", "seq_aux_loss", "global_aux_loss", "none"))
    one_of("moe_router_dtype", config.moe_router_dtype, (None, "fp32", "fp64"))
    one_of("moe_token_drop_policy", config.moe_token_drop_policy, ("probs", "position"))
    _check_router_groups(config)
    capacity = config.moe_expert_capacity_factor
    if capacity is not None and not capacity > 0:
        raise ValueError(f"moe_expert_capacity_factor={capacity!r} must be > 0")
    one_of("moe_router_score_function", config.moe_router_score_function,
           ("softmax", "sigmoid"))
    sigmoid = config.moe_router_score_function == "sigmoid"
    if sigmoid and config.moe_router_pre_softmax:
        raise ValueError("moe_router_pre_softmax=True needs moe_router_score_function="
                         "'softmax'")
    if config.moe_router_enable_expert_bias and not sigmoid:
        raise ValueError("moe_router_enable_expert_bias=True needs "
                         "moe_router_score_function='sigmoid' (mp's expert bias)")
    factor = config.moe_router_topk_scaling_factor
    if factor is not None and not factor > 0:
        raise ValueError(f"moe_router_topk_scaling_factor={factor!r} must be > 0")
    jitter = config.moe_input_jitter_eps
    if jitter is not None and not 0 < jitter < 1:
        raise ValueError(f"moe_input_jitter_eps={jitter!r} must be in (0, 1)")
    if not config.moe_router_bias_update_rate >= 0:
        raise ValueError(f"moe_router_bias_update_rate={config.moe_router_bias_update_rate!r} "
                         "must be >= 0")
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        value = getattr(config, name)
        if value is not None and not value >= 0:
            raise ValueError(f"{name}={value!r} must be >= 0")


def _expert_tensor_parallel_size(config) -> int:
    """ETP: TP (None, the default: each expert split as the layer's MLP) or 1 (each expert
    whole on one rank, the TP ranks serving as EP ranks too: sequence parallelism, so that
    each TP rank routes its own tokens, and EP a multiple of TP, so that the TP ranks hold
    different experts)."""
    etp, tp = config.expert_tensor_parallel_size, config.tensor_model_parallel_size
    ep = config.expert_model_parallel_size
    if etp is None or etp == tp:
        return tp
    if etp != 1:
        raise ValueError(f"expert_tensor_parallel_size={etp!r} must be 1 or equal "
                         f"tensor_model_parallel_size={tp}")
    if not config.sequence_parallel:
        raise ValueError(f"expert_tensor_parallel_size=1 with tensor_model_parallel_size={tp} "
                         "needs sequence_parallel=True (each TP rank routes its own tokens)")
    if ep % tp:
        raise ValueError(f"expert_tensor_parallel_size=1 needs expert_model_parallel_size={ep} "
                         f"to be a multiple of tensor_model_parallel_size={tp} (the TP ranks "
                         "hold different experts)")
    return 1


def _layer_frequency(config, name: str, flags: str) -> int | list[int]:
    """Field ``name``: every n-th layer (a positive int) or ``flags`` per layer (a list of 0/1,
    or Megatron's expression of one, parsed here)."""
    value = getattr(config, name)
    if isinstance(value, str):
        value = layer_pattern(value, name)
    if isinstance(value, list):
        if len(value) != config.num_layers or not set(value) <= {0, 1}:
            raise ValueError(f"{name}={value} must hold a {flags} for each of the "
                             f"num_layers={config.num_layers} layers")
    else:
        positive_int(name, value)
    return value


def check_window(config) -> None:
    """Sliding-window attention: ``window_size`` (``[left, 0]``, or its text ``"4096,0"`` /
    ``"(4096, 0)"``, parsed here) and ``window_attn_skip_freq``."""
    window = config.window_size
    if isinstance(window, str):
        window = config.window_size = _window_text(window)
    if window is None:
        if config.window_attn_skip_freq is not None:
            raise ValueError(f"window_attn_skip_freq={config.window_attn_skip_freq!r} needs "
                             "window_size (the window of the layers that slide)")
        return
    if not (isinstance(window, (list, tuple)) and len(window) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in window)):
        raise ValueError(f"window_size={window!r} must be two integers [left, right]")
    config.window_size = window = list(window)
    left, right = window
    if right != 0:
        raise ValueError(f"window_size={window}: right={right} must be 0, a GPT attends "
                         "causally (no key after its query)")
    if left < 0:
        raise ValueError(f"window_size={window}: left={left} must be >= 0 (how many earlier "
                         "keys a query attends to); leave window_size null to attend to "
                         "every earlier key")
    if config.window_attn_skip_freq is not None:
        config.window_attn_skip_freq = _layer_frequency(
            config, "window_attn_skip_freq", "0 (full attention) or 1 (sliding window)")


def check_qk_l2_norm_and_no_rope(config) -> None:
    """Llama 4's two attention options: ``qk_l2_norm`` (instead of ``qk_layernorm``, not
    under multi-latent attention, as Megatron asserts) and ``no_rope_freq`` (with RoPE, not
    under multi-latent attention; parsed here: every n-th layer, n dividing ``num_layers``, or a
    0/1 per layer)."""
    mla = config.multi_latent_attention
    if config.qk_l2_norm and config.qk_layernorm:
        raise ValueError("qk_l2_norm=True and qk_layernorm=True: choose one (Megatron builds "
                         "the L2 norm in the q/k layernorms' place, leaving their weights out)")
    if config.qk_l2_norm and mla:
        raise ValueError("qk_l2_norm=True does not apply to multi_latent_attention (Megatron "
                         "refuses it there too)")
    freq = config.no_rope_freq
    if freq is None:
        return
    if config.position_embedding_type != "rope":
        raise ValueError(f"no_rope_freq={freq!r} names the layers that skip RoPE: it needs "
                         f"position_embedding_type='rope', not "
                         f"{config.position_embedding_type!r}")
    if mla:
        raise ValueError(f"no_rope_freq={freq!r} does not apply to multi_latent_attention: "
                         "its qk_pos_emb_head_dim channels rotate in every layer (Megatron's "
                         "multi-latent attention ignores no_rope_freq)")
    freq = config.no_rope_freq = _layer_frequency(config, "no_rope_freq",
                                                  "0 (RoPE) or 1 (no RoPE)")
    if isinstance(freq, int):
        divisible("num_layers", config.num_layers, "no_rope_freq", freq)


def check_glu_and_softmax_type(config) -> None:
    """gpt-oss's knobs: ``activation_func_clamp_value`` (> 0) and ``glu_linear_offset`` act on
    a gated unit's halves, so they need one (``activation`` swiglu or quick_geglu);
    ``softmax_type`` is vanilla, off-by-one or learnable (every attention path and
    ``cp_comm_type`` takes its sink logits)."""
    clamp, offset = config.activation_func_clamp_value, config.glu_linear_offset
    gated = config.activation in ("swiglu", "quick_geglu")
    if clamp is not None and not clamp > 0:
        raise ValueError(f"activation_func_clamp_value={clamp!r} must be > 0 (the gate half is "
                         "clamped to at most it, the linear half to [-it, it])")
    for name, value, unset in (("activation_func_clamp_value", clamp, None),
                               ("glu_linear_offset", offset, 0.0)):
        if value != unset and not gated:
            raise ValueError(f"{name}={value!r} acts on a gated unit's halves: it needs "
                             f"activation 'swiglu' or 'quick_geglu', not {config.activation!r}")
    one_of("softmax_type", config.softmax_type, ("vanilla", "off-by-one", "learnable"))


def _window_text(text: str) -> list[int] | str:
    """``"4096,0"``, ``"(4096, 0)"`` or ``"[4096, 0]"`` as ``[4096, 0]`` (the text itself
    when it is none of those, for the caller's message)."""
    parts = text.strip().strip("()[]").split(",")
    try:
        return [int(part) for part in parts]
    except ValueError:
        return text


def _check_router_groups(config) -> None:
    groups, chosen = config.moe_router_num_groups, config.moe_router_group_topk
    if (groups is None) != (chosen is None):
        raise ValueError(f"moe_router_num_groups={groups} and moe_router_group_topk="
                         f"{chosen}: set both or neither")
    if groups is None:
        return
    positive_int("moe_router_num_groups", groups)
    positive_int("moe_router_group_topk", chosen)
    divisible("num_moe_experts", config.num_moe_experts, "moe_router_num_groups", groups)
    k, per_group = config.moe_router_topk, config.num_moe_experts // groups
    if not chosen <= min(groups, k) or k // chosen > per_group or chosen * per_group < k:
        raise ValueError(f"moe_router_group_topk={chosen} must be at most "
                         f"moe_router_num_groups={groups} and moe_router_topk={k}, its "
                         f"groups of {per_group} experts must hold {k}, and "
                         f"moe_router_topk / moe_router_group_topk = {k // chosen} at most "
                         f"{per_group}")


def check_mla(config) -> None:
    """The multi-latent attention fields of a `TransformerConfig`."""
    if not config.multi_latent_attention:
        if config.q_lora_rank is not None:
            raise ValueError(f"q_lora_rank={config.q_lora_rank} needs "
                             "multi_latent_attention=True")
        return
    for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
        positive_int(name, getattr(config, name))
    if config.q_lora_rank is not None:
        positive_int("q_lora_rank", config.q_lora_rank)
    if config.qk_pos_emb_head_dim % 2:
        raise ValueError(f"qk_pos_emb_head_dim={config.qk_pos_emb_head_dim} must be even: "
                         "RoPE rotates pairs of channels")
    if config.position_embedding_type != "rope":
        raise ValueError(f"multi_latent_attention=True needs position_embedding_type='rope', "
                         f"not {config.position_embedding_type!r}: its qk_pos_emb_head_dim "
                         "channels carry the positions")
    if config.num_query_groups != config.num_attention_heads:
        raise ValueError(f"num_query_groups={config.num_query_groups} must equal "
                         f"num_attention_heads={config.num_attention_heads} under "
                         "multi_latent_attention: every head has its own key and value")
    for name, default in (("rotary_percent", 1.0), ("qk_layernorm", False)):
        if getattr(config, name) != default:
            raise ValueError(f"{name}={getattr(config, name)!r} does not apply to "
                             f"multi_latent_attention (leave it {default!r}): the latents "
                             "have their own norms and only the qk_pos_emb_head_dim channels "
                             "rotate")
    if config.add_qkv_bias:
        raise ValueError("add_qkv_bias=True does not apply to multi_latent_attention: it has no "
                         "QKV projection (its projections have no bias)")


def check_yarn(config) -> None:
    """The YaRN fields of a `TransformerConfig`."""
    one_of("rope_type", config.rope_type, ("rope", "yarn"))
    if config.rope_type != "yarn":
        return
    if config.position_embedding_type != "rope":
        raise ValueError(f"rope_type='yarn' scales RoPE's frequencies: it needs "
                         f"position_embedding_type='rope', not "
                         f"{config.position_embedding_type!r}")
    if config.use_rope_scaling:
        raise ValueError("rope_type='yarn' and use_rope_scaling=True (Llama 3.1's) are two "
                         "ways to scale RoPE's frequencies: choose one")
    positive_int("yarn_original_max_position_embeddings",
                 config.yarn_original_max_position_embeddings)
    for name in ("yarn_rotary_scaling_factor", "yarn_beta_fast", "yarn_beta_slow"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name}={getattr(config, name)!r} must be > 0")


def check_mtp(config) -> None:
    """The multi-token prediction fields of a `TransformerConfig`."""
    if config.mtp_num_layers is None:
        return
    positive_int("mtp_num_layers", config.mtp_num_layers)
    if not config.mtp_loss_scaling_factor >= 0:
        raise ValueError(f"mtp_loss_scaling_factor={config.mtp_loss_scaling_factor!r} must "
                         "be >= 0")
    if config.context_parallel_size > 1:
        raise ValueError(f"mtp_num_layers={config.mtp_num_layers} needs "
                         f"context_parallel_size=1, not {config.context_parallel_size}: mp's "
                         "multi-token prediction shifts the tokens within a rank's sequence")
    if config.pipeline_model_parallel_size > 1 \
            and config.position_embedding_type == "learned_absolute":
        raise ValueError(f"mtp_num_layers={config.mtp_num_layers} with "
                         f"pipeline_model_parallel_size={config.pipeline_model_parallel_size} "
                         "needs position_embedding_type 'rope' or 'none': the last stage keeps "
                         "a copy of the word embedding only")


#: What selective recompute can cover (Megatron-Core's ``recompute_modules``): checkpointed
#: (inputs kept, insides recomputed) ``core_attn`` (the attention core), ``mlp`` (a dense
#: layer's MLP), ``moe`` (a mixture-of-experts layer), ``shared_experts``; with their outputs
#: recomputed too (`mp.tensor_parallel.CheckpointWithoutOutput`) ``layernorm`` (the layer's two
#: norms), ``moe_act`` (the experts' activation) and ``mla_up_proj`` (multi-latent attention's
#: up projections and RoPE).
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "shared_experts", "layernorm", "moe_act",
                     "mla_up_proj")
OUTPUT_DISCARDING_MODULES = ("layernorm", "moe_act", "mla_up_proj")


def check_recompute_modules(config) -> None:
    """``recompute_modules`` of a `TransformerConfig`: with ``recompute_granularity=
    'selective'`` only (default ``["core_attn"]``), each of `RECOMPUTE_MODULES` once, and
    each about a part the model has."""
    modules, granularity = config.recompute_modules, config.recompute_granularity
    if granularity != "selective":
        if modules is not None:
            raise ValueError(f"recompute_modules={modules} needs recompute_granularity="
                             f"'selective', not {granularity!r}")
        return
    if modules is None:
        config.recompute_modules = modules = ["core_attn"]
    if not isinstance(modules, (list, tuple)):
        raise ValueError(f"recompute_modules={modules!r} must be a list of "
                         f"{', '.join(RECOMPUTE_MODULES)}")
    for module in modules:
        one_of("recompute_modules entry", module, RECOMPUTE_MODULES)
    if len(set(modules)) < len(modules):
        raise ValueError(f"recompute_modules={modules} names a module twice")
    moe = config.num_moe_experts is not None
    needs = {"mla_up_proj": (config.multi_latent_attention, "multi_latent_attention"),
             "moe": (moe, "num_moe_experts (a mixture of experts)"),
             "moe_act": (moe, "num_moe_experts (a mixture of experts)"),
             "shared_experts": (config.moe_shared_expert_intermediate_size is not None,
                                "moe_shared_expert_intermediate_size (shared experts)"),
             "mlp": (not all(map(config.is_moe_layer, range(config.num_layers))),
                     "a layer without experts (every layer has them: 'moe' recomputes those)")}
    for module in modules:
        has, what = needs.get(module, (True, ""))
        if not has:
            raise ValueError(f"recompute_modules names {module!r}, which needs {what}")
    for part in ("moe_act", "shared_experts"):
        if "moe" in modules and part in modules:
            raise ValueError(f"recompute_modules={modules}: 'moe' recomputes the whole "
                             f"mixture-of-experts layer, {part!r} included; name one of them")
    discarding = [m for m in modules if m in OUTPUT_DISCARDING_MODULES]
    if discarding and config.compile_layers:
        raise ValueError(f"recompute_modules {discarding} free their outputs' storage, which "
                         "torch.compile cannot trace: they need compile_layers=False")


def check_rope(config) -> None:
    """RoPE's settings: ``rotary_percent`` in (0, 1] turning an even number (>= 2) of a head's
    channels; interleaving, Llama 3.1's scaling and the interpolation factor need RoPE; the
    scaling factor is positive."""
    if not 0.0 < config.rotary_percent <= 1.0:
        raise ValueError(f"rotary_percent={config.rotary_percent} must be in (0, 1]")
    if config.position_embedding_type == "rope" and not config.multi_latent_attention and (
            config.rotary_dim < 2 or config.rotary_dim % 2):
        raise ValueError(f"rope rotates pairs of channels: kv_channels x rotary_percent = "
                         f"{config.kv_channels} x {config.rotary_percent} = {config.rotary_dim} "
                         "must be even and at least 2")
    if config.rotary_interleaved and config.position_embedding_type != "rope":
        raise ValueError(f"rotary_interleaved=True lays out RoPE's pairs; "
                         f"position_embedding_type={config.position_embedding_type!r}")
    if config.use_rope_scaling and config.position_embedding_type != "rope":
        raise ValueError(f"use_rope_scaling=True scales rotary embeddings; "
                         f"position_embedding_type={config.position_embedding_type!r}")
    factor = config.rotary_seq_len_interpolation_factor
    if factor is not None and not (factor > 0 and config.position_embedding_type == "rope"):
        raise ValueError(f"rotary_seq_len_interpolation_factor={factor!r} must be > 0 and "
                         "needs position_embedding_type='rope' (it divides RoPE's positions)")
    if not config.rope_scaling_factor > 0:
        raise ValueError(f"rope_scaling_factor={config.rope_scaling_factor} must be > 0")


def check_fp32_residual_connection(config) -> None:
    """``fp32_residual_connection`` needs a 16-bit model (Megatron asserts ``--fp16`` or
    ``--bf16``: in fp32 the residual stream is fp32 already) and mp's norms (apex's take
    input and weight of one dtype)."""
    if not config.fp32_residual_connection:
        return
    if config.precision == "fp32":
        raise ValueError("fp32_residual_connection=True needs precision='bf16' or 'fp16', not "
                         "'fp32' (the residual stream is fp32 already; Megatron refuses it too)")
    if config.normalization_impl != "mp":
        raise ValueError(f"fp32_residual_connection=True needs normalization_impl='mp', not "
                         f"{config.normalization_impl!r}: apex's norms take an input and "
                         "weights of one dtype, mp's take an fp32 input with 16-bit weights")
