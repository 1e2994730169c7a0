"""What activation recompute saves and costs: the bytes a forward leaves for backward and the
time of forward+backward, with each selective-recompute module and with full recompute.

    python tools/bench_recompute.py        # gpt-tiny with multi-latent attention and experts
    python tools/bench_recompute.py --config configs/gpt3-1.3b.yaml --micro-batch-size 4

The config's model (any override, as for the job: ``--num-layers 4``) at TP 1 and PP 1 on one
device, its weights the same in every row. Rows: no recompute; each of Megatron-Core's
``--recompute-modules`` the model has, alone; the output-dropping ones together
(``layernorm moe_act mla_up_proj``, those the model has); every module the model has
(``moe`` in place of its parts); full recompute of every layer. Columns: the bytes autograd
keeps once the forward is done (`mp.estimate.measure.SavedTensorMeter`, weights left out:
what recompute is for), on CUDA the peak the allocator reached over forward and backward
beyond the weights and gradients (recompute's transients included), and the median
milliseconds of forward+backward, each also against no recompute.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from bench_gpt import timed_steps

from mp import parallel_state
from mp.config import load_config
from mp.device import get_device
from mp.estimate.measure import SavedTensorMeter
from mp.initialize import initialize_distributed
from mp.model import GPTModel, TransformerConfig
from mp.model.config_rules import OUTPUT_DISCARDING_MODULES, RECOMPUTE_MODULES

NO_RECOMPUTE = [f"--model.{key}=null" for key in ("recompute_granularity", "recompute_method",
                                                 "recompute_num_layers")]  # the rows set it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_MODEL = ["--multi-latent-attention", "--position-embedding-type", "rope",
             "--q-lora-rank", "32", "--kv-lora-rank", "32", "--qk-head-dim", "16",
             "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--num-experts", "4",
             "--moe-layer-freq", "([0]+[1]*3)", "--moe-shared-expert-intermediate-size", "64",
             "--num-layers", "4"]


def settings(model: TransformerConfig) -> list[tuple[str, TransformerConfig]]:
    """(label, the model with that recompute) for each row that applies to ``model``."""
    def selective(modules):
        return dataclasses.replace(model, recompute_granularity="selective",
                                   recompute_modules=list(modules), recompute_method=None,
                                   recompute_num_layers=None)

    rows = [("none", dataclasses.replace(model, recompute_granularity=None,
                                         recompute_modules=None, recompute_method=None,
                                         recompute_num_layers=None))]
    usable = []
    for module in RECOMPUTE_MODULES:
        try:
            rows.append((module, selective([module])))
            usable.append(module)
        except ValueError:  # a part the model does not have
            continue
    dropping = [m for m in usable if m in OUTPUT_DISCARDING_MODULES]
    if len(dropping) > 1:
        rows.append((" ".join(dropping), selective(dropping)))
    every = [m for m in usable if not ("moe" in usable and m in ("moe_act", "shared_experts"))]
    if len(every) > 1:
        rows.append((" ".join(every), selective(every)))
    rows.append(("full (every layer)", dataclasses.replace(
        model, recompute_granularity="full", recompute_modules=None, recompute_method="uniform",
        recompute_num_layers=1)))
    return rows


def measure(model: GPTModel, batch: tuple, device: torch.device, iters: int
            ) -> tuple[int, int | None, float]:
    """(bytes kept after the forward, CUDA peak beyond weights and gradients or None, median
    seconds of forward+backward)."""
    ids, labels = batch

    def step() -> float:
        loss = model(ids, labels=labels).float().mean()
        loss.backward()
        return loss.item()
    step()  # gradients allocated, kernels compiled
    with SavedTensorMeter(exclude=list(model.parameters())) as meter:
        loss = model(ids, labels=labels).float().mean()
    kept = meter.bytes
    loss.backward()
    del meter, loss  # the meter holds what it counted: measure the peak without it
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    seconds, _ = timed_steps(step, device, warmup=1, iters=iters)
    return kept, peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "gpt-tiny.yaml"))
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    args, overrides = parser.parse_known_args()
    if args.config.endswith("gpt-tiny.yaml") and not overrides:
        overrides = CPU_MODEL
    mbs = str(args.micro_batch_size)
    cfg = load_config(args.config, [
        *overrides, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--expert-model-parallel-size", "1", "--micro-batch-size", mbs,
        "--global-batch-size", mbs, *NO_RECOMPUTE], world_size=1)
    initialize_distributed()
    try:
        parallel_state.initialize_model_parallel(1)
        device = get_device()
        m = cfg.model
        g = torch.Generator().manual_seed(0)
        batch = tuple(torch.randint(0, m.vocab_size, (args.micro_batch_size, m.seq_length),
                                    generator=g).to(device) for _ in range(2))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"{os.path.basename(args.config)} {' '.join(overrides)}: l={m.num_layers} "
              f"h={m.hidden_size} s={m.seq_length} micro-batch {args.micro_batch_size} | "
              f"{m.precision} | {name}", flush=True)
        print("| recompute | kept after forward | vs none | peak (CUDA) | ms fwd+bwd | vs none |"
              "\n| --- | ---: | ---: | ---: | ---: | ---: |")
        base = None
        for label, model_cfg in settings(m):
            torch.manual_seed(cfg.training.seed)
            model = GPTModel(model_cfg)
            kept, peak, seconds = measure(model, batch, device, args.iters)
            base = base or (kept, seconds)
            peak_text = "-" if peak is None else f"{peak / 2**20:.1f} MiB"
            print(f"| {label} | {kept / 2**20:.2f} MiB | {kept / base[0]:.2f} | {peak_text} | "
                  f"{seconds * 1e3:.1f} | {seconds / base[1]:.2f} |", flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
