"""How kernels store what they save for backward, and the sizes every activation term counts.

What the kernels save depends on where they run; `Kernels` names the differences, and
`CUDA` (the default) and `CPU` (what the tests measure) are the two sets of them.

The sizes: bytes per activation element (`activation_bytes`) and per element of the residual
stream (`residual_bytes`: fp32 with ``fp32_residual_connection``), the tokens of a micro-batch on
one rank (`local_tokens`: ``s b``, or ``s b / c`` with context parallelism) and the rows of
the sequence-parallel regions (`sequence_rows`: ``/ t`` more under SP), the ranks that split
each expert (`expert_tensor_parallel_size`); the channels per
token of the queries, keys and values the attention takes on one TP rank (`attention_widths`)
and the width of a query or key head and of a value head (`head_dims`); a norm's saves
(`norm_terms`, and `norm_weight_terms` for the norms of the residual stream) and a dropout
mask's bytes per element (`dropout_mask_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mp.model.config import TransformerConfig

FP32 = 4
INT64 = 8
LSE_ROWS = 32  # CUDA's memory-efficient attention keeps its log-sum-exp for whole 32-row tiles


@dataclass(frozen=True)
class Kernels:
    """How the kernels a layer runs store what they save for backward.

    Args:
        name: for messages and reports.
        dropout_mask_bytes: bytes per element of a dropout mask: 1 for CUDA's fused dropout
            (a bool mask); ``None`` for "the activation's own size" (the CPU computes dropout
            as ``x * scaled_bernoulli_noise`` and saves the noise).
        fused_softmax: mp's fused scale-mask-softmax kernel runs for 16-bit scores (CUDA, the
            extension built) and saves the probabilities in the activation dtype. Otherwise
            the torch path saves them in fp32, plus the ``[s, s]`` causal mask (bools, kept
            by the ``masked_fill`` of the scores). No ``[s, 1]`` fully-masked-row flags: a
            causal row always keeps its diagonal, so the causal path skips
            ``zero_fully_masked_rows`` (only an explicit padding mask runs it).
        norm_stats_bytes: bytes of each per-row norm statistic: 4 (fp32) on CUDA; ``None``
            for the activation's size (the CPU LayerNorm keeps bf16 statistics for bf16 input).
        composite_rms_norm: RMSNorm runs as torch's composite ``F.rms_norm`` (the CPU), which
            computes in fp32 and saves the fp32 input (a copy of 16-bit input), the fp32
            ``x * rstd`` and an fp32 rstd; otherwise mp's kernel saves x and the rstd.
        sdpa_dropout_kernel: SDPA with attention dropout: ``"flash"`` (CUDA: the flash kernel
            takes dropout) or ``"math"`` (CPU: the math path, which upcasts 16-bit q, k, v to
            fp32 and saves fp32 copies of them and of the softmax, its dropout mask and the
            dropped probabilities). Without dropout the CPU runs a flash kernel too.
        sdpa_bottom_right_mask: SDPA's bottom-right causal form (context parallelism's query
            chunks against longer keys) runs as a materialized ``[sq, sk]`` mask in the
            activation dtype, which the kernel saves (the CPU); CUDA's flash and
            memory-efficient kernels take the form as it is.
        sdpa_mask_kernel: the SDPA kernel that takes an explicit mask (a sliding window's,
            or a tile's view of the window's shared one): ``"efficient"`` on CUDA (flash takes
            none; the memory-efficient kernel takes the mask as an additive bias in the
            activation dtype and keeps it for backward, a view as it comes when its strides
            are multiples of 8, as the tile mask's are; and its log-sum-exp for whole
            32-query tiles, per call), ``"flash"`` on the CPU (its flash kernel converts a
            boolean mask to the activation dtype and keeps that, an additive one as it
            comes).
        compiled_loss: the cross-entropy's element-wise work runs compiled (`mp.jit`: CUDA,
            with ``cross_entropy_loss_fusion``), with no ``[s, b, V / t]`` fp32 intermediates;
            eagerly it keeps one fp32 copy of the logits (and in backward a bool one-hot).
        layer_norm_saves_bias: LayerNorm keeps its bias for backward besides its weight
            (torch's, the CPU); mp's kernel keeps the weight only. It counts for the fp32
            copies of 16-bit parameters a norm of an fp32 residual stream computes with.
    """

    name: str
    dropout_mask_bytes: int | None
    fused_softmax: bool
    norm_stats_bytes: int | None
    composite_rms_norm: bool
    sdpa_dropout_kernel: str
    sdpa_bottom_right_mask: bool
    jit_compiled: bool
    sdpa_value_width_kernel: str = "efficient"
    sdpa_mask_kernel: str = "efficient"
    layer_norm_saves_bias: bool = False

    def __post_init__(self):
        if self.sdpa_dropout_kernel not in ("flash", "math"):
            raise ValueError(f"sdpa_dropout_kernel={self.sdpa_dropout_kernel!r} must be one "
                             "of 'flash', 'math'")
        if self.sdpa_value_width_kernel not in ("efficient", "math"):
            raise ValueError(f"sdpa_value_width_kernel={self.sdpa_value_width_kernel!r} must "
                             "be one of 'efficient', 'math'")
        if self.sdpa_mask_kernel not in ("efficient", "flash"):
            raise ValueError(f"sdpa_mask_kernel={self.sdpa_mask_kernel!r} must be one of "
                             "'efficient', 'flash'")


CUDA = Kernels("cuda", dropout_mask_bytes=1, fused_softmax=True, norm_stats_bytes=FP32,
               composite_rms_norm=False, sdpa_dropout_kernel="flash",
               sdpa_bottom_right_mask=False, jit_compiled=True,
               sdpa_value_width_kernel="efficient", sdpa_mask_kernel="efficient")
CPU = Kernels("cpu", dropout_mask_bytes=None, fused_softmax=False, norm_stats_bytes=None,
              composite_rms_norm=True, sdpa_dropout_kernel="math", sdpa_bottom_right_mask=True,
              jit_compiled=False, sdpa_value_width_kernel="math", sdpa_mask_kernel="flash",
              layer_norm_saves_bias=True)


def activation_bytes(cfg: TransformerConfig) -> int:
    """Bytes per activation element: 4 for fp32, 2 for bf16 and fp16."""
    return 4 if cfg.precision == "fp32" else 2


def residual_bytes(cfg: TransformerConfig) -> int:
    """Bytes per element of the residual stream (the embedding's output, each layer's input
    and output, what a pipeline stage sends): 4 with ``fp32_residual_connection``, else
    `activation_bytes`."""
    return FP32 if cfg.fp32_residual_connection else activation_bytes(cfg)


def norm_terms(cfg: TransformerConfig, kernels: Kernels, rows: float, width: int | None = None,
               residual: bool = False) -> dict[str, float]:
    """What one norm over ``rows`` rows of ``width`` (default ``h``) saves: its input and
    statistics (mean and rstd, or rstd for RMSNorm; the CPU's in the input's dtype), and the
    fp32 normalized input of a composite RMSNorm. ``residual``: a norm of the residual stream,
    its input `residual_bytes` an element (its weights: `norm_weight_terms`)."""
    h = cfg.hidden_size if width is None else width
    if cfg.normalization == "RMSNorm" and kernels.composite_rms_norm:
        return {"input (fp32)": FP32 * rows * h, "normalized input (fp32)": FP32 * rows * h,
                "statistics": FP32 * rows}
    x = residual_bytes(cfg) if residual else activation_bytes(cfg)
    stats = (2 if cfg.normalization == "LayerNorm" else 1) * (kernels.norm_stats_bytes or x)
    return {"input": x * rows * h, "statistics": stats * rows}


def norm_weight_terms(cfg: TransformerConfig, kernels: Kernels) -> dict[str, float]:
    """What one norm of the residual stream saves of its weights (the parameters themselves
    are not counted): with ``fp32_residual_connection`` the fp32 copies it computes with
    (`mp.fused.normalization`), of the weight (``1 + weight`` with zero-centred gamma) and,
    where LayerNorm keeps it, the bias; else with ``layernorm_zero_centered_gamma`` its
    ``1 + weight``; else nothing."""
    h = cfg.hidden_size
    if cfg.fp32_residual_connection:
        bias = cfg.normalization == "LayerNorm" and kernels.layer_norm_saves_bias
        return {"weights (fp32 copies)": (2 if bias else 1) * FP32 * h}
    if cfg.layernorm_zero_centered_gamma:
        return {"weights (1 + weight)": activation_bytes(cfg) * h}
    return {}


def kept_input_name(cfg: TransformerConfig, kernels: Kernels, residual: bool = False) -> str:
    """The `norm_terms` name of a norm's input as it comes (what a recomputed norm's
    `mp.tensor_parallel.CheckpointWithoutOutput` keeps): ``"input"``, ``"input (fp32)"`` for
    a composite RMSNorm of fp32 input, ``"input (kept for the recompute)"`` where the
    composite RMSNorm keeps an fp32 copy instead. ``residual``: a norm of the residual
    stream (`norm_terms`)."""
    if not (cfg.normalization == "RMSNorm" and kernels.composite_rms_norm):
        return "input"
    x = residual_bytes(cfg) if residual else activation_bytes(cfg)
    return "input (fp32)" if x == FP32 else "input (kept for the recompute)"


def dropout_mask_bytes(cfg: TransformerConfig, kernels: Kernels, residual: bool = False) -> int:
    """Bytes per element of a dropout mask; ``residual``: of a dropout on the residual stream
    (the embedding's, `residual_bytes` an element)."""
    return kernels.dropout_mask_bytes or (residual_bytes(cfg) if residual
                                          else activation_bytes(cfg))


def local_tokens(cfg: TransformerConfig, micro_batch: int) -> int:
    """Tokens of a micro-batch on one rank: ``s b``, or ``s b / c`` with ``c`` context-parallel
    ranks."""
    return cfg.seq_length // cfg.context_parallel_size * micro_batch


def sequence_rows(cfg: TransformerConfig, micro_batch: int) -> float:
    """Rows (tokens) of a tensor in the sequence-parallel regions on one rank: `local_tokens`,
    divided by ``t`` with sequence parallelism."""
    rows = local_tokens(cfg, micro_batch)
    return rows / cfg.tensor_model_parallel_size if cfg.sequence_parallel else rows


def expert_tensor_parallel_size(cfg: TransformerConfig) -> int:
    """ETP, the ranks that split each expert: TP (``expert_tensor_parallel_size`` None, the
    default), or 1 (whole experts under TP > 1, the TP ranks then EP ranks too)."""
    return cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size


def head_dims(cfg: TransformerConfig) -> tuple[int, int]:
    """(channels of a query or key head, of a value head): ``(d, d)`` with ``d`` =
    ``kv_channels``; ``(dn + dr, dv)`` under multi-latent attention (`mp.model.mla`)."""
    if cfg.multi_latent_attention:
        return cfg.qk_head_dim + cfg.qk_pos_emb_head_dim, cfg.v_head_dim
    return cfg.kv_channels, cfg.kv_channels


def attention_widths(cfg: TransformerConfig) -> tuple[float, float, float]:
    """Channels per token of the queries, keys and values one TP rank's heads take (before
    any context-parallel exchange): ``(a d / t, g d / t, g d / t)``; under multi-latent
    attention every head has its own key and value, ``(a (dn + dr) / t, a (dn + dr) / t,
    a dv / t)`` (the key's shared RoPE channels repeated for every head)."""
    t = cfg.tensor_model_parallel_size
    qk, v = head_dims(cfg)
    heads = cfg.num_attention_heads if cfg.multi_latent_attention else cfg.num_query_groups
    return cfg.num_attention_heads * qk / t, heads * qk / t, heads * v / t
