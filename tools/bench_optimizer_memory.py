"""Bytes of model state per parameter on one rank, with and without the distributed optimizer.

    torchrun --nproc-per-node 4 tools/bench_optimizer_memory.py \\
        --config configs/gpt3-125m.yaml --bf16 --use-distributed-optimizer \\
        --seq-length 128 --micro-batch-size 1 --global-batch-size 4

Builds the job's model and optimizer (`mp.training.pretrain`), takes one training step on
random tokens (AdamW creates its moments there), then counts, tensor by tensor on rank 0: the
parameters, the gradient buffer (padding included), and the optimizer state (fp32 masters
that are not the parameters themselves, AdamW's moments in their dtypes with any fp16 scale
factors, and step counters). Prints one table row in bytes per model parameter next to
Megatron's figure ``w + g + (M + m + v) / d``: weights ``w`` (2 bf16/fp16, 4 fp32), gradients
``g`` (4, 2 with ``--grad-reduce-in-bf16`` or ``--main-grads-dtype bf16``), master ``M`` (4,
0 for fp32 models), moments ``m`` and ``v`` (4 each, 2 in bf16/fp16 with
``--use-precision-aware-optimizer --exp-avg-dtype/--exp-avg-sq-dtype``), ``d`` = DP /
``--num-distributed-optimizer-instances`` with the distributed optimizer, else 1: ``2 + 4 +
12/d`` bf16, ``2 + 4 + 8/d`` with bf16 moments. With ``--use-torch-fsdp2`` the weights (fp32,
their own masters), gradients and moments are all shards over the DP x CP ranks: ``(4 + 4 +
8) / DP``. With ``--optimizer muon --use-distributed-optimizer`` (the layer-wise optimizer:
whole parameters dealt over the ranks, an uneven deal) it prints every DP rank's optimizer
state next to the estimator's for that rank (`mp.estimate.layer_wise`). Other arguments are
config overrides (``launch/pretrain_gpt.py --help``).
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist
from bench_job import BenchJob

from mp import parallel_state
from mp.distributed.torch_fsdp2 import local_tensor
from mp.estimate import Setup
from mp.estimate.layer_wise import dealt_cards, owned_state_bytes
from mp.estimate.setup import STATE_DTYPE_BYTES


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_optimizer_memory.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    job = BenchJob.start(parser, prog="bench_optimizer_memory.py")
    job.step()  # AdamW creates its moments here
    model, optimizer, m, tr = job.model, job.optimizer, job.cfg.model, job.cfg.training
    params = [p for chunk in model for p in chunk.module.parameters()]
    n = sum(p.numel() for p in params)  # a DTensor's numel is the whole tensor's
    weights = _nbytes(local_tensor(p) for p in params)
    fsdp = tr.use_torch_fsdp2
    grads = _nbytes(local_tensor(p.grad) for p in params if p.grad is not None) if fsdp \
        else _nbytes(buffer.grads for chunk in model for buffer in chunk.buffers)
    state = [t for s in optimizer.shards for t in optimizer.optimizer.state[s.main].values()]
    masters = [s.main for s in optimizer.shards if not s.main_is_param]
    opt = _nbytes(state) + _nbytes(masters)
    dp = parallel_state.get_data_parallel_world_size()
    half = m.precision != "fp32"
    instances = tr.num_distributed_optimizer_instances  # copies of the sharded state
    shards = dp // instances if tr.use_distributed_optimizer else 1
    moments = STATE_DTYPE_BYTES[tr.exp_avg_dtype] + STATE_DTYPE_BYTES[tr.exp_avg_sq_dtype]
    grad_bytes = 2 if tr.grad_reduce_in_bf16 else 4
    formula = (2 if half else 4) + grad_bytes + ((4 if half else 0) + moments) / shards
    if fsdp:
        formula = (4 + 4 + moments) / dist.get_world_size(  # fp32 shards, grads too
            parallel_state.get_data_parallel_group(with_context_parallel=True))
    if dist.get_rank() == 0:
        name = "FSDP" if fsdp else "distributed" if tr.use_distributed_optimizer else "plain"
        name += f", {instances} instances" if instances > 1 else ""
        name += f", moments {tr.exp_avg_dtype}/{tr.exp_avg_sq_dtype}" \
            if tr.use_precision_aware_optimizer else ""
        print(f"| {os.path.basename(job.args.config)} {m.precision} | {name} | DP{dp} | "
              f"{n / 1e6:.1f}M | {weights / n:.3f} | {grads / n:.4f} | {opt / n:.4f} | "
              f"{(weights + grads + opt) / n:.4f} | {formula:.3f} |", flush=True)
    if tr.optimizer == "muon" and tr.use_distributed_optimizer:
        _layer_wise_rows(job.cfg, opt)
    job.end()


def _layer_wise_rows(cfg, opt: int) -> None:
    """Each DP x CP rank's optimizer state (masters, momentum, moments) in bytes on the first
    TP rank of the first stage, measured and as `mp.estimate.layer_wise` deals it (a model
    without experts)."""
    where = (parallel_state.get_tensor_model_parallel_rank(),
             parallel_state.get_pipeline_model_parallel_rank(),
             parallel_state.get_data_parallel_rank(with_context_parallel=True))
    measured = [None] * dist.get_world_size()
    dist.all_gather_object(measured, (*where, opt))
    setup = Setup.from_job(cfg, dist.get_world_size())
    dense, _ = dealt_cards(setup)
    if dist.get_rank() == 0:
        for _, _, rank, got in sorted(m for m in measured if m[:2] == (0, 0)):
            print(f"| DP rank {rank} | {got:,} | {owned_state_bytes(setup, dense[rank]):,.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
