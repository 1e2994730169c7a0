"""Every fused kernel path once, on small inputs, for compute-sanitizer (tools/gpu_check.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python3 tests/gpu/kernel_cases.py

Without torch's caching allocator each tensor is its own allocation, so memcheck sees an access
one element past any tensor; racecheck sees the shared-memory hazards of the reductions and of
the norm backward's staging. Results are checked by the tests, not here.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mp.fused import load_fused_kernels


def tensor(shape, dtype, misaligned=False):
    n = torch.Size(shape).numel()
    flat = torch.randn(n + 1, device="cuda").to(dtype)
    return (flat[1:] if misaligned else flat[:n]).view(shape)


def main() -> None:
    ext = load_fused_kernels()
    assert ext is not None, "the fused kernels did not build"
    for dtype in (torch.float16, torch.bfloat16):
        for shape, misaligned in [((2, 3, 40, 40), False), ((2, 3, 9, 9), False),
                                  ((1, 2, 16, 16), True), ((1, 1, 2, 2048), False)]:
            b, _, sq, sk = shape
            x = tensor(shape, dtype, misaligned)
            for mask, causal in [(None, sq == sk), (None, False),
                                 (torch.rand(b, 1, sq, sk, device="cuda") < 0.5, False)]:
                y = ext.softmax_forward(x, mask, causal, 0.5)
                ext.softmax_backward(tensor(shape, dtype), y, causal, 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, hidden, misaligned in [(5, 64, False), (37, 4096, False), (3, 4100, False),
                                         (4, 4096, True), (2, 20000, False)]:
            x = tensor((rows, hidden), dtype, misaligned)
            weight, bias = tensor((hidden,), dtype), tensor((hidden,), dtype)
            for b in (bias, None):
                out = ext.norm_forward(x, weight, b, 1e-5)
                mean, rstd = (out[1], out[2]) if b is not None else (None, out[1])
                ext.norm_backward(tensor((rows, hidden), dtype), x, weight, mean, rstd)
    torch.cuda.synchronize()
    print("kernel cases ran")


if __name__ == "__main__":
    main()
