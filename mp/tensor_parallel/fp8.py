"""FP8 matrix multiplies for the linear layers: per-tensor current scaling (Megatron's
``--fp8-format e4m3|hybrid --fp8-recipe tensorwise``).

A linear layer runs three GEMMs: forward ``y = x w^T``, input gradient ``dx = dy w`` and
weight gradient ``dw = dy^T x``. In FP8 each operand is quantized just before its product, by
its own largest magnitude: ``scale = fmax / amax(t)``, ``q = saturate(t * scale)`` in float8,
and ``torch._scaled_mm`` multiplies ``q_a q_b`` with fp32 accumulation, times ``1 / (scale_a
scale_b)``, written in the activations' dtype. Activations and weights are e4m3 (fmax 448);
output gradients are e4m3 too (``e4m3``) or e5m2 (fmax 57344, wider range, ``hybrid``).
``Fp8Recipe.wgrad`` false (Megatron's ``--no-fp8-wgrad``) computes ``dw`` in the activations'
dtype instead.

With a process group (the layer's tensor-parallel group), the amax of each operand sharded
over it is all-reduced (max) before scaling, so every rank scales its shard as one process
holding the whole tensor would: the TP layout changes nothing but the order of fp32 sums.
(Transformer Engine scales each shard of a weight by its own amax instead.) An operand every
rank holds whole (a column-parallel layer's input, a row-parallel layer's output gradient)
needs no reduction. Data- and context-parallel ranks scale their own tokens, as successive
micro-batches of one process do.

The operands are quantized again where backward needs them (the quantization is a pure
function of the tensor, so ``dx`` and ``dw`` use the very ``q(w)`` and ``q(x)`` the forward
used); nothing but the layer's usual input is kept for backward. cuBLAS multiplies FP8 only
with every dimension a multiple of 16 (rows, columns, the tokens of a micro-batch):
`check_fp8_dims` says which is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mp.jit import jit_fuser

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_FORMATS = ("e4m3", "hybrid")
#: cuBLAS's FP8 GEMMs take only dimensions that are multiples of this.
FP8_MULTIPLE = 16


@dataclass(frozen=True)
class Fp8Recipe:
    """How a layer's GEMMs run in FP8: ``format`` one of `FP8_FORMATS`; ``wgrad`` whether
    the weight gradient's GEMM does too."""

    format: str = "hybrid"
    wgrad: bool = True

    def __post_init__(self):
        if self.format not in FP8_FORMATS:
            raise ValueError(f"Fp8Recipe format={self.format!r}: must be one of {FP8_FORMATS}")

    @property
    def grad_dtype(self) -> torch.dtype:
        """The float8 type of output gradients: e5m2 under ``hybrid``, else e4m3."""
        return E5M2 if self.format == "hybrid" else E4M3


class Scaled(NamedTuple):
    """A float8 tensor ``data`` and the fp32 scalar ``scale_inv`` it is multiplied by to
    approximate the tensor it was quantized from."""

    data: torch.Tensor
    scale_inv: torch.Tensor

    def t(self) -> Scaled:
        return Scaled(self.data.t(), self.scale_inv)


def quantize(tensor: torch.Tensor, dtype: torch.dtype, group=None) -> Scaled:
    """``tensor`` in float8 ``dtype``, scaled so its largest magnitude (all-reduced over
    ``group`` when it has several ranks) meets the type's largest value; an all-zero tensor
    keeps scale 1. A NaN or infinite element makes the result non-finite. Two passes over
    ``tensor`` on CUDA: the amax, then one fused kernel (`mp.jit`) that scales and casts."""
    amax = torch.linalg.vector_norm(tensor, float("inf"), dtype=torch.float32)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return Scaled(*_scale_and_cast(tensor, amax, torch.finfo(dtype).max, dtype))


@jit_fuser
def _scale_and_cast(tensor: torch.Tensor, amax: torch.Tensor, fmax: float, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(saturate(tensor * scale) in dtype, 1 / scale)`` with ``scale = fmax / amax`` (1 for
    a zero amax), the product in fp32."""
    scale = torch.where(amax > 0, fmax / amax, torch.ones_like(amax))
    data = (tensor.float() * scale).clamp(-fmax, fmax).to(dtype)
    return data, scale.reciprocal()


def check_fp8_device(device: torch.device) -> None:
    """ValueError on a GPU without FP8 tensor cores (compute capability below 8.9: before Ada
    and Hopper). The CPU multiplies FP8 too (for tests; slowly on most CPUs)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"FP8 products need a GPU of compute capability 8.9 or newer (Ada, "
                         f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} is "
                         f"{major}.{minor}: train in bf16 (drop --fp8-format)")


def check_fp8_dims(what: str, **dims: int) -> None:
    """ValueError naming the first of ``dims`` that is not a multiple of `FP8_MULTIPLE`."""
    for name, size in dims.items():
        if size % FP8_MULTIPLE:
            raise ValueError(f"{what}: {name}={size} is not a multiple of {FP8_MULTIPLE}, as "
                             "cuBLAS's FP8 matrix multiplies need every dimension to be")


def scaled_mm(a: Scaled, b: Scaled, out_dtype: torch.dtype, leading=None) -> torch.Tensor:
    """``a [m, k] @ b [k, n]`` dequantized, in ``out_dtype``: ``[*leading, n]`` (default
    ``leading = (m,)``), written in place so that it is no view. ``a`` is made row-major and
    ``b`` column-major, as cuBLAS takes them (copied into those layouts if need be)."""
    (m, k), n = a.data.shape, b.data.shape[1]
    check_fp8_dims(f"an FP8 matrix multiply [{m}, {k}] x [{k}, {n}]", m=m, k=k, n=n)
    b_data = b.data if b.data.stride(0) == 1 else b.data.t().contiguous().t()
    out = torch.empty((*(leading or (m,)), n), dtype=out_dtype, device=a.data.device)
    torch._scaled_mm(a.data.contiguous(), b_data, scale_a=a.scale_inv, scale_b=b.scale_inv,
                     out_dtype=out_dtype, out=out.view(m, n))
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., n] -> [tokens, n]``."""
    return t.reshape(-1, t.size(-1))


class Gemms:
    """A linear layer's three products in the operands' own precision: ``linear`` ``x [...,
    in], w [out, in] -> [..., out]``; ``dgrad`` ``dy [..., out] -> [..., in]``; ``wgrad``
    ``-> [out, in]``. ``dy`` is what `gradient` made of the output's gradient."""

    def linear(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def gradient(self, grad_output):
        return grad_output

    def dgrad(self, dy, weight):
        return dy.matmul(weight)

    def wgrad(self, dy, x):
        return _rows(dy).t().matmul(_rows(x))


class _Gradient(NamedTuple):
    """An output gradient and its float8 form (`Fp8Gemms.gradient`)."""

    tensor: torch.Tensor
    scaled: Scaled


class Fp8Gemms(Gemms):
    """`Gemms` in FP8 by ``recipe`` (module doc), amaxes all-reduced over ``group``: the
    weight's always (a shard), the input's unless ``replicated`` says every rank of the group
    holds the same input (a column-parallel layer's, gathered under sequence parallelism),
    the output gradient's unless it says that of the gradient (a row-parallel layer's, whose
    output is reduced): ``replicated`` is None, ``"input"`` or ``"gradient"``."""

    def __init__(self, recipe: Fp8Recipe, group=None, replicated: str | None = None):
        if replicated not in (None, "input", "gradient"):
            raise ValueError(f"replicated={replicated!r}: must be None, 'input' or 'gradient'")
        self.recipe, self.weight_group = recipe, group
        self.input_group = None if replicated == "input" else group
        self.grad_group = None if replicated == "gradient" else group

    def linear(self, x, weight, bias):
        y = scaled_mm(quantize(_rows(x), E4M3, self.input_group),
                      quantize(weight, E4M3, self.weight_group).t(), x.dtype, x.shape[:-1])
        return y if bias is None else y + bias

    def gradient(self, grad_output):
        return _Gradient(grad_output, quantize(_rows(grad_output), self.recipe.grad_dtype,
                                               self.grad_group))

    def dgrad(self, dy, weight):
        return scaled_mm(dy.scaled, quantize(weight, E4M3, self.weight_group), dy.tensor.dtype,
                         dy.tensor.shape[:-1])

    def wgrad(self, dy, x):
        if not self.recipe.wgrad:
            return super().wgrad(dy.tensor, x)
        return scaled_mm(dy.scaled.t(), quantize(_rows(x), E4M3, self.input_group), x.dtype)


#: The plain products, for layers without FP8.
PLAIN = Gemms()
