"""The training loop (Megatron's ``train_step``, ``evaluate`` and ``train``).

One iteration: zero the gradient buffers, run the schedule over the iteration's micro-batches
(as many as its global batch holds: `mp.config.BatchSchedule`, which may ramp the batch up),
take an optimizer step, advance the learning-rate schedule (by one iteration, or by the
iteration's samples in a run counted in samples) when the step was applied, and average the
reported losses over micro-batches and data-parallel ranks (`mp.training.evaluation.
average_losses`). Every ``eval_interval`` iterations, and after the last one, the validation
loss is measured with a forward-only schedule, averaged the same way over all its iterations
(`mp.training.evaluation`: ``eval_iters`` global batches, the whole split, or each validation
set on its own); after the last one (and the final save) the test split's loss is measured the
same way, over its first ``eval_iters`` global batches (Megatron's end of ``pretrain``). With
``logging.log_params_norm`` the step also measures the parameters' norm
(`MixedPrecisionOptimizer.calc_params_l2_norm`).

A loss that is not finite in a bf16 or fp32 run stops the run with an error that names the
iteration and the rank (fp16 runs skip such steps through the loss scaler instead). The
``checkpoint_hook`` is called with the `TrainState` every ``save_interval`` iterations and at
the end; the error names the last iteration it saved, the one to resume from. With
``training.skip_train`` (Megatron's ``--skip-train``) the loop runs no iteration: it evaluates
the validation and test data once at the state's iteration (where there is such data), writes
no scalars and saves nothing.

Around the iterations: Python's garbage collector at the same points on every rank with
``training.manual_gc`` (`mp.training.manual_gc`), the CUDA cache emptied after the
forward-backward pass (``training.empty_unused_memory_level`` 1, evaluation too) and after the
optimizer step (2), as in Megatron, and the profiled range of ``logging.profile``
(`mp.training.profiling`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.config import JobConfig
from mp.device import get_device
from mp.distributed.replica_check import check_param_hashes_across_dp_replicas
from mp.model.aux_losses import take_tracked, tracked_names
from mp.optim import MixedPrecisionOptimizer, OptimizerParamScheduler
from mp.pipeline_parallel.schedules import get_forward_backward_func
from mp.training.evaluation import average_losses, evaluate, validation_evaluator
from mp.training.exit import ExitConditions
from mp.training.logger import TrainingLogger
from mp.training.manual_gc import ManualGC
from mp.training.profiling import IterationProfiler


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
    params_norm: float | None = None  # with logging.log_params_norm
    num_zeros_in_grad: int | None = None  # with logging.log_num_zeros_in_grad


class NonFiniteLossError(RuntimeError):
    """The loss became inf or NaN in a run without loss scaling."""


def auxiliary_losses(model: list[nn.Module]) -> dict[str, float]:
    """The auxiliary losses of the iteration without their coefficients
    (`mp.model.aux_losses.track`), each averaged over the layers that add it, the
    micro-batches and the data-parallel ranks: the routers' (Megatron's
    ``load_balancing_loss``, ``z_loss``) and multi-token prediction's (``mtp_1 loss``, ...).
    Empty for a model without them."""
    config = getattr(getattr(model[0], "module", model[0]), "config", None)
    names = tracked_names(config) if config is not None else []
    taken = take_tracked()
    if not names:
        return {}
    zero = torch.zeros(2, dtype=torch.float64, device=get_device())
    stats = torch.stack([taken.get(name, zero) for name in names])  # [names, (sum, count)]
    for group in (parallel_state.get_pipeline_model_parallel_group(),
                  parallel_state.get_data_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(stats, group=group)
    return dict(zip(names, (stats[:, 0] / stats[:, 1]).tolist()))


def train_step(forward_step_func: Callable, data_iterator: Iterator, model: list[nn.Module],
               optimizer: MixedPrecisionOptimizer, opt_param_scheduler: OptimizerParamScheduler,
               *, num_microbatches: int, seq_length: int, micro_batch_size: int,
               lr_increment: int = 1, empty_unused_memory_level: int = 0,
               calculate_per_token_loss: bool = False, log_params_norm: bool = False
               ) -> StepOutput:
    """One iteration over ``num_microbatches`` micro-batches of ``model`` (a list of
    `DistributedDataParallel` chunks); a successful update advances the learning-rate schedule
    by ``lr_increment`` (the iteration's samples when it counts samples). The CUDA cache is
    emptied after the forward-backward pass at ``empty_unused_memory_level`` 1, and also after
    the optimizer step at 2 (Megatron's)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, grad_scale_func=optimizer.scale_loss,
        calculate_per_token_loss=calculate_per_token_loss)
    if empty_unused_memory_level >= 1:
        torch.cuda.empty_cache()  # does nothing until CUDA is used
    result = optimizer.step()
    if result.update_successful:
        opt_param_scheduler.step(lr_increment)
    if empty_unused_memory_level >= 2:
        torch.cuda.empty_cache()
    reduced, local = average_losses(losses, calculate_per_token_loss)
    auxiliary = auxiliary_losses(model)
    reduced, local = {**reduced, **auxiliary}, {**local, **auxiliary}
    return StepOutput(reduced, local, result.update_successful, result.grad_norm,
                      optimizer.calc_params_l2_norm() if log_params_norm else None,
                      result.num_zeros_in_grad)


def skip_batches(data_iterator, num_microbatches: int) -> None:
    """Megatron's ``dummy_train_step``: read an iteration's ``num_microbatches`` micro-batches
    from ``data_iterator`` (or from each model chunk's, given a list) without running the
    model, as the iteration would have."""
    iterators = data_iterator if isinstance(data_iterator, (list, tuple)) else [data_iterator]
    for iterator in iterators:
        for _ in range(num_microbatches):
            next(iterator)


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
    hint = ("; nan is also the mean over no tokens, when no loss mask of the iteration keeps "
            "one (fine-tuning samples cut before the assistant speaks need a longer "
            "model.seq_length)") if math.isnan(value) else ""
    raise NonFiniteLossError(
        f"iteration {state.iteration}: the data-parallel mean {key} is {value} on rank "
        f"{dist.get_rank()} ({where}); stopping the run ({resume}){hint}")


def train(forward_step_func: Callable, model: list[nn.Module],
          optimizer: MixedPrecisionOptimizer, opt_param_scheduler: OptimizerParamScheduler,
          train_data_iterator: Iterator, valid_data_iterator: Iterator | None,
          cfg: JobConfig, logger: TrainingLogger, *, state: TrainState | None = None,
          checkpoint_hook: Callable[..., None] | None = None,
          exit_conditions: ExitConditions | None = None,
          test_data_iterator: Iterator | None = None) -> TrainState:
    """Run iterations from ``state`` (default: the start) to the end of the run
    (`JobConfig.train_iterations`), or until ``exit_conditions`` stop it, then evaluate the
    test data. Evaluation iterations take the full global batch."""
    tr = cfg.training
    shared = {"seq_length": cfg.model.seq_length, "micro_batch_size": tr.micro_batch_size,
              "empty_unused_memory_level": tr.empty_unused_memory_level,
              "calculate_per_token_loss": tr.calculate_per_token_loss}
    per_microbatch = tr.micro_batch_size * parallel_state.get_data_parallel_world_size()

    def evaluate_iterator(iterator: Iterator, **extra) -> dict[str, float]:
        return evaluate(forward_step_func, iterator, model, eval_iters=tr.eval_iters,
                        num_microbatches=cfg.num_microbatches(dist.get_world_size()),
                        **shared, **extra)

    def evaluator(iterator: Iterator | None) -> Callable[[], dict[str, float]] | None:
        return None if iterator is None else lambda: evaluate_iterator(iterator)

    for chunk in model:
        chunk.train()
    return run_iterations(
        lambda batch: train_step(forward_step_func, train_data_iterator, model, optimizer,
                                 opt_param_scheduler, num_microbatches=batch // per_microbatch,
                                 lr_increment=batch if tr.counts_samples else 1,
                                 log_params_norm=cfg.logging.log_params_norm, **shared),
        cfg, logger, lr=opt_param_scheduler.get_lr, loss_scale=optimizer.get_loss_scale,
        decoupled_lr=None if tr.decoupled_lr is None else functools.partial(
            opt_param_scheduler.get_lr, param_group={"is_decoupled_lr": True}),
        evaluate=validation_evaluator(evaluate_iterator, valid_data_iterator, cfg),
        test=evaluator(test_data_iterator),
        state=state, checkpoint_hook=checkpoint_hook, exit_conditions=exit_conditions,
        check_replicas=functools.partial(check_param_hashes_across_dp_replicas, model),
        skip=lambda batch: skip_batches(train_data_iterator, batch // per_microbatch))


def run_iterations(step: Callable[[int], StepOutput], cfg: JobConfig, logger: TrainingLogger, *,
                   lr: Callable[[], float], loss_scale: Callable[[], float],
                   evaluate: Callable[[], dict[str, float] | list[dict[str, float]]] | None,
                   decoupled_lr: Callable[[], float] | None = None,
                   state: TrainState | None = None,
                   checkpoint_hook: Callable[..., None] | None = None,
                   exit_conditions: ExitConditions | None = None,
                   test: Callable[[], dict[str, float]] | None = None,
                   check_replicas: Callable[[int], None] | None = None,
                   skip: Callable[[int], None] | None = None) -> TrainState:
    """The loop around ``step(global_batch_size)``, one iteration (mp's `train_step`, or
    DeepSpeed's engine in `mp.training.deepspeed`): count iterations and samples, check the loss,
    log with ``lr()``, ``loss_scale()`` (and ``decoupled_lr()``), ``evaluate`` the validation data
    every ``eval_interval`` iterations and after the last, save every ``save_interval`` iterations
    and at the end, then evaluate the ``test`` data. When ``exit_conditions`` give a reason to stop
    before the last iteration, the run saves and ends there, without the final evaluations. With
    ``training.skip_train`` only the final evaluations happen, at ``state``'s iteration, printed but
    not written as scalars. Nothing is evaluated with ``eval_iters`` 0, except the validation
    data under ``data.full_validation`` (Megatron's ``do_valid``). An ``evaluate`` that returns
    a list (``data.multiple_validation_sets``) is reported set by set
    (`TrainingLogger.validation_sets`). Every
    ``non_persistent_save_interval`` iterations that no ``save_interval`` one falls on, the
    hook saves into the non-persistent directory (``checkpoint_hook(state, non_persistent=
    True)``). Every
    ``check_weight_hash_across_dp_replicas_interval`` iterations ``check_replicas(iteration)``
    compares the data-parallel replicas' weights, before any save (a drifted model is not
    saved). A ``checkpoint_hook`` with ``poll()`` and ``finish()`` (`mp.checkpointing.job.
    JobSaver`'s asynchronous saves) is polled after every iteration and finished before the
    loop ends, a non-finite loss's stop included. An iteration that starts with N iterations
    done, N in ``training.iterations_to_skip`` (Megatron's count), only reads its batch
    (``skip(global_batch_size)``) and counts its iteration and samples: no step, so the
    learning-rate schedule does not advance, and no log line, evaluation, save or exit check.
    Garbage collection (`ManualGC`) and profiling (`IterationProfiler`) happen around the
    iterations."""
    tr = cfg.training
    state = TrainState() if state is None else state
    check_loss = cfg.model.precision != "fp16"
    evaluated_at = None

    def run_evaluation(split: str, losses: Callable[[], dict | list[dict]]):
        logger.pause()
        collector.before_evaluation()
        results = losses()
        if isinstance(results, list):
            logger.validation_sets(state.iteration, results, write=not tr.skip_train)
        else:
            logger.evaluation(split, state.iteration, results, write=not tr.skip_train)
        collector.after_evaluation()
        logger.resume()

    def save():
        checkpoint_hook(state)
        state.last_saved_iteration = state.iteration

    def finish_saving():
        if hasattr(checkpoint_hook, "finish"):
            checkpoint_hook.finish()

    can_evaluate = evaluate is not None and (tr.eval_iters > 0 or cfg.data.full_validation)
    stop = None
    schedule = cfg.batch_schedule(dist.get_world_size())
    iterations = state.iteration if tr.skip_train else cfg.train_iterations(dist.get_world_size())
    skipped = set(tr.iterations_to_skip)
    if skipped and skip is None:
        raise ValueError(f"training.iterations_to_skip={tr.iterations_to_skip} needs a way to "
                         "read the skipped batches (run_iterations' skip)")
    with (ManualGC(tr) as collector,
          IterationProfiler(cfg.logging, dist.get_rank(), get_device()) as profiler):
        while state.iteration < iterations:
            batch = schedule.global_batch_size_at(state.consumed_train_samples)
            if state.iteration in skipped:  # Megatron's: the batch is read, no step is taken
                skip(batch)
                state.iteration += 1
                state.consumed_train_samples += batch
                continue
            profiler.before_iteration(state.iteration)
            out = step(batch)
            state.iteration += 1
            state.consumed_train_samples += batch
            if check_loss:
                try:
                    _check_finite(out, state)
                except NonFiniteLossError:
                    finish_saving()  # the checkpoint the message names is committed
                    raise
            logger.training_iteration(state.iteration, state.consumed_train_samples, out.losses,
                                      lr(), out.grad_norm, loss_scale(), out.update_successful,
                                      batch, params_norm=out.params_norm,
                                      num_zeros_in_grad=out.num_zeros_in_grad,
                                      decoupled_lr=None if decoupled_lr is None
                                      else decoupled_lr())
            if can_evaluate and tr.eval_interval and state.iteration % tr.eval_interval == 0:
                run_evaluation("validation", evaluate)
                evaluated_at = state.iteration
            if check_replicas and tr.check_weight_hash_across_dp_replicas_interval and \
                    state.iteration % tr.check_weight_hash_across_dp_replicas_interval == 0:
                check_replicas(state.iteration)
            if checkpoint_hook and tr.save_interval and state.iteration % tr.save_interval == 0:
                save()
            elif checkpoint_hook and tr.non_persistent_save_interval and \
                    state.iteration % tr.non_persistent_save_interval == 0:
                checkpoint_hook(state, non_persistent=True)  # the end still saves into save
            if hasattr(checkpoint_hook, "poll"):
                checkpoint_hook.poll()
            profiler.after_iteration(state.iteration)
            collector.after_iteration(state.iteration)
            if exit_conditions is not None and state.iteration < iterations:
                stop = exit_conditions.reason(state.iteration)
                if stop is not None:
                    break
        if can_evaluate and stop is None and evaluated_at != state.iteration:
            run_evaluation("validation", evaluate)
        if checkpoint_hook and not tr.skip_train and state.last_saved_iteration != state.iteration:
            save()
        finish_saving()
        if test is not None and tr.eval_iters > 0 and stop is None:
            run_evaluation("test", test)
    if stop is not None:
        logger.early_exit(state.iteration, stop)
    return state
