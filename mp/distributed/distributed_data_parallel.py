"""Data parallelism: fp32 gradient buckets, all-reduced over the data-parallel group.

Megatron-Core's ``DistributedDataParallel`` idea, plainly:

- Every trainable parameter gets ``param.main_grad``, an fp32 view into one contiguous buffer.
  After autograd accumulates a parameter's gradient, a post-accumulate-grad hook adds it to
  ``main_grad`` and frees ``param.grad``, so gradients sum in fp32 across micro-batches
  whatever the parameter dtype (bf16 and fp16 included).
- The buffer is cut into buckets of about ``bucket_size`` elements, in reverse parameter order
  (roughly the order backward produces gradients). A bucket is all-reduced as one tensor.
- ``overlap_grad_reduce``: during the backward of the micro-batch that synchronises, a
  bucket's all-reduce starts asynchronously as soon as its last gradient is in, and overlaps
  the rest of backward. Buckets are launched strictly in order (a ready bucket waits for the
  ones before it), so every rank issues the same collectives in the same order whatever order
  its hooks fire in. ``finish_grad_sync()`` launches what is left (buckets of unused
  parameters, or everything when not overlapping) and waits.
- ``no_sync()``: micro-batches run inside it only accumulate; nothing is communicated until
  the last micro-batch's backward.
- Averaging: each bucket is multiplied by ``1 / DP`` before a SUM all-reduce, so ``main_grad``
  holds the data-parallel mean (the loss of each rank being a mean over its own samples).

With one data-parallel rank nothing is communicated and no readiness is tracked; only the
accumulation into ``main_grad`` remains (which mixed precision needs anyway).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state

DEFAULT_BUCKET_SIZE = 40_000_000  # elements (Megatron-Core's default)


@dataclass(eq=False)
class _Bucket:
    """A contiguous slice of the gradient buffer and the parameters whose grads live in it."""

    index: int
    data: torch.Tensor
    params: frozenset
    ready: set = field(default_factory=set)
    handle: object = None  # the async all-reduce's Work once launched
    launched: bool = False


class DistributedDataParallel(nn.Module):
    """Wrap ``module`` for data parallelism (see the module doc).

    Args:
        module: the model (chunk); its parameters must all live on one device.
        data_parallel_group: default ``parallel_state.get_data_parallel_group()``.
        overlap_grad_reduce: start each bucket's all-reduce during backward.
        bucket_size: elements per bucket (a parameter is never split; a bucket closes once it
            holds at least this many); None puts everything in one bucket.
    """

    def __init__(self, module: nn.Module, *, data_parallel_group=None,
                 overlap_grad_reduce: bool = True, bucket_size: int | None = DEFAULT_BUCKET_SIZE):
        super().__init__()
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size={bucket_size} must be a positive number of elements "
                             "or None (one bucket)")
        self.module = module
        self.data_parallel_group = (parallel_state.get_data_parallel_group()
                                    if data_parallel_group is None else data_parallel_group)
        self.data_parallel_size = dist.get_world_size(self.data_parallel_group)
        self.overlap_grad_reduce = overlap_grad_reduce
        params = [p for p in module.parameters() if p.requires_grad][::-1]
        if not params:
            raise ValueError("DistributedDataParallel: the module has no trainable parameters")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"DistributedDataParallel: parameters on several devices {devices}")
        self.grad_buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32,
                                       device=params[0].device)
        self.buckets = self._make_buckets(params, bucket_size)
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._next_to_launch = 0
        self._sync_enabled = True
        for param in params:
            param.register_post_accumulate_grad_hook(self._grad_ready)

    def _make_buckets(self, params: list[nn.Parameter], bucket_size: int | None) -> list[_Bucket]:
        buckets, members, start, offset = [], [], 0, 0
        for i, param in enumerate(params):
            param.main_grad = self.grad_buffer[offset:offset + param.numel()].view_as(param)
            members.append(param)
            offset += param.numel()
            last = i == len(params) - 1
            if last or (bucket_size is not None and offset - start >= bucket_size):
                buckets.append(_Bucket(len(buckets), self.grad_buffer[start:offset],
                                       frozenset(members)))
                members, start = [], offset
        return buckets

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # --- backward hooks -----------------------------------------------------------------

    @torch.no_grad()
    def _grad_ready(self, param: nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if self._sync_enabled and self.overlap_grad_reduce and self.data_parallel_size > 1:
            bucket = self._bucket_of[param]
            if bucket.launched:
                raise RuntimeError(
                    f"a parameter of shape {tuple(param.shape)} got a second gradient after its "
                    f"bucket's all-reduce started (it is used twice in one backward across "
                    f"graphs?); build DistributedDataParallel with overlap_grad_reduce=False")
            bucket.ready.add(param)
            while (self._next_to_launch < len(self.buckets)
                   and len(self.buckets[self._next_to_launch].ready)
                   == len(self.buckets[self._next_to_launch].params)):
                self._launch(self.buckets[self._next_to_launch])

    def _launch(self, bucket: _Bucket) -> None:
        bucket.data.mul_(1.0 / self.data_parallel_size)
        bucket.handle = dist.all_reduce(bucket.data, group=self.data_parallel_group,
                                        async_op=True)
        bucket.launched = True
        self._next_to_launch = bucket.index + 1

    # --- the public protocol (Megatron-Core's names) ------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate into ``main_grad``; no communication."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet in flight, wait for all: ``main_grad`` then holds the
        data-parallel mean. Call once after the last micro-batch's backward."""
        if self.data_parallel_size > 1:
            for bucket in self.buckets[self._next_to_launch:]:
                self._launch(bucket)
            for bucket in self.buckets:
                bucket.handle.wait()
        self._reset_buckets()

    def zero_grad_buffer(self) -> None:
        """Zero every ``main_grad`` (one fill of the buffer); call before each iteration."""
        self.grad_buffer.zero_()
        for param in self._bucket_of:
            param.grad = None
        self._reset_buckets()

    def _reset_buckets(self) -> None:
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.handle, bucket.launched = None, False
        self._next_to_launch = 0

    def state_dict(self, *args, **kwargs):
        """The wrapped module's (no ``module.`` prefix: checkpoints do not depend on DP)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)
