"""mp.fused softmax without a GPU: the torch paths against a float64 reference (forward and
backward, every mask kind, rows fully masked), the gate's decisions, and the errors.

The CUDA kernels are checked against the same reference in tests/gpu/."""

import pytest
import torch
from checks import assert_rel_close, seeded

from mp.fused import (
    AttnMaskType,
    FusedScaleMaskSoftmax,
    attention_mask_func,
    scale_mask_softmax,
    scaled_masked_softmax,
    scaled_softmax,
    scaled_upper_triang_masked_softmax,
    softmax_kernel_usable,
)
from mp.fused.softmax import softmax_kernel_fits

TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference_softmax(x: torch.Tensor, masked: torch.Tensor | None, scale: float) -> torch.Tensor:
    """float64 softmax of ``scale * x`` over the last dim; positions where ``masked`` (bool,
    broadcast over x) is True get 0, and a row with all of them masked is all 0. Differentiable
    without NaN, so autograd of it is the backward reference."""
    z = x.double() * scale
    if masked is not None:
        z = z.masked_fill(masked, float("-inf"))
    top = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def padding_mask(batches: int, sq: int, sk: int, seed: int) -> torch.Tensor:
    """Random bool ``[batches, 1, sq, sk]``, True = masked, with query 1 fully masked and
    query 0 not masked at all."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batches, 1, sq, sk, generator=g) < 0.4
    mask[:, :, 1] = True
    mask[:, :, 0] = False
    return mask


def check_softmax(x, masked, scale, dy, y, dx):
    """Outputs ``y`` and input gradient ``dx`` for scores ``x`` and output gradient ``dy``
    against autograd of the float64 reference: within the dtype's tolerance, nothing left
    unwritten (NaN), masked positions exactly 0. Shared by the kernel tests in tests/gpu/."""
    x_ref = x.detach().double().requires_grad_(True)
    y_ref = reference_softmax(x_ref, masked, scale)
    y_ref.backward(dy.double())
    tol = TOLERANCE[x.dtype]
    what = f"{tuple(x.shape)} {x.dtype}"
    assert y.dtype == dx.dtype == x.dtype, what
    assert torch.isfinite(y).all() and torch.isfinite(dx).all(), f"{what}: NaN or inf"
    assert_rel_close(y, y_ref, tol, f"{what} probabilities")
    assert_rel_close(dx, x_ref.grad, 2 * tol, f"{what} input gradient")
    if masked is not None:
        full = masked.expand_as(y)
        assert (y[full] == 0).all() and (dx[full] == 0).all(), f"{what}: masked positions not 0"


def check_against_reference(op, x, masked, scale, dtype, seed):
    """``op`` (a torch path) forward and backward through autograd, checked."""
    x = x.to(dtype).requires_grad_(True)
    dy = seeded(x.shape, seed + 1, dtype)
    y = op(x)
    y.backward(dy)
    check_softmax(x, masked, scale, dy, y.detach(), x.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["causal", "padding", "padding_broadcast", "none"])
def test_functional_ops_match_float64(kind, dtype):
    b, heads, sq, scale = 2, 3, 6, 0.7
    if kind == "causal":
        x = seeded((b * heads, sq, sq), 1, scale=3.0)
        masked = torch.ones(sq, sq, dtype=torch.bool).triu(1)
        op = lambda t: scaled_upper_triang_masked_softmax(t, scale)
    elif kind == "none":
        x = seeded((b, heads, sq, 9), 2, scale=3.0)
        masked = None
        op = lambda t: scaled_softmax(t, scale)
    else:
        x = seeded((b, heads, sq, 9), 3, scale=3.0)
        masked = padding_mask(1 if kind == "padding_broadcast" else b, sq, 9, seed=4)
        op = lambda t: scaled_masked_softmax(t, masked, scale)
    check_against_reference(op, x, masked, scale, dtype, seed=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_type,with_mask", [(AttnMaskType.causal, False),
                                                 (AttnMaskType.padding, True),
                                                 (AttnMaskType.padding, False)])
def test_module_torch_path_matches_float64(mask_type, with_mask, dtype):
    b, heads, sq, sk, scale = 2, 2, 5, 5, 0.5
    module = FusedScaleMaskSoftmax(
        input_in_fp16=dtype == torch.float16, input_in_bf16=dtype == torch.bfloat16,
        attn_mask_type=mask_type, scaled_masked_softmax_fusion=True,
        mask_func=attention_mask_func, softmax_in_fp32=True, scale=scale)
    x = seeded((b, heads, sq, sk), 5, scale=3.0)
    mask = padding_mask(b, sq, sk, seed=6) if with_mask else None
    masked = torch.ones(sq, sk, dtype=torch.bool).triu(1) if mask_type == AttnMaskType.causal \
        else mask
    assert not module.is_kernel_available(x.to(dtype), mask)  # no GPU here: the torch path
    check_against_reference(lambda t: module(t, mask), x, masked, scale, dtype, seed=20)


def test_kernel_fit_decisions():
    meta = {"device": "meta"}  # shapes and dtypes only: nothing is allocated
    bf16 = torch.empty(2, 3, 8, 8, dtype=torch.bfloat16, **meta)
    assert softmax_kernel_fits(bf16) and softmax_kernel_fits(bf16.half())
    assert softmax_kernel_fits(bf16, causal=True)
    assert not softmax_kernel_fits(bf16.float())
    assert softmax_kernel_fits(torch.empty(1, 1, 3, 16384, dtype=torch.half, **meta))
    assert softmax_kernel_fits(torch.empty(1, 1, 3, 7, dtype=torch.half, **meta))  # odd sk
    assert not softmax_kernel_fits(torch.empty(1, 1, 3, 16385, dtype=torch.half, **meta))
    assert not softmax_kernel_fits(torch.empty(2, 3, 8, 9, dtype=torch.half, **meta),
                                   causal=True)
    for shape, fits in [((2, 1, 8, 8), True), ((1, 1, 8, 8), True), ((2, 3, 8, 8), False),
                        ((3, 1, 8, 8), False), ((2, 1, 8, 9), False)]:
        mask = torch.empty(shape, dtype=torch.bool, **meta)
        assert softmax_kernel_fits(bf16, mask) == fits, shape
    assert not softmax_kernel_fits(bf16, torch.empty(8, 8, dtype=torch.bool, **meta))
    assert not softmax_kernel_fits(bf16, torch.empty(2, 1, 8, 8, dtype=torch.uint8, **meta))
    assert not softmax_kernel_fits(bf16[0], torch.empty(1, 1, 8, 8, dtype=torch.bool, **meta))
    assert not softmax_kernel_usable(torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16))  # CPU


def test_module_gate_decisions(monkeypatch):
    """The module's own rules, with the device check left out (the kernels' fit only)."""
    monkeypatch.setattr(scale_mask_softmax, "softmax_kernel_usable", softmax_kernel_fits)
    x = torch.empty(2, 3, 8, 8, dtype=torch.bfloat16, device="meta")
    good = torch.empty(2, 1, 8, 8, dtype=torch.bool, device="meta")
    bad = torch.empty(2, 3, 8, 8, dtype=torch.bool, device="meta")

    def gate(mask_type=AttnMaskType.padding, fusion=True, bf16=True):
        return FusedScaleMaskSoftmax(False, bf16, mask_type, fusion, attention_mask_func, True,
                                     None).is_kernel_available

    assert gate()(x, good) and gate()(x, None)
    assert not gate()(x, bad)  # a per-head mask: the torch path
    assert gate(AttnMaskType.causal)(x, bad)  # causal ignores the mask
    assert not gate(AttnMaskType.causal)(x[..., :7], None)  # sq != sk
    assert not gate(fusion=False)(x, good)
    assert not gate(bf16=False)(x, good)  # the flags say the input is not fp16/bf16


def test_errors_name_the_problem():
    x = torch.zeros(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3, 4, 5\)"):
        scaled_masked_softmax(x, torch.zeros(2, 3, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="sq=4, sk=5"):
        scaled_upper_triang_masked_softmax(x)
    with pytest.raises(ValueError, match="both"):
        FusedScaleMaskSoftmax(True, True, AttnMaskType.causal, True, attention_mask_func, True,
                              None)
    with pytest.raises(ValueError, match="softmax_in_fp32"):
        FusedScaleMaskSoftmax(True, False, AttnMaskType.causal, True, attention_mask_func, False,
                              0.5)
    module = FusedScaleMaskSoftmax(False, False, AttnMaskType.causal, True, attention_mask_func,
                                   True, None)
    with pytest.raises(ValueError, match=r"\[b, np, sq, sk\]"):
        module(torch.zeros(3, 4, 4), None)
    with pytest.raises(ValueError, match="sq=4, sk=5"):
        module(x, None)
