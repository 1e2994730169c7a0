"""Multi-latent attention (`mp.model.mla`, DeepSeek-V2's) in the estimate: what its
projections and latents save for backward, and the tensor-parallel calls they add.

With ``a`` heads over ``t`` ranks, ``dn`` channels without positions, ``dr`` rotated ones
(``qk = dn + dr`` a query or key head), ``dv`` a value head, latents ``c`` (``kv_lora_rank``)
and ``r`` (``q_lora_rank``) wide, ``n`` the rank's tokens (`local_tokens`) and ``n'`` the
rows of the sequence-parallel regions (`sequence_rows`), a layer saves, beside what every
layer saves (its norms, the attention input ``e n' h``, the rotary tables of the ``dr``
channels, the core, the attention output, the MLP):

- the keys' and values' latent norm: its input, a view of the down projection's
  ``[n', c + dr]`` output that keeps all of it (``e n' (c + dr)``; torch's composite RMSNorm
  on the CPU keeps an fp32 copy of the ``c`` channels instead), its statistics, and its
  output, the up projection's input (``e n' c``);
- with ``q_lora_rank``, the queries' latent norm (input ``e n' r``, statistics) and its output
  (``e n' r``);
- the queries and keys the core takes: each a new tensor, the ``dn`` channels and the rotated
  ``dr`` concatenated (the key's shared by every head), ``2 e n a qk / t``; and the values,
  a copy of their channels of the up projection's output, ``e n a dv / t``.

The SDPA core takes values as wide as the queries and keys only: with ``dv != qk`` CUDA runs
the memory-efficient kernel (what flash saves, its log-sum-exp padded to 32-query tiles) and
the CPU torch's math path, with or without dropout (fp32 copies of q, k and v replace the
terms above, plus the fp32 softmax). With context parallelism ``all_gather`` saves the
gathered keys and values, ``e s b a (qk + dv) / t`` (so the up projection's output is no
longer kept) beside the queries; ``a2a`` the exchanged q, k, v, ``e n a (2 qk + dv) / t``;
``p2p`` its inputs as they come, the terms above.

Tensor parallelism (`tensor_parallel_channels`): the up projections are column-parallel
layers whose inputs are the latents, so under sequence parallelism they gather ``c`` (and
``r``) channels per token instead of ``h``; the key's RoPE channels reach every rank's heads
through a gather (SP: all-gathered forward, reduce-scattered backward) or a copy into the TP
region (its gradient all-reduced backward), ``dr`` channels per token. Without SP the up
projections' input gradients are all-reduced as a column-parallel layer's are.
"""

from __future__ import annotations

from mp.estimate.storage import (
    FP32,
    Kernels,
    activation_bytes,
    attention_widths,
    kept_input_name,
    local_tokens,
    norm_terms,
    sequence_rows,
)
from mp.model.config import TransformerConfig


def mla_qkv_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels,
                  core_recomputed: bool, math_rows: tuple[int, int] | None = None,
                  up_proj_recomputed: bool = False, refilled: bool = False
                  ) -> dict[str, float]:
    """What multi-latent attention's latents, queries, keys and values leave saved on one TP
    rank for one micro-batch (module doc). ``core_recomputed`` (``core_attn``): the core's
    checkpoint keeps q, k and v as they come. ``math_rows``: the rows of queries and of keys
    the SDPA math core reads, when it runs (its fp32 copies then replace q, k and v).
    ``up_proj_recomputed`` (``mla_up_proj``): the latents are kept as they come, nothing
    between them and q, k, v is, and q, k, v themselves are freed once the core has saved
    them (what the core keeps as copies stays; ``refilled``: counted, as the recompute
    refills them in backward)."""
    e, t = activation_bytes(cfg), cfg.tensor_model_parallel_size
    a, dv = cfg.num_attention_heads, cfg.v_head_dim
    c, r, dr = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_pos_emb_head_dim
    tokens, local = local_tokens(cfg, micro_batch), sequence_rows(cfg, micro_batch)
    terms = {}
    if up_proj_recomputed:  # the down projections' outputs, q_in and kv_in
        kept = kept_input_name(cfg, kernels)
        if r is not None:
            terms[f"query latent norm {kept}"] = e * local * r
        terms[f"key-value latent norm {kept}"] = e * local * (c + dr)
    else:
        terms.update(_latent_terms(cfg, kernels, local))
    q, k, v = attention_widths(cfg)
    kind = cfg.cp_comm_type if cfg.context_parallel_size > 1 and not core_recomputed else None
    if math_rows is not None:
        rows_q, rows_k = math_rows
        terms["Q, K, V (fp32 copies)"] = FP32 * (rows_q * q + rows_k * (k + v)) \
            / _exchange_share(cfg)
    elif kind == "a2a":  # every token of 1 / c of the heads, exchanged: copies
        terms["Q, K, V exchanged over CP"] = e * tokens * (q + k + v)
    elif kind == "all_gather":  # the keys and values of the whole sequence, gathered: copies
        terms["K, V gathered over CP"] = e * micro_batch * cfg.seq_length * (k + v)
        if refilled or not up_proj_recomputed:
            terms["Q (with the rotated channels)"] = e * tokens * q
    elif refilled or not up_proj_recomputed:  # the core (or ring attention, or the core's
        # checkpoint) keeps its inputs
        terms["Q, K (with the rotated channels)"] = e * tokens * (q + k)
        terms["V (a copy of its channels of the up projection's output)"] = \
            e * tokens * a * dv / t
    return terms


def _latent_terms(cfg: TransformerConfig, kernels: Kernels, local: float) -> dict[str, float]:
    """The latent norms' saves and outputs (the up projections' inputs), ``local`` rows."""
    e, c, r, dr = activation_bytes(cfg), cfg.kv_lora_rank, cfg.q_lora_rank, \
        cfg.qk_pos_emb_head_dim
    terms = {}
    if r is not None:
        terms.update({f"query latent norm {name}": size
                      for name, size in norm_terms(cfg, kernels, local, r).items()})
        terms["query latent normalized (up projection input)"] = e * local * r
    latent = norm_terms(cfg, kernels, local, c)
    copied = cfg.normalization == "RMSNorm" and kernels.composite_rms_norm and e != FP32
    if not copied:  # the input is a view that keeps the down projection's whole output
        name = next(name for name in latent if name.startswith("input"))
        latent[name] = latent[name] * (c + dr) // c
    terms.update({f"key-value latent norm {name}": size for name, size in latent.items()})
    terms["key-value latent normalized (up projection input)"] = e * local * c
    if cfg.layernorm_zero_centered_gamma:
        terms["latent norm weights (1 + weight)"] = e * (c + (r or 0))
    return terms


def _exchange_share(cfg: TransformerConfig) -> int:
    """How many CP ranks share the heads (``a2a`` trades tokens for heads: the math core's
    rows are every token of ``1 / c`` of the heads)."""
    split = cfg.context_parallel_size > 1 and cfg.cp_comm_type == "a2a"
    return cfg.context_parallel_size if split else 1


def tensor_parallel_channels(cfg: TransformerConfig, layers: int, forwards: int
                             ) -> dict[str, int]:
    """Channels per token (of the rank's ``n`` tokens) that multi-latent attention's own
    TP calls move, summed over ``layers`` layers and their ``forwards`` forwards, by kind:
    under SP the latents' up projections gather ``c`` (and ``r``) channels each forward and
    again in backward and reduce-scatter their input gradients, and the key's RoPE channels
    are gathered forward and reduce-scattered backward; without SP the up projections' input
    gradients and the RoPE channels' gradient are all-reduced. (With ``q_lora_rank`` unset
    the queries' projection is a column-parallel layer over ``h``, counted with the others.)
    """
    latents = cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    rope = cfg.qk_pos_emb_head_dim
    if cfg.sequence_parallel:
        return {"all_gather": forwards * (latents + rope) + layers * latents,
                "reduce_scatter": layers * (latents + rope)}
    return {"all_reduce": layers * (latents + rope)}
