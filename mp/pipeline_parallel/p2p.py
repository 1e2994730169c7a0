"""Point-to-point communication between adjacent pipeline stages.

Stage ``r`` sends activations ``[s, b, h]`` forward to stage ``r + 1`` and receives their
gradients back. With sequence parallelism the pipeline carries the ``[s / t, b, h]`` shard
that each TP rank already holds (``tensor_shape`` says which). All sends and receives of one
step are posted together with ``torch.distributed.batch_isend_irecv``, so a stage that both
sends and receives cannot deadlock against its neighbour whatever order they post in.

Peers are global ranks from ``parallel_state`` (the next/previous rank in this rank's
pipeline group); on the first stage there is no previous stage to receive from and on the last
no next stage to send to: callers only ask for what exists (the schedules do).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mp import parallel_state


def post(*, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
         recv_prev: bool = False, recv_next: bool = False,
         tensor_shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
         device: torch.device | None = None
         ) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
    """Post every requested send and receive at once, without waiting; return
    ``(from_prev, from_next, requests)``: the receive buffers are filled once every request
    is waited for (and a sent tensor may be changed only then)."""
    if (recv_prev or recv_next) and (tensor_shape is None or dtype is None or device is None):
        raise ValueError("receiving needs tensor_shape, dtype and device")
    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
    prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
    group = parallel_state.get_pipeline_model_parallel_group()  # peers stay global ranks
    from_prev = torch.empty(tensor_shape, dtype=dtype, device=device) if recv_prev else None
    from_next = torch.empty(tensor_shape, dtype=dtype, device=device) if recv_next else None
    # Messages between two ranks are matched in the order they are posted. Post the forward
    # flow (activations: send next, receive prev) before the backward flow (gradients: send
    # prev, receive next) on every rank, so that with two stages -- where next and prev are
    # the same peer -- an activation is never taken for a gradient. (Split into two posts,
    # forward flow first, the order is the same.)
    ops = []
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, send_next.contiguous(), next_rank, group))
    if from_prev is not None:
        ops.append(dist.P2POp(dist.irecv, from_prev, prev_rank, group))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), prev_rank, group))
    if from_next is not None:
        ops.append(dist.P2POp(dist.irecv, from_next, next_rank, group))
    return from_prev, from_next, dist.batch_isend_irecv(ops) if ops else []


def _communicate(**kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`post`, then wait: ``(from_prev, from_next)``."""
    from_prev, from_next, requests = post(**kwargs)
    for request in requests:
        request.wait()
    return from_prev, from_next


class P2P:
    """The sends and receives of one pipeline rank, for activations of one shape and dtype.

    Megatron's functions by name: ``recv_forward``, ``send_forward``, ``recv_backward``,
    ``send_backward`` and the paired forms the steady 1F1B phase uses. Calls on the first
    (last) stage that would talk to a previous (next) stage do nothing and return None.
    """

    def __init__(self, tensor_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.tensor_shape, self.dtype, self.device = tuple(tensor_shape), dtype, device

    def _first(self) -> bool:
        return parallel_state.is_pipeline_first_stage()

    def _last(self) -> bool:
        return parallel_state.is_pipeline_last_stage()

    def _run(self, **kw):
        return _communicate(tensor_shape=self.tensor_shape, dtype=self.dtype,
                            device=self.device, **kw)

    def recv_forward(self) -> torch.Tensor | None:
        return None if self._first() else self._run(recv_prev=True)[0]

    def send_forward(self, output: torch.Tensor) -> None:
        if not self._last():
            self._run(send_next=output)

    def recv_backward(self) -> torch.Tensor | None:
        return None if self._last() else self._run(recv_next=True)[1]

    def send_backward(self, input_grad: torch.Tensor) -> None:
        if not self._first():
            self._run(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor | None:
        return None if self._last() else self._run(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor) -> torch.Tensor | None:
        return None if self._first() else self._run(send_prev=input_grad, recv_prev=True)[0]
