"""The compiled fusions of `mp.jit` against the same functions run eagerly, forward+backward.

    python tools/bench_fusions.py                 # GPT-3 1.3B's shapes (GPU), smaller on a CPU
    MP_JIT_FUSION_CPU=1 python tools/bench_fusions.py   # compile on the CPU as well

Ops, each at the shape one GPT-3 1.3B micro-batch of 8 gives it (``s=2048, b=8, h=2048``,
``V=50304``; a quarter of ``s`` and ``h`` and an eighth of ``V`` on a CPU), in the model's
precision (bf16 on a GPU, fp32 on a CPU):

- ``bias-dropout-add``: ``residual + dropout(x + bias)`` with p = 0.1, as each transformer
  layer runs it twice (`mp.model.dropout.bias_dropout_add`);
- ``bias-gelu`` and ``bias-swiglu``: the MLP's activation with fc1's bias on ``[s, b, 4h]``
  (`mp.model.mlp.bias_gelu`, `bias_swiglu`);
- ``cross-entropy``: the loss from logits ``[s * b, V]`` and its gradient
  (`mp.tensor_parallel.vocab_parallel_cross_entropy` at TP=1), and beside it what a plain
  PyTorch model runs under autocast, ``F.cross_entropy(logits.float())``.

Columns: median milliseconds of forward+backward (``bench_gpt.timed_steps``), the fewest bytes
the op must move as a rate (bias-dropout-add: read x, residual, dy and the 1-byte mask; write
y, the mask, dx and d residual; bias-gelu: read x and dy, x again in backward, write y and dx;
bias-swiglu: read up, gate, dy, and up and gate again, write y, d up and d gate;
cross-entropy: read the logits twice, write their gradient),
and on CUDA the memory the op allocates beyond its inputs at its peak.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from bench_gpt import one_rank, timed_steps

from mp import jit
from mp.model.dropout import bias_dropout_add
from mp.model.mlp import bias_gelu, bias_swiglu
from mp.tensor_parallel import vocab_parallel_cross_entropy


def bias_dropout_add_case(s: int, b: int, h: int, dtype, device):
    """(variants, bytes moved): each variant a function running one forward+backward."""
    x, residual = (torch.randn(s, b, h, dtype=dtype, device=device, requires_grad=True)
                   for _ in range(2))
    bias = torch.randn(h, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(s, b, h, dtype=dtype, device=device)

    def run(fused: bool):
        def step():
            bias_dropout_add(x, bias, residual, 0.1, True, False, fused).backward(dy)
            x.grad = bias.grad = residual.grad = None
        return step

    n, e = x.numel(), x.element_size()
    return {"mp eager": run(False), "mp compiled": run(True)}, n * (6 * e + 2)


def bias_activation_case(swiglu: bool, s: int, b: int, f: int, dtype, device):
    inputs = [torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
              for shape in [(s, b, f), (f,)] * (2 if swiglu else 1)]
    dy = torch.randn(s, b, f, dtype=dtype, device=device)

    def run(fused: bool):
        def step():
            y = (bias_swiglu(*inputs, fused=fused) if swiglu
                 else bias_gelu(*inputs, "none", fused=fused))
            y.backward(dy)
            for t in inputs:
                t.grad = None
        return step

    n, e = inputs[0].numel(), inputs[0].element_size()
    return {"mp eager": run(False), "mp compiled": run(True)}, n * e * (8 if swiglu else 5)


def cross_entropy_case(tokens: int, vocab: int, dtype, device):
    logits = torch.randn(tokens, vocab, dtype=dtype, device=device, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,), device=device)

    def run(fused: bool):
        def step():
            vocab_parallel_cross_entropy(logits, target, fused=fused).sum().backward()
            logits.grad = None
        return step

    def plain():
        F.cross_entropy(logits.float(), target, reduction="sum").backward()
        logits.grad = None

    variants = {"mp eager": run(False), "mp compiled": run(True),
                "F.cross_entropy(fp32)": plain}
    return variants, 3 * logits.numel() * logits.element_size()


def measure(step, device, iters: int) -> tuple[float, float | None]:
    """(median seconds, CUDA bytes allocated beyond the inputs at the peak, or None)."""
    step()  # compile outside the timing and the memory peak
    if device.type != "cuda":
        return timed_steps(step, device, 2, iters)[0], None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = timed_steps(step, device, 2, iters)[0]
    return seconds, torch.cuda.max_memory_allocated(device) - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    with one_rank() as (device, dtype, name):
        s, b, h, vocab = (2048, 8, 2048, 50304) if device.type == "cuda" else (512, 8, 512, 6288)
        print(f"{name} | {dtype} | s={s} b={b} h={h} V={vocab} | compiled here: "
              f"{jit.compiles_on(device)}", flush=True)
        cases = {f"bias-dropout-add [{s}, {b}, {h}]": bias_dropout_add_case(s, b, h, dtype,
                                                                            device),
                 f"bias-gelu [{s}, {b}, {4 * h}]": bias_activation_case(False, s, b, 4 * h,
                                                                         dtype, device),
                 f"bias-swiglu [{s}, {b}, {4 * h}]": bias_activation_case(True, s, b, 4 * h,
                                                                           dtype, device),
                 f"cross-entropy [{s * b}, {vocab}]": cross_entropy_case(s * b, vocab, dtype,
                                                                         device)}
        print("| op | variant | ms fwd+bwd | GB/s | extra memory |\n"
              "| --- | --- | ---: | ---: | ---: |")
        for op, (variants, moved) in cases.items():
            for variant, step in variants.items():
                seconds, extra = measure(step, device, args.iters)
                memory = "-" if extra is None else f"{extra / 2**20:,.0f} MiB"
                print(f"| {op} | {variant} | {1000 * seconds:.3f} | {moved / seconds / 1e9:,.1f} "
                      f"| {memory} |", flush=True)


if __name__ == "__main__":
    main()
