"""How the pretraining job uses checkpoints (Megatron's ``--load``, ``--save``,
``--save-interval``, ``--no-load-optim``, ``--no-load-rng``, ``--no-save-optim``,
``--no-save-rng``, ``--exit-on-missing-checkpoint``, ``--non-persistent-save-interval``,
``--save-retain-interval``, ``--pretrained-checkpoint``, plus ``keep_last``).

- `start_point`: where the run starts, from ``training.load``'s newest complete checkpoint
  (its metadata only). A directory with no checkpoint yet starts from scratch, so one command
  line serves the first run and every restart of a preemptible job (as in Megatron), unless
  ``training.exit_on_missing_checkpoint`` (`check_checkpoint_exists`, before any process
  group). A checkpoint written by a tool (converted from Hugging Face: no layout, Megatron's
  "release" checkpoint), or any checkpoint under ``training.finetune``, gives weights only:
  the run starts at iteration 0 with a fresh optimizer and schedule. When ``load`` is unset
  or holds no checkpoint, ``training.pretrained_checkpoint``'s (its ``ckpt_step`` one with
  one) is taken instead, as weights only (Megatron's rule, ``load_checkpoint``: it sets
  ``finetune``); when neither holds one the job stops before any process group
  (`check_checkpoint_exists`). A ``load`` that holds one always wins: a fine-tuning job
  resumes its own checkpoints. (Megatron asks ``load`` for its tracker file only; mp counts
  a non-persistent checkpoint too, since the job would resume it.) A job's checkpoint
  resumes its iteration and data position; ``training.no_load_optim`` leaves out the
  optimizer state, the loss scaler and the learning-rate schedule (as Megatron, whose schedule
  is saved with the optimizer), and a checkpoint saved without them (``no_save_optim``) needs
  it; ``training.no_load_rng`` leaves out the RNG states. With
  ``training.non_persistent_ckpt_type="global"`` the newest checkpoint of the non-persistent
  directory (`non_persistent_dir` of ``load``) is taken instead when it is at least as new
  (Megatron's rule); ``training.ckpt_step`` names one of ``load``'s own.
- `resume`: load it. Call it last, right before the training loop: it restores the RNG states,
  and anything drawing from them afterwards would shift the run (creating a DataLoader
  iterator draws its base seed from torch's generator, so build the data iterators first).
- `checkpoint_hook`: what the training loop calls every ``save_interval`` iterations and at
  the end (`mp.training.training.train`), saving into ``training.save``, without the optimizer
  state and schedule under ``training.no_save_optim`` and the RNG states under
  ``no_save_rng``; with ``training.async_save`` the writing goes on in the background
  (`mp.checkpointing.async_save`), the loop polling it after every iteration and finishing
  it before it ends. Every ``training.non_persistent_save_interval`` iterations that are not
  a ``save_interval`` one, the loop saves into the non-persistent directory instead, which
  keeps only its newest checkpoint; the run's end and early exits save into ``save``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from mp.checkpointing.async_save import AsyncSave
from mp.checkpointing.checkpoint import (
    CheckpointInfo,
    job_state,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.files import Retention, find_checkpoint
from mp.config import JobConfig, TrainingConfig
from mp.optim import MixedPrecisionOptimizer, OptimizerParamScheduler

DEEPSPEED_LATEST = "latest"  # DeepSpeed's file naming a save directory's newest checkpoint
NON_PERSISTENT_DIR = "non_persistent"  # Megatron's, under the save or load directory


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
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def non_persistent_dir(training: TrainingConfig, base: str) -> Path:
    """The directory of the non-persistent checkpoints: ``training.non_persistent_global_ckpt_
    dir``, else ``base/non_persistent`` (``base``: the save or the load directory)."""
    return Path(training.non_persistent_global_ckpt_dir or os.path.join(base, NON_PERSISTENT_DIR))


def _checkpoint_to_load(training: TrainingConfig) -> Path | None:
    """``training.load``'s newest checkpoint (``ckpt_step``'s with one), or the non-persistent
    directory's when that is at least as new; None when neither holds one."""
    persistent = find_checkpoint(training.load, training.ckpt_step)
    if training.non_persistent_ckpt_type is None or training.ckpt_step is not None:
        return persistent
    scratch = find_checkpoint(non_persistent_dir(training, training.load))
    if scratch is None or (persistent is not None and read_checkpoint_info(scratch).iteration
                           < read_checkpoint_info(persistent).iteration):
        return persistent
    return scratch


def _load_holds_checkpoint(training: TrainingConfig) -> bool:
    """Whether ``training.load`` holds a checkpoint a run would resume (any iteration of its
    own or of its non-persistent directory, or a DeepSpeed job's)."""
    load = training.load
    if load is None:
        return False
    if find_checkpoint(load) is not None or os.path.isfile(os.path.join(load, DEEPSPEED_LATEST)):
        return True
    return training.non_persistent_ckpt_type is not None and \
        find_checkpoint(non_persistent_dir(training, load)) is not None


def _load_text(training: TrainingConfig) -> str:
    """``training.load`` holds no checkpoint, in words."""
    return "training.load is not set" if training.load is None else \
        f"training.load={training.load!r} holds none"


def _pretrained_to_load(training: TrainingConfig) -> Path | None:
    """``training.pretrained_checkpoint``'s checkpoint when the run takes it (set, and
    ``load`` holds none), else None; ValueError when it is taken but holds none."""
    pretrained = training.pretrained_checkpoint
    if pretrained is None or _load_holds_checkpoint(training):
        return None
    try:
        directory = find_checkpoint(pretrained, training.ckpt_step)
    except CheckpointError as error:
        directory, why = None, f" ({error})"
    else:
        why = ""
    if directory is None:
        raise ValueError(f"training.pretrained_checkpoint={pretrained!r} holds no "
                         f"checkpoint{why}, and {_load_text(training)}: nothing to fine-tune "
                         "from (Megatron stops here too)")
    return directory


def check_checkpoint_exists(cfg: JobConfig) -> None:
    """With ``training.exit_on_missing_checkpoint``, raise ValueError naming ``training.load``
    unless it holds a checkpoint (mp's, or a DeepSpeed job's) or the run fine-tunes from
    ``training.pretrained_checkpoint``; with ``pretrained_checkpoint`` that the run takes,
    raise ValueError unless it holds one. Needs no process group."""
    load = cfg.training.load
    if _pretrained_to_load(cfg.training) is not None:
        return
    if cfg.training.exit_on_missing_checkpoint and _checkpoint_to_load(cfg.training) is None \
            and not os.path.isfile(os.path.join(load, DEEPSPEED_LATEST)):
        raise ValueError(f"training.load={load!r} holds no checkpoint and training."
                         "exit_on_missing_checkpoint is set: stopping before training (drop "
                         "--exit-on-missing-checkpoint to start from scratch there)")


def start_point(cfg: JobConfig) -> StartPoint:
    """The start of a run given ``training.load`` (reads metadata only; the same error on
    every rank when the checkpoint holds no optimizer state and the flags want it)."""
    tr = cfg.training
    pretrained = _pretrained_to_load(tr)
    if pretrained is not None:
        _say(f"{_load_text(tr)}: fine-tuning from {pretrained} "
             "(training.pretrained_checkpoint; weights only, iteration 0)")
        return StartPoint(pretrained)
    if tr.load is None:
        return StartPoint()
    directory = _checkpoint_to_load(tr)
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
                    scheduler: OptimizerParamScheduler,
                    on_save: Callable[[Any], None] | None = None) -> JobSaver | None:
    """The `JobSaver` of a job that saves (``training.save``), else None; ``on_save(state)``
    follows each save into ``save`` (`JobSaver`)."""
    return None if cfg.training.save is None else \
        JobSaver(cfg, model, optimizer, scheduler, on_save)


class JobSaver:
    """``saver(state)`` saves the job at ``state.iteration`` into ``training.save`` (keeping
    the last ``training.keep_last`` and those ``training.save_retain_interval`` divides:
    `Retention`), ``saver(state, non_persistent=True)`` into the
    non-persistent directory (keeping the newest only); with ``training.async_save`` it
    starts an `AsyncSave` (after finishing the one in flight), which `poll` commits once
    written and `finish` waits for. ``on_save(state)``, when given, is called after each save
    into ``save`` (once it is written, or with ``async_save`` once it is started: Megatron's
    points for its progress log), never after a non-persistent one. Collective, as saving is."""

    def __init__(self, cfg: JobConfig, model: list[nn.Module],
                 optimizer: MixedPrecisionOptimizer, scheduler: OptimizerParamScheduler,
                 on_save: Callable[[Any], None] | None = None):
        self.training, self.config, self.model = cfg.training, cfg.to_dict(), model
        self.saved = (None, None) if self.training.no_save_optim else (optimizer, scheduler)
        self.pending: AsyncSave | None = None
        self.on_save = on_save

    def __call__(self, state, non_persistent: bool = False) -> None:
        tr = self.training
        directory = non_persistent_dir(tr, tr.save) if non_persistent else tr.save
        keep = dict(keep_last=1) if non_persistent else dict(
            keep_last=tr.keep_last, retain_interval=tr.save_retain_interval)
        arguments = dict(consumed_train_samples=state.consumed_train_samples,
                         config=self.config, save_rng=not tr.no_save_rng)
        if not tr.async_save:
            save_checkpoint(directory, state.iteration, self.model, *self.saved,
                            **keep, **arguments)
        else:
            self.finish()
            tensors, meta = job_state(self.model, *self.saved, iteration=state.iteration,
                                      **arguments)
            self.pending = AsyncSave(directory, state.iteration, tensors, meta,
                                     Retention(**keep))
        if self.on_save is not None and not non_persistent:
            self.on_save(state)

    def poll(self) -> None:
        """Commit the save in flight if every rank has written it."""
        if self.pending is not None and self.pending.poll() is not None:
            self.pending = None

    def finish(self) -> None:
        """Wait for the save in flight and commit it."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.finish()
