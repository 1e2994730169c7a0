"""Pipelined schedules: 1F1B and interleaved 1F1B (Narayanan et al. 2021, section 2.2).

Both run ``m`` micro-batches through ``p`` stages and keep at most a stage-dependent number of
micro-batches' activations alive (1F1B: ``p - r`` on stage ``r``, not ``m`` as GPipe does).

1F1B on stage ``r``: ``min(p - r - 1, m)`` warm-up forwards, then ``m - warmup`` pairs of one
forward and one backward, then ``warmup`` cool-down backwards.

Interleaved (``v`` model chunks per rank), Megatron's schedule table: the micro-batches go in
groups of ``N`` consecutive ones (``microbatch_group_size_per_vp_stage``, by default ``p``; the
last group holds what is left), and each group runs through chunk 0, then chunk 1, ... before
the next group: virtual micro-batch ``k`` is the ``k``-th entry of `schedule_table`; backwards
walk the same table with the chunks reversed. Warm-up is ``2 (p - r - 1) + (v - 1) N`` forwards
(`interleaved_warmup`; all ``m v`` when ``m = p``), then 1F1B pairs, then cool-down. The bubble
shrinks by ``v``; a larger ``N`` holds more micro-batches in flight and switches chunks less
often. Megatron's rules on ``m`` (`mp.model.parallel_rules.interleaved_microbatches_rule`): with
``N = p`` a multiple of ``p``; else at least ``N``, the last group empty or at least ``p`` long.
Which step receives which chunk's tensor follows Megatron's ``recv_tensor_from_previous_stage``
(``receives`` in the schedule): the first rank's forward inputs and the last rank's backward
gradients come from the other end of the pipeline, ``p - 1`` steps behind; with ``N > p`` they
can arrive before their chunk's turn and wait in order.

An output already sent downstream keeps only its autograd graph: its data is freed (it is
never read again) and backward runs from the gradient the next stage sends back.

With ``overlap_p2p_comm`` (the model config's; Megatron's ``--overlap-p2p-communication``) the
interleaved schedule's steady phase posts the forward flow (send the activation, receive the
next input) right after each forward and waits for it only before the next forward, and the
backward flow (send the input gradient, receive the next output gradient) right after each
backward, waited for before the next backward: each exchange runs under the other pass's
compute instead of stopping both neighbours. The order of posts is the blocking schedule's.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable

import torch
from torch import nn
from torch.autograd import Variable

from mp import parallel_state
from mp.distributed import finalize_model_grads
from mp.model.parallel_rules import interleaved_microbatches_rule
from mp.pipeline_parallel.losses import microbatch_loss, scale_aux_losses
from mp.pipeline_parallel.p2p import P2P, _communicate, post


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class _Stage:
    """Forward and backward of one micro-batch on one model chunk of this rank; the last
    stage keeps the reported values and counts the loss's tokens."""

    def __init__(self, forward_step_func: Callable, num_microbatches: int,
                 grad_scale_func: Callable | None, forward_only: bool,
                 calculate_per_token_loss: bool):
        self.forward_step_func, self.num_microbatches = forward_step_func, num_microbatches
        self.grad_scale_func, self.forward_only = grad_scale_func, forward_only
        self.calculate_per_token_loss = calculate_per_token_loss
        self.forward_data_store: list[dict] = []
        self.num_tokens = 0
        if not forward_only:
            scale_aux_losses(num_microbatches, grad_scale_func)

    def finalize(self, finalize_model_grads_func: Callable | None,
                 models: list[nn.Module]) -> None:
        """After the last backward: ``finalize_model_grads_func`` (with the token count when
        the loss is per token)."""
        if not self.forward_only and finalize_model_grads_func is not None:
            finalize_model_grads_func(models, self.num_tokens if self.calculate_per_token_loss
                                      else None)

    def forward(self, model: nn.Module, data_iterator, input_tensor: torch.Tensor | None,
                is_last_stage: bool) -> torch.Tensor:
        """``[s, b, h]`` activations for the next stage, or on the last stage the loss to
        backpropagate (`microbatch_loss`)."""
        if input_tensor is not None and not self.forward_only:
            input_tensor.requires_grad_()
        _unwrap(model).set_input_tensor(input_tensor)
        output, loss_func = self.forward_step_func(data_iterator, model)
        if not is_last_stage:
            return output
        loss, num_tokens = microbatch_loss(loss_func(output), self.num_microbatches,
                                           self.forward_data_store,
                                           self.calculate_per_token_loss)
        self.num_tokens = self.num_tokens + num_tokens
        return loss

    def backward(self, input_tensor: torch.Tensor | None, output: torch.Tensor,
                 output_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of one micro-batch; the gradient for the previous stage (None on the
        first). ``output_grad`` is None on the last stage, where ``output`` is the loss."""
        if output_grad is None:
            if self.grad_scale_func is not None:
                output = self.grad_scale_func(output)
            torch.autograd.backward(output)
        else:
            # output's data was freed after sending; autograd.backward would check its shape
            Variable._execution_engine.run_backward(
                (output,), (output_grad,), False, False, (), True, True)
        return None if input_tensor is None else input_tensor.grad


def _free(output: torch.Tensor) -> None:
    """Drop the data of an output that the next stage has received (keep its graph)."""
    output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def _tensor_shape(model: nn.Module, seq_length: int, micro_batch_size: int):
    """What a stage sends: ``[s / CP (/ TP with sequence parallelism), b, h]``, in the
    model's dtype, or fp32 with ``fp32_residual_connection`` (the residual stream's; as
    Megatron's p2p and its inference wrappers do)."""
    config = _unwrap(model).config
    s = seq_length // config.context_parallel_size
    if config.sequence_parallel:
        s //= config.tensor_model_parallel_size
    dtype = torch.float32 if config.fp32_residual_connection else config.params_dtype
    return (s, micro_batch_size, config.hidden_size), dtype


def _no_sync_all(models: list[nn.Module]):
    stack = contextlib.ExitStack()
    for model in models:
        stack.enter_context(getattr(model, "no_sync", contextlib.nullcontext)())
    return stack


def forward_backward_pipelining_without_interleaving(
        *, forward_step_func: Callable, data_iterator, model, num_microbatches: int,
        seq_length: int, micro_batch_size: int, forward_only: bool = False,
        grad_scale_func: Callable | None = None,
        finalize_model_grads_func: Callable | None = finalize_model_grads,
        calculate_per_token_loss: bool = False) -> list[dict]:
    """1F1B over ``p`` stages; arguments as ``forward_backward_no_pipelining``."""
    model = model[0] if isinstance(model, (list, tuple)) else model
    data_iterator = (data_iterator[0] if isinstance(data_iterator, (list, tuple))
                     else data_iterator)
    p = parallel_state.get_pipeline_model_parallel_world_size()
    r = parallel_state.get_pipeline_model_parallel_rank()
    last = parallel_state.is_pipeline_last_stage()
    shape, dtype = _tensor_shape(model, seq_length, micro_batch_size)
    comm = P2P(shape, dtype, next(model.parameters()).device)
    stage = _Stage(forward_step_func, num_microbatches, grad_scale_func, forward_only,
                   calculate_per_token_loss)
    warmup = min(p - r - 1, num_microbatches)
    steady = num_microbatches - warmup
    inputs: deque = deque()
    outputs: deque = deque()

    def run_forward(input_tensor):
        output = stage.forward(model, data_iterator, input_tensor, last)
        return output

    with torch.no_grad() if forward_only else contextlib.nullcontext(), _no_sync_all([model]):
        for _ in range(warmup):
            input_tensor = comm.recv_forward()
            output = run_forward(input_tensor)
            comm.send_forward(output)
            if not forward_only:
                inputs.append(input_tensor)
                outputs.append(output)
                if not last:
                    _free(output)
        input_tensor = comm.recv_forward() if steady > 0 else None
        for i in range(steady):
            final = i == steady - 1
            output = run_forward(input_tensor)
            if forward_only:
                comm.send_forward(output)
                input_tensor = None if final else comm.recv_forward()
                continue
            output_grad = comm.send_forward_recv_backward(output)
            inputs.append(input_tensor)
            outputs.append(output)
            if not last:
                _free(output)
            input_grad = stage.backward(inputs.popleft(), outputs.popleft(), output_grad)
            if final:
                comm.send_backward(input_grad)
            else:
                input_tensor = comm.send_backward_recv_forward(input_grad)
        if not forward_only:
            for _ in range(warmup):
                output_grad = comm.recv_backward()
                comm.send_backward(stage.backward(inputs.popleft(), outputs.popleft(),
                                                  output_grad))
    stage.finalize(finalize_model_grads_func, [model])
    return stage.forward_data_store


def schedule_table(num_microbatches: int, num_chunks: int, group: int) -> list[tuple[int, int]]:
    """Megatron's ``get_schedule_table``: ``(micro-batch, chunk)`` of each virtual micro-batch
    in forward order. Micro-batches go in groups of ``group`` consecutive ones (the last group
    what is left); each group runs through every chunk in turn before the next group."""
    table = []
    for start in range(0, num_microbatches, group):
        stop = min(start + group, num_microbatches)
        table += [(mb, c) for c in range(num_chunks) for mb in range(start, stop)]
    return table


def interleaved_warmup(p: int, r: int, num_microbatches: int, num_chunks: int,
                       group: int) -> int:
    """Warm-up forwards of stage ``r`` of ``p`` in the interleaved schedule: Megatron's
    ``2 (p - r - 1) + (v - 1) N`` for groups of ``N``, at most all ``m v``; all of them when
    ``m = p`` (Megatron's rule before micro-batch groups; it keeps the all-forward-then-all-
    backward order there, as mp always ran it, where Megatron now runs 1F1B on later stages).
    """
    total = num_microbatches * num_chunks
    if num_microbatches == p:
        return total
    return min(2 * (p - r - 1) + (num_chunks - 1) * group, total)


def forward_backward_pipelining_with_interleaving(
        *, forward_step_func: Callable, data_iterator, model, num_microbatches: int,
        seq_length: int, micro_batch_size: int, forward_only: bool = False,
        grad_scale_func: Callable | None = None,
        finalize_model_grads_func: Callable | None = finalize_model_grads,
        calculate_per_token_loss: bool = False) -> list[dict]:
    """Interleaved 1F1B: ``model`` and ``data_iterator`` are lists, one per model chunk."""
    models, iterators = list(model), list(data_iterator)
    p = parallel_state.get_pipeline_model_parallel_world_size()
    r = parallel_state.get_pipeline_model_parallel_rank()
    v = len(models)
    if len(iterators) != v:
        raise ValueError(f"{v} model chunks but {len(iterators)} data iterators")
    group = _unwrap(models[0]).config.microbatch_group_size_per_vp_stage or p
    if group < p:
        raise ValueError(f"microbatch_group_size_per_vp_stage={group} must be at least "
                         f"pipeline_model_parallel_size={p} (Megatron's rule)")
    rule = interleaved_microbatches_rule(num_microbatches, p, group)
    if rule is not None:
        raise ValueError(f"the interleaved schedule needs num_microbatches={num_microbatches} "
                         f"{rule}")
    m = num_microbatches
    total = m * v
    all_warmup = m == p
    warmup = interleaved_warmup(p, r, m, v, group)
    chunk_of = [c for _, c in schedule_table(m, v, group)]
    shape, dtype = _tensor_shape(models[0], seq_length, micro_batch_size)
    device = next(models[0].parameters()).device
    stage = _Stage(forward_step_func, m, grad_scale_func, forward_only,
                   calculate_per_token_loss)
    inputs = [deque() for _ in range(v)]
    outputs = [deque() for _ in range(v)]
    output_grads = [deque() for _ in range(v)]
    first_rank, last_rank = r == 0, r == p - 1
    overlap = _unwrap(models[0]).config.overlap_p2p_comm

    def exchange(send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        return _communicate(send_next=send_next, send_prev=send_prev, recv_prev=recv_prev,
                            recv_next=recv_next, tensor_shape=shape, dtype=dtype, device=device)

    def chunk(k: int, forward: bool) -> int:
        """The model chunk of virtual micro-batch ``k`` (backwards: the chunks reversed)."""
        c = chunk_of[k % total]
        return c if forward else v - 1 - c

    def receives(k: int, forward: bool) -> tuple[bool, int]:
        """Megatron's ``recv_tensor_from_previous_stage``: whether this rank receives (an input
        in forward, an output gradient in backward) with step ``k``, and for which chunk."""
        if not (first_rank if forward else last_rank):
            return True, chunk(k + 1, forward)
        if k < p - 1:  # the other end of the pipeline, p - 1 steps behind, sent nothing yet
            return False, chunk(k + 1, forward)
        c = chunk(k - (p - 1), forward)  # what the other end's step of now produced
        return c != (v - 1 if forward else 0), c + 1 if forward else c - 1

    def run_forward(k: int):
        c = chunk(k, True)
        parallel_state.set_virtual_pipeline_model_parallel_rank(c)
        if parallel_state.is_pipeline_first_stage() and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)
        is_last = parallel_state.is_pipeline_last_stage()
        # inputs of later micro-batches may wait behind this one's (groups longer than p)
        output = stage.forward(models[c], iterators[c], inputs[c][len(outputs[c])], is_last)
        outputs[c].append(output)
        if forward_only:
            inputs[c].popleft()
            outputs[c].pop()
        return None if is_last else output  # nothing to send from the very last chunk

    def run_backward(k: int):
        c = chunk(k, False)
        parallel_state.set_virtual_pipeline_model_parallel_rank(c)
        if parallel_state.is_pipeline_last_stage() and not output_grads[c]:
            output_grads[c].append(None)
        input_grad = stage.backward(inputs[c].popleft(), outputs[c].popleft(),
                                    output_grads[c].popleft())
        return None if parallel_state.is_pipeline_first_stage() else input_grad

    def free_sent(output):
        if output is not None and not forward_only:
            _free(output)

    pending = {"forward": [], "backward": []}  # posted, not yet waited: (requests, sent output)

    def post_flow(flow: str, send_next=None, **kw):
        from_prev, from_next, requests = post(send_next=send_next, tensor_shape=shape,
                                              dtype=dtype, device=device, **kw)
        pending[flow].append((requests, send_next))
        return from_prev, from_next

    def wait(flow: str):
        for requests, sent in pending[flow]:
            for request in requests:
                request.wait()
            free_sent(sent)
        pending[flow].clear()

    with torch.no_grad() if forward_only else contextlib.nullcontext(), _no_sync_all(models):
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
        inputs[0].append(exchange(recv_prev=not first_rank)[0])
        for k in range(warmup):
            output = run_forward(k)
            recv_prev, next_chunk = receives(k, True)
            recv_prev = recv_prev and k != total - 1
            if k == warmup - 1 and not forward_only and not all_warmup:
                from_prev, from_next = exchange(send_next=output, recv_prev=recv_prev,
                                                recv_next=not last_rank)
                output_grads[v - 1].append(from_next)
            else:
                from_prev, _ = exchange(send_next=output, recv_prev=recv_prev)
            free_sent(output)
            if recv_prev:
                inputs[next_chunk].append(from_prev)

        for i in range(total - warmup):
            fk, bk = i + warmup, i
            if overlap:
                wait("forward")  # this forward's input
            output = run_forward(fk)
            recv_prev, next_fwd = receives(fk, True)
            recv_prev = recv_prev and i != total - warmup - 1
            if overlap:
                from_prev, _ = post_flow("forward", send_next=output, recv_prev=recv_prev)
                output = None  # sent (and freed) in the background
            input_grad = None
            if not forward_only:
                if overlap:
                    wait("backward")  # this backward's output gradient
                input_grad = run_backward(bk)
            recv_next, next_bwd = receives(bk, False)
            recv_next = recv_next and not forward_only
            if overlap:
                _, from_next = post_flow("backward", send_prev=input_grad, recv_next=recv_next)
            else:
                from_prev, from_next = exchange(send_next=output, send_prev=input_grad,
                                                recv_prev=recv_prev, recv_next=recv_next)
                free_sent(output)
            if recv_prev:
                inputs[next_fwd].append(from_prev)
            if recv_next:
                output_grads[next_bwd].append(from_next)
        wait("forward")
        wait("backward")

        if not forward_only:
            if all_warmup:
                output_grads[v - 1].append(exchange(recv_next=not last_rank)[1])
            for k in range(total - warmup, total):
                input_grad = run_backward(k)
                recv_next, next_chunk = receives(k, False)
                recv_next = recv_next and k != total - 1
                _, from_next = exchange(send_prev=input_grad, recv_next=recv_next)
                if recv_next:
                    output_grads[next_chunk].append(from_next)
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    stage.finalize(finalize_model_grads_func, models)
    return stage.forward_data_store
