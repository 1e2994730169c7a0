"""Fused CUDA kernels (``csrc/``) for attention softmax and normalization, with torch fallbacks.

The modules carry Megatron's names and arguments, so a model drops them in:

    from mp.fused import AttnMaskType, FusedScaleMaskSoftmax, FusedLayerNorm, attention_mask_func
    softmax = FusedScaleMaskSoftmax(False, True, AttnMaskType.causal, True, attention_mask_func,
                                    True, 1 / math.sqrt(head_dim))
    norm = FusedLayerNorm(hidden_size, eps=1e-5, sequence_parallel=True)

The kernels are built on first use (or at install with ``MP_BUILD_CUDA_EXT=1``); without a GPU
or a compiler, one log line says so and everything runs in torch.
"""

from mp.fused.extension import load_fused_kernels
from mp.fused.normalization import (
    FusedLayerNorm,
    FusedRMSNorm,
    fused_layer_norm,
    fused_rms_norm,
    norm_kernel_usable,
)
from mp.fused.scale_mask_softmax import AttnMaskType, FusedScaleMaskSoftmax, attention_mask_func
from mp.fused.softmax import (
    scaled_masked_softmax,
    scaled_softmax,
    scaled_upper_triang_masked_softmax,
    softmax_kernel_usable,
)

__all__ = [
    "AttnMaskType",
    "FusedLayerNorm",
    "FusedRMSNorm",
    "FusedScaleMaskSoftmax",
    "attention_mask_func",
    "fused_layer_norm",
    "fused_rms_norm",
    "load_fused_kernels",
    "norm_kernel_usable",
    "scaled_masked_softmax",
    "scaled_softmax",
    "scaled_upper_triang_masked_softmax",
    "softmax_kernel_usable",
]
