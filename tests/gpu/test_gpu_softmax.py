"""The softmax kernels against a float64 reference on a GPU: many shapes, odd sizes and the
limits, every mask kind with fully masked rows, both the 16-byte and the element-wise paths,
outputs poisoned before each launch; backward against autograd of the reference."""

import pytest
import torch
from checks import assert_rel_close
from poison import assert_poisoned, poison
from test_fused_softmax import check_softmax

from mp.fused import (
    AttnMaskType,
    FusedScaleMaskSoftmax,
    attention_mask_func,
    load_fused_kernels,
    scaled_masked_softmax,
    scaled_upper_triang_masked_softmax,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    module = load_fused_kernels()
    assert module is not None, "the fused kernels did not build: see the 'mp.fused' log line"
    return module


def scores(shape, dtype, seed, misaligned=False, magnitude=4.0):
    """Random scores on the GPU; ``misaligned`` starts them one element into their storage, so
    they are not 16-byte aligned and the element-wise path runs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = torch.Size(shape).numel()
    flat = torch.randn(n + 1, generator=g, device="cuda", dtype=torch.float32) * magnitude
    flat = flat.to(dtype)
    return (flat[1:] if misaligned else flat[:n]).view(shape)


def run_kernels(ext, x, mask, causal, scale, seed):
    """Forward and backward through the extension with poisoned outputs, then check both."""
    ranges = poison((x.shape, x.dtype))
    y = ext.softmax_forward(x, mask, causal, scale)
    assert_poisoned(y, ranges, "y")
    dy = scores(x.shape, x.dtype, seed + 1, magnitude=1.0)
    ranges = poison((x.shape, x.dtype))
    dx = ext.softmax_backward(dy, y, causal, scale)
    assert_poisoned(dx, ranges, "dx")

    sq, sk = x.shape[-2:]
    masked = torch.ones(sq, sk, dtype=torch.bool, device="cuda").triu(1) if causal else mask
    check_softmax(x, masked, scale, dy, y, dx)


CAUSAL = [1, 2, 7, 16, 33, 100, 256, 1000, 1024, 2047, 2048, 4096, 16384]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", CAUSAL)
def test_causal(ext, dtype, s):
    heads = max(1, min(6, 2 ** 22 // (s * s)))  # keep each case a few million elements at most
    run_kernels(ext, scores((heads, s, s), dtype, s), None, True, 0.125, seed=s)


PADDED = [(2, 3, 5, 1), (2, 3, 7, 5), (2, 2, 9, 8), (3, 2, 17, 33), (2, 4, 16, 128),
          (1, 2, 33, 1000), (2, 1, 8, 1001), (2, 2, 4, 4096), (1, 2, 3, 16383), (2, 1, 3, 16384)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("shape", PADDED)
def test_padding_mask(ext, dtype, broadcast, shape):
    b, _, sq, sk = shape
    g = torch.Generator(device="cuda").manual_seed(sk)
    mask = torch.rand(1 if broadcast else b, 1, sq, sk, generator=g, device="cuda") < 0.3
    mask[..., 0, :] = True  # a fully masked query
    if sq > 1:
        mask[..., 1, :] = False  # and one with nothing masked
    run_kernels(ext, scores(shape, dtype, sk), mask, False, 0.5, seed=sk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3, 1), (2, 2, 5, 3), (2, 3, 4, 8), (1, 2, 7, 129),
                                   (2, 1, 4, 2048), (1, 1, 5, 16383), (1, 1, 3, 16384)])
def test_no_mask(ext, dtype, shape):
    run_kernels(ext, scores(shape, dtype, shape[-1], magnitude=20.0), None, False, -0.7,
                seed=shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_element_wise_path(ext, dtype, causal):
    """sk a multiple of 8 but the scores misaligned: the path without 16-byte vectors."""
    x = scores((3, 64, 64), dtype, 3, misaligned=True)
    assert x.data_ptr() % 16 != 0
    run_kernels(ext, x, None, causal, 1.0, seed=3)


def test_ops_and_module_use_the_kernels(ext):
    """The public ops and FusedScaleMaskSoftmax give the kernels' results, through autograd."""
    x = scores((2, 4, 64, 64), torch.bfloat16, 9).requires_grad_(True)
    dy = scores(x.shape, torch.bfloat16, 10, magnitude=1.0)
    module = FusedScaleMaskSoftmax(False, True, AttnMaskType.causal, True, attention_mask_func,
                                   True, 0.25)
    assert module.is_kernel_available(x, None)
    y = module(x, None)
    y.backward(dy)
    y_kernel = ext.softmax_forward(x.detach(), None, True, 0.25)
    assert torch.equal(y, y_kernel)
    assert torch.equal(x.grad, ext.softmax_backward(dy, y_kernel, True, 0.25))
    assert torch.equal(scaled_upper_triang_masked_softmax(x.detach().view(8, 64, 64), 0.25),
                       y_kernel.view(8, 64, 64))

    mask = torch.rand(2, 1, 64, 64, device="cuda") < 0.5
    padded = FusedScaleMaskSoftmax(False, True, AttnMaskType.padding, True, attention_mask_func,
                                   True, 0.25)
    assert padded.is_kernel_available(x, mask)
    fused = padded(x.detach(), mask)
    assert torch.equal(fused, scaled_masked_softmax(x.detach(), mask, 0.25))
    assert_rel_close(fused, padded.forward_torch_softmax(x.detach(), mask), 1e-2, "paths agree")
    assert not padded.is_kernel_available(x.detach().float(), mask)
