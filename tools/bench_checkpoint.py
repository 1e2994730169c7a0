"""Checkpoint save and load time and size, against a training step.

    torchrun --nproc-per-node 2 tools/bench_checkpoint.py --dir /tmp/ckpt-bench \\
        --config configs/gpt3-125m.yaml --tensor-model-parallel-size 2 \\
        --seq-length 512 --micro-batch-size 1 --global-batch-size 1

Builds the job's model, optimizer and schedule (`mp.training.pretrain`), takes training steps
on random tokens (so AdamW has its moments), then times, on every rank between barriers:
``save_checkpoint`` into ``--dir`` twice (the second save replaces the first, as a running job
with ``keep_last=1`` does), and ``load_checkpoint`` of the result (hashing every file
included). Prints one table row: parameters, bytes on disk, median step time, save and load
time with their throughput, the save's cost in steps, and the largest resident set of any
rank (each rank writes only its own part of the state). Other arguments are config overrides
(``launch/pretrain_gpt.py --help``).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import time

import torch
import torch.distributed as dist
from bench_job import BenchJob

from mp import parallel_state
from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.training.pretrain import count_parameters


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _bytes(directory: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_checkpoint.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="save directory (emptied first)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    job = BenchJob.start(parser, prog="bench_checkpoint.py")
    args, cfg, model, optimizer, scheduler = (job.args, job.cfg, job.model, job.optimizer,
                                              job.scheduler)
    m = cfg.model
    params = count_parameters(model)
    job.step()  # AdamW's state exists from the first step on
    step_s = statistics.median(_timed(job.step) for _ in range(args.steps))
    if dist.get_rank() == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
    first = _timed(lambda: save_checkpoint(args.dir, 1, model, optimizer, scheduler,
                                           config=cfg.to_dict()))
    save_s = _timed(lambda: save_checkpoint(args.dir, 2, model, optimizer, scheduler,
                                            config=cfg.to_dict(), keep_last=1))
    size = _bytes(os.path.join(args.dir, "iter_0000002"))
    load_s = _timed(lambda: load_checkpoint(args.dir, model, optimizer, scheduler))
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        layout = (f"TP{m.tensor_model_parallel_size} PP{m.pipeline_model_parallel_size} "
                  f"DP{parallel_state.get_data_parallel_world_size()}")
        print(f"| {os.path.basename(args.config)} {m.precision} | {layout} | "
              f"{params / 1e6:.1f}M | {size / 2**20:.0f} MiB | {step_s:.2f} s | "
              f"{first:.2f} s / {save_s:.2f} s ({size / 2**20 / save_s:.0f} MiB/s) | "
              f"{load_s:.2f} s ({size / 2**20 / load_s:.0f} MiB/s) | {save_s / step_s:.2f} | "
              f"{rss.item() / 2**30:.2f} GiB |", flush=True)
    job.end()


if __name__ == "__main__":
    main()
