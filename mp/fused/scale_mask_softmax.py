"""Megatron's ``FusedScaleMaskSoftmax``: the softmax of attention scores, fused when it can be.

    probs = softmax(mask_func(scale * scores, mask)) over the last dim of [b, np, sq, sk] scores

``forward`` runs the fused kernels of ``mp.fused.softmax`` when ``is_kernel_available`` says
they can take the input, and Megatron's torch path otherwise, with the same arguments and
results. Differences from Megatron, each a fix:

- The gate looks at the tensor itself (a CUDA tensor of fp16/bf16, the extension built) rather
  than trusting the ``input_in_*`` flags, and takes any sq and 1 <= sk <= 16384; Megatron's
  kernels need 16 < sk <= 4096 and sizes divisible by 4.
- A row whose keys are all masked is all zeros on both paths (Megatron's torch path and its
  -10000 fill give a uniform row).
- ``causal`` without a mask builds the causal mask on the torch path too (Megatron-Core does;
  older Megatron needs the caller's mask).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
from torch import nn

from mp.fused.extension import load_fused_kernels
from mp.fused.softmax import (
    causal_mask,
    scaled_masked_softmax,
    scaled_softmax,
    scaled_upper_triang_masked_softmax,
    softmax_kernel_usable,
    zero_fully_masked_rows,
)


class AttnMaskType(enum.Enum):
    """Megatron's attention mask types."""

    padding = 1
    causal = 2
    no_mask = 3


def attention_mask_func(attention_scores: torch.Tensor, attention_mask: torch.Tensor
                        ) -> torch.Tensor:
    """Megatron's mask function: masked scores (``attention_mask`` True) become -10000.
    Out of place, unlike Megatron's ``masked_fill_``, so the caller's scores stay intact."""
    return attention_scores.masked_fill(attention_mask, -10000.0)


class FusedScaleMaskSoftmax(nn.Module):
    """Scale, mask and softmax attention scores ``[b, np, sq, sk]``; Megatron's arguments.

    Args:
        input_in_fp16, input_in_bf16: the scores' dtype (at most one is True).
        attn_mask_type: ``AttnMaskType.causal`` uses the causal kernel and ignores ``mask`` on
            the fused path; otherwise ``mask`` (bool, True = masked) is applied when given.
        scaled_masked_softmax_fusion: allow the fused kernels.
        mask_func: ``(scores, mask) -> masked scores`` for the torch path.
        softmax_in_fp32: on the torch path, compute fp16/bf16 scores in fp32 (the kernels
            always do).
        scale: multiplies the scores first; ``None`` for 1. Needs ``softmax_in_fp32``.
    """

    def __init__(self, input_in_fp16: bool, input_in_bf16: bool, attn_mask_type: AttnMaskType,
                 scaled_masked_softmax_fusion: bool,
                 mask_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 softmax_in_fp32: bool, scale: float | None):
        super().__init__()
        if input_in_fp16 and input_in_bf16:
            raise ValueError("FusedScaleMaskSoftmax: input_in_fp16 and input_in_bf16 cannot "
                             "both be True")
        if scale is not None and not softmax_in_fp32:
            raise ValueError(f"FusedScaleMaskSoftmax: scale={scale} needs softmax_in_fp32=True")
        self.input_in_fp16, self.input_in_bf16 = input_in_fp16, input_in_bf16
        self.input_in_float16 = input_in_fp16 or input_in_bf16
        self.attn_mask_type = attn_mask_type
        self.scaled_masked_softmax_fusion = scaled_masked_softmax_fusion
        self.mask_func = mask_func
        self.softmax_in_fp32 = softmax_in_fp32
        self.scale = scale
        if scaled_masked_softmax_fusion:
            load_fused_kernels()  # build now rather than in the first forward

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if input.dim() != 4:
            raise ValueError(f"FusedScaleMaskSoftmax takes [b, np, sq, sk] scores, got shape "
                             f"{tuple(input.shape)}")
        if self.is_kernel_available(input, mask):
            return self.forward_fused_softmax(input, mask)
        return self.forward_torch_softmax(input, mask)

    def is_kernel_available(self, input: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether the fused kernels take this input (Megatron passes sizes; the device, dtype
        and mask layout matter too, so this takes the tensors)."""
        if not (self.scaled_masked_softmax_fusion and self.input_in_float16):
            return False
        if self.attn_mask_type == AttnMaskType.causal:
            return softmax_kernel_usable(input, None, causal=True)
        return softmax_kernel_usable(input, mask)

    def forward_fused_softmax(self, input: torch.Tensor, mask: torch.Tensor | None
                              ) -> torch.Tensor:
        scale = 1.0 if self.scale is None else self.scale
        if self.attn_mask_type == AttnMaskType.causal:
            return scaled_upper_triang_masked_softmax(input, scale)
        if mask is not None:
            return scaled_masked_softmax(input, mask, scale)
        return scaled_softmax(input, scale)

    def forward_torch_softmax(self, input: torch.Tensor, mask: torch.Tensor | None
                              ) -> torch.Tensor:
        to_fp32 = self.input_in_float16 and self.softmax_in_fp32
        dtype = input.dtype
        if to_fp32:
            input = input.float()
        if self.scale is not None:
            input = input * self.scale
        sq, sk = input.shape[-2:]
        if mask is not None:
            probs = zero_fully_masked_rows(torch.softmax(self.mask_func(input, mask), dim=-1),
                                           mask)
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"causal attention without a mask needs sq == sk, got sq={sq}, "
                                 f"sk={sk}")
            # a causal row always keeps its diagonal: no row is fully masked
            probs = torch.softmax(self.mask_func(input, causal_mask(sq, sk, input.device)), dim=-1)
        else:
            probs = torch.softmax(input, dim=-1)
        return probs.to(dtype) if to_fp32 else probs
