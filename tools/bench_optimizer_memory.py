"""Bytes of model state per parameter on one rank, with and without the distributed optimizer.

    torchrun --nproc-per-node 4 tools/bench_optimizer_memory.py \\
        --config configs/gpt3-125m.yaml --bf16 --use-distributed-optimizer \\
        --seq-length 128 --micro-batch-size 1 --global-batch-size 4

Builds the job's model and optimizer (`mp.training.pretrain`), takes one training step on
random tokens (AdamW creates its moments there), then counts, tensor by tensor on rank 0: the
parameters, the fp32 gradient buffer (padding included), and the optimizer state (fp32 masters
that are not the parameters themselves, AdamW's moments and step counters). Prints one table
row in bytes per model parameter next to Megatron's figures (`2 + 4 + 12/d` bf16, `4 + 4 +
8/d` fp32 with the distributed optimizer, `d` = DP / `--num-distributed-optimizer-instances`;
18 and 16 without). Other arguments are config overrides (``launch/pretrain_gpt.py --help``).
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist
from bench_job import BenchJob

from mp import parallel_state


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_optimizer_memory.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    job = BenchJob.start(parser, prog="bench_optimizer_memory.py")
    job.step()  # AdamW creates its moments here
    model, optimizer, m, tr = job.model, job.optimizer, job.cfg.model, job.cfg.training
    params = [p for chunk in model for p in chunk.module.parameters()]
    n = sum(p.numel() for p in params)
    weights = _nbytes(params)
    grads = _nbytes(buffer.grads for chunk in model for buffer in chunk.buffers)
    state = [t for s in optimizer.shards for t in optimizer.optimizer.state[s.main].values()]
    masters = [s.main for s in optimizer.shards if not s.main_is_param]
    opt = _nbytes(state) + _nbytes(masters)
    dp = parallel_state.get_data_parallel_world_size()
    half = m.precision != "fp32"
    instances = tr.num_distributed_optimizer_instances  # copies of the sharded state
    shards = dp // instances if tr.use_distributed_optimizer else 1
    formula = (2 + 4 + 12 / shards) if half else (4 + 4 + 8 / shards)
    if dist.get_rank() == 0:
        name = "distributed" if tr.use_distributed_optimizer else "plain"
        name += f", {instances} instances" if instances > 1 else ""
        print(f"| {os.path.basename(job.args.config)} {m.precision} | {name} | DP{dp} | "
              f"{n / 1e6:.1f}M | {weights / n:.3f} | {grads / n:.4f} | {opt / n:.4f} | "
              f"{(weights + grads + opt) / n:.4f} | {formula:.3f} |", flush=True)
    job.end()


if __name__ == "__main__":
    main()
