"""The pipeline bubble of mp's schedules, measured, against the model's idle fraction.

The papers' model: with ``v`` chunks per stage the bubble is ``(p - 1) / v`` micro-batch
times, so a stage is idle ``b / (m + b)`` of the time, ``b = (p - 1) / v`` (for ``v = 1``,
``(p - 1) / (m + p - 1)``).

Runs the real schedules (``get_forward_backward_func``: 1F1B, and interleaved with ``v`` model
chunks) on ``p`` local gloo ranks with stage chunks whose forward and backward take a fixed
time (a sleep of ``t_f`` and ``2 t_f`` per micro-batch for the whole stage, split evenly over
its chunks), so that busy time is known exactly and every other moment of a stage is bubble
(or communication). Prints per-stage busy and idle time for each micro-batch count.

    python tools/bench_pipeline_bubble.py [--stages 4] [--microbatches 4 8 16] [--tf-ms 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch import nn

from mp.model import TransformerConfig

H = 8


class _Sleep(torch.autograd.Function):
    """Identity that takes ``seconds`` forward and twice that backward (a stage's work)."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class _SleepChunk(nn.Module):
    def __init__(self, seconds: float, overlap_p2p_comm: bool):
        super().__init__()
        self.seconds = seconds
        self.scale = nn.Parameter(torch.ones(H))
        self.input_tensor = None
        # what the schedule reads: the activation shape and dtype, and overlap_p2p_comm
        self.config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1,
                                        vocab_size=1, seq_length=2,
                                        overlap_p2p_comm=overlap_p2p_comm)

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, x):
        x = x if self.input_tensor is None else self.input_tensor
        return _Sleep.apply(x * self.scale, self.seconds)


def _step(data_iterator, model):
    out = model(next(data_iterator))
    return out, lambda o: (o.sum(), {"loss": o.sum().detach()})


def _rank(rank: int, world: int, init_file: str, args, results) -> None:
    from mp import parallel_state
    from mp.pipeline_parallel.schedules import get_forward_backward_func

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    rows = []
    for v, overlap in _schedules(args.chunks):
        parallel_state.initialize_model_parallel(1, world, v if v > 1 else None)
        for m in args.microbatches:
            chunks = [_SleepChunk(args.tf_ms / 1e3 / v, overlap) for _ in range(v)]
            iters = [iter([torch.ones(2, 1, H)] * m) for _ in range(v)]
            dist.barrier()
            start = time.perf_counter()
            get_forward_backward_func()(forward_step_func=_step, data_iterator=iters,
                                        model=chunks, num_microbatches=m, seq_length=2,
                                        micro_batch_size=1, finalize_model_grads_func=None)
            wall = time.perf_counter() - start
            busy = 3 * args.tf_ms / 1e3 * m  # forward t_f + backward 2 t_f per micro-batch
            rows.append((v, overlap, m, rank, wall, busy))
        parallel_state.destroy_model_parallel()
    results.put(rows)
    dist.destroy_process_group()


def _schedules(chunks: list[int]) -> list[tuple[int, bool]]:
    """(v, overlap_p2p_comm): 1F1B, and each interleaving with blocking and overlapped p2p."""
    return [(v, overlap) for v in chunks for overlap in ((False,) if v == 1 else (False, True))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tf-ms", type=float, default=100.0)
    args = parser.parse_args()
    p = args.stages
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    ctx = torch_mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, p, init_file, args, results)) for r in range(p)]
    for proc in procs:
        proc.start()
    rows = sorted(row for _ in procs for row in results.get())
    for proc in procs:
        proc.join()
    print(f"p={p}, t_f={args.tf_ms} ms, t_b={2 * args.tf_ms} ms per micro-batch per stage "
          "(busy is the same on every stage); iteration = the slowest stage's wall time")
    print(f"{'schedule':<28}{'m':>4}{'busy s':>9}{'iteration s':>13}{'stage walls s':>26}"
          f"{'idle %':>9}{'model idle %':>14}")
    for v, overlap in _schedules(args.chunks):
        for m in args.microbatches:
            mine = [row for row in rows if row[:3] == (v, overlap, m)]
            walls = [row[4] for row in mine]
            busy = mine[0][5]
            iteration = max(walls)
            bubble = (p - 1) / v
            name = "1F1B" if v == 1 else f"interleaved v={v}" + (", overlap" if overlap else "")
            spread = " ".join(f"{w:.2f}" for w in walls)
            print(f"{name:<28}{m:>4}{busy:>9.3f}{iteration:>13.3f}{spread:>26}"
                  f"{(iteration - busy) / iteration:>9.1%}{bubble / (m + bubble):>14.1%}")

if __name__ == "__main__":
    main()
