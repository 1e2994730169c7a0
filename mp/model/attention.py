"""Causal self-attention with heads split over tensor-parallel ranks.

``[s, b, h]`` (``[s / t, b, h]`` with sequence parallelism) -> fused QKV projection (column-
parallel, ``[s, b, (a + 2 g) d / t]``: this rank's ``np = a / t`` query heads and ``ng = g / t``
key/value heads) -> attention per head -> output projection (row-parallel, reduced back to
``[s, b, h]`` or ``[s / t, b, h]``). ``a`` heads of size ``d`` (``kv_channels``, ``h / a`` by
default; the output projection takes ``a d`` inputs) share ``g`` key/value heads
(``num_query_groups``): ``g = a`` multi-head, ``g < a`` grouped-query, ``g = 1`` multi-query.

The fused QKV weight is laid out per query group, ``[g, a / g + 2, d]`` along its output
dim: the group's queries, then its key, then its value (Megatron's layout; with ``g = a``
that is ``[heads, 3, d]``). A contiguous TP slice holds whole groups.

The projections run in FP8 with ``config.fp8`` (`mp.model.fp8_layers`). Two attention cores:
``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``, flash or
memory-efficient kernels on GPU, causal unless a mask is given; ``unfused``: ``Q K^T`` ->
``FusedScaleMaskSoftmax`` (mp's CUDA kernel when built and usable, torch otherwise) -> dropout
-> ``P V``, for custom masks and for checking the fused path.
A layer with a sliding window (``config.attention_window``, Megatron's ``--window-size``) masks
out, besides, every key more than ``window`` positions before its query (the masks:
`mp.model.attention_masks`). When no other mask is given and the queries outnumber a tile
(`window_tile`, at least `WINDOW_TILE` rows), each tile of queries attends to the keys from
``window`` before its first query to its last, through one ``[tile, tile + window]`` mask that
every tile and every layer of that window shares (`tile_mask`; the tiles whose window reaches
before the first key take a copy of their part): ``s (tile + window)`` scores instead of
``s^2``, and one mask in memory, not one per layer.
With ``config.softmax_type`` off-by-one or learnable (Megatron's ``--softmax-type``, gpt-oss's
attention sinks) every softmax row has one more logit, ``s_h`` per head (0, or the learned
``core_attention.softmax_offset [np]``), which joins the denominator and no value:
``P = exp(scores) / (sum exp(scores) + exp(s_h))`` (`CoreAttention._with_sink`).
Masks follow Megatron: boolean ``[b or 1, 1, s, s]``, ``True`` = masked out; the SDPA core also
takes `sdpa_bias`'s additive form. A micro-batch's `mp.model.packed_documents.PackedDocuments`
may stand where a mask would: the core then attends causally within each document, the
documents gathered into a batch of their own (no mask; the flash kernels run).
`attention_masks.mask_for_layers` prepares a batch's mask once for all the layers of a
`mp.model.transformer.TransformerBlock` (converting a boolean mask is what SDPA would do in
every layer, each keeping its own copy for backward). With a key/value cache
(`mp.model.inference`) the new queries attend over the cached keys too, through the cache's
``[1, 1, s, cached + s]`` causal mask.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from mp import parallel_state
from mp.fused import AttnMaskType, FusedScaleMaskSoftmax, attention_mask_func
from mp.model.attention_masks import tile_mask, window_tile, with_window
from mp.model.config import TransformerConfig
from mp.model.context_parallel import (
    attention_over_gathered_keys,
    attention_over_heads,
    exchange_groups,
    heads_of_this_rank,
)
from mp.model.fp8_layers import fp8_recipe
from mp.model.inference import InferenceParams
from mp.model.init import init_method, init_method_normal, output_init_method
from mp.model.norm import build_norm
from mp.model.packed_documents import PackedDocuments
from mp.model.ring_attention import ring_attention
from mp.model.rope import apply_rotary
from mp.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    checkpoint,
    divide,
    get_cuda_rng_tracker,
)
from mp.tensor_parallel.layers import _sharded_parameter

# SDPA reads grouped keys and values itself from torch 2.5 (enable_gqa); before, they are
# repeated per query head first, as for the unfused core.
SDPA_TAKES_GROUPS = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 5)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's L2 norm of each row of ``x [..., d]`` (Megatron-Core's ``L2Norm``, its
    ``--qk-l2-norm``): ``x / sqrt(mean(x^2) + eps)`` computed in fp32, in ``x``'s dtype, no
    weights. It keeps ``x`` in fp32 (a copy of 16-bit input) and the ``[..., 1]`` fp32 factor
    for backward."""
    x_float = x.float()
    return (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class CoreAttention(nn.Module):
    """``q, k, v [s, b, np, hd] -> context [s, b, np * hd]``.

    Dropout on the attention probabilities runs in the TP-specific RNG stream: each rank
    holds different heads, as a serial model's heads draw different masks. With context
    parallelism (``config.context_parallel_size > 1``) ``s`` is the rank's part of the
    sequence and the keys and values of the rest come from the other CP ranks
    (`mp.model.context_parallel`). ``window``: a query attends to its key and at most this
    many earlier ones (a sliding window); None: to every earlier one.

    ``config.softmax_type``: "off-by-one" or "learnable" add a sink logit per head to every
    softmax row (`_with_sink`); learnable's is the parameter ``softmax_offset [np]``
    (Megatron's name), this TP rank's heads of a ``[a]`` tensor drawn from
    ``N(0, init_method_std)`` as a serial model's (Megatron's init_method), split over
    ``group`` (None: the tensor-parallel group) with the heads. Under context parallelism the
    sinks follow the heads (``a2a``: the CP rank's share, `_learned_sinks`) or join the ring's
    merged softmax (``p2p``, `mp.model.ring_attention`), or both (``a2a+p2p``).
    """

    def __init__(self, config: TransformerConfig, window: int | None = None, group=None):
        super().__init__()
        self.window = window
        self.softmax_type = config.softmax_type
        self.softmax_offset = None
        if config.softmax_type == "learnable":
            group = parallel_state.get_tensor_model_parallel_group() if group is None else group
            self.softmax_offset = _sharded_parameter(
                (config.num_attention_heads,), 0, init_method_normal(config.init_method_std),
                group, config.params_dtype, None, True)
        self.cp_group = (parallel_state.get_context_parallel_group()
                         if config.context_parallel_size > 1 else None)
        self.heads_group, self.ring_group = exchange_groups(config)  # a2a's, p2p's
        self.backend = config.attention_backend
        # compiled layers attend packed documents outside their graphs (which would compile
        # again for each micro-batch's buckets); torch.compiler.disable imports TorchDynamo
        self._packed_attend = (torch.compiler.disable(PackedDocuments.attend)
                               if config.compile_layers else PackedDocuments.attend)
        self.dropout = config.attention_dropout
        self.scale = config.softmax_scale
        self.softmax = FusedScaleMaskSoftmax(
            input_in_fp16=config.precision == "fp16", input_in_bf16=config.precision == "bf16",
            attn_mask_type=AttnMaskType.causal,
            scaled_masked_softmax_fusion=config.masked_softmax_fusion,
            mask_func=attention_mask_func, softmax_in_fp32=True, scale=self.scale)

    def forward(self, q, k, v, attention_mask: torch.Tensor | PackedDocuments | None = None
                ) -> torch.Tensor:
        """``q, k [s, b, np or ng, hd]``, ``v [s, b, ng, vd]`` (``ng`` divides ``np``: each
        key and value head serves ``np / ng`` consecutive query heads; ``vd = hd`` but under
        multi-latent attention) -> ``[s, b, np * vd]``. ``attention_mask``: None (causal), a
        mask, or the micro-batch's `PackedDocuments` (module doc; under context parallelism
        with ``a2a`` only: the other kinds take their mask, `mask_for_layers`)."""
        if isinstance(attention_mask, PackedDocuments) and self.cp_group is not None and (
                self.heads_group is None or self.ring_group is not None):
            raise ValueError("packed documents split over context-parallel ranks: the "
                             "attention under all_gather, p2p and a2a+p2p takes the rank's "
                             "rows of their mask (mp.model.attention_masks.mask_for_layers)")
        if self.cp_group is None:
            return self._attend_within(q, k, v, attention_mask)
        if self.heads_group is not None:  # a2a; a2a+p2p with the ring inside
            attend = self._attend_within if self.ring_group is None else self._ring
            return attention_over_heads(attend, q, k, v, attention_mask, self.heads_group)
        if self.ring_group is not None:
            return self._ring(q, k, v, attention_mask)
        return attention_over_gathered_keys(self._attend, q, k, v, attention_mask,
                                            self.cp_group)

    def _ring(self, q, k, v, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`ring_attention` of ``q [2L, b, np, hd]`` over ``ring_group`` (``p2p``, or
        ``a2a+p2p``'s for the a2a group's share of the heads) -> ``[2L, b, np * vd]``."""
        return ring_attention(q, k, v, attention_mask, self.scale, self.ring_group,
                              window=self.window, sinks=self._ring_sinks(q))

    def _attend_within(self, q, k, v, attention_mask: torch.Tensor | PackedDocuments | None
                       ) -> torch.Tensor:
        """`_attend`, or with packed documents `_attend` within each of them."""
        if isinstance(attention_mask, PackedDocuments):
            return self._packed_attend(attention_mask, self._attend, q, k, v)
        return self._attend(q, k, v, attention_mask)

    def _attend(self, q, k, v, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``q [sq, b, np, hd]``, ``k [sk, b, ng, hd]``, ``v [sk, b, ng, vd]`` -> ``[sq, b,
        np * vd]``. Without a mask, causal with the queries at the last ``sq`` of the ``sk``
        positions (so is the window's mask, when a key falls out of it)."""
        s = q.size(0)
        if self.window is not None and k.size(0) - 1 > self.window:
            if attention_mask is None and s > window_tile(self.window):
                return self._tiled(q, k, v)
            attention_mask = with_window(attention_mask, s, k.size(0), self.window, q.device)
        return self._core(q, k, v, attention_mask)

    def _tiled(self, q, k, v) -> torch.Tensor:
        """`_attend` under the window in tiles of `window_tile` queries (module doc), the
        queries at the last ``sq`` of the ``sk`` positions."""
        window, tile = self.window, window_tile(self.window)
        form = torch.bool if self.backend == "unfused" else q.dtype
        shared = tile_mask(tile, window, form, q.device)
        first = k.size(0) - q.size(0)  # the position of the first query
        contexts = []
        for start in range(0, q.size(0), tile):
            end = min(start + tile, q.size(0))
            keys = max(0, first + start - window)  # the tile's first key
            cut = keys - (first + start - window)  # columns before key 0: a tile near the start
            mask = shared[..., :end - start, cut:end - start + window]
            if cut:  # a copy of its own: CUDA's kernels want the mask's start aligned
                mask = mask.contiguous()
            contexts.append(self._core(q[start:end], k[keys:first + end], v[keys:first + end],
                                       mask))
        return torch.cat(contexts)

    def _ring_sinks(self, q: torch.Tensor) -> torch.Tensor | None:
        """Ring attention's ``sinks [np]`` for ``q [2L, b, np, hd]``: None without sinks,
        the learned logits, or off-by-one's fp32 zeros."""
        if self.softmax_type == "off-by-one":
            return torch.zeros(q.size(2), device=q.device)
        return None if self.softmax_offset is None else self._learned_sinks()

    def _learned_sinks(self) -> torch.Tensor:
        """``softmax_offset``'s logits of the heads `_core` attends: this TP rank's ``np``, or
        under ``a2a`` context parallelism this CP rank's share of them (of its a2a group's
        under ``a2a+p2p``)."""
        if self.heads_group is not None:
            return heads_of_this_rank(self.softmax_offset, self.heads_group)
        return self.softmax_offset

    def _with_sink(self, q, k, v, attention_mask: torch.Tensor | None):
        """`_core`'s arguments with the sink folded in as one more key, exactly: each query
        head gains a channel ``s_h / scale`` (``s_h`` its sink logit: 0 for off-by-one),
        every key a channel 0, and a key ``[0, .., 0, 1]`` with value 0 comes first, which
        every query keeps (a column of kept entries joins ``attention_mask``; without one the
        causal rule with the queries at the last ``sq`` of the ``sk + 1`` positions keeps it
        too). Its score is ``s_h``, the real keys' are unchanged: the softmax runs over them
        and the sink, and the sink adds nothing to the context. q and k (and v, where as
        wide as k; `_core` drops its extra channels from the context) are padded with 0 up
        to the next multiple of 8 channels, which CUDA's flash and memory-efficient kernels
        take. Both cores (and the CUDA softmax kernel) run as they are; the learnable logits'
        gradients come through the queries' channel. It costs up to 8 channels on q, k, v
        and one key, not a per-head ``[b, np, sq, sk]`` bias (what a sink column as a mask
        would take under SDPA)."""
        sq, b, heads = q.shape[:3]
        groups, width = k.size(2), k.size(-1)
        extra = 8 - width % 8  # the sink's channel and zeros up to a multiple of 8
        if self.softmax_offset is None:  # off-by-one: a 0 logit
            column = q.new_zeros(sq, b, heads, 1)
        else:
            column = (self._learned_sinks().to(q.dtype) / self.scale).view(1, 1, heads, 1)
            column = column.expand(sq, b, heads, 1)
        q = torch.cat([q, column, q.new_zeros(sq, b, heads, extra - 1)], dim=-1)
        sink_key = k.new_zeros(1, b, groups, width + extra)
        sink_key[..., width] = 1.0
        k = torch.cat([sink_key, F.pad(k, (0, extra))])
        value_pad = extra if v.size(-1) == width else 0
        v = F.pad(v, (0, value_pad, 0, 0, 0, 0, 1, 0))  # a zero value first
        if attention_mask is not None:  # False (bool) and 0 (additive) keep the sink
            kept = attention_mask.new_zeros(*attention_mask.shape[:-1], 1)
            attention_mask = torch.cat([kept, attention_mask], dim=-1)
        return q, k, v, attention_mask

    def _core(self, q, k, v, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`_attend` with the window's mask in ``attention_mask`` already."""
        value_width = v.size(-1)
        if self.softmax_type != "vanilla":
            q, k, v, attention_mask = self._with_sink(q, k, v, attention_mask)
        s, b, heads = q.shape[:3]
        offset = k.size(0) - s  # keys before the first query (context parallelism)
        groups = k.size(2)
        if groups < heads and not (self.backend == "sdpa" and SDPA_TAKES_GROUPS):
            k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))
            groups = heads
        dropout = self.dropout if self.training else 0.0
        with get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            if self.backend == "sdpa":
                grouped = {"enable_gqa": True} if groups < heads else {}
                if attention_mask is None:  # flash and memory-efficient kernels take the
                    # bottom-right form
                    mask = _causal_lower_right(s, k.size(0)) if offset else None
                elif attention_mask.dtype == torch.bool:
                    mask = ~attention_mask  # True = masked in mp, kept in SDPA
                else:
                    mask = attention_mask  # sdpa_bias's additive form
                context = F.scaled_dot_product_attention(
                    *(t.permute(1, 2, 0, 3) for t in (q, k, v)),  # [b, np, s, hd]
                    attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                    scale=self.scale, **grouped)
            else:
                if attention_mask is None and offset:
                    attention_mask = torch.ones(s, k.size(0), dtype=torch.bool,
                                                device=q.device).triu(offset + 1)[None, None]
                context = self._unfused(q, k, v, attention_mask, dropout)
        if context.size(-1) != value_width:  # the sink's padded value channels
            context = context[..., :value_width]
        return context.permute(2, 0, 1, 3).reshape(s, b, heads * value_width)

    def _unfused(self, q, k, v, attention_mask, dropout) -> torch.Tensor:
        """Returns ``[b, np, s, hd]``."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2))  # [b, np, sq, sk], scaled in the softmax
        self.softmax.attn_mask_type = (AttnMaskType.causal if attention_mask is None
                                       else AttnMaskType.padding)
        probs = F.dropout(self.softmax(scores, attention_mask), dropout, dropout > 0)
        return torch.matmul(probs, v)


class Attention(nn.Module):
    """What self-attentions share: the core and the row-parallel output projection ``dense``
    (``query_projection_size -> h``), and `attend`, from the heads' queries, keys and values to
    ``(output, bias)``. A subclass builds its input projections, then calls `_build_output`:
    the default generator draws the weights in that order."""

    def __init__(self, config: TransformerConfig, layer_number: int = 1):
        super().__init__()
        self.config = config
        self.layer_number = layer_number  # its key in an inference cache

    def _build_output(self, group) -> None:
        config, number = self.config, self.layer_number
        self.core_attention = CoreAttention(config, config.attention_window(number), group)
        self.dense = RowParallelLinear(
            config.query_projection_size, config.hidden_size, bias=config.add_bias_linear,
            input_is_parallel=True, init_method=output_init_method(config),
            skip_bias_add=True, sequence_parallel=config.sequence_parallel,
            params_dtype=config.params_dtype, group=group, fp8=fp8_recipe(config, number))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention_mask: torch.Tensor | None, inference_params: InferenceParams | None):
        """``q, k [s, b, np or ng, hd]``, ``v [s, b, ng, vd]`` (after RoPE) -> ``(output,
        bias)``: `context` through the output projection."""
        return self.dense(self.context(q, k, v, attention_mask, inference_params))

    def context(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor | None, inference_params: InferenceParams | None
                ) -> torch.Tensor:
        """`attend`'s arguments -> the core's ``[s, b, np vd]``, checkpointed when selective
        recompute covers ``core_attn``. With ``inference_params`` the keys and values join the
        cached ones, and the new queries attend over all of them (``attention_mask`` must then
        be None)."""
        if inference_params is not None:
            if attention_mask is not None:
                raise ValueError("a key/value cache attends causally: attention_mask must be "
                                 "None")
            attention_mask = inference_params.causal_mask(q.size(0), q.device)
            k, v = inference_params.update(self.layer_number, k, v)
        if self.config.recomputes("core_attn"):
            return checkpoint(self.core_attention, False, q, k, v, attention_mask)
        return self.core_attention(q, k, v, attention_mask)


class SelfAttention(Attention):
    """Returns ``(output, bias)`` like the row-parallel projection it ends with (the bias is
    left for the caller's fused bias-dropout-add).

    With ``config.qk_layernorm`` (Megatron's ``--qk-layernorm``) each query head and each key
    head is normalized over its ``d`` channels after the projection and before RoPE, by the
    model's norm: ``q_layernorm`` is shared by all query heads, ``k_layernorm`` by all key
    heads, each ``[d]``. They are replicated over TP while each rank sees only its heads, so
    their gradients are partial sums over the TP group (marked ``sequence_parallel``, as
    sequence-parallel norms are; `mp.distributed.finalize_model_grads` adds them up). With
    ``config.qk_l2_norm`` (Megatron's ``--qk-l2-norm``, Llama 4's) `l2_norm` takes their
    place there: no weights.

    RoPE rotates q and k unless ``config.no_rope_freq`` makes this layer a NoPE one
    (``config.applies_rope(layer_number)``): its q and k then attend as projected (and
    normalized).
    """

    def __init__(self, config: TransformerConfig, group=None, layer_number: int = 1):
        super().__init__(config, layer_number)
        sp, dtype = config.sequence_parallel, config.params_dtype
        bias = config.add_bias_linear or config.add_qkv_bias
        self.query_key_value = ColumnParallelLinear(
            config.hidden_size, config.qkv_size, bias=bias, gather_output=False,
            init_method=init_method(config), sequence_parallel=sp,
            params_dtype=dtype, group=group, fp8=fp8_recipe(config, layer_number))
        tp = self.query_key_value.world_size
        self.heads_per_partition = divide(config.num_attention_heads, tp, "num_attention_heads")
        self.groups_per_partition = divide(config.num_query_groups, tp, "num_query_groups")
        self.q_layernorm, self.k_layernorm = (
            (build_norm(config, config.kv_channels, partial_grads=True),
             build_norm(config, config.kv_channels, partial_grads=True))
            if config.qk_layernorm else (None, None))
        self.rotary = config.applies_rope(layer_number)  # False on NoPE layers
        self._build_output(group)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_freqs: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None):
        qkv, _ = self.query_key_value(hidden)  # [s, b, (a + 2 g) d / t]
        s, b = qkv.shape[:2]
        d, groups = self.config.kv_channels, self.groups_per_partition
        queries = self.heads_per_partition // groups * d  # per group
        q, k, v = qkv.view(s, b, groups, queries + 2 * d).split([queries, d, d], dim=-1)
        q = q.reshape(s, b, self.heads_per_partition, d)  # a view when groups = heads
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        elif self.config.qk_l2_norm:
            eps = self.config.layernorm_epsilon
            q, k = l2_norm(q, eps), l2_norm(k, eps)
        if rotary_freqs is not None and self.rotary:
            magnitude = self.config.rotary_magnitude
            q, k = (apply_rotary(t, rotary_freqs, magnitude, self.config.rotary_interleaved)
                    for t in (q, k))
        return self.attend(q, k, v, attention_mask, inference_params)


def _causal_lower_right(sq: int, sk: int):
    """SDPA's bottom-right causal bias for ``sq`` queries over ``sk`` keys (imported here:
    ``torch.nn.attention.bias`` imports TorchDynamo, seconds of every job's start-up)."""
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(sq, sk)
