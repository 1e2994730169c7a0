"""Schedules: forward and backward over the micro-batches of one iteration.

Megatron-Core's contract. ``forward_step_func(data_iterator, model)`` takes the next
micro-batch from the iterator, runs the model and returns ``(output_tensor, loss_func)``;
``loss_func(output_tensor)`` returns ``(loss, {"lm loss": reported, ...})`` or ``(loss_sum,
num_tokens, {...})`` (`mp.pipeline_parallel.losses`). The schedule averages each micro-batch's
loss over the iteration (so gradients accumulate to the mean; with
``calculate_per_token_loss`` it keeps the sum and counts the tokens instead), runs backward
from it (times the loss scale, through ``grad_scale_func``), lets only the last micro-batch's
backward synchronise gradients (``model.no_sync()`` around the others), and finally calls
``finalize_model_grads_func(model_chunks, num_tokens)`` (``num_tokens`` None unless
``calculate_per_token_loss``). It returns the reported dicts, one per micro-batch.

`get_forward_backward_func` picks the schedule for the current layout; the pipelined ones
(1F1B, interleaved 1F1B) live in `mp.pipeline_parallel.pipelined` and keep the same contract.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mp import parallel_state
from mp.distributed import finalize_model_grads
from mp.pipeline_parallel.losses import microbatch_loss, scale_aux_losses
from mp.pipeline_parallel.pipelined import (
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
)


def forward_step(forward_step_func: Callable, data_iterator: Iterator, model: nn.Module,
                 num_microbatches: int, forward_data_store: list,
                 calculate_per_token_loss: bool = False) -> tuple[torch.Tensor,
                                                                  torch.Tensor | int]:
    """Run one micro-batch forward; append its reported values to ``forward_data_store``;
    return ``(the loss to backpropagate, its token count)`` (`microbatch_loss`)."""
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    return microbatch_loss(loss_func(output_tensor), num_microbatches, forward_data_store,
                           calculate_per_token_loss)


def backward_step(output_tensor: torch.Tensor, grad_scale_func: Callable | None) -> None:
    """Backward from a micro-batch's loss (as `forward_step` returned it), scaled for fp16."""
    if grad_scale_func is not None:
        output_tensor = grad_scale_func(output_tensor)
    torch.autograd.backward(output_tensor)


def _single(value, what: str):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"forward_backward_no_pipelining takes one {what}, got "
                             f"{len(value)} (virtual pipeline chunks need a pipelined schedule)")
        return value[0]
    return value


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator,
                                   model, num_microbatches: int, seq_length: int,
                                   micro_batch_size: int, forward_only: bool = False,
                                   grad_scale_func: Callable | None = None,
                                   finalize_model_grads_func: Callable | None =
                                   finalize_model_grads,
                                   calculate_per_token_loss: bool = False) -> list[dict]:
    """All micro-batches on one stage, each forward followed by its backward.

    ``model`` and ``data_iterator`` may be given bare or as one-element lists (Megatron
    passes lists). ``seq_length`` and ``micro_batch_size`` are the shapes pipelined schedules
    exchange; unused here but checked, so every schedule takes the same arguments.
    ``grad_scale_func`` (the optimizer's ``scale_loss``) and ``finalize_model_grads_func``
    and ``calculate_per_token_loss`` are what Megatron reads from the model config; they are
    arguments here. With ``forward_only`` nothing is differentiated (evaluation) and no
    gradients are touched.
    """
    model = _single(model, "model chunk")
    data_iterator = _single(data_iterator, "data iterator")
    for name, value in (("num_microbatches", num_microbatches), ("seq_length", seq_length),
                        ("micro_batch_size", micro_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    forward_data_store: list[dict] = []
    num_tokens = 0
    if not forward_only:
        scale_aux_losses(num_microbatches, grad_scale_func)
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        for i in range(num_microbatches):
            last = i == num_microbatches - 1
            with contextlib.nullcontext() if last or forward_only else no_sync():
                loss, tokens = forward_step(forward_step_func, data_iterator, model,
                                            num_microbatches, forward_data_store,
                                            calculate_per_token_loss)
                num_tokens = num_tokens + tokens
                if not forward_only:
                    backward_step(loss, grad_scale_func)
    if not forward_only and finalize_model_grads_func is not None:
        finalize_model_grads_func([model], num_tokens if calculate_per_token_loss else None)
    return forward_data_store


def get_forward_backward_func() -> Callable:
    """The schedule for the current layout: `forward_backward_no_pipelining` without pipeline
    parallelism, 1F1B with it, interleaved 1F1B with virtual stages."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return forward_backward_no_pipelining
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is None:
        return forward_backward_pipelining_without_interleaving
    return forward_backward_pipelining_with_interleaving
