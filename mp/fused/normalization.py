"""LayerNorm and RMSNorm over the last dim, one fused kernel each way.

    LayerNorm: y = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps)
    RMSNorm:   y = x * rstd * weight,                  rstd = 1 / sqrt(mean(x^2) + eps)

Statistics in fp32 for fp32, fp16 and bf16 inputs; hidden sizes 1..65536. The backward
computes dx and the weight (and bias) gradients in one pass over x and dy, the gradients summed
over rows in a fixed order (bitwise deterministic).

``fused_layer_norm`` / ``fused_rms_norm`` run the kernels when ``norm_kernel_usable`` says they
can (a CUDA input of one of those dtypes, weight and bias of the same dtype, the extension
built) and torch's ``F.layer_norm`` / ``F.rms_norm`` otherwise. An fp32 input with fp16 or bf16
parameters (the residual stream of ``fp32_residual_connection``) is normalized in fp32, the
parameters upcast, and comes out in the parameters' dtype, as Megatron's mixed-precision norms
(apex's ``forward_affine_mixed_dtypes``) do; the kernels then run in fp32 (they take one dtype
for all), their fp32 copy of the weight saved for backward. ``FusedLayerNorm`` and
``FusedRMSNorm`` are the modules, with Megatron's ``sequence_parallel`` attribute on their
parameters: under sequence parallelism each TP rank sees part of the sequence, so these
replicated parameters' gradients must be all-reduced over the TP group. With
``zero_centered_gamma`` (Megatron's ``--apply-layernorm-1p``) a module's weight starts at zeros
and the norm scales by ``1 + weight``: the kernels (or torch) get ``1 + weight`` and autograd
carries its gradient back to the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mp.device import get_device
from mp.fused.extension import load_fused_kernels

MAX_HIDDEN = 65536  # csrc/fused_kernels.h: kMaxNormHidden
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def norm_kernel_fits(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> bool:
    """Whether the kernels take ``x [..., hidden]`` with ``weight`` (and ``bias``) ``[hidden]``,
    on any device: one dtype of fp32/fp16/bf16 for all, 1 <= hidden <= 65536."""
    hidden = weight.numel()
    params = (weight,) if bias is None else (weight, bias)
    return (x.dtype in KERNEL_DTYPES and x.dim() >= 1 and 1 <= hidden <= MAX_HIDDEN
            and x.size(-1) == hidden
            and all(p.dim() == 1 and p.numel() == hidden and p.dtype == x.dtype
                    and p.device == x.device for p in params))


def norm_kernel_usable(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> bool:
    """Whether the fused kernels run: the tensors fit, are on CUDA, and the extension is built.
    Otherwise torch's implementation runs."""
    return x.is_cuda and norm_kernel_fits(x, weight, bias) and load_fused_kernels() is not None


def fused_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of ``x [..., hidden]`` with ``weight`` and ``bias`` ``[hidden]``."""
    return _normalize(x, weight, bias, eps,
                      lambda x, w, b: F.layer_norm(x, (w.numel(),), w, b, eps))


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm of ``x [..., hidden]`` with ``weight [hidden]``."""
    return _normalize(x, weight, None, eps,
                      lambda x, w, _: F.rms_norm(x, (w.numel(),), w, eps))


def _normalize(x, weight, bias, eps, torch_norm):
    """The kernel when usable, else ``torch_norm(x, weight, bias)``; fp32 ``x`` with 16-bit
    parameters in fp32, returned in the parameters' dtype (module doc)."""
    mixed = x.dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16)
    out_dtype = weight.dtype
    if mixed:
        weight, bias = weight.float(), None if bias is None else bias.float()
    if norm_kernel_usable(x, weight, bias):
        y = _FusedNorm.apply(x, weight, bias, eps)
    else:
        y = torch_norm(x, weight, bias)
    return y.to(out_dtype) if mixed else y


class _FusedNorm(torch.autograd.Function):
    """The kernels: LayerNorm when ``bias`` is given, RMSNorm when it is ``None``. Saves x, the
    weight and the fp32 per-row statistics ``[rows]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = x.contiguous()
        out = load_fused_kernels().norm_forward(
            x, weight.contiguous(), None if bias is None else bias.contiguous(), eps)
        y, stats = out[0], out[1:]  # [mean, rstd] or [rstd]
        ctx.save_for_backward(x, weight, *stats)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, *stats = ctx.saved_tensors
        mean, rstd = stats if ctx.has_bias else (None, stats[0])
        grads = load_fused_kernels().norm_backward(dy.contiguous(), x, weight.contiguous(),
                                                   mean, rstd)
        dx, dweight = grads[0], grads[1]
        return dx, dweight, grads[2] if ctx.has_bias else None, None


class _FusedNormModule(nn.Module):
    """A norm over the last dim (``hidden_size``) with a weight (ones; zeros with
    ``zero_centered_gamma``, the norm then scaling by ``1 + weight``), and a bias (zeros) when
    ``has_bias``. Its parameters are replicated over TP and carry ``sequence_parallel``: under
    sequence parallelism each rank sees part of the sequence, so their gradients are partial
    sums that `mp.distributed.finalize_model_grads` adds up over TP."""

    has_bias: bool

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False, *,
                 params_dtype: torch.dtype = torch.float32, device=None,
                 zero_centered_gamma: bool = False):
        super().__init__()
        device = get_device() if device is None else torch.device(device)
        self.hidden_size, self.eps = hidden_size, eps
        self.sequence_parallel, self.zero_centered_gamma = sequence_parallel, zero_centered_gamma
        kw = dict(dtype=params_dtype, device=device)
        self.weight = nn.Parameter(torch.empty(hidden_size, **kw))
        self.bias = nn.Parameter(torch.empty(hidden_size, **kw)) if self.has_bias else None
        self.reset_parameters()
        for param in self.parameters():
            param.sequence_parallel = sequence_parallel
        load_fused_kernels()  # build now rather than in the first forward

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.zero_centered_gamma else nn.init.ones_)(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def scale(self) -> torch.Tensor:
        """What the normalized input is multiplied by, ``[hidden]``: the weight, or
        ``1 + weight`` with ``zero_centered_gamma``."""
        return self.weight + 1 if self.zero_centered_gamma else self.weight

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"
                + (", zero_centered_gamma=True" if self.zero_centered_gamma else ""))


class FusedLayerNorm(_FusedNormModule):
    """LayerNorm over the last dim (``hidden_size``) with weight and bias, fused on CUDA."""

    has_bias = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_layer_norm(x, self.scale(), self.bias, self.eps)


class FusedRMSNorm(_FusedNormModule):
    """RMSNorm over the last dim (``hidden_size``) with a weight, fused on CUDA."""

    has_bias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm(x, self.scale(), self.eps)
