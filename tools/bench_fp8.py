"""FP8 linear layers against the same layers in bf16, forward+backward.

    python tools/bench_fp8.py              # GPT-3 1.3B's linears (GPU), smaller on a CPU

Each of a GPT-3 1.3B layer's linears at the token count one micro-batch of 8 gives it
(``s b = 16384`` tokens, ``h = 2048``; a sixteenth of the tokens and a quarter of ``h`` on a
CPU), as `mp.tensor_parallel.ColumnParallelLinear` at TP 1 without bias: in the model's
precision (bf16 on a GPU, fp32 on a CPU), in FP8 (``hybrid``, `mp.tensor_parallel.fp8`)
eagerly, and in FP8 through ``torch.compile`` (which fuses each quantization's passes).
Columns: median milliseconds of forward+backward, the three products' rate
(``6 tokens in out`` FLOPs), the rate against the first row, and on CUDA the memory the step
allocates beyond its inputs at its peak. A second table times one quantization
(`mp.tensor_parallel.fp8.quantize`: the amax, then the scale and cast, compiled into one
kernel on CUDA) of each linear's input, as a rate of the bytes it must move (read the input
twice, write one byte an element).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from bench_fusions import measure
from bench_gpt import one_rank

from mp.tensor_parallel import ColumnParallelLinear
from mp.tensor_parallel.fp8 import E4M3, Fp8Recipe, quantize


def linear_case(tokens: int, in_size: int, out_size: int, dtype, device) -> dict:
    """Variant -> a function running one forward+backward of the ``in -> out`` linear."""
    x = torch.randn(tokens, in_size, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(tokens, out_size, dtype=dtype, device=device)

    def run(fp8: Fp8Recipe | None, compiled: bool):
        torch.manual_seed(0)
        layer = ColumnParallelLinear(in_size, out_size, bias=False, params_dtype=dtype,
                                     device=device, fp8=fp8)
        forward = torch.compile(layer) if compiled else layer

        def step():
            forward(x)[0].backward(dy)
            x.grad = layer.weight.grad = None
        return step

    return {str(dtype).removeprefix("torch."): run(None, False),
            "fp8 hybrid": run(Fp8Recipe("hybrid"), False),
            "fp8 hybrid, compiled": run(Fp8Recipe("hybrid"), True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    with one_rank() as (device, dtype, name):
        tokens, h = (16384, 2048) if device.type == "cuda" else (1024, 512)
        print(f"{name} | tokens {tokens} | h {h} | products in {dtype} or FP8", flush=True)
        shapes = {"QKV": (h, 3 * h), "attention output": (h, h), "fc1": (h, 4 * h),
                  "fc2": (4 * h, h)}
        print("| linear | variant | ms fwd+bwd | TFLOP/s | x first row | extra memory |\n"
              "| --- | --- | ---: | ---: | ---: | ---: |")
        for label, (in_size, out_size) in shapes.items():
            first = None
            for variant, step in linear_case(tokens, in_size, out_size, dtype, device).items():
                seconds, extra = measure(step, device, args.iters)
                first = first or seconds
                memory = "-" if extra is None else f"{extra / 2**20:,.0f} MiB"
                print(f"| {label} [{in_size} -> {out_size}] | {variant} | {1000 * seconds:.2f} "
                      f"| {6 * tokens * in_size * out_size / seconds / 1e12:.2f} "
                      f"| {first / seconds:.2f} | {memory} |", flush=True)
        print("\n| quantized input | ms | GB/s |\n| --- | ---: | ---: |")
        for size in sorted({in_size for in_size, _ in shapes.values()}):
            x = torch.randn(tokens, size, dtype=dtype, device=device)
            seconds, _ = measure(lambda: quantize(x, E4M3), device, args.iters)
            moved = x.numel() * (2 * x.element_size() + 1)
            print(f"| [{tokens}, {size}] | {1000 * seconds:.3f} | {moved / seconds / 1e9:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
