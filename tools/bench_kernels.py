"""Benchmark mp's fused kernels against torch eager, torch.compile and apex (when importable).

    python tools/bench_kernels.py [--ops layernorm rmsnorm softmax]

Prints one table, every variant measured in the same run: milliseconds (median over timed
loops of back-to-back calls) and, in brackets, the fraction of the device-to-device copy
bandwidth measured at the start of the run. Bytes counted are the fewest the operation must
move, whole tensors:

- forward: read x, write y;
- forward+backward: also read dy and the saved tensor (x for the norms, y for the softmax) and
  write dx. Weights, their gradients and the norms' per-row statistics are not counted.

The causal softmax is counted the same way (the whole [b*np, s, s] tensors), though its kernels
read only the unmasked lower triangle of x, y and dy: fractions above 1 are possible.

Variants: ``mp`` calls the public functions (``fused_layer_norm``, ``fused_rms_norm``,
``scaled_upper_triang_masked_softmax``) through autograd; ``eager`` is torch's
``F.layer_norm`` / ``F.rms_norm`` and, for the softmax, Megatron's torch path
(``FusedScaleMaskSoftmax`` with fusion off: fp32 upcast, scale, mask fill, softmax, downcast);
``compile`` is ``torch.compile`` of the same eager function, static shapes; ``apex`` is
``apex.normalization`` and apex's ``scaled_upper_triang_masked_softmax_cuda``. Forward times
are the training forward (inputs that require grad).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from mp.fused import (
    AttnMaskType,
    FusedScaleMaskSoftmax,
    attention_mask_func,
    fused_layer_norm,
    fused_rms_norm,
    norm_kernel_usable,
    scaled_upper_triang_masked_softmax,
    softmax_kernel_usable,
)

NORM_SHAPES = [(16384, 4096), (16384, 8192), (16384, 12288)]
SOFTMAX_SHAPES = [(256, 2048), (64, 4096), (32, 8192)]  # [b * np, s, s]
VARIANTS = ["mp", "eager", "compile", "apex"]
EPS = 1e-5


def time_ms(fn, target_ms: float = 25.0, min_reps: int = 5, budget_s: float = 1.5) -> float:
    """Median milliseconds per call: loops of back-to-back calls between CUDA events, each loop
    about ``target_ms`` long, repeated at least ``min_reps`` times within ``budget_s``."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, round(target_ms / max(start.elapsed_time(end), 1e-3)))
    times, begun = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - begun < budget_s and len(times) < 30):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting the read and the write."""
    src = torch.randn(2**30 // 4, device="cuda").to(torch.bfloat16).repeat(4)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def forward_and_backward(fn, inputs, dy):
    """One training step of ``fn``: forward, then the gradients of every input needing one."""
    def step():
        y = fn(*inputs)
        torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy)
    return step


def apex_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------------------- variants
# Each returns {variant: function of the op's inputs}, None where the variant is unavailable.

def norm_variants(rms: bool, hidden: int) -> dict:
    if rms:
        def eager(x, w):
            return F.rms_norm(x, (hidden,), w, EPS)
        apex = apex_module("apex.normalization.fused_layer_norm")
        apex_fn = apex and (lambda x, w: apex.fused_rms_norm_affine(x, w, (hidden,), EPS))
        return {"mp": lambda x, w: fused_rms_norm(x, w, EPS), "eager": eager,
                "compile": torch.compile(eager, dynamic=False), "apex": apex_fn}

    def eager(x, w, b):
        return F.layer_norm(x, (hidden,), w, b, EPS)
    apex = apex_module("apex.normalization.fused_layer_norm")
    apex_fn = apex and (lambda x, w, b: apex.fused_layer_norm_affine(x, w, b, (hidden,), EPS))
    return {"mp": lambda x, w, b: fused_layer_norm(x, w, b, EPS), "eager": eager,
            "compile": torch.compile(eager, dynamic=False), "apex": apex_fn}


def causal_softmax_variants(scale: float) -> dict:
    megatron_torch = FusedScaleMaskSoftmax(False, True, AttnMaskType.causal, False,
                                           attention_mask_func, True, scale)

    def eager(x):  # [b * np, s, s] as [b * np, 1, s, s]
        return megatron_torch(x.unsqueeze(1), None).squeeze(1)

    apex = apex_module("scaled_upper_triang_masked_softmax_cuda")
    return {"mp": lambda x: scaled_upper_triang_masked_softmax(x, scale), "eager": eager,
            "compile": torch.compile(eager, dynamic=False),
            "apex": apex and _apex_causal_softmax(apex, scale)}


def _apex_causal_softmax(apex, scale: float):
    class ApexCausalSoftmax(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = apex.forward(x, scale)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, dy):
            (y,) = ctx.saved_tensors
            return apex.backward(dy.contiguous(), y, scale)

    return ApexCausalSoftmax.apply


# ---------------------------------------------------------------------------------- running

def measure(variants: dict, inputs: list, elements: int, itemsize: int, copy_bps: float):
    """{(variant, pass): (ms, fraction of copy bandwidth) or an error word}."""
    dy = torch.randn_like(inputs[0])
    counted = {"fwd": 2 * elements * itemsize, "fwd+bwd": 5 * elements * itemsize}
    results = {}
    for name, fn in variants.items():
        for pass_name, step in [("fwd", lambda fn=fn: fn(*inputs)),
                                ("fwd+bwd", forward_and_backward(fn, inputs, dy))]:
            if fn is None:
                results[name, pass_name] = "n/a"
                continue
            try:
                ms = time_ms(step)
                results[name, pass_name] = (ms, counted[pass_name] / (ms * 1e-3) / copy_bps)
            except torch.cuda.OutOfMemoryError:
                results[name, pass_name] = "OOM"
            except Exception as error:  # noqa: BLE001 - one broken variant must not lose the rest
                print(f"{name} {pass_name}: {type(error).__name__}: {error}"[:300], flush=True)
                results[name, pass_name] = "error"
            torch.cuda.empty_cache()
    return results


def cell(result) -> str:
    return result if isinstance(result, str) else f"{result[0]:.3f} ({result[1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=["layernorm", "rmsnorm", "softmax"],
                        choices=["layernorm", "rmsnorm", "softmax"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_bps = copy_bandwidth()
    print(f"# {device}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.strftime('%Y-%m-%d')}; copy bandwidth {copy_bps / 1e12:.2f} TB/s "
          "(read + write)", flush=True)
    rows = []
    for op in args.ops:
        shapes = SOFTMAX_SHAPES if op == "softmax" else NORM_SHAPES
        for shape in shapes:
            if op == "softmax":
                batches, s = shape
                x = torch.randn(batches, s, s, device="cuda", dtype=torch.bfloat16) * 4
                inputs = [x.requires_grad_(True)]
                variants = causal_softmax_variants(1.0 / 8)
                assert softmax_kernel_usable(x, None, causal=True), "the kernel would not run"
                label, shape_text = "causal softmax", f"{batches}x{s}x{s}"
            else:
                tokens, hidden = shape
                x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
                params = [torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
                          for _ in range(1 if op == "rmsnorm" else 2)]
                inputs = [t.requires_grad_(True) for t in [x, *params]]
                variants = norm_variants(op == "rmsnorm", hidden)
                assert norm_kernel_usable(*inputs), "the kernel would not run"
                label = "RMSNorm" if op == "rmsnorm" else "LayerNorm"
                shape_text = f"{tokens}x{hidden}"
            results = measure(variants, inputs, x.numel(), x.element_size(), copy_bps)
            for pass_name in ["fwd", "fwd+bwd"]:
                row = [label, shape_text, pass_name,
                       *(cell(results[v, pass_name]) for v in VARIANTS)]
                rows.append(row)
                print("  ".join(row), flush=True)
            del x, inputs, variants
            torch.cuda.empty_cache()

    print(f"\n{device}: ms per call (fraction of the {copy_bps / 1e12:.2f} TB/s copy bandwidth), "
          "bf16")
    print("| op | shape | pass | mp | torch eager | torch.compile | apex |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
