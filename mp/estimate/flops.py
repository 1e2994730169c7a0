"""Floating-point operations per iteration (Narayanan et al. 2021, section 5.1 and appendix).

A matrix product of ``[m, k] x [k, n]`` costs ``2 m k n`` FLOPs; backward costs twice the
forward (the input and the weight gradients). Per layer and micro-batch of ``b`` sequences
the forward costs, with ``n = b s`` tokens:

- QKV projection ``6 n h^2``, attention output ``2 n h^2``; in general, with ``g`` key/value
  heads for ``a`` query heads (grouped-query attention) and heads ``d`` wide (``kv_channels``,
  query width ``q = a d``, ``h`` by default), ``2 n h (q + 2 g d)`` and ``2 n q h``;
- scores ``Q K^T`` and ``P V``: ``2 b s^2 q`` each (the full ``s x s``, the papers' convention,
  although a causal kernel skips half of it); with a sliding window of ``W`` earlier keys
  (``cfg.attention_window``: per layer, as ``window_attn_skip_freq`` picks them) the square
  times the share of the causal (query, key) pairs the window keeps, ``sum_i min(i + 1, W +
  1) / (s (s + 1) / 2)`` over the ``s`` queries (`window_share`: 1 for ``W >= s - 1``; about
  ``2 W / s`` for ``W << s``), whether the kernel skips the pairs out of the window or masks
  them: mp's SDPA and unfused cores compute the whole ``sq x sk`` of a call, so of a long
  sequence's tiles (`mp.model.attention_masks.window_tile`: ``T`` queries against ``T + W`` keys
  each, fewer for the first tiles) about ``s (T + W)`` pairs, masked ones included, and of
  one call over a shorter one the square; ``p2p``'s ring skips whole blocks. The step time
  (`mp.estimate.step_time`) takes these FLOPs too: under this count's convention (the full
  square, twice the causal pairs) tiles compute about what is counted for ``W >= T``, and up
  to ``(T + W) / (2 (W + 1))`` times more for shorter windows (docs/estimate.md);
- MLP ``4 n h f`` (GeLU) or ``6 n h f`` (SwiGLU's gate); a mixture-of-experts layer
  (`mp.model.moe`) runs ``k`` experts of width ``f_e`` (``moe_ffn_hidden_size``) per token,
  ``4 n h f_e k`` (``6 ...`` for SwiGLU), plus a shared expert's ``4 n h f_s`` (and its
  gate's ``2 n h``) and the router's ``2 n h E`` (Megatron leaves the router out);

and the logits ``2 n h V``. Training is three forwards' worth; full recompute adds one more
forward of every layer, selective recompute one more of the parts its modules cover
(`RECOMPUTED_PARTS`): ``core_attn`` the attention scores, ``mlp`` a dense layer's MLP, ``moe``
a mixture-of-experts layer's router, experts and shared experts, ``shared_experts`` the
shared experts, ``mla_up_proj`` multi-latent attention's up projections (``r a (dn + dr) + c a
(dn + dv)`` per token, or ``h a (dn + dr) + ...`` without ``q_lora_rank``); ``layernorm`` and
``moe_act`` rerun no matrix product (checked against torch's FLOP formulas, with the
recompute inside the backward, in tests/test_estimate_recompute.py). For GPT-3's
shape this is exactly Narayanan's eq. 3, ``96 B s l h^2 (1 + s / (6 h) + V / (16 l h))`` with
full recompute and ``72 B s l h^2 (1 + s / (6 h) + V / (12 l h))`` without (`narayanan_flops`).
Norms, softmax, dropout and the optimizer are left out, as there. For any ``q``, ``g``, MLP
and vocabulary this is Megatron-LM's ``num_floating_point_operations``, ``12 B s l h^2 ((1 +
g / a + s / h) q / h + ...)`` with ``query_projection_size = kv_channels x heads``.

Multi-latent attention (`mp.model.mla`; ``dn``, ``dr``, ``dv`` channels, latents ``c`` and
``r`` wide) replaces the QKV projection by its down and up projections,
``2 n (h a (dn + dr) + h (c + dr) + c a (dn + dv))`` (with ``q_lora_rank`` ``r`` the queries'
``h a (dn + dr)`` becomes ``h r + r a (dn + dr)``), the scores by ``2 b s^2 a (dn + dr)`` for
``Q K^T`` and ``2 b s^2 a dv`` for ``P V``, and the output projection is ``2 n a dv h``
(`attention_projections`; checked against torch's FLOP counter on the built model).

Multi-token prediction (`mp.model.mtp`, ``D`` depths on the last stage) adds per depth
``eh_proj``'s ``2 n (2h) h``, one more layer (with experts when the model's last layer has
them) and the logits ``2 n h V``, each three forwards' worth (`mtp_forward_flops`). Full
recompute does not rerun its layers (it checkpoints the decoder's); selective recompute
reruns what it reruns in the decoder's (`mtp_training_flops`); its layers slide as the
decoder's last one does.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable

from mp.estimate.activations import recomputed_modules
from mp.estimate.storage import head_dims
from mp.model.config import TransformerConfig

#: The parts of a layer's forward (`layer_forward_parts`) that each selective recompute module
#: runs again in backward; ``layernorm`` and ``moe_act`` rerun no matrix product.
RECOMPUTED_PARTS = {"core_attn": ("attention scores",), "mla_up_proj": ("up projections",),
                    "mlp": ("MLP",), "moe": ("router", "experts", "shared experts"),
                    "shared_experts": ("shared experts",)}


def window_share(s: int, window: int | None) -> float:
    """The share of a sequence's ``s (s + 1) / 2`` causal (query, key) pairs that a sliding
    window of ``window`` earlier keys keeps, ``sum_i min(i + 1, window + 1)`` over the ``s``
    queries: 1 without a window or with one that reaches the first key from the last query
    (``window >= s - 1``)."""
    if window is None or window >= s - 1:
        return 1.0
    kept = (window + 1) * (window + 2) // 2 + (s - window - 1) * (window + 1)
    return kept / (s * (s + 1) / 2)


def layer_forward_parts(cfg: TransformerConfig, sequences: int, moe: bool = False,
                        window: int | None = None) -> dict[str, float]:
    """One layer's forward FLOPs for ``sequences`` by part (``moe``: a mixture-of-experts
    layer's; ``window``: its sliding window, `window_share` of the full square of scores):
    the attention scores, the attention's input projections (multi-latent attention's up
    projections apart), its output projection, and the MLP (or the router, the experts and
    the shared experts)."""
    s, h = cfg.seq_length, cfg.hidden_size
    tokens = sequences * s
    qk, v = head_dims(cfg)  # Q K^T over qk channels a head, P V over v
    up = up_projections(cfg)
    parts = {"attention scores": 2 * sequences * s * s * cfg.num_attention_heads * (qk + v)
             * window_share(s, window),
             "input projections": 2 * tokens * (attention_projections(cfg) - up),
             "up projections": 2 * tokens * up,
             "output projection": 2 * tokens * cfg.query_projection_size * h}
    matrices = 3 if cfg.gated_linear_unit else 2
    if not moe:
        parts["MLP"] = 2 * tokens * h * matrices * cfg.ffn_hidden_size
        return parts
    parts["router"] = 2 * tokens * h * cfg.num_moe_experts
    parts["experts"] = 2 * tokens * h * matrices * cfg.moe_ffn_hidden_size * cfg.moe_router_topk
    parts["shared experts"] = 2 * tokens * h * (
        matrices * (cfg.moe_shared_expert_intermediate_size or 0)
        + cfg.moe_shared_expert_gate)  # the gate's [1, h]
    return parts


def layer_training_flops(cfg: TransformerConfig, sequences: int, moe: bool,
                         recompute: str | None, modules: Collection[str] = (),
                         window: int | None = None) -> float:
    """Forward, backward (twice the forward) and recompute of one layer: ``"full"`` reruns
    its forward, ``"selective"`` the parts of ``modules`` (`RECOMPUTED_PARTS`)."""
    parts = layer_forward_parts(cfg, sequences, moe, window)
    total = 3 * sum(parts.values())
    if recompute == "full":
        return total + sum(parts.values())
    if recompute != "selective":
        return total
    rerun = {part for module in modules for part in RECOMPUTED_PARTS.get(module, ())}
    return total + sum(parts.get(part, 0.0) for part in rerun)


def attention_projections(cfg: TransformerConfig) -> int:
    """Multiply-adds per token of the attention's input projections: the fused QKV's
    ``h (q + 2 g d)``; under multi-latent attention the queries' ``h a (dn + dr)`` (or, with
    ``q_lora_rank`` ``r``, ``h r + r a (dn + dr)``) and the keys' and values' ``h (c + dr) +
    c a (dn + dv)``."""
    h = cfg.hidden_size
    if not cfg.multi_latent_attention:
        return h * cfg.qkv_size
    return h * (cfg.q_lora_rank or 0) + h * (cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim) \
        + up_projections(cfg)


def up_projections(cfg: TransformerConfig) -> int:
    """Multiply-adds per token of what ``mla_up_proj`` reruns: multi-latent attention's
    queries' ``r a (dn + dr)`` (``h a (dn + dr)`` without ``q_lora_rank``: ``linear_q_proj``)
    and keys' and values' ``c a (dn + dv)``; 0 for standard attention."""
    if not cfg.multi_latent_attention:
        return 0
    a, dn = cfg.num_attention_heads, cfg.qk_head_dim
    queries = (cfg.q_lora_rank or cfg.hidden_size) * a * (dn + cfg.qk_pos_emb_head_dim)
    return queries + cfg.kv_lora_rank * a * (dn + cfg.v_head_dim)


def logits_forward_flops(cfg: TransformerConfig, sequences: int) -> float:
    return 2 * sequences * cfg.seq_length * cfg.hidden_size * cfg.padded_vocab_size


def mtp_training_flops(cfg: TransformerConfig, sequences: int, recompute: str | None,
                       modules: Collection[str] = ()) -> float:
    """Multi-token prediction's forward, backward and recompute for ``sequences``, its ``D``
    depths together: ``eh_proj`` ``[2h] -> [h]``, the layer and the logits of each (0
    without ``mtp_num_layers``). Full recompute does not rerun them (module doc)."""
    depths = cfg.mtp_num_layers or 0
    if not depths:
        return 0.0
    last = cfg.num_layers - 1  # the depths' layers have the last layer's experts and window
    moe = cfg.num_moe_experts is not None and cfg.is_moe_layer(last)
    layer = layer_training_flops(cfg, sequences, moe, None if recompute == "full" else recompute,
                                 modules, cfg.attention_window(last + 1))
    eh_proj = 2 * sequences * cfg.seq_length * 2 * cfg.hidden_size ** 2
    return depths * (layer + 3 * (eh_proj + logits_forward_flops(cfg, sequences)))


def training_flops(cfg: TransformerConfig, sequences: int, recompute: str | None = "config",
                   layers: Iterable[int] | None = None, logits: bool = True,
                   mtp: bool | None = None) -> float:
    """FLOPs to train on ``sequences`` sequences: forward, backward and the recompute of
    ``recompute`` (``"config"``: the config's ``recompute_granularity`` and
    ``recompute_modules``; ``"selective"``: the config's modules, or Megatron's default
    ``core_attn`` when the config recomputes none; ``None`` for the model FLOPs that MFU
    counts). ``layers`` (indices over the model, default all), ``logits`` and ``mtp``
    (multi-token prediction's depths, default as ``logits``: both are the last stage's)
    select a part of the model: a pipeline stage (`TransformerConfig.stage_layers`).
    """
    if recompute == "config":
        recompute = cfg.recompute_granularity
    if recompute not in (None, "selective", "full"):
        raise ValueError(f"recompute={recompute!r} must be one of None, 'selective', 'full'")
    modules = recomputed_modules(cfg) or {"core_attn"}
    layers = range(cfg.num_layers) if layers is None else layers
    kinds = collections.Counter((cfg.is_moe_layer(i), cfg.attention_window(i + 1))
                                for i in layers)  # the layers alike count once
    total = sum(count * layer_training_flops(cfg, sequences, moe, recompute, modules, window)
                for (moe, window), count in kinds.items())
    if logits:
        total += 3 * logits_forward_flops(cfg, sequences)
    if logits if mtp is None else mtp:
        total += mtp_training_flops(cfg, sequences, recompute, modules)
    return total


def narayanan_flops(batch: int, s: int, l: int, h: int, vocab: int, recompute: bool) -> float:
    """Narayanan et al. 2021, eq. 3 (with full recompute) and its no-recompute form."""
    if recompute:
        return 96 * batch * s * l * h * h * (1 + s / (6 * h) + vocab / (16 * l * h))
    return 72 * batch * s * l * h * h * (1 + s / (6 * h) + vocab / (12 * l * h))
