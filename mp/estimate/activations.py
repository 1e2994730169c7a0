"""Activation memory: what one micro-batch leaves saved for backward, layer by layer.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4) count the bytes a GPT layer saves with 16-bit activations, ``a`` heads, ``t``
tensor-parallel ranks: `korthikanti_layer_bytes` gives their closed forms. `layer_terms`
counts the same thing tensor by tensor for the layer ``mp.model`` builds, so it also covers
fp32, SwiGLU, RoPE, no biases, any FFN size, dropout off, and the attention kernels.

Saved for backward, with ``e`` bytes per activation, ``n = s b`` tokens and ``n'`` = ``n / t``
with sequence parallelism (else ``n``):

- the two norm inputs, the QKV input and the MLP input: ``4 e n' h``;
- the norms' statistics (mean and rstd, or rstd per row; fp32 on CUDA), which Korthikanti
  et al. leave out (torch's composite RMSNorm, which the CPU runs, keeps the input in fp32, a
  copy for 16-bit input, and the fp32 normalized input too: `norm_terms`);
- Q, K, V: one fused QKV output that q, k and v view, ``3 e n h / t``. In general, with heads
  ``d`` wide (``kv_channels``; ``h / a`` by default), query width ``q = a d`` and ``g <= a``
  key/value heads (grouped-query attention), it is ``e n (q + 2 g d) / t``, plus the queries
  copied out of their groups when ``g < a`` (``e n q / t``, unless a rank holds one group);
  the unfused core saves q and the keys and values repeated per query head instead,
  ``3 e n q / t``; with RoPE the rotated q and k, and fp32 cos and sin tables of the
  ``rotary_dim`` rotated channels;
- the attention core, unfused: softmax output, dropout mask and dropped probabilities,
  ``(e + 1 + e) a s^2 b / t``; SDPA (flash): only the fp32 log-sum-exp, ``4 a s b / t``;
- the attention output (the input of the attention's output projection): ``e n q / t``;
- the two residual dropout masks: ``2 n' h`` (bools);
- the MLP interior: GeLU input and fc2 input, ``2 e n f / t`` (SwiGLU: gate and up outputs,
  the SiLU output and the fc2 input, ``4 e n f / t``; compiled, the SiLU output is
  recomputed);
- with ``layernorm_zero_centered_gamma``, each norm's ``1 + weight``, ``2 e h``.

With ``fp32_residual_connection`` (16-bit models) the residual stream is fp32: the two norm
inputs take 4 bytes an element instead of ``e`` (their statistics on the CPU too, and a
``layernorm`` recompute's kept inputs), and each norm keeps the fp32 copies of its weights it
computes with instead of a 16-bit ``1 + weight`` (`mp.estimate.storage.norm_weight_terms`);
everything between the norms, the dropout masks included, stays in ``e``.

With 16-bit activations, GeLU, ``f = 4h``, the unfused core and the statistics left out, the
sum is Korthikanti's ``s b h (34 + 5 a s / h)`` at ``t = 1``, ``s b h (10 + 24 / t + 5 a s /
(h t))`` under TP and ``s b h / t (34 + 5 a s / h)`` with SP, term for term. Full recompute
keeps only each checkpointed chunk's input (see `mp.estimate.memory`). The SDPA core saves far
less than the formula's ``5 a s / h`` term: no ``s x s`` tensor at all.

Selective recompute (``cfg.recompute_modules``, `layer_halves`' ``modules``) changes what a
layer keeps, module by module:

- ``core_attn`` (Korthikanti's selective, ``34 s b h / t``): no attention core; its
  checkpoint keeps q, k and v as they come (and so, under CP, no gathered or exchanged
  copies);
- ``layernorm``: the two norms keep no graph (no statistics, no fp32 copies, no ``1 +
  weight``) and their outputs, the QKV (or down projections') input and the MLP input, are
  freed; each norm's input, ``e n' h``, is kept instead (it is the layer input, or the
  residual after the attention);
- ``mlp``: a dense layer's MLP interior (its input is kept, as before);
- ``moe``: a mixture-of-experts MLP keeps only its input, ``e n' h``
  (`mp.estimate.mlp_activations.moe_terms`); ``shared_experts``: the shared expert's
  interior; ``moe_act``: the experts' activation output (fc2's input), its inputs kept;
- ``mla_up_proj``: everything between multi-latent attention's down projections and q, k, v
  (latent norms, up projections, RoPE: no rotary tables), and q, k, v themselves once the core
  has saved them; the latents are kept (`mp.estimate.mla`), and the RoPE angles, one fp32
  ``[s / c, dr]`` tensor for a chunk's layers (`mp.estimate.memory.rope_angle_bytes`).

A freed output is refilled in backward when its recompute runs: ``refilled=True`` counts
those, for what a recompute brings back (`mp.estimate.memory.rebuilt_bytes`).

With ``c`` context-parallel ranks every per-token tensor holds the rank's ``s / c`` tokens
(`local_tokens`). What the attention saves, its calls under context parallelism and sliding
windows, and multi-latent attention's terms are `mp.estimate.attention_activations`'s.
The MLP's interior and a mixture-of-experts layer's terms are `mp.estimate.mlp_activations`'s;
how the kernels store what they save, and the sizes above, `mp.estimate.storage`'s.
"""

from __future__ import annotations

from collections.abc import Collection

from mp.estimate.attention_activations import attention_terms, busiest_calls
from mp.estimate.mlp_activations import mlp_interior_terms, moe_terms
from mp.estimate.storage import (
    CUDA,
    FP32,
    Kernels,
    activation_bytes,
    dropout_mask_bytes,
    kept_input_name,
    local_tokens,
    norm_terms,
    norm_weight_terms,
    residual_bytes,
    sequence_rows,
)
from mp.model.config import TransformerConfig


def recomputed_modules(cfg: TransformerConfig) -> frozenset[str]:
    """The modules selective recompute covers (``cfg.recompute_modules``); none without it."""
    if cfg.recompute_granularity != "selective":
        return frozenset()
    return frozenset(cfg.recompute_modules)


def layer_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA,
                modules: Collection[str] | None = None, moe: bool = False, layer: int = 0
                ) -> dict[str, float]:
    """Bytes one transformer layer saves for backward on one TP rank for one micro-batch,
    by tensor (see the module doc): `layer_halves` added up. ``modules``: the selective
    recompute modules applied (default: the config's, `recomputed_modules`); full recompute
    is not applied here. ``moe``: the layer's MLP is a mixture of experts (`moe_terms`;
    ``cfg.is_moe_layer(i)`` says which layers are). ``layer``: its index over the model
    (0-based; multi-token prediction's from ``cfg.num_layers``), for its sliding window
    (``cfg.attention_window(layer + 1)``).
    """
    attention, mlp = layer_halves(cfg, micro_batch, kernels, modules, moe, layer=layer)
    terms = dict(attention)
    for name, size in mlp.items():
        terms[name] = terms.get(name, 0) + size
    return terms


def layer_halves(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA,
                 modules: Collection[str] | None = None, moe: bool = False,
                 refilled: bool = False, layer: int = 0
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """`layer_terms` in two: what the attention half (input norm to residual) and what the
    MLP half (pre-MLP norm to residual) save, each recomputed in its own stretch of the
    backward. The norms' and the residual dropout masks' terms have the same names in both.
    ``refilled``: count the outputs that ``layernorm``, ``moe_act`` and ``mla_up_proj`` free
    after the forward, as their recomputes refill them in backward."""
    if moe and cfg.num_moe_experts is None:
        raise ValueError("moe=True needs a mixture-of-experts config (num_moe_experts is None)")
    modules = recomputed_modules(cfg) if modules is None else frozenset(modules)
    up_proj = "mla_up_proj" in modules
    e = activation_bytes(cfg)
    t, h, f = cfg.tensor_model_parallel_size, cfg.hidden_size, cfg.ffn_hidden_size
    q = cfg.query_projection_size
    tokens = local_tokens(cfg, micro_batch)
    local = sequence_rows(cfg, micro_batch)
    mask = dropout_mask_bytes(cfg, kernels)
    # each half: its norm, the norm's output as the next projections' input, ..., the
    # residual's dropout mask
    halves = [_norm_half(cfg, kernels, local, "layernorm" in modules, name, refilled)
              for name in ("QKV input", "MLP input")]
    attention, mlp = halves
    window, rope = cfg.attention_window(layer + 1), cfg.applies_rope(layer + 1)
    attention.update(attention_terms(cfg, micro_batch, kernels, modules, refilled,
                                      busiest_calls(cfg, micro_batch, kernels, window), window,
                                      rope))
    if rope and not up_proj:  # cos and sin, for q and k (none on no_rope_freq's layers)
        attention["rotary tables"] = 4 * FP32 * local_tokens(cfg, 1) * cfg.rotary_dim
    attention["attention output"] = e * tokens * q / t
    if moe:
        mlp.pop("MLP input", None)  # the router's and the shared expert's input: `moe_terms`
        mlp.update(moe_terms(cfg, micro_batch, kernels, modules=modules, refilled=refilled))
    elif "mlp" not in modules:
        mlp.update(mlp_interior_terms(cfg, kernels, tokens, f / t))
    if cfg.hidden_dropout > 0:
        compiled = kernels.jit_compiled and cfg.bias_dropout_fusion
        for half in halves:
            half["residual dropout masks"] = (1 if compiled else mask) * local * h
    return attention, mlp


def _norm_half(cfg: TransformerConfig, kernels: Kernels, rows: float, recomputed: bool,
               output: str, refilled: bool = False) -> dict[str, float]:
    """A layer norm's saves over ``h``, and its output as ``output`` (the next projections'
    input). With ``layernorm`` recomputed (``recomputed``) the norm keeps no graph and its
    output is freed (``refilled``: counted): only its input stays, kept by its
    `CheckpointWithoutOutput`."""
    e, h = activation_bytes(cfg), cfg.hidden_size
    if recomputed:
        kept = {f"norm {kept_input_name(cfg, kernels, residual=True)}":
                residual_bytes(cfg) * rows * h}
        return {**kept, output: e * rows * h} if refilled else kept
    terms = {f"norm {name}": size
             for name, size in norm_terms(cfg, kernels, rows, residual=True).items()}
    terms[output] = e * rows * h
    terms.update({f"norm {name}": size for name, size in norm_weight_terms(cfg, kernels).items()})
    return terms


def layer_bytes(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA,
                modules: Collection[str] | None = None, moe: bool = False, layer: int = 0
                ) -> float:
    """The sum of `layer_terms`."""
    return sum(layer_terms(cfg, micro_batch, kernels, modules, moe, layer).values())


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1,
                            sequence_parallel: bool = False, recompute: str | None = None
                            ) -> float:
    """Korthikanti et al. 2022's activation bytes per layer (16-bit, dropout on, GeLU 4h):
    none ``s b h (34 + 5 a s / h)``; TP ``s b h (10 + 24 / t + 5 a s / (h t))``; TP + SP
    ``s b h / t (34 + 5 a s / h)``; selective recompute (TP + SP) ``34 s b h / t`` (without SP
    ``s b h (10 + 24 / t)``); full recompute ``2 s b h``."""
    if recompute not in (None, "selective", "full"):
        raise ValueError(f"recompute={recompute!r} must be one of None, 'selective', 'full'")
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh
    attention = 0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return sbh / t * (34 + attention)
    return sbh * (10 + 24 / t + attention / t)
