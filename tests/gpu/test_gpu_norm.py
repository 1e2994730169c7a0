"""The LayerNorm/RMSNorm kernels against a float64 reference on a GPU: hidden sizes from 1 to
65536 (odd ones, both sides of the registers-path limit), one row to many, fp32/fp16/bf16,
aligned and misaligned inputs, outputs poisoned before each launch; backward (dx, dweight,
dbias) against autograd of the reference, and bitwise deterministic."""

import pytest
import torch
from poison import assert_poisoned, poison
from test_fused_norm import check_norm

from mp.fused import FusedLayerNorm, FusedRMSNorm, load_fused_kernels, norm_kernel_usable

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


@pytest.fixture(scope="module")
def ext():
    module = load_fused_kernels()
    assert module is not None, "the fused kernels did not build: see the 'mp.fused' log line"
    return module


def randn(shape, dtype, seed, scale=1.0, offset=0.0, misaligned=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = torch.Size(shape).numel()
    flat = (torch.randn(n + 1, generator=g, device="cuda") * scale + offset).to(dtype)
    return (flat[1:] if misaligned else flat[:n]).view(shape)


def run_norm(ext, rows, hidden, dtype, rms, seed, misaligned=False):
    x = randn((rows, hidden), dtype, seed, scale=2.0, offset=3.0, misaligned=misaligned)
    assert (x.data_ptr() % 16 != 0) == misaligned
    weight = randn((hidden,), dtype, seed + 1, offset=1.0)
    bias = None if rms else randn((hidden,), dtype, seed + 2)
    dy = randn((rows, hidden), dtype, seed + 3)
    stats = [((rows,), torch.float32)] * (1 if rms else 2)
    ranges = poison(((rows, hidden), dtype), *stats)
    out = ext.norm_forward(x, weight, bias, EPS)
    for t, name in zip(out, ["y", "mean or rstd", "rstd"]):
        assert_poisoned(t, ranges, name)
    y, mean, rstd = (out[0], None, out[1]) if rms else out
    grads = [((rows, hidden), dtype)] + [((hidden,), dtype)] * (1 if rms else 2)
    # The backward's scratch, NaN too: a partial sum left unwritten would reach dweight. One
    # block at the size limit of the allocator's small pool, one larger than any launch needs.
    workspace = [((2 ** 18,), torch.float32), ((2 * 2048 * hidden,), torch.float32)]
    ranges = poison(*grads, *workspace)
    back = ext.norm_backward(dy, x, weight, mean, rstd)
    for t, name in zip(back, ["dx", "dweight", "dbias"]):
        assert_poisoned(t, ranges, name)
    check_norm(x, weight, bias, EPS, dy, y, back, [rstd] if rms else [mean, rstd])
    again = ext.norm_backward(dy, x, weight, mean, rstd)
    for t, u, name in zip(back, again, ["dx", "dweight", "dbias"]):
        assert torch.equal(t, u), f"{rows}x{hidden} {dtype}: {name} differs between two runs"


HIDDEN = [1, 7, 8, 100, 768, 1000, 1030, 2048, 4096, 5120, 8192, 8200, 12288, 16384, 16392,
          20000, 65536]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", [1, 301])
def test_norm(ext, rows, hidden, rms, dtype):
    run_norm(ext, rows, hidden, dtype, rms, seed=hidden + rows)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_many_rows(ext, rms):
    """More rows than the persistent backward grid holds at once: each block walks many."""
    run_norm(ext, 5000, 4096, torch.bfloat16, rms, seed=5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_input(ext, dtype):
    run_norm(ext, 37, 4096, dtype, False, seed=6, misaligned=True)


@pytest.mark.parametrize("cls", [FusedLayerNorm, FusedRMSNorm])
def test_modules_use_the_kernels(ext, cls):
    module = cls(1024, eps=EPS, params_dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(p.shape, torch.bfloat16, 3, offset=0.5))
    x = randn((4, 8, 1024), torch.bfloat16, 4).requires_grad_(True)
    assert norm_kernel_usable(x, module.weight, getattr(module, "bias", None))
    y = module(x)
    dy = randn(y.shape, torch.bfloat16, 5)
    y.backward(dy)
    bias = getattr(module, "bias", None)
    out = ext.norm_forward(x.detach().view(32, 1024), module.weight.detach(),
                           None if bias is None else bias.detach(), EPS)
    assert torch.equal(y.detach().view(32, 1024), out[0])
    mean, rstd = (None, out[1]) if bias is None else (out[1], out[2])
    back = ext.norm_backward(dy.view(32, 1024), x.detach().view(32, 1024),
                             module.weight.detach(), mean, rstd)
    assert torch.equal(x.grad.view(32, 1024), back[0])
    assert torch.equal(module.weight.grad, back[1])
    if bias is not None:
        assert torch.equal(bias.grad, back[2])


@pytest.mark.parametrize("cls", [FusedLayerNorm, FusedRMSNorm])
def test_zero_centered_modules_equal_the_plain_ones_with_one_added(ext, cls):
    """``--apply-layernorm-1p`` on the kernel path: weights ``w`` give what ``1 + w`` gives a
    plain module, bit for bit, and the same weight gradient."""
    centred = cls(1024, eps=EPS, params_dtype=torch.bfloat16, device="cuda",
                  zero_centered_gamma=True)
    plain = cls(1024, eps=EPS, params_dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for p, q in zip(centred.parameters(), plain.parameters()):
            p.copy_(randn(p.shape, torch.bfloat16, 7, scale=0.1))
            q.copy_(p + 1 if q is plain.weight else p)
    x = randn((4, 8, 1024), torch.bfloat16, 8)
    dy = randn((4, 8, 1024), torch.bfloat16, 9)
    outputs = []
    for module in (centred, plain):
        y = module(x)
        y.backward(dy)
        outputs.append(y.detach())
    assert torch.equal(*outputs)
    for p, q in zip(centred.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_fp32_input_with_bf16_weights_takes_the_kernel(ext, kind, monkeypatch):
    """``--fp32-residual-connection``'s norms on CUDA: fp32 input, bf16 weights upcast, the
    kernel in fp32, the output rounded once to bf16, against float64 (test_fp32_residual)."""
    from test_fp32_residual import check_fp32_input_norm

    assert check_fp32_input_norm(kind, monkeypatch, "cuda", h=1024) == [True]
