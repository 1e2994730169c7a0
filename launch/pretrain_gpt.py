"""Pretrain a GPT: the ``torchrun`` entry point.

    torchrun --nproc-per-node 4 launch/pretrain_gpt.py --config configs/gpt-tiny.yaml \\
        --tensor-model-parallel-size 2

The config (YAML plus overrides, see ``--help``) is checked against the world size before any
process group exists. Then every rank joins the job (NCCL with one GPU per local rank when
CUDA is there, gloo on the CPU), the tensor/pipeline/data-parallel groups are made, rank 0
prints the resolved config, and `mp.training.pretrain.pretrain` builds the data (the embedded
corpus by default), the model and the optimizer, and trains. An exception on any rank ends
that rank with a traceback and a non-zero status, and torchrun then stops the others.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from mp import parallel_state  # noqa: E402
from mp.config import format_config, parse_args  # noqa: E402
from mp.initialize import initialize_distributed  # noqa: E402
from mp.training.pretrain import pretrain  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, prog="pretrain_gpt.py")
    initialize_distributed()
    try:
        m = cfg.model
        parallel_state.initialize_model_parallel(m.tensor_model_parallel_size,
                                                 m.pipeline_model_parallel_size,
                                                 m.virtual_pipeline_model_parallel_size)
        if dist.get_rank() == 0:
            print(format_config(cfg), end="", flush=True)
        pretrain(cfg)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
