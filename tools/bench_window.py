"""What a sliding window costs in one attention core: forward+backward time and the bytes
autograd keeps, full causal attention against windowed attention in one call (the window's
``[s, s]`` mask) and in tiles (`mp.model.attention_masks.window_tile`; each tile against its window,
one shared ``[T, T + L]`` mask).

    python tools/bench_window.py                        # CPU-sized: s 2048 and 4096
    python tools/bench_window.py --seq 8192 16384 --window 1024 4096 --dtype bf16   # a GPU

The core is `mp.model.attention.CoreAttention` (SDPA, or ``--backend unfused``) on random
``q [s, b, heads, d]`` and grouped ``k, v`` (``--heads``, ``--groups``, ``--head-dim``). The
one-call rows make the core attend in one call by raising the tile above ``s``. Columns:
the median milliseconds of forward+backward, the bytes autograd keeps once the forward is
done (`mp.estimate.measure.SavedTensorMeter`, inputs excluded), and on CUDA the allocator's
peak over forward and backward beyond the inputs.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from bench_gpt import timed_steps

from mp.device import get_device
from mp.estimate.measure import SavedTensorMeter
from mp.model import TransformerConfig, attention_masks
from mp.model.attention import CoreAttention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(core: CoreAttention, inputs: list[torch.Tensor], warmup: int, iters: int
            ) -> tuple[float, int, int | None]:
    """(median ms of forward+backward, bytes kept after the forward, CUDA peak bytes)."""
    device = inputs[0].device
    grad = torch.randn_like(core(*inputs))

    def step() -> float:
        for t in inputs:
            t.grad = None
        core(*inputs).backward(grad)
        return 0.0

    with SavedTensorMeter(exclude=inputs) as meter:
        out = core(*inputs)
    kept = meter.bytes
    del out
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    seconds, _ = timed_steps(step, device, warmup, iters)
    return 1e3 * seconds, kept, peak


def add_core_arguments(p: argparse.ArgumentParser) -> None:
    """The core's and the timing's arguments, shared with ``tools/bench_documents.py``."""
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--backend", choices=("sdpa", "unfused"), default="sdpa")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)


def core_setup(args: argparse.Namespace, s: int, device: torch.device
               ) -> tuple[TransformerConfig, list[torch.Tensor]]:
    """The core's config at ``s`` tokens and its random ``q, k, v`` on ``device`` (seed 0)."""
    config = TransformerConfig(
        num_layers=1, hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
        num_query_groups=args.groups, vocab_size=128, seq_length=s, attention_dropout=0.0,
        attention_backend=args.backend, precision=args.dtype)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, args.batch, h, args.head_dim, generator=g)
              .to(device, DTYPES[args.dtype]).requires_grad_(True)
              for h in (args.heads, args.groups, args.groups)]
    return config, inputs


def print_setup(args: argparse.Namespace, device: torch.device) -> None:
    print(f"device {device}, {args.backend}, {args.dtype}, batch {args.batch}, heads "
          f"{args.heads} (groups {args.groups}) x {args.head_dim}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_core_arguments(p)
    p.add_argument("--window", type=int, nargs="+", default=[256, 1024])
    args = p.parse_args(argv)
    device = get_device()
    mib = 2 ** 20
    print_setup(args, device)
    print("| s | window | how | tile | ms fwd+bwd | kept MiB | CUDA peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in args.seq:
        config, inputs = core_setup(args, s, device)
        rows = [("full causal", None, None)]
        for window in args.window:
            rows += [("one call", window, s + 1), ("tiles", window, None)]
        for how, window, tile in rows:
            saved = attention_masks.WINDOW_TILE
            attention_masks.WINDOW_TILE = tile or saved
            try:
                ms, kept, peak = measure(CoreAttention(config, window), inputs, args.warmup,
                                         args.iters)
                shown = "-" if window is None or tile else attention_masks.window_tile(window)
                if shown != "-" and shown >= s:
                    shown = f"{shown} (s fits one)"
            finally:
                attention_masks.WINDOW_TILE = saved
            print(f"| {s} | {window if window is not None else '-'} | {how} | {shown} | "
                  f"{ms:.1f} | {kept / mib:.1f} | "
                  f"{'-' if peak is None else f'{peak / mib:.0f}'} |", flush=True)


if __name__ == "__main__":
    main()
