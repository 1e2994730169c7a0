"""What a layer's attention saves for backward, from its input projections' outputs to its
core's output: q, k and v with their copies (RoPE but on ``no_rope_freq``'s layers,
``qk_layernorm`` or ``qk_l2_norm``, grouped queries, context parallelism) and the core, over
the attention calls one rank makes (`mp.estimate.attention_calls`).
`mp.estimate.activations` adds the rest of the layer and sums the terms (its module doc lists
them all).

With ``c`` context-parallel ranks the attention reads other ranks' tokens: ``all_gather`` saves
the keys and values of the whole sequence and attends in two query chunks (`rank_calls`);
``a2a`` saves q, k and v exchanged for every token of ``a / (t c)`` heads (`attention_heads`).
Both keep each attention call's output apart from the projection's input. ``p2p``'s ring
attention keeps its q, k, v inputs as they come, its output (the projection's input) and an
fp32 log-sum-exp per query: CP 1's terms for ``s / c`` tokens, with SDPA's core whatever the
backend. ``a2a+p2p`` (``A x P = c``, `exchange_sizes`) saves ``a2a``'s exchanged q, k, v, for
``s / P`` tokens of ``a / (t A)`` heads, which its ring keeps with its output (kept apart
from the projection's input, which the all-to-all back makes) and log-sum-exp.

A layer with a sliding window (``cfg.attention_window``; `layer_terms`' ``layer``) attends
through an explicit mask in each attention call whose keys reach past the window, in place of
the causal form (`window_calls`): its own ``[sq, sk]`` mask when the call's queries fit a
tile (`mp.model.attention_masks.window_tile`, the rule the model runs), else, tile by tile of ``T``
queries, each against the ``W`` keys before the tile and its own (the first tiles' cut at
key 0), through a view of one cached ``[T, T + W]`` mask that every tile and every layer of
the window shares (``tile`` calls). The kernels save a mask as they save a given one: the
unfused core's torch path the boolean mask and ``[sq, 1]`` fully-masked-row flags (in place
of the square causal mask; mp's fused softmax keeps no mask), SDPA's CPU flash kernel and
CUDA's memory-efficient one (which runs instead of flash, which takes no mask) the mask in
the activation dtype, ``e sq sk`` (CUDA's by the kernels' code, not measured), and the math
path nothing (it adds the mask to its scores). A tile's view keeps the whole shared mask,
``T (T + W)`` bools or ``e T (T + W)`` bytes, under one name a window (`tile_mask_name`):
each layer's terms hold it, the layers held together once (`split_tile_masks`). Everything
else is per call: scores, row flags, the math path's fp32 copies of q, k and v (the tiles'
keys overlap), the unfused core's keys and values repeated per head, the log-sum-exp (on
CUDA in whole 32-query tiles per call); SDPA's tiles keep their outputs apart from their
concatenation, the projection's input. Under ``all_gather`` each chunk's calls are cut,
tiled or neither by its own queries and keys, so the estimate is the CP rank that saves the
most (`busiest_calls`); ``p2p``'s ring masks by distance and keeps no mask; selective
``core_attn`` recomputes the mask with the core (a recompute of tiles saves the shared mask).

With attention sinks (``softmax_type`` off-by-one or learnable) each core call pads copies of
its q, k and v, one more key and channels up to a multiple of 8 (`core_head_dims`), which the
core keeps in place of any other q, k, v; every call has one more key and a mask of its own
(`sink_calls`: the causal ones bottom-right, the tiles' no view of the shared mask), and
SDPA's padded output is kept apart from the projection's input, cut to the values' channels
(with one head per call the input views it).
``p2p``'s ring keeps what it keeps without sinks, and off-by-one's fp32 zero logits.

Multi-latent attention (`mp.model.mla`) replaces the QKV terms by its latents', queries', keys'
and values' (`mp.estimate.mla`); its core is this module's, scores ``s x s`` per head as
above, with values ``dv`` wide and, where the values are narrower or wider than the queries,
the SDPA kernel that takes them (`sdpa_kernel`); with attention sinks it is refused.
"""

from __future__ import annotations

from mp.estimate.attention_calls import (
    AttentionCall,
    exchange_sizes,
    rank_calls,
    tile_mask_name,
)
from mp.estimate.mla import mla_qkv_terms
from mp.estimate.storage import (
    FP32,
    LSE_ROWS,
    Kernels,
    activation_bytes,
    dropout_mask_bytes,
    head_dims,
    local_tokens,
)
from mp.model.attention_masks import window_tile
from mp.model.config import TransformerConfig


def attention_heads(cfg: TransformerConfig) -> int:
    """Query heads one rank attends with: ``a / t``, or ``a / (t c)`` when ``a2a`` context
    parallelism trades its tokens of every head for every token of some heads (``a / (t
    A)`` under ``a2a+p2p``)."""
    return cfg.num_attention_heads // cfg.tensor_model_parallel_size // exchange_sizes(cfg)[0]


def core_head_dims(cfg: TransformerConfig) -> tuple[int, int]:
    """(channels of a query or key head, of a value head) as the core takes them: `head_dims`,
    but with attention sinks (``softmax_type`` off-by-one or learnable) the query and key
    heads padded with the sink's channel and zeros up to the next multiple of 8, and the value
    heads as much where as wide (`mp.model.attention.CoreAttention._with_sink`)."""
    qk, v = head_dims(cfg)
    if cfg.softmax_type == "vanilla":
        return qk, v
    extra = 8 - qk % 8
    return qk + extra, v + extra if v == qk else v


def sink_calls(calls: list[AttentionCall]) -> list[AttentionCall]:
    """``calls`` as the core makes them with attention sinks: each with one more key (the
    sink's, first) and a mask of its own (a column that keeps the sink joins a given mask;
    a tile's is no view of the shared one then; causal calls have fewer queries than keys,
    the bottom-right form)."""
    return [AttentionCall(c.queries, c.keys + 1, "window" if c.mask == "tile" else c.mask)
            for c in calls]


def sdpa_kernel(cfg: TransformerConfig, kernels: Kernels, masked: bool = False) -> str | None:
    """The kernel SDPA runs (None for the unfused core): ``"flash"``; ``"math"`` where
    ``kernels`` take attention dropout (CPU) or values narrower or wider than the queries
    (multi-latent attention, CPU) only that way; ``"efficient"`` (memory-efficient) for such
    values on CUDA. ``masked``: the call takes a sliding window's explicit mask (its own or a
    tile's view of the shared one), which CUDA's flash kernel refuses
    (``kernels.sdpa_mask_kernel``). None too under ``p2p`` and ``a2a+p2p`` context
    parallelism, whose ring attention runs its own (and saves what flash does)."""
    if cfg.attention_backend != "sdpa" or exchange_sizes(cfg)[1] > 1:
        return None
    qk, v = head_dims(cfg)
    if qk != v:
        return kernels.sdpa_value_width_kernel
    if cfg.attention_dropout > 0 and kernels.sdpa_dropout_kernel == "math":
        return "math"
    return kernels.sdpa_mask_kernel if masked else "flash"


def busiest_calls(cfg: TransformerConfig, micro_batch: int, kernels: Kernels,
                  window: int | None) -> list[AttentionCall]:
    """The `rank_calls` of the CP rank whose attention saves the most without recompute (its
    q, k, v and their copies, its core; the first of equals): the estimate's rank."""
    candidates = rank_calls(cfg, window)
    if len(candidates) == 1:
        return candidates[0]
    return max(candidates, key=lambda calls: sum(attention_terms(
        cfg, micro_batch, kernels, frozenset(), False, calls, window).values()))


def attention_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels,
                     modules: frozenset[str], refilled: bool, calls: list[AttentionCall],
                     window: int | None, rope: bool | None = None) -> dict[str, float]:
    """What the attention saves between its input projections' outputs and its core's
    output, attending through ``calls`` (`mp.estimate.activations.layer_halves`' arguments).
    ``rope``: RoPE rotates the layer's q and k (``cfg.applies_rope``; default: with RoPE, as
    every layer does without ``no_rope_freq``)."""
    if cfg.softmax_type != "vanilla" and cfg.multi_latent_attention:
        raise ValueError(f"softmax_type={cfg.softmax_type!r} with multi_latent_attention: the "
                         "activation estimate does not model attention sinks over multi-latent "
                         "attention's queries, keys and values")
    if rope is None:
        rope = cfg.position_embedding_type == "rope"
    if cfg.multi_latent_attention and cfg.cp_comm_type == "a2a+p2p":
        raise ValueError("multi_latent_attention with cp_comm_type='a2a+p2p': the activation "
                         "estimate does not model multi-latent attention's queries, keys and "
                         "values exchanged for its ring")
    core, up_proj = "core_attn" in modules, "mla_up_proj" in modules
    ring = exchange_sizes(cfg)[1] > 1
    if cfg.softmax_type != "vanilla" and not (core or ring):
        calls = sink_calls(calls)
    math_core = sdpa_kernel(cfg, kernels) == "math" and not core
    if cfg.multi_latent_attention:
        math_rows = (micro_batch * sum(c.queries for c in calls),
                     micro_batch * sum(c.keys for c in calls)) if math_core else None
        terms = mla_qkv_terms(cfg, micro_batch, kernels, core, math_rows, up_proj, refilled)
    else:
        terms = _qkv_terms(cfg, micro_batch, kernels, math_core, core, calls, rope)
    if not core:
        terms.update(_attention_core(cfg, micro_batch, kernels, math_core, calls, window))
    return terms


def _qkv_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels, math_core: bool,
               core_recomputed: bool, calls: list[AttentionCall], rope: bool
               ) -> dict[str, float]:
    """What the QKV output, the queries and keys (normalized, rotated where ``rope``) leave
    saved, and the ``qk_layernorm`` norms' own saves (their input when they keep it as it
    comes, statistics per head row, a composite RMSNorm's fp32 tensors, the ``1 + weight`` of
    zero-centred ones) or ``qk_l2_norm``'s (`_l2_norm_terms`). With context parallelism the
    attention reads the keys and values of the whole sequence, gathered over CP: copies, so
    the QKV output stays saved only through the queries that view it; with ``a2a`` the
    attention reads copies of all three, exchanged for every token of its heads (under
    ``a2a+p2p`` for the ring's ``s / P`` tokens, which it keeps). The math
    core's copies and the unfused core's repeated keys and values are made per call of
    ``calls`` (a window's tiles overlap in keys)."""
    e, t = activation_bytes(cfg), cfg.tensor_model_parallel_size
    tokens = local_tokens(cfg, micro_batch)
    # rows the attention calls read, and the query channels they read them with
    queries = micro_batch * sum(c.queries for c in calls)
    keys = micro_batch * sum(c.keys for c in calls)
    heads, (qk_width, v_width) = attention_heads(cfg), core_head_dims(cfg)
    split = cfg.context_parallel_size > 1 and not core_recomputed  # else with the core
    heads_shared, ring_size = exchange_sizes(cfg)
    gathered = split and cfg.cp_comm_type == "all_gather"
    exchanged = split and heads_shared > 1  # a2a+p2p's ring saves the exchanged copies
    ring = split and ring_size > 1  # saves its q, k, v inputs, as they come
    # the sinks' padded copies of q, k, v replace every other input of the core's
    padded = cfg.softmax_type != "vanilla" and not (core_recomputed or ring)
    q, kv = cfg.query_projection_size, cfg.num_query_groups * cfg.kv_channels
    grouped = cfg.num_query_groups < cfg.num_attention_heads
    copied_q = grouped and cfg.num_query_groups > t  # with one group per rank, q is a view
    qk_norm = cfg.qk_layernorm or cfg.qk_l2_norm
    composite = cfg.normalization == "RMSNorm" and kernels.composite_rms_norm
    # a norm that keeps its q, k input as is (k is a view of the QKV output); the composite
    # RMSNorm keeps an fp32 copy of 16-bit input instead
    norm_keeps_input = cfg.qk_layernorm and not (composite and e != FP32) \
        or cfg.qk_l2_norm and e == FP32
    per_head = heads * (queries * qk_width + keys * (qk_width + v_width))
    terms = {}
    if math_core:  # fp32 copies of q, k, v replace the 16-bit QKV output (and RoPE's q, k)
        terms["Q, K, V (fp32 copies)"] = FP32 * per_head
    elif grouped and cfg.attention_backend == "unfused" and not (core_recomputed or ring):
        # the matmuls save q and the keys and values repeated for every query head
        terms["Q, and K, V repeated per head"] = e * per_head
    elif padded:  # per call: the sink's channel on q and k, its key on k and v
        key_heads = heads * cfg.num_query_groups // cfg.num_attention_heads
        terms["Q, K, V padded for the sinks"] = e * (heads * queries * qk_width
                                                     + key_heads * keys * (qk_width + v_width))
    elif exchanged:  # RoPE's, the norms' and the projection's q, k, v go into the exchange
        terms["Q, K, V exchanged over CP"] = e * tokens * cfg.qkv_size / t
    else:
        if gathered:
            terms["K, V gathered over CP"] = 2 * e * micro_batch * cfg.seq_length * kv / t
            if not (rope or qk_norm or copied_q):  # q views the QKV output
                terms["Q, K, V"] = e * tokens * cfg.qkv_size / t
        else:  # v views the whole QKV output
            terms["Q, K, V"] = e * tokens * cfg.qkv_size / t
        qk, names = (q, "Q") if gathered else (q + kv, "Q, K")
        if rope:
            terms[f"rotated {names}"] = e * tokens * qk / t
        elif qk_norm:
            terms[f"normalized {names}"] = e * tokens * qk / t
        elif copied_q:
            terms["Q (copied out of its groups)"] = e * tokens * q / t
    if not qk_norm:
        return terms
    if norm_keeps_input:
        terms["Q, K, V"] = e * tokens * cfg.qkv_size / t
        if copied_q:
            terms["Q (copied out of its groups)"] = e * tokens * q / t
    rows = tokens * (cfg.num_attention_heads + cfg.num_query_groups) / t
    if cfg.qk_l2_norm:
        terms.update(_l2_norm_terms(e, tokens * (q + kv) / t, rows))
        return terms
    if composite:
        if e != FP32:
            terms["Q, K norm input (fp32)"] = FP32 * tokens * (q + kv) / t
        terms["Q, K normalized (fp32)"] = FP32 * tokens * (q + kv) / t
        terms["Q, K norm statistics"] = FP32 * rows
    else:
        stats = kernels.norm_stats_bytes or e
        terms["Q, K norm statistics"] = (2 if cfg.normalization == "LayerNorm" else 1) * \
            stats * rows
    if cfg.layernorm_zero_centered_gamma:
        terms["Q, K norm weights (1 + weight)"] = 2 * e * cfg.kv_channels
    return terms


def _l2_norm_terms(e: int, elements: float, rows: float) -> dict[str, float]:
    """`mp.model.attention.l2_norm`'s own saves over q and k, ``elements`` of them in
    ``rows`` head rows: their fp32 copy of 16-bit input (fp32 input is kept as it comes,
    `_qkv_terms`' "Q, K, V"), and an fp32 factor per row."""
    terms = {"Q, K L2 norm input (fp32)": FP32 * elements} if e != FP32 else {}
    return {**terms, "Q, K L2 norm factors (fp32)": FP32 * rows}


def _attention_core(cfg: TransformerConfig, micro_batch: int, kernels: Kernels,
                    math_core: bool, calls: list[AttentionCall], window: int | None
                    ) -> dict[str, float]:
    """What the attention core saves between Q, K, V and its output over ``calls``
    (`busiest_calls`) of ``micro_batch`` sequences; ``window``: the layer's sliding window
    (the tiles' shared mask is ``[T, T + W]``, `mp.model.attention_masks.window_tile`)."""
    e = activation_bytes(cfg)
    heads = attention_heads(cfg)
    heads_shared, ring_size = exchange_sizes(cfg)
    if ring_size > 1:  # ring attention keeps the output it returns (p2p: the projection's
        # input; a2a+p2p: exchanged back into another) and an fp32 log-sum-exp per query of
        # its s / P tokens; it masks by distance, keeping no mask; the sinks' logits (a
        # parameter, but off-by-one's fp32 zeros)
        rows = heads_shared * local_tokens(cfg, micro_batch)
        core = {"softmax log-sum-exp": FP32 * heads * rows}
        if heads_shared > 1:
            core["attention output before its exchange"] = e * rows * heads * head_dims(cfg)[1]
        if cfg.softmax_type == "off-by-one":
            core["off-by-one sink logits (fp32 zeros)"] = FP32 * heads
        return core
    # [b, np, sq, sk] elements
    scores = heads * micro_batch * sum(c.queries * c.keys for c in calls)
    queries = micro_batch * sum(c.queries for c in calls)
    windowed = [c for c in calls if c.mask == "window"]
    bottom_right = [c for c in calls if c.mask == "causal" and c.keys > c.queries]
    tiles = [c for c in calls if c.mask == "tile"]
    tile = window_tile(window) if tiles else 0  # one [T, T + W] mask for every tile and layer
    shared = {tile_mask_name(window): tile * (tile + window)} if tiles else {}
    dropout = cfg.attention_dropout > 0
    value_width, padded_width = head_dims(cfg)[1], core_head_dims(cfg)[1]
    # the projection's input is a copy of SDPA's outputs: concatenated (tiles, all_gather's
    # chunks), exchanged back (a2a) or cut to the values' channels (the sinks' padding), but
    # for one call of one head whose output (in the queries' [s, b, np, d] memory order) is
    # only cut: a view of it then
    copied = cfg.context_parallel_size > 1 or len(calls) > 1 \
        or (padded_width != value_width and heads > 1)
    viewed = {} if copied or padded_width == value_width else {
        "attention output's padded value channels (the projection's input views it)":
            e * queries * heads * (padded_width - value_width)}
    if math_core:  # the math path adds any mask to its scores: it saves none
        core = {"softmax output (fp32)": FP32 * scores}
        if dropout:
            core.update({"attention dropout mask (fp32)": FP32 * scores,
                         "dropped probabilities (fp32)": FP32 * scores})
        return core
    if cfg.attention_backend == "sdpa":
        rows = micro_batch * sum(  # the memory-efficient kernel's are whole tiles of queries
            -(-c.queries // LSE_ROWS) * LSE_ROWS
            if sdpa_kernel(cfg, kernels, c.mask != "causal") == "efficient" else c.queries
            for c in calls)
        core = {"softmax log-sum-exp": FP32 * heads * rows, **viewed}
        if copied:  # SDPA keeps its output
            core["attention output before its concatenation, exchange or cut"] = \
                e * queries * heads * padded_width
        if kernels.sdpa_bottom_right_mask and bottom_right:
            core["bottom-right causal masks"] = e * sum(c.queries * c.keys for c in bottom_right)
        if windowed:  # the window's mask in the activation dtype: the CPU's flash kernel
            # converts it so, CUDA's memory-efficient one takes it so as its additive bias
            core["sliding-window masks"] = e * sum(c.queries * c.keys for c in windowed)
        # the tiles': views of the shared mask, made in the activation dtype
        core.update({name: e * size for name, size in shared.items()})
        return core
    fused = kernels.fused_softmax and e == 2  # the kernel takes 16-bit scores only
    softmax_bytes = e if fused else FP32
    core = {"softmax output": softmax_bytes * scores}
    if not fused:
        # the [sq, sk] bool mask the scores' masked_fill saves: the causal torch path runs no
        # zero_fully_masked_rows (no row is fully masked), so no [sq, 1] row flags; an
        # explicit mask (a bottom-right block's, a window's, a tile's view of the shared one)
        # takes the padding path, which saves them
        square = sum(c.queries ** 2 for c in calls if c.mask == "causal" and c.keys == c.queries)
        if square:
            core["causal mask"] = square
        for name, masked in (("bottom-right causal masks", bottom_right),
                             ("sliding-window masks", windowed)):
            if masked:
                core[f"{name} and row flags"] = sum(c.queries * c.keys + c.queries
                                                    for c in masked)
        if tiles:
            core["row flags of the tiles"] = sum(c.queries for c in tiles)
            core.update(shared)
    if dropout:
        core["attention dropout mask"] = dropout_mask_bytes(cfg, kernels) * scores
        core["dropped probabilities"] = e * scores
    elif softmax_bytes != e:
        core["probabilities (activation dtype)"] = e * scores
    return core
