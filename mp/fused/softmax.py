"""Scaled, masked softmax over the last dim of attention scores, one fused kernel each way.

    probs = softmax(scale * scores), in fp32, fp16/bf16 in and out

| op | scores | masked (probability 0) |
| --- | --- | --- |
| ``scaled_upper_triang_masked_softmax`` | ``[..., sq, sk]``, sq == sk | key k > query q (causal) |
| ``scaled_masked_softmax`` | ``[b, np, sq, sk]`` | ``mask[b or 0, 0, q, k]`` True |
| ``scaled_softmax`` | ``[..., sq, sk]`` | none |

A row with every key masked is all zeros: not NaN, and not uniform as Megatron's -10000 fill
makes it. Backward: ``dx = scale * y * (dy - sum(dy * y))``.

Each op runs the CUDA kernel when ``softmax_kernel_usable`` says it can (fp16/bf16 CUDA scores,
1..16384 keys, the extension built) and otherwise ``torch_scaled_softmax``, which has the same
semantics, so the ops work on any device and dtype. Megatron exposes the kernels as autograd
Functions of the same names; here they are plain functions.
"""

from __future__ import annotations

import torch

from mp.fused.extension import load_fused_kernels

MAX_KEYS = 16384  # csrc/fused_kernels.h: kMaxSoftmaxKeys
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def scaled_upper_triang_masked_softmax(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Causal softmax of ``scale * x`` over ``[..., sq, sk]`` scores (sq == sk)."""
    return _scaled_softmax(x, None, True, scale)


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0
                          ) -> torch.Tensor:
    """Softmax of ``scale * x`` over ``[b, np, sq, sk]`` scores without the keys where the bool
    ``mask`` (``[b or 1, 1, sq, sk]``) is True."""
    return _scaled_softmax(x, mask, False, scale)


def scaled_softmax(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Softmax of ``scale * x`` over the last dim of ``[..., sq, sk]`` scores."""
    return _scaled_softmax(x, None, False, scale)


def mask_fits(mask: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``mask`` is a bool ``[b or 1, 1, sq, sk]`` mask for ``[b, np, sq, sk]`` scores."""
    return (mask.dtype == torch.bool and x.dim() == 4 and mask.dim() == 4
            and mask.size(0) in (1, x.size(0)) and mask.size(1) == 1
            and mask.shape[2:] == x.shape[2:])


def softmax_kernel_fits(x: torch.Tensor, mask: torch.Tensor | None = None,
                        causal: bool = False) -> bool:
    """Whether the kernels take scores of this dtype and shape (and this mask), on any device:
    fp16/bf16 ``[..., sq, sk]`` with 1 <= sk <= 16384; sq == sk when causal."""
    if not (x.dtype in KERNEL_DTYPES and x.dim() >= 2 and 1 <= x.size(-1) <= MAX_KEYS):
        return False
    if causal and x.size(-2) != x.size(-1):
        return False
    return mask is None or (mask.device == x.device and mask_fits(mask, x))


def softmax_kernel_usable(x: torch.Tensor, mask: torch.Tensor | None = None,
                          causal: bool = False) -> bool:
    """Whether the fused kernel runs for these scores: they fit, are on CUDA, and the
    extension is built. Otherwise the torch path runs."""
    return x.is_cuda and softmax_kernel_fits(x, mask, causal) and load_fused_kernels() is not None


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """``[sq, sk]`` bool, True above the diagonal (key k > query q): broadcasts over scores."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)


def zero_fully_masked_rows(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Probabilities with each row whose keys are all masked set to 0 (a softmax over a fill
    value gives them a uniform row). Gradients stay finite: no NaN enters the graph."""
    return probs.masked_fill(mask.all(dim=-1, keepdim=True), 0.0)


def torch_scaled_softmax(x: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                         scale: float) -> torch.Tensor:
    """The kernels' semantics in torch ops, computing in at least fp32: the fallback."""
    z = x.to(torch.promote_types(x.dtype, torch.float32)) * scale
    if causal:
        mask = causal_mask(x.size(-2), x.size(-1), x.device)
    if mask is not None:
        z = z.masked_fill(mask, torch.finfo(z.dtype).min)
    probs = torch.softmax(z, dim=-1)
    if mask is not None and not causal:  # a causal row always keeps its diagonal
        probs = zero_fully_masked_rows(probs, mask)
    return probs.to(x.dtype)


class _FusedSoftmax(torch.autograd.Function):
    """The kernels: forward saves only the output ``y``; backward reads ``y`` and ``dy``."""

    @staticmethod
    def forward(ctx, x, mask, causal, scale):
        ext = load_fused_kernels()
        y = ext.softmax_forward(x.contiguous(), None if mask is None else mask.contiguous(),
                                causal, scale)
        ctx.save_for_backward(y)
        ctx.causal, ctx.scale = causal, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = load_fused_kernels().softmax_backward(dy.contiguous(), y, ctx.causal, ctx.scale)
        return dx, None, None, None


def _scaled_softmax(x, mask, causal, scale):
    if x.dim() < 2:
        raise ValueError(f"softmax scores need [..., sq, sk], got shape {tuple(x.shape)}")
    if causal and x.size(-2) != x.size(-1):
        raise ValueError(f"causal softmax needs sq == sk, got sq={x.size(-2)}, sk={x.size(-1)}")
    if mask is not None and not mask_fits(mask, x):
        raise ValueError(f"mask of shape {tuple(mask.shape)} and dtype {mask.dtype} is not a bool "
                         f"[b or 1, 1, sq, sk] mask for scores of shape {tuple(x.shape)}")
    if softmax_kernel_usable(x, mask, causal):
        return _FusedSoftmax.apply(x, mask, causal, float(scale))
    return torch_scaled_softmax(x, mask, causal, scale)
