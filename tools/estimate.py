"""Estimate a training job's memory, FLOPs, communication and step time, or plan its layout.

    # one layout: the config's own (TP, PP, ...), with any override of the config
    python tools/estimate.py --config configs/gpt3-175b.yaml --gpus 1024 --gpu h100
    python tools/estimate.py --config configs/gpt3-1.3b.yaml --gpus 8 --micro-batch-size 8 \\
        --recompute-granularity full --recompute-method uniform
    python tools/estimate.py --config configs/gpt3-1.3b.yaml --gpus 8 \\
        --recompute-granularity selective --recompute-modules layernorm mlp

    # every valid layout that fits, fastest first, and a memory chart (needs matplotlib)
    python tools/estimate.py --config configs/gpt3-175b.yaml --gpus 1024 --gpu h100 --plan \\
        --top 10 --chart plan.png

Arguments this tool does not know are config overrides, as for pretraining
(``--section.key VALUE`` or a Megatron flag such as ``--global-batch-size 2048``). With
``--plan`` the config's own layout is ignored: the planner tries every one. See
docs/estimate.md for the model behind each number and what is checked against the code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mp.config import load_config
from mp.config.overrides import apply_overrides
from mp.estimate import (
    CPU,
    CUDA,
    GPUS,
    Setup,
    estimate,
    format_estimate,
    format_plan,
    gpu_spec,
    memory_chart,
    plan,
)
from mp.estimate.planner import (
    DEFAULT_MEMORY_FRACTION,
    DEFAULT_MICRO_BATCH_SIZES,
    recompute_fields,
)
from mp.estimate.step_time import DEFAULT_EFFICIENCY
from mp.model.context_parallel import CP_COMM_TYPES
from mp.model.pipeline_split import UNEVEN_SPLIT_FIELDS

RANK_ORDERS = ("tp-dp-pp", "tp-pp-dp")  # Megatron's default (CP after TP), --use-tp-pp-dp-mapping

# what --plan resets before the user's overrides: the planner chooses these itself, and the
# config's own layout need not fit the GPU count
_PLAN_RESETS = ["--model.tensor_model_parallel_size", "1",
                "--model.pipeline_model_parallel_size", "1",
                "--model.virtual_pipeline_model_parallel_size", "null",
                "--model.context_parallel_size", "1",
                "--model.expert_model_parallel_size", "1",
                *(part for name, even in UNEVEN_SPLIT_FIELDS.items()
                  for part in (f"--model.{name}", json.dumps(even))),
                "--model.sequence_parallel", "false",
                "--model.recompute_granularity", "null", "--model.recompute_modules", "null",
                "--model.recompute_method", "null",
                "--model.recompute_num_layers", "null",
                "--training.micro_batch_size", "1"]


def _check_plan_overrides(overrides: list[str]) -> None:
    """ValueError naming an override of a key the planner chooses itself."""
    given: dict = {}
    apply_overrides(given, overrides)
    for flag in _PLAN_RESETS[::2]:
        section, name = flag[2:].split(".")
        if name in (given.get(section) or {}):
            raise ValueError(f"--plan chooses {section}.{name} itself: drop it from the command "
                             "line (without --plan the tool estimates the layout it is given)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values


def _choices(what: str, allowed: tuple[str, ...]):
    """An argparse type: a comma-separated list of ``allowed`` values."""
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(text.split(","))
        for value in values:
            if value not in allowed:
                raise argparse.ArgumentTypeError(
                    f"{what} {value!r} must be one of {', '.join(allowed)}")
        return values
    return parse


def _recompute_modes(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated planner recompute modes (`recompute_fields`)."""
    modes = tuple(text.split(","))
    try:
        for mode in modes:
            recompute_fields(mode)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    return modes


#: How a job that keeps documents or conversations apart differs from the estimate.
DOCUMENT_MASKS_NOTE = (
    "not modelled: the job keeps documents apart (data.sft or data.reset_attention_mask); the "
    "estimate counts causal attention over whole samples, where the job attends within each "
    "document, padded to its bucket, and under all_gather, p2p and a2a+p2p context "
    "parallelism also keeps a [b, 1, s / C, s] mask for every micro-batch in flight "
    "(docs/estimate.md, Limits)")
#: How a job whose linears run in FP8 differs from the estimate.
FP8_NOTE = (
    "not modelled: the job runs its transformer layers' linears in FP8 (model.fp8); the "
    "estimate times every product at the GPU's dense bf16 rate and counts no float8 copies "
    "(each product quantizes its operands into transient 1-byte copies; what backward keeps "
    "is the model precision's, as counted) (docs/estimate.md, Limits)")


def unmodelled(job) -> list[str]:
    """The notes of what ``job`` does that the estimate leaves out."""
    return ([DOCUMENT_MASKS_NOTE] * bool(job.data.sft or job.data.reset_attention_mask)
            + [FP8_NOTE] * (job.model.fp8 is not None))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other arguments are config overrides.")
    p.add_argument("--config", required=True, help="the job's YAML config")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU type")
    hw = p.add_argument_group("GPU and links (override the GPU type's figures)")
    hw.add_argument("--peak-tflops", type=float, help="dense 16-bit peak, TFLOP/s")
    hw.add_argument("--memory-gib", type=float, help="memory per GPU, GiB")
    hw.add_argument("--hbm-gbps", type=float, help="HBM bandwidth, GB/s")
    hw.add_argument("--intra-node-gbps", type=float, help="NVLink per GPU per direction, GB/s")
    hw.add_argument("--inter-node-gbps", type=float, help="network per GPU per direction, GB/s")
    hw.add_argument("--gpus-per-node", type=int, help="GPUs per node")
    p.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                   help="achievable fraction of peak for the matrix products (default "
                        "%(default)s)")
    p.add_argument("--kernels", choices=("cuda", "cpu"), default="cuda",
                   help="whose kernels' saved tensors to count (default cuda)")
    pl = p.add_argument_group("planning")
    pl.add_argument("--plan", action="store_true", help="rank every valid layout that fits")
    pl.add_argument("--top", type=int, default=10, help="layouts to print (default 10)")
    pl.add_argument("--memory-fraction", type=float, default=DEFAULT_MEMORY_FRACTION,
                    help="usable fraction of GPU memory (default %(default)s)")
    pl.add_argument("--micro-batch-sizes", type=_int_list, default=DEFAULT_MICRO_BATCH_SIZES,
                    help="micro-batch sizes to try, e.g. 1,2,4 (default 1,2,4,8)")
    pl.add_argument("--recompute", type=_recompute_modes,
                    help="recompute modes to try, e.g. none,selective,layernorm+moe_act,full: "
                         "selective is the attention core (core_attn), modules joined by + "
                         "are recomputed selectively (default: none, selective, the modules "
                         "that free their outputs, every module, full)")
    pl.add_argument("--sequence-parallel-modes", choices=("on", "off", "both"), default="on",
                    help="sequence parallelism tried when TP > 1 (default on; Megatron's "
                         "--sequence-parallel is a config override)")
    pl.add_argument("--max-tensor-parallel", type=int,
                    help="largest TP size tried (default: GPUs per node)")
    pl.add_argument("--distributed-optimizer", choices=("on", "off"),
                    help="default: the config's training.use_distributed_optimizer")
    pl.add_argument("--context-parallel-sizes", type=_int_list, default=(1,),
                    help="context-parallel sizes to try, e.g. 1,2,4,8 (default 1: context "
                         "parallelism pays for long sequences only)")
    pl.add_argument("--cp-comm-types", type=_choices("CP exchange", CP_COMM_TYPES),
                    help="with CP > 1, the exchanges to try, e.g. all_gather,a2a,a2a+p2p "
                         "(a2a+p2p at every [A, P] split of CP; default: the config's "
                         "model.cp_comm_type)")
    pl.add_argument("--expert-tensor-parallel-sizes", type=_int_list,
                    help="for a mixture-of-experts model, the experts' tensor-parallel sizes to "
                         "try, e.g. 1,8 (default: the config's; Megatron's "
                         "--expert-tensor-parallel-size)")
    pl.add_argument("--rank-orders", type=_choices("rank order", RANK_ORDERS),
                    help="the rank orders to try: tp-dp-pp (Megatron's default), tp-pp-dp "
                         "(--use-tp-pp-dp-mapping: a pipeline's stages on neighbouring ranks; "
                         "no CP or EP); default: the config's")
    pl.add_argument("--expert-parallel-sizes", type=_int_list,
                    help="for a mixture-of-experts model, the expert-parallel sizes to try "
                         "(default: every one its experts and data-parallel size allow)")
    pl.add_argument("--uneven-pipeline", action="store_true",
                    help="also try pipeline splits that count the embedding and/or the loss as "
                         "a layer (Megatron's --account-for-embedding/loss-in-pipeline-split)")
    p.add_argument("--chart", metavar="PNG", help="draw the memory breakdown (matplotlib)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        gpu = gpu_spec(args.gpu, peak_tflops=args.peak_tflops, memory_gib=args.memory_gib,
                       hbm_gbps=args.hbm_gbps, intra_node_gbps=args.intra_node_gbps,
                       inter_node_gbps=args.inter_node_gbps, gpus_per_node=args.gpus_per_node)
        kernels = CUDA if args.kernels == "cuda" else CPU
        if args.plan:
            _check_plan_overrides(overrides)
            job = load_config(args.config, _PLAN_RESETS + overrides, world_size=1)
            sp = {"on": (True,), "off": (False,),
                  "both": (True, False)}[args.sequence_parallel_modes]
            distributed = None if args.distributed_optimizer is None else \
                args.distributed_optimizer == "on"
            result = plan(job, args.gpus, gpu, efficiency=args.efficiency,
                          memory_fraction=args.memory_fraction, kernels=kernels,
                          micro_batch_sizes=args.micro_batch_sizes,
                          recompute_modes=args.recompute, sequence_parallel=sp,
                          max_tensor_parallel=args.max_tensor_parallel or gpu.gpus_per_node,
                          distributed_optimizer=distributed, uneven_splits=args.uneven_pipeline,
                          context_parallel_sizes=args.context_parallel_sizes,
                          cp_comm_types=args.cp_comm_types,
                          expert_parallel_sizes=args.expert_parallel_sizes,
                          expert_tensor_parallel_sizes=args.expert_tensor_parallel_sizes,
                          tp_pp_dp_orders=None if args.rank_orders is None else tuple(
                              order == "tp-pp-dp" for order in args.rank_orders))
            print(f"{os.path.basename(args.config)} on {args.gpus} x {gpu.name}, global batch "
                  f"{job.training.global_batch_size} x {job.model.seq_length} tokens, "
                  f"{args.efficiency:.0%} of peak:")
            print(format_plan(result, args.top))
            shown = result.fitting[:args.top]
        else:
            job = load_config(args.config, overrides, world_size=args.gpus)
            est = estimate(Setup.from_job(job, args.gpus), gpu, args.efficiency, kernels)
            print(f"{os.path.basename(args.config)}: " + format_estimate(est, kernels))
            shown = [est]
        for note in unmodelled(job):
            print(note)
        if args.chart and shown:
            memory_chart(shown, args.chart, args.memory_fraction)
            print(f"memory chart written to {args.chart}")
    except (ValueError, OSError, RuntimeError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
