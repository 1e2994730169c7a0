"""How the pretraining job uses checkpoints (Megatron's ``--load``, ``--save``,
``--save-interval``, ``--no-load-optim``, ``--no-load-rng``, ``--no-save-optim``,
``--no-save-rng``, ``--exit-on-missing-checkpoint``, plus ``keep_last``).

- `start_point`: where the run starts, from ``training.load``'s newest complete checkpoint
  (its metadata only). A directory with no checkpoint yet starts from scratch, so one command
  line serves the first run and every restart of a preemptible job (as in Megatron), unless
  ``training.exit_on_missing_checkpoint`` (`check_checkpoint_exists`, before any process
  group). A checkpoint written by a tool (converted from Hugging Face: no layout, Megatron's
  "release" checkpoint), or any checkpoint under ``training.finetune``, gives weights only:
  the run starts at iteration 0 with a fresh optimizer and schedule. A job's checkpoint
  resumes its iteration and data position; ``training.no_load_optim`` leaves out the
  optimizer state, the loss scaler and the learning-rate schedule (as Megatron, whose schedule
  is saved with the optimizer), and a checkpoint saved without them (``no_save_optim``) needs
  it; ``training.no_load_rng`` leaves out the RNG states.
- `resume`: load it. Call it last, right before the training loop: it restores the RNG states,
  and anything drawing from them afterwards would shift the run (creating a DataLoader
  iterator draws its base seed from torch's generator, so build the data iterators first).
- `checkpoint_hook`: what the training loop calls every ``save_interval`` iterations and at
  the end (`mp.training.training.train`), saving into ``training.save``, without the optimizer
  state and schedule under ``training.no_save_optim`` and the RNG states under
  ``no_save_rng``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch import nn

from mp.checkpointing.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.files import find_checkpoint
from mp.config import JobConfig
from mp.optim import MixedPrecisionOptimizer, OptimizerParamScheduler

DEEPSPEED_LATEST = "latest"  # DeepSpeed's file naming a save directory's newest checkpoint


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: the checkpoint to load (None: nothing) and what it resumes."""

    checkpoint: Path | None = None
    resumes: bool = False  # True: a job's checkpoint (iteration, data position); False: weights
    iteration: int = 0
    consumed_train_samples: int = 0
    load_optim: bool = True  # when it resumes: the optimizer state, loss scaler and schedule
    load_rng: bool = True  # when it resumes: the RNG states (at the saving layout)


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def check_checkpoint_exists(cfg: JobConfig) -> None:
    """With ``training.exit_on_missing_checkpoint``, raise ValueError naming ``training.load``
    unless it holds a checkpoint (mp's, or a DeepSpeed job's); needs no process group."""
    load = cfg.training.load
    if cfg.training.exit_on_missing_checkpoint and find_checkpoint(load) is None \
            and not os.path.isfile(os.path.join(load, DEEPSPEED_LATEST)):
        raise ValueError(f"training.load={load!r} holds no checkpoint and training."
                         "exit_on_missing_checkpoint is set: stopping before training (drop "
                         "--exit-on-missing-checkpoint to start from scratch there)")


def start_point(cfg: JobConfig) -> StartPoint:
    """The start of a run given ``training.load`` (reads metadata only; the same error on
    every rank when the checkpoint holds no optimizer state and the flags want it)."""
    tr = cfg.training
    if tr.load is None:
        return StartPoint()
    directory = find_checkpoint(tr.load, tr.ckpt_step)
    if directory is None:
        if os.path.isfile(os.path.join(tr.load, DEEPSPEED_LATEST)):
            raise CheckpointError(f"training.load={tr.load!r} holds a DeepSpeed "
                                  "checkpoint (its 'latest' file): resume it with --deepspeed "
                                  "and the same TP and DP sizes")
        _say(f"no checkpoint in {tr.load} yet: starting from iteration 0")
        return StartPoint()
    info = read_checkpoint_info(directory)
    if info.layout is None or tr.finetune:
        return StartPoint(directory)
    if not info.has_optimizer and not tr.no_load_optim:
        raise CheckpointError(f"{directory} holds no optimizer state (saved with "
                              "--no-save-optim): add --no-load-optim (training.no_load_optim) "
                              "to resume it with a fresh optimizer and learning-rate schedule, "
                              "or --finetune to take only its weights")
    return StartPoint(directory, True, info.iteration, info.consumed_train_samples,
                      load_optim=not tr.no_load_optim, load_rng=not tr.no_load_rng)


def _rng_outcome(start: StartPoint, info: CheckpointInfo) -> str:
    """Whether `resume` restored the RNG states, and if not, why."""
    if info.rng_restored:
        return "restored"
    if not start.load_rng:
        return "not restored (training.no_load_rng)"
    if not info.has_rng:
        return "not restored (the checkpoint holds none)"
    return "not restored (saved at another layout)"


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
    info = load_checkpoint(start.checkpoint, model, optimizer,
                           scheduler if start.load_optim else None, load_rng=start.load_rng,
                           load_optimizer_state=start.load_optim)
    fresh = "" if start.load_optim else ("; the optimizer, loss scale and learning-rate "
                                         "schedule start fresh (training.no_load_optim)")
    _say(f"resuming from {info.path}: iteration {info.iteration}, "
         f"{info.consumed_train_samples} samples consumed, RNG states "
         f"{_rng_outcome(start, info)}{fresh}")


def checkpoint_hook(cfg: JobConfig, model: list[nn.Module], optimizer: MixedPrecisionOptimizer,
                    scheduler: OptimizerParamScheduler) -> Callable | None:
    """``hook(state)`` saving the job at ``state.iteration`` into ``training.save`` (keeping
    the last ``training.keep_last``); None when the job does not save."""
    tr = cfg.training
    if tr.save is None:
        return None
    config = cfg.to_dict()
    saved = (None, None) if tr.no_save_optim else (optimizer, scheduler)

    def hook(state) -> None:
        save_checkpoint(tr.save, state.iteration, model, *saved,
                        consumed_train_samples=state.consumed_train_samples, config=config,
                        keep_last=tr.keep_last, save_rng=not tr.no_save_rng)
    return hook
