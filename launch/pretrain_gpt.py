"""Pretrain a GPT: the ``torchrun`` entry point.

    torchrun --nproc-per-node 4 launch/pretrain_gpt.py --config configs/gpt-tiny.yaml \\
        --tensor-model-parallel-size 2

The config (YAML plus overrides, see ``--help``; without ``--config``, Megatron-LM's flags
alone) is checked against the world size before any
process group exists. Then every rank joins the job (NCCL with one GPU per local rank when
CUDA is there, gloo on the CPU), the tensor/pipeline/data-parallel groups are made, rank 0
prints the resolved config (and a notice for each Megatron flag that changes nothing in mp),
and `mp.training.pretrain.pretrain` builds the data (the embedded corpus by default), the
model and the optimizer, and trains (`train`, what each rank runs once the default process
group exists). An exception on any rank ends that rank with a traceback and a non-zero status,
and torchrun then stops the others.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist

from mp import parallel_state
from mp.config import flag_notices, format_config, parse_args
from mp.initialize import initialize_distributed, initialize_model_parallel_of
from mp.training.pretrain import check_supported, pretrain


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv, prog="pretrain_gpt.py")
    try:
        check_supported(cfg)
    except ValueError as error:
        print(f"pretrain_gpt.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    initialize_distributed(timeout_minutes=cfg.training.distributed_timeout_minutes)
    try:
        train(cfg, argv)
    finally:
        dist.destroy_process_group()


def train(cfg, argv: list[str]) -> None:
    """The job of ``cfg`` (parsed from ``argv``) on this rank of the default process group:
    the model-parallel groups, rank 0's printout of the config and the flag notices, and
    `pretrain`; the groups are gone again when it returns or raises."""
    try:
        initialize_model_parallel_of(cfg)
        if dist.get_rank() == 0:
            print(format_config(cfg), end="", flush=True)
            for line in flag_notices(argv):
                print(line, flush=True)
        pretrain(cfg)
    finally:
        parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    main()
