"""Losses as the training log reports them, and evaluation (Megatron's ``evaluate``).

`average_losses` averages an iteration's reported losses over its micro-batches and the
data-parallel ranks (one all-reduce; with ``training.calculate_per_token_loss``, total loss over
total tokens) and hands them from the last pipeline stage to the others. `evaluate` measures
them over forward-only iterations with the models in eval mode; `validation_evaluator` makes a
run's validation: ``eval_iters`` global batches, or with ``data.full_validation`` the whole
validation split once (restarted at each evaluation), and with
``data.multiple_validation_sets`` one result per ``valid_data_path`` dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.config import JobConfig
from mp.pipeline_parallel.schedules import get_forward_backward_func
from mp.training.data import ValidationSets


def _sum_and_count(values: list[torch.Tensor], per_token: bool) -> torch.Tensor:
    """``[numerator, denominator]`` (float64) of the mean of one reported key over
    micro-batches: a value is a micro-batch's mean (one element) or its ``[loss sum, token
    count]`` (two), whose ratio is averaged over the micro-batches that count tokens, or
    summed when ``per_token``."""
    pairs = torch.stack([v.detach().double().view(-1) for v in values])
    if pairs.size(1) == 1:
        return torch.stack([pairs.sum(), pairs.new_tensor(float(len(values)))])
    if per_token:
        return pairs.sum(0)
    counted = pairs[pairs[:, 1] > 0]
    return torch.stack([(counted[:, 0] / counted[:, 1]).sum(),
                        counted.new_tensor(float(len(counted)))])


def average_losses(per_microbatch: list[dict], calculate_per_token_loss: bool = False
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """(the data-parallel mean, this rank's own mean) over micro-batches, as floats: the mean
    of the micro-batches' losses, or with ``calculate_per_token_loss`` the sum of their loss
    sums over the sum of their token counts (Megatron's per-token reporting). Only the last
    pipeline stage computes losses; it sends the result to the other stages."""
    result = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        keys = list(per_microbatch[0])
        local = torch.stack([_sum_and_count([d[k] for d in per_microbatch],
                                            calculate_per_token_loss) for k in keys])
        reduced = local.clone()
        if parallel_state.get_data_parallel_world_size() > 1:
            dist.all_reduce(reduced, group=parallel_state.get_data_parallel_group())
        local_values, reduced_values = (t[:, 0] / t[:, 1] for t in (local, reduced))
        result = (dict(zip(keys, reduced_values.tolist())),
                  dict(zip(keys, local_values.tolist())))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        result = box[0]
    return result


def evaluate(forward_step_func: Callable, data_iterator: Iterator, model: list[nn.Module], *,
             eval_iters: int, num_microbatches: int, seq_length: int,
             micro_batch_size: int, empty_unused_memory_level: int = 0,
             calculate_per_token_loss: bool = False,
             total_microbatches: int | None = None) -> dict[str, float]:
    """The reported losses of ``eval_iters`` forward-only iterations (models in eval mode, no
    gradients) averaged over all their micro-batches and the data-parallel ranks, or per
    token (`average_losses`); the CUDA cache is emptied after each at
    ``empty_unused_memory_level`` >= 1. Given ``total_microbatches`` (a full validation),
    ``eval_iters`` is not used: iterations of ``num_microbatches`` run until that many
    micro-batches are read, the last iteration taking what is left."""
    counts = [num_microbatches] * eval_iters if total_microbatches is None else \
        [min(num_microbatches, total_microbatches - done)
         for done in range(0, total_microbatches, num_microbatches)]
    for chunk in model:
        chunk.eval()
    losses: list[dict] = []
    try:
        for count in counts:
            losses += get_forward_backward_func()(
                forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
                num_microbatches=count, seq_length=seq_length,
                micro_batch_size=micro_batch_size, forward_only=True)
            if empty_unused_memory_level >= 1:
                torch.cuda.empty_cache()
    finally:
        for chunk in model:
            chunk.train()
    return average_losses(losses, calculate_per_token_loss)[0]


def validation_evaluator(evaluate_iterator: Callable[..., dict[str, float]],
                         valid_data_iterator, cfg: JobConfig
                         ) -> Callable[[], dict[str, float] | list[dict[str, float]]] | None:
    """The validation of a run: ``evaluate_iterator(iterator, **extra)`` (`evaluate` bound to
    the model and shapes) over ``valid_data_iterator``, which is as
    `mp.training.data.build_data_iterators` returns it, or a list of those, one per model
    chunk. With ``data.full_validation`` each call restarts the `ValidationPass` iterators and
    reads their ``num_microbatches`` (made a multiple of the pipeline size under the
    interleaved schedule, which needs it), with ``data.multiple_validation_sets`` it returns
    one result per validation set (a list). None without validation data."""
    if valid_data_iterator is None:
        return None
    chunked = isinstance(valid_data_iterator, list) and \
        not isinstance(valid_data_iterator, ValidationSets)
    per_chunk = valid_data_iterator if chunked else [valid_data_iterator]
    multiple = isinstance(per_chunk[0], ValidationSets)
    # [set][chunk]: each set's iterator, or each chunk's iterator of it
    sets = [list(chunks) for chunks in zip(*per_chunk)] if multiple else [per_chunk]
    sets = [chunks if chunked else chunks[0] for chunks in sets]

    def one(iterator) -> dict[str, float]:
        if not cfg.data.full_validation:
            return evaluate_iterator(iterator)
        passes = iterator if isinstance(iterator, list) else [iterator]
        for chunk_pass in passes:
            chunk_pass.restart()
        total = passes[0].num_microbatches
        if cfg.model.virtual_pipeline_model_parallel_size is not None:
            total -= total % cfg.model.pipeline_model_parallel_size
        return evaluate_iterator(iterator, total_microbatches=total)

    if multiple:
        return lambda: [one(iterator) for iterator in sets]
    return lambda: one(sets[0])
