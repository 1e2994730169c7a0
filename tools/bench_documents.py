"""What keeping packed documents apart costs in one attention core: forward+backward time and the
bytes autograd keeps, through the dense ``[b, 1, s, s]`` document mask against through
`mp.model.packed_documents.PackedDocuments` (the documents gathered into a causal batch of
their own), in one run.

    python tools/bench_documents.py                       # CPU-sized: s 2048 and 4096
    python tools/bench_documents.py --seq 4096 8192 --dtype bf16 --batch 4   # a GPU

Each sample is filled with documents of lengths drawn uniformly from each ``--doc-lengths``
range (the last one cut at ``s``), the same samples for both rows. The core is
`mp.model.attention.CoreAttention` (SDPA, or ``--backend unfused``) on random
``q [s, b, heads, d]`` and grouped ``k, v``. Columns: the documents' mean length, the core calls
a micro-batch takes (one per bucket), the median milliseconds of forward+backward, the bytes
autograd keeps once the forward is done (`mp.estimate.measure.SavedTensorMeter`, inputs
excluded; the dense row's mask is kept), and on CUDA the allocator's peak over forward and
backward beyond the inputs. The dense row includes making the mask's additive form, as a
model's block does once for all its layers.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from bench_window import DTYPES, add_core_arguments, core_setup, measure, print_setup

from mp.device import get_device
from mp.model.attention import CoreAttention
from mp.model.attention_masks import mask_for_layers
from mp.model.packed_documents import PackedDocuments


def random_segments(batch: int, seq: int, low: int, high: int, generator: torch.Generator
                      ) -> torch.Tensor:
    """``[batch, seq]`` segment ids of samples filled with documents of ``low..high`` tokens."""
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)),
                                            torch.tensor(lengths))[:seq])
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_core_arguments(p)
    p.add_argument("--doc-lengths", nargs="+", default=["100-600", "1000-3000"],
                   help="ranges LOW-HIGH of document lengths")
    args = p.parse_args(argv)
    device, dtype = get_device(), DTYPES[args.dtype]
    mib = 2 ** 20
    print_setup(args, device)
    print("| s | documents | mean length | how | calls | ms fwd+bwd | kept MiB | "
          "CUDA peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(1)
    for s in args.seq:
        config, inputs = core_setup(args, s, device)
        core = CoreAttention(config).to(device)
        for lengths in args.doc_lengths:
            low, high = (int(n) for n in lengths.split("-"))
            segments = random_segments(args.batch, s, low, high, g)
            documents = PackedDocuments(segments, device)
            mean = s * args.batch / (int(segments[:, -1].sum()) + args.batch)
            rows = [("mask", 1, lambda q, k, v: core(q, k, v, mask_for_layers(
                        documents.mask(), config, dtype))),
                    ("packed", len(documents.calls), lambda q, k, v: core(q, k, v, documents))]
            for how, calls, run in rows:
                ms, kept, peak = measure(run, inputs, args.warmup, args.iters)
                print(f"| {s} | {lengths} | {mean:.0f} | {how} | {calls} | {ms:.1f} | "
                      f"{kept / mib:.1f} | {'-' if peak is None else f'{peak / mib:.0f}'} |",
                      flush=True)


if __name__ == "__main__":
    main()
