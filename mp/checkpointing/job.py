"""How the pretraining job uses checkpoints (Megatron's ``--load``, ``--save``,
``--save-interval``, plus ``keep_last``).

- `start_point`: where the run starts, from ``training.load``'s newest complete checkpoint
  (its metadata only). A directory with no checkpoint yet starts from scratch, so one command
  line serves the first run and every restart of a preemptible job (as in Megatron). A
  model-only checkpoint (converted from Hugging Face), or any checkpoint under
  ``training.finetune``, gives weights only: the run starts at iteration 0 with a fresh
  optimizer and schedule.
- `resume`: load it. Call it last, right before the training loop: it restores the RNG states,
  and anything drawing from them afterwards would shift the run (creating a DataLoader
  iterator draws its base seed from torch's generator, so build the data iterators first).
- `checkpoint_hook`: what the training loop calls every ``save_interval`` iterations and at
  the end (`mp.training.training.train`), saving into ``training.save``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch import nn

from mp.checkpointing.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.files import find_checkpoint
from mp.config import JobConfig
from mp.optim import MixedPrecisionOptimizer, OptimizerParamScheduler

DEEPSPEED_LATEST = "latest"  # DeepSpeed's file naming a save directory's newest checkpoint


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: the checkpoint to load (None: nothing) and what it resumes."""

    checkpoint: Path | None = None
    resumes: bool = False  # True: a full checkpoint (iteration, optimizer, RNG); False: weights
    iteration: int = 0
    consumed_train_samples: int = 0


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def start_point(cfg: JobConfig) -> StartPoint:
    """The start of a run given ``training.load`` (reads metadata only)."""
    if cfg.training.load is None:
        return StartPoint()
    directory = find_checkpoint(cfg.training.load)
    if directory is None:
        if os.path.isfile(os.path.join(cfg.training.load, DEEPSPEED_LATEST)):
            raise CheckpointError(f"training.load={cfg.training.load!r} holds a DeepSpeed "
                                  "checkpoint (its 'latest' file): resume it with --deepspeed "
                                  "and the same TP and DP sizes")
        _say(f"no checkpoint in {cfg.training.load} yet: starting from iteration 0")
        return StartPoint()
    info = read_checkpoint_info(directory)
    if not info.has_optimizer or cfg.training.finetune:
        return StartPoint(directory)
    return StartPoint(directory, True, info.iteration, info.consumed_train_samples)


def resume(start: StartPoint, model: list[nn.Module], optimizer: MixedPrecisionOptimizer,
           scheduler: OptimizerParamScheduler) -> None:
    """Load ``start``'s checkpoint into the job (see the module doc for when). Collective."""
    if start.checkpoint is None:
        return
    if not start.resumes:
        load_checkpoint(start.checkpoint, model, optimizer, load_rng=False,
                        load_optimizer_state=False)  # the weights into the fp32 masters too
        _say(f"loaded the weights of checkpoint {start.checkpoint}; the optimizer and the "
             "learning-rate schedule start fresh at iteration 0")
        return
    info = load_checkpoint(start.checkpoint, model, optimizer, scheduler)
    rng = "restored" if info.rng_restored else "not restored (saved at another layout)"
    _say(f"resuming from {info.path}: iteration {info.iteration}, "
         f"{info.consumed_train_samples} samples consumed, RNG states {rng}")


def checkpoint_hook(cfg: JobConfig, model: list[nn.Module], optimizer: MixedPrecisionOptimizer,
                    scheduler: OptimizerParamScheduler) -> Callable | None:
    """``hook(state)`` saving the job at ``state.iteration`` into ``training.save`` (keeping
    the last ``training.keep_last``); None when the job does not save."""
    tr = cfg.training
    if tr.save is None:
        return None
    config = cfg.to_dict()

    def hook(state) -> None:
        save_checkpoint(tr.save, state.iteration, model, optimizer, scheduler,
                        consumed_train_samples=state.consumed_train_samples, config=config,
                        keep_last=tr.keep_last)
    return hook
