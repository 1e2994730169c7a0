"""What the training benchmarks share: the job a config and its overrides describe, built on
every rank (`mp.training.pretrain`), and one training step on a fixed batch of random tokens.

    job = BenchJob.start(parser, prog="bench_x.py")   # parser: the tool's own arguments
    job.step()                                          # one iteration, all micro-batches
    job.end()
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.config import JobConfig, parse_args
from mp.initialize import initialize_distributed, initialize_model_parallel_of
from mp.training import gpt_step
from mp.training.pretrain import set_random_seed, setup_model_and_optimizer
from mp.training.training import train_step


@dataclass
class BenchJob:
    args: argparse.Namespace  # the tool's own arguments
    cfg: JobConfig
    model: list
    optimizer: object
    scheduler: object
    batch: dict

    @classmethod
    def start(cls, parser: argparse.ArgumentParser, prog: str) -> BenchJob:
        """Parse the tool's arguments (``--config`` is added) and the config overrides,
        start the process groups and build the model, optimizer and schedule."""
        parser.add_argument("--config", required=True, help="YAML config, as for pretrain_gpt.py")
        args, overrides = parser.parse_known_args()
        cfg = parse_args(["--config", args.config, *overrides], prog=prog)
        initialize_distributed(timeout_minutes=cfg.training.distributed_timeout_minutes)
        initialize_model_parallel_of(cfg)
        m, tr = cfg.model, cfg.training
        set_random_seed(tr.seed)
        model, optimizer, scheduler = setup_model_and_optimizer(cfg)
        text = torch.randint(0, m.vocab_size, (tr.micro_batch_size, m.seq_length + 1),
                             generator=torch.Generator().manual_seed(0))
        batch = {"tokens": text[:, :-1], "labels": text[:, 1:],
                 "loss_mask": torch.ones(tr.micro_batch_size, m.seq_length),
                 "position_ids": torch.arange(m.seq_length).repeat(tr.micro_batch_size, 1)}
        return cls(args, cfg, model, optimizer, scheduler, batch)

    def step(self) -> None:
        """One training iteration (every micro-batch is the same random batch)."""
        m, tr = self.cfg.model, self.cfg.training
        train_step(gpt_step.forward_step, [itertools.repeat(self.batch) for _ in self.model],
                   self.model, self.optimizer, self.scheduler,
                   num_microbatches=self.cfg.num_microbatches(dist.get_world_size()),
                   seq_length=m.seq_length, micro_batch_size=tr.micro_batch_size)

    @staticmethod
    def end() -> None:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
