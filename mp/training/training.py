"""The training loop (Megatron's ``train_step``, ``evaluate`` and ``train``).

One iteration: zero the gradient buffers, run the schedule over the iteration's micro-batches
(as many as its global batch holds: `mp.config.BatchSchedule`, which may ramp the batch up),
take an optimizer step, advance the learning-rate schedule (by one iteration, or by the
iteration's samples in a run counted in samples) when the step was applied, and average the
reported losses over micro-batches and data-parallel ranks (one all-reduce). Every
``eval_interval`` iterations, and after the last one, the validation loss is measured with a
forward-only schedule.

A loss that is not finite in a bf16 or fp32 run stops the run with an error that names the
iteration and the rank (fp16 runs skip such steps through the loss scaler instead). The
``checkpoint_hook`` is called with the `TrainState` every ``save_interval`` iterations and at
the end; the error names the last iteration it saved, the one to resume from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.config import JobConfig
from mp.optim import MixedPrecisionOptimizer, OptimizerParamScheduler
from mp.pipeline_parallel.schedules import get_forward_backward_func
from mp.training.exit import ExitConditions
from mp.training.logger import TrainingLogger


@dataclass
class TrainState:
    """Where a run is: what a checkpoint must hold to resume it exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    last_saved_iteration: int | None = None


class StepOutput(NamedTuple):
    losses: dict[str, float]  # mean over micro-batches and data-parallel ranks
    local_losses: dict[str, float]  # this rank's mean over its micro-batches
    update_successful: bool
    grad_norm: float


class NonFiniteLossError(RuntimeError):
    """The loss became inf or NaN in a run without loss scaling."""


def average_losses(per_microbatch: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """(the data-parallel mean, this rank's own mean) over micro-batches, as floats. Only the
    last pipeline stage computes losses; it sends the result to the other stages."""
    result = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        keys = list(per_microbatch[0])
        local = torch.stack([torch.stack([d[k].float() for d in per_microbatch]).mean()
                             for k in keys])
        reduced = local.clone()
        if parallel_state.get_data_parallel_world_size() > 1:
            dist.all_reduce(reduced, group=parallel_state.get_data_parallel_group())
            reduced /= parallel_state.get_data_parallel_world_size()
        local_values, reduced_values = torch.stack([local, reduced]).tolist()
        result = dict(zip(keys, reduced_values)), dict(zip(keys, local_values))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        result = box[0]
    return result


def train_step(forward_step_func: Callable, data_iterator: Iterator, model: list[nn.Module],
               optimizer: MixedPrecisionOptimizer, opt_param_scheduler: OptimizerParamScheduler,
               *, num_microbatches: int, seq_length: int, micro_batch_size: int,
               lr_increment: int = 1) -> StepOutput:
    """One iteration over ``num_microbatches`` micro-batches of ``model`` (a list of
    `DistributedDataParallel` chunks); a successful update advances the learning-rate schedule
    by ``lr_increment`` (the iteration's samples when it counts samples)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, grad_scale_func=optimizer.scale_loss)
    result = optimizer.step()
    if result.update_successful:
        opt_param_scheduler.step(lr_increment)
    reduced, local = average_losses(losses)
    return StepOutput(reduced, local, result.update_successful, result.grad_norm)


def evaluate(forward_step_func: Callable, data_iterator: Iterator, model: list[nn.Module], *,
             eval_iters: int, num_microbatches: int, seq_length: int,
             micro_batch_size: int) -> dict[str, float]:
    """The reported losses averaged over ``eval_iters`` forward-only iterations (models in
    eval mode, no gradients), their micro-batches and the data-parallel ranks."""
    for chunk in model:
        chunk.eval()
    totals: dict[str, float] = {}
    try:
        for _ in range(eval_iters):
            losses = get_forward_backward_func()(
                forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
                num_microbatches=num_microbatches, seq_length=seq_length,
                micro_batch_size=micro_batch_size, forward_only=True)
            for key, value in average_losses(losses)[0].items():
                totals[key] = totals.get(key, 0.0) + value
    finally:
        for chunk in model:
            chunk.train()
    return {key: value / eval_iters for key, value in totals.items()}


def _check_finite(out: StepOutput, state: TrainState) -> None:
    bad = {k: v for k, v in out.losses.items() if not math.isfinite(v)}
    if not bad:
        return
    key, value = next(iter(bad.items()))
    local = out.local_losses[key]
    where = (f"this rank's own {key} is {local}" if not math.isfinite(local)
             else f"this rank's own {key} is finite ({local:.4f}): another data-parallel rank "
                  "produced it")
    resume = (f"resume from the checkpoint of iteration {state.last_saved_iteration}"
              if state.last_saved_iteration is not None else "no checkpoint was saved")
    raise NonFiniteLossError(
        f"iteration {state.iteration}: the data-parallel mean {key} is {value} on rank "
        f"{dist.get_rank()} ({where}); stopping the run ({resume})")


def train(forward_step_func: Callable, model: list[nn.Module],
          optimizer: MixedPrecisionOptimizer, opt_param_scheduler: OptimizerParamScheduler,
          train_data_iterator: Iterator, valid_data_iterator: Iterator | None,
          cfg: JobConfig, logger: TrainingLogger, *, state: TrainState | None = None,
          checkpoint_hook: Callable[[TrainState], None] | None = None,
          exit_conditions: ExitConditions | None = None) -> TrainState:
    """Run iterations from ``state`` (default: the start) to the end of the run
    (`JobConfig.train_iterations`), or until ``exit_conditions`` stop it. Evaluation
    iterations take the full global batch."""
    tr = cfg.training
    shapes = {"seq_length": cfg.model.seq_length, "micro_batch_size": tr.micro_batch_size}
    per_microbatch = tr.micro_batch_size * parallel_state.get_data_parallel_world_size()
    for chunk in model:
        chunk.train()
    return run_iterations(
        lambda batch: train_step(forward_step_func, train_data_iterator, model, optimizer,
                                 opt_param_scheduler, num_microbatches=batch // per_microbatch,
                                 lr_increment=batch if tr.counts_samples else 1, **shapes),
        cfg, logger, lr=opt_param_scheduler.get_lr, loss_scale=optimizer.get_loss_scale,
        evaluate=None if valid_data_iterator is None else
        lambda: evaluate(forward_step_func, valid_data_iterator, model,
                         eval_iters=tr.eval_iters,
                         num_microbatches=cfg.num_microbatches(dist.get_world_size()), **shapes),
        state=state, checkpoint_hook=checkpoint_hook, exit_conditions=exit_conditions)


def run_iterations(step: Callable[[int], StepOutput], cfg: JobConfig, logger: TrainingLogger, *,
                   lr: Callable[[], float], loss_scale: Callable[[], float],
                   evaluate: Callable[[], dict[str, float]] | None,
                   state: TrainState | None = None,
                   checkpoint_hook: Callable[[TrainState], None] | None = None,
                   exit_conditions: ExitConditions | None = None) -> TrainState:
    """The loop around ``step(global_batch_size)``, one iteration (mp's `train_step`, or
    DeepSpeed's engine in `mp.training.deepspeed`): count iterations and samples, check the
    loss, log with ``lr()`` and ``loss_scale()``, ``evaluate`` every ``eval_interval``
    iterations and after the last, save every ``save_interval`` iterations and at the end.
    When ``exit_conditions`` give a reason to stop before the last iteration, the run saves
    and ends there, without the final evaluation."""
    tr = cfg.training
    state = TrainState() if state is None else state
    check_loss = cfg.model.precision != "fp16"
    evaluated_at = None

    def run_evaluation():
        logger.pause()
        logger.validation(state.iteration, evaluate())
        logger.resume()

    def save():
        checkpoint_hook(state)
        state.last_saved_iteration = state.iteration

    can_evaluate = evaluate is not None and tr.eval_iters > 0
    stop = None
    schedule = cfg.batch_schedule(dist.get_world_size())
    iterations = cfg.train_iterations(dist.get_world_size())
    while state.iteration < iterations:
        batch = schedule.global_batch_size_at(state.consumed_train_samples)
        out = step(batch)
        state.iteration += 1
        state.consumed_train_samples += batch
        if check_loss:
            _check_finite(out, state)
        logger.training_iteration(state.iteration, state.consumed_train_samples, out.losses,
                                  lr(), out.grad_norm, loss_scale(), out.update_successful,
                                  batch)
        if can_evaluate and tr.eval_interval and state.iteration % tr.eval_interval == 0:
            run_evaluation()
            evaluated_at = state.iteration
        if checkpoint_hook and tr.save_interval and state.iteration % tr.save_interval == 0:
            save()
        if exit_conditions is not None and state.iteration < iterations:
            stop = exit_conditions.reason(state.iteration)
            if stop is not None:
                break
    if can_evaluate and stop is None and evaluated_at != state.iteration:
        run_evaluation()
    if checkpoint_hook and state.last_saved_iteration != state.iteration:
        save()
    if stop is not None:
        logger.early_exit(state.iteration, stop)
    return state
