"""`ParamShard`: the elements ``[start, end)`` (row-major) of a model parameter that one
rank's optimizer updates, with their fp32 master (on the device, or in host memory with
``cpu_offload``), and the helpers that place and copy the masters (`mp.optim.optimizer` uses
them). Under FSDP (`mp.distributed.torch_fsdp2`) a shard is the rows of a ``DTensor``
parameter this rank holds, its local tensor the master, updated in place; the gradient norm
then sums over every rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mp.distributed.torch_fsdp2 import local_tensor


@dataclass(eq=False)
class ParamShard:
    """Elements ``[start, end)`` of ``param`` (row-major) and their fp32 ``main`` (the master
    AdamW updates): the parameter itself (fp32, whole), a view of it (fp32, part), or an fp32
    copy (bf16/fp16), shaped like the parameter when whole, else 1-D."""

    param: nn.Parameter
    start: int
    end: int
    main: torch.Tensor
    offloaded: bool = False  # ``main`` a host copy (``cpu_offload``)
    host_grad: torch.Tensor | None = None  # offloaded: the pinned buffer of its gradient

    @classmethod
    def make(cls, param: nn.Parameter, start: int, end: int,
             offload: bool = False) -> ParamShard:
        local = local_tensor(param)
        if local is not param:  # FSDP: the DTensor's local rows are the shard, in place
            if offload:
                raise ValueError("cpu_offload does not apply to FSDP's in-place rows")
            return cls(param, start, end, local if local.dtype == torch.float32
                       else local.detach().float())
        whole = start == 0 and end == param.numel()
        view = param.detach() if whole else param.detach().view(-1)[start:end]
        if offload:  # pinned, for asynchronous copies from the device
            main = torch.empty(view.shape, dtype=torch.float32, pin_memory=view.is_cuda)
            return cls(param, start, end, main.copy_(view), offloaded=True)
        if param.dtype == torch.float32:
            return cls(param, start, end, param if whole else view)
        return cls(param, start, end, view.float())

    @property
    def main_is_param(self) -> bool:
        """Whether the parameter holds the master's values (fp32): ``main`` is (a view of)
        it, or its host copy, written back after every step."""
        return self.param.dtype == torch.float32

    def copy_to_host_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` (this offloaded shard's fp32 gradient on the device) copied, asynchronously
        from CUDA, into the pinned host buffer, made at the first call; returns the buffer."""
        if self.host_grad is None:
            self.host_grad = torch.empty(self.main.shape, dtype=torch.float32,
                                         pin_memory=grad.is_cuda)
        return self.host_grad.copy_(grad, non_blocking=True)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This shard's elements of ``tensor`` (shaped like ``param``; an FSDP ``DTensor``
        holds them as its local tensor), shaped like ``main``."""
        local = local_tensor(tensor)
        if local is not tensor:
            return local.view_as(self.main)
        return tensor.view(-1)[self.start:self.end].view_as(self.main)


def offloaded_shards(sizes: list[int], fraction: float):
    """For shards of ``sizes`` elements in order, whether each is offloaded: while the
    elements offloaded so far are below ``fraction`` of all (Megatron's
    ``HybridDeviceOptimizer``), so 1 offloads every shard and 0 none."""
    threshold, done = fraction * sum(sizes), 0
    for size in sizes:
        offload = done < threshold
        done += size if offload else 0
        yield offload


def copy_across(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dst.copy_(src)`` for every pair: one foreach call for those on one device, one copy
    each for those across the host boundary (offloaded masters)."""
    same = [(d, s) for d, s in zip(dsts, srcs) if d.device == s.device]
    for d, s in zip(dsts, srcs):
        if d.device != s.device:
            d.copy_(s)
    if same:
        torch._foreach_copy_([d for d, _ in same], [s for _, s in same])
