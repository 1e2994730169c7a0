"""mp.fused LayerNorm/RMSNorm without a GPU: the torch paths against a float64 reference
(forward and backward), the modules' parameters and attributes, and the gate's decisions.

The CUDA kernels are checked against the same reference in tests/gpu/."""

import pytest
import torch
from checks import assert_rel_close, seeded

from mp.fused import (
    FusedLayerNorm,
    FusedRMSNorm,
    fused_layer_norm,
    fused_rms_norm,
    norm_kernel_usable,
)
from mp.fused.normalization import norm_kernel_fits

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """float64 LayerNorm over the last dim (RMSNorm when ``bias`` is None), differentiable."""
    x, weight = x.double(), weight.double()
    if bias is None:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias.double()


def check_norm(x, weight, bias, eps, dy, y, grads, stats=None):
    """Output ``y`` and ``grads`` (dx, dweight[, dbias]) of LayerNorm (RMSNorm when ``bias`` is
    None) against autograd of the float64 reference, within the dtype's tolerance, nothing left
    unwritten (NaN); ``stats`` (mean, rstd) or (rstd,) when the kernel returns them. Shared by
    the kernel tests in tests/gpu/."""
    rms = bias is None
    refs = [t.detach().double().requires_grad_(True) for t in [x, weight, *([] if rms else [bias])]]
    y_ref = reference_norm(refs[0], refs[1], None if rms else refs[2], eps)
    y_ref.backward(dy.double())
    tol = TOLERANCE[x.dtype]
    what = f"{'RMSNorm' if rms else 'LayerNorm'} {tuple(x.shape)} {x.dtype}"
    for t in [y, *grads, *(stats or [])]:
        assert torch.isfinite(t).all(), f"{what}: NaN or inf"
    assert all(t.dtype == x.dtype for t in [y, *grads]), what
    assert_rel_close(y, y_ref, tol, f"{what} y")
    x64 = x.detach().double()
    rstd64 = torch.rsqrt((x64.pow(2).mean(-1) if rms else x64.var(-1, unbiased=False)) + eps)
    if stats is not None:
        assert_rel_close(stats[-1].view(rstd64.shape), rstd64, 1e-5, f"{what} rstd")
        if not rms:
            assert_rel_close(stats[0].view(rstd64.shape), x64.mean(-1), 1e-5, f"{what} mean")
    # dx is a difference of terms of size rstd * |dy * w| that nearly cancel when rows are short
    # (hidden = 1 makes LayerNorm's dx exactly 0): its error is measured against those terms.
    terms = (rstd64.unsqueeze(-1) * dy.double() * weight.double()).norm().item()
    err = (grads[0].double() - refs[0].grad).norm().item()
    scale = max(refs[0].grad.norm().item(), terms)
    assert err <= 2 * tol * scale, f"{what} dx: error {err / scale:.3e} > {2 * tol:.1e}"
    for t, r, name in zip(grads[1:], refs[1:], ["dweight", "dbias"]):
        assert_rel_close(t, r.grad, 2 * tol, f"{what} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
def test_fallback_matches_float64(rms, dtype):
    hidden, eps = 37, 1e-5
    x = (seeded((3, 5, hidden), 1, scale=2.0) + 3.0).to(dtype).requires_grad_(True)  # offset:
    weight = (seeded((hidden,), 2) + 1.0).to(dtype).requires_grad_(True)  # var is not E[x^2]
    bias = None if rms else seeded((hidden,), 3, dtype).requires_grad_(True)
    y = fused_rms_norm(x, weight, eps) if rms else fused_layer_norm(x, weight, bias, eps)
    dy = seeded(y.shape, 4, dtype)
    y.backward(dy)
    grads = [x.grad, weight.grad] + ([] if rms else [bias.grad])
    check_norm(x, weight, bias, eps, dy, y.detach(), grads)


@pytest.mark.parametrize("cls", [FusedLayerNorm, FusedRMSNorm])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_modules(cls, sequence_parallel):
    module = cls(12, eps=1e-6, sequence_parallel=sequence_parallel, params_dtype=torch.bfloat16)
    names = ["weight", "bias"] if cls is FusedLayerNorm else ["weight"]
    assert [n for n, _ in module.named_parameters()] == names
    for name, p in module.named_parameters():
        assert p.sequence_parallel is sequence_parallel
        assert p.dtype == torch.bfloat16 and p.shape == (12,)
        assert (p == (1.0 if name == "weight" else 0.0)).all()
    assert f"sequence_parallel={sequence_parallel}" in repr(module)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(seeded(p.shape, 7))
    x = seeded((4, 2, 12), 8, torch.bfloat16)
    expected = fused_layer_norm(x, module.weight, module.bias, 1e-6) if cls is FusedLayerNorm \
        else fused_rms_norm(x, module.weight, 1e-6)
    assert torch.equal(module(x), expected)


@pytest.mark.parametrize("cls", [FusedLayerNorm, FusedRMSNorm])
def test_zero_centered_modules_scale_by_one_plus_weight(cls):
    """``zero_centered_gamma`` (Megatron's ``--apply-layernorm-1p``): the weight starts (and
    resets) at zeros, keeps ``sequence_parallel``, and the module is the float64 norm with
    ``1 + weight``, forward and backward (dweight is the gradient of ``1 + weight``)."""
    hidden, eps = 37, 1e-5
    module = cls(hidden, eps=eps, sequence_parallel=True, zero_centered_gamma=True)
    assert (module.weight == 0).all() and "zero_centered_gamma=True" in repr(module)
    assert all(p.sequence_parallel for p in module.parameters())
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(seeded(p.shape, 2 + i, scale=0.3))
    x = (seeded((3, 5, hidden), 1, scale=2.0) + 3.0).requires_grad_(True)
    y = module(x)
    dy = seeded(y.shape, 4)
    y.backward(dy)
    grads = [x.grad, *(p.grad for p in module.parameters())]
    check_norm(x, module.weight.detach() + 1, module.bias, eps, dy, y.detach(), grads)
    module.reset_parameters()
    assert (module.weight == 0).all()


def test_kernel_fit_decisions():
    def fits(hidden=64, dtype=torch.bfloat16, weight_dtype=None, weight_shape=None, bias=True):
        x = torch.empty(3, hidden, dtype=dtype, device="meta")
        w = torch.empty(weight_shape or (hidden,), dtype=weight_dtype or dtype, device="meta")
        return norm_kernel_fits(x, w, torch.empty_like(w) if bias else None)

    assert fits() and fits(bias=False)
    assert fits(dtype=torch.float16) and fits(dtype=torch.float32)
    assert fits(hidden=1) and fits(hidden=4097) and fits(hidden=65536)
    assert not fits(hidden=65537)
    assert not fits(dtype=torch.float64)
    assert not fits(weight_dtype=torch.float32)  # mixed dtypes: torch's implementation
    assert not fits(weight_shape=(32,))
    assert not fits(weight_shape=(8, 8))
    x, w = torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    assert not norm_kernel_usable(x, w)  # CPU
