"""The contiguous gradient (and, with the distributed optimizer, parameter) buffer of
`mp.distributed.DistributedDataParallel`, its buckets and each bucket's collectives (Megatron-
Core's ``param_and_grad_buffer.py``).

A `GradBuffer` holds the parameters reduced over one group back to back, cut into `Bucket`\\ s
(`plan_buckets`). Its collectives, per bucket:

- all-reduce (no distributed optimizer, or a tied embedding copy's own bucket): the bucket
  over the whole reduction group (DP x CP, or the experts' EDP);
- reduce-scatter (distributed optimizer): the bucket over the shard group, this rank keeping
  its shard; with several distributed-optimizer instances (``inter_group``) the shard is then
  all-reduced across the instances (Megatron-Core's order: the reduce-scatter inside the
  instance, then the all-reduce of the reduced shard across instances), so the owned shard
  holds the sum over the whole group. With one instance the shard group is the whole group;
- all-gather (distributed optimizer, after the step): every shard of the bucket's parameters
  over the shard group (the instances hold equal copies, so nothing crosses them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from mp.comm import all_gather_single, reduce_scatter_single


@dataclass(eq=False)
class Bucket:
    """A contiguous slice ``[start, end)`` of a `GradBuffer`'s gradients (and, with the
    distributed optimizer, parameters) and the parameters whose elements live in it."""

    buffer: GradBuffer
    index: int  # in its buffer
    start: int
    end: int
    data: torch.Tensor  # the gradient buffer's slice, [end - start]
    params: frozenset
    all_reduce: bool = True  # False: reduce-scatter (distributed optimizer)
    ready: set = field(default_factory=set)
    handle: object = None  # the async gradient reduction's Work once launched
    inter_handle: object = None  # the cross-instance all-reduce's Work once launched
    launched: bool = False
    param_data: torch.Tensor | None = None  # the parameter buffer's slice (distributed opt.)
    param_handle: object = None  # the async parameter all-gather's Work while in flight

    def shard(self, rank: int, size: int) -> tuple[int, int]:
        """Shard-group rank ``rank``'s ``[start, end)`` of the buffer (of ``size`` ranks)."""
        length = (self.end - self.start) // size
        return self.start + rank * length, self.start + (rank + 1) * length

    def owned(self) -> tuple[int, int]:
        """This rank's ``[start, end)`` of the bucket, in its buffer's coordinates."""
        return self.shard(self.buffer.shard_rank, self.buffer.shard_size)


@dataclass(eq=False)
class GradBuffer:
    """The parameters reduced over one group, back to back: their gradients (``grads``,
    ``[elements]``), with the distributed optimizer their values (``params``, the same
    shape), cut into ``buckets``.

    ``group`` (``size`` ranks) is the whole reduction group; ``shard_group`` the ranks the
    distributed optimizer shards the buckets over (one instance; ``group`` itself with one
    instance); ``inter_group`` the ranks at this rank's place in each instance (None with
    one instance, ``inter_size`` 1)."""

    group: dist.ProcessGroup
    shard_group: dist.ProcessGroup
    inter_group: dist.ProcessGroup | None = None
    buckets: list[Bucket] = field(default_factory=list)
    grads: torch.Tensor | None = None
    params: torch.Tensor | None = None
    next_to_launch: int = 0  # buckets launch strictly in order
    awaiting_inter: list[Bucket] = field(default_factory=list)  # reduce-scattered, not yet
    # all-reduced across instances

    def __post_init__(self):
        self.size = dist.get_world_size(self.group)
        self.shard_size = dist.get_world_size(self.shard_group)
        self.shard_rank = dist.get_rank(self.shard_group)
        self.inter_size = 1 if self.inter_group is None else dist.get_world_size(self.inter_group)
        if self.shard_size * self.inter_size != self.size:
            raise ValueError(f"a shard group of {self.shard_size} ranks x {self.inter_size} "
                             f"instances is not the reduction group's {self.size} ranks")

    # --- gradients --------------------------------------------------------------------------

    def start_grad_sync(self, bucket: Bucket) -> None:
        """Launch ``bucket``'s reduction asynchronously (module doc); with several instances,
        the previous buckets' cross-instance all-reduces once their reduce-scatters are done
        (so every rank issues each group's collectives in bucket order)."""
        if bucket.all_reduce:
            bucket.handle = dist.all_reduce(bucket.data, group=self.group, async_op=True)
        else:
            start, end = bucket.owned()
            if self.shard_size > 1:
                bucket.handle = reduce_scatter_single(self.grads[start:end], bucket.data,
                                                      group=self.shard_group, async_op=True)
            if self.inter_group is not None:
                self.start_inter_instance_sync()
                self.awaiting_inter.append(bucket)
        bucket.launched = True
        self.next_to_launch = bucket.index + 1

    def start_inter_instance_sync(self) -> None:
        """All-reduce across the instances the owned shard of every bucket whose
        reduce-scatter was launched (waiting for each first)."""
        for bucket in self.awaiting_inter:
            if bucket.handle is not None:  # waited once only: a gloo reduce-scatter's second
                bucket.handle.wait()  # wait would copy its result over the all-reduced shard
                bucket.handle = None
            start, end = bucket.owned()
            bucket.inter_handle = dist.all_reduce(self.grads[start:end], group=self.inter_group,
                                                  async_op=True)
        self.awaiting_inter.clear()

    def finish_grad_sync(self) -> None:
        """Wait for every bucket's reduction (all launched)."""
        self.start_inter_instance_sync()
        for bucket in self.buckets:
            for handle in (bucket.handle, bucket.inter_handle):
                if handle is not None:
                    handle.wait()

    def reset(self) -> None:
        """Forget what the last synchronisation launched."""
        self.next_to_launch = 0
        self.awaiting_inter.clear()
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.handle = bucket.inter_handle = None
            bucket.launched = False

    # --- parameters -------------------------------------------------------------------------

    def start_param_sync(self, async_op: bool) -> None:
        """All-gather every bucket's parameters from the shards their owners updated, over the
        shard group (the first layers' buckets first)."""
        if self.shard_size == 1:
            return
        for bucket in reversed(self.buckets):
            start, end = bucket.owned()
            bucket.param_handle = all_gather_single(bucket.param_data, self.params[start:end],
                                                    group=self.shard_group, async_op=async_op)


def plan_buckets(buffer: GradBuffer, params: list[nn.Parameter], bucket_size: int | None,
                 use_distributed_optimizer: bool) -> dict[nn.Parameter, tuple[int, int]]:
    """Lay ``params`` out back to back and cut ``buffer``'s buckets (their ``data`` left
    None); return each parameter's ``[start, end)`` in the buffer. A bucket closes once it
    holds at least ``bucket_size`` elements (None: one bucket). With the distributed optimizer
    each bucket is padded to a multiple of the shard group's size and a tied embedding copy
    (``embedding_group_sync``) gets a bucket of its own, all-reduced, since the two stages'
    shards of it differ; the other buckets are reduce-scattered."""
    ranges: dict[nn.Parameter, tuple[int, int]] = {}
    buckets, members, start, offset = buffer.buckets, [], 0, 0
    pad = buffer.shard_size if use_distributed_optimizer else 1

    def close(all_reduce: bool):
        nonlocal members, start, offset
        offset = -(-offset // pad) * pad
        buckets.append(Bucket(buffer, len(buckets), start, offset, None,
                              frozenset(members), all_reduce=all_reduce))
        members, start = [], offset

    plain = not use_distributed_optimizer
    for param in params:
        isolate = use_distributed_optimizer and getattr(param, "embedding_group_sync", False)
        if isolate and members:
            close(plain)
        ranges[param] = (offset, offset + param.numel())
        members.append(param)
        offset += param.numel()
        if isolate or (bucket_size is not None and offset - start >= bucket_size):
            close(isolate or plain)
    if members:
        close(plain)
    return ranges
