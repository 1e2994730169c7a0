"""The autograd collectives of tensor and sequence parallelism.

Shoeybi et al. 2019 ("Megatron-LM", section 3) pair two conjugate operators around each
tensor-parallel block: ``f`` is the identity forward and an all-reduce backward, ``g`` the
reverse. Korthikanti et al. 2022 ("Reducing Activation Recomputation", section 4.2.2) replace
the all-reduce by a reduce-scatter plus an all-gather along the sequence (first) dimension,
so that the regions between tensor-parallel blocks hold ``1/TP`` of the sequence.

| function                                     | forward               | backward              |
| -------------------------------------------- | --------------------- | --------------------- |
| copy_to_tensor_model_parallel_region (f)     | identity              | all-reduce            |
| reduce_from_tensor_model_parallel_region (g) | all-reduce            | identity              |
| scatter_to_tensor_model_parallel_region      | split last dim        | all-gather last dim   |
| gather_from_tensor_model_parallel_region     | all-gather last dim   | split last dim        |
| scatter_to_sequence_parallel_region          | split first dim       | all-gather first dim  |
| gather_from_sequence_parallel_region         | all-gather first dim  | reduce-scatter first  |
| reduce_scatter_to_sequence_parallel_region   | reduce-scatter first  | all-gather first dim  |
| all_to_all (scatter dim a, gather dim b)     | all-to-all a -> b     | all-to-all b -> a     |
| all_to_all_by_sizes (rows out, rows in)      | all-to-all, uneven    | the reverse exchange  |

``all_to_all`` trades one split dimension for another: rank ``r`` sends block ``j`` of its
input along ``scatter_dim`` to rank ``j`` and concatenates what it receives along
``gather_dim`` in rank order (context parallelism's heads-for-sequence exchange,
`mp.model.context_parallel`). ``all_to_all_by_sizes`` sends rank ``j`` the next
``input_sizes[j]`` rows and receives ``output_sizes[j]`` rows from it (the token exchange of
mixture-of-experts layers, `mp.model.moe`).

Activations are ``[sequence, batch, hidden]`` as in Megatron, so "first dim" is the sequence.
Every function takes ``group`` (default: the tensor-parallel group of ``parallel_state``) and
is the identity when the group has one rank. None of them changes its input, except
``reduce_from_tensor_model_parallel_region``, which all-reduces in place (as Megatron does, to
save a copy) and tells autograd so: using a tensor that autograd still needs raises an error
instead of silently giving wrong gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.comm import all_gather_single, reduce_scatter_single


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over the group, in place."""
    dist.all_reduce(x, group=group)
    return x


def _split_along_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[..., n]`` -> this rank's ``[..., n / world]``."""
    world = dist.get_world_size(group)
    if x.size(-1) % world != 0:
        raise ValueError(f"last dimension {x.size(-1)} is not divisible by the group size {world}")
    return x.chunk(world, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_along_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[..., n]`` on each rank -> ``[..., world * n]`` in rank order."""
    gathered = _gather_along_first_dim(x.unsqueeze(0), group)
    return torch.cat(gathered.unbind(0), dim=-1)


def _split_along_first_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[s, ...]`` -> this rank's ``[s / world, ...]``."""
    world = dist.get_world_size(group)
    if x.size(0) % world != 0:
        raise ValueError(f"first (sequence) dimension {x.size(0)} is not divisible by the "
                         f"group size {world}")
    return x.chunk(world, dim=0)[dist.get_rank(group)].contiguous()


def _gather_along_first_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[s, ...]`` on each rank -> ``[world * s, ...]`` in rank order."""
    world = dist.get_world_size(group)
    out = torch.empty((world * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_along_first_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[s, ...]`` on each rank -> this rank's ``[s / world, ...]`` of the sum over ranks."""
    world = dist.get_world_size(group)
    if x.size(0) % world != 0:
        raise ValueError(f"first (sequence) dimension {x.size(0)} is not divisible by the "
                         f"group size {world}")
    out = torch.empty((x.size(0) // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, x.contiguous(), group=group)
    return out


class _CopyToModelParallelRegion(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """g: all-reduce forward (in place), identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_last_dim(grad, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_along_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_along_last_dim(grad, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_first_dim(grad, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_along_first_dim(grad, ctx.group), None, None
        return _split_along_first_dim(grad, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_first_dim(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int,
                group: dist.ProcessGroup) -> torch.Tensor:
    blocks = torch.stack(x.chunk(dist.get_world_size(group), dim=scatter_dim))
    received = torch.empty_like(blocks)
    dist.all_to_all_single(received, blocks, group=group)  # received[i] came from rank i
    return torch.cat(received.unbind(0), dim=gather_dim)


def _all_to_all_by_sizes(x: torch.Tensor, output_sizes: list[int], input_sizes: list[int],
                         group: dist.ProcessGroup) -> torch.Tensor:
    received = x.new_empty((sum(output_sizes), *x.shape[1:]))
    dist.all_to_all_single(received, x.contiguous(), output_sizes, input_sizes, group=group)
    return received


class _Exchange(torch.autograd.Function):
    """``exchange(x, *there)`` forward and ``exchange(grad, *back)`` backward: an all-to-all
    whose gradient takes the reverse trip."""

    @staticmethod
    def forward(ctx, x, exchange, there, back):
        ctx.exchange, ctx.back = exchange, back
        return exchange(x, *there)

    @staticmethod
    def backward(ctx, grad):
        return ctx.exchange(grad, *ctx.back), None, None, None


def _single_rank(group: dist.ProcessGroup) -> bool:
    return dist.get_world_size(group) == 1


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _single_rank(group) else _CopyToModelParallelRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _single_rank(group) else _ReduceFromModelParallelRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _single_rank(group) else _ScatterToModelParallelRegion.apply(x, group)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _single_rank(group) else _GatherFromModelParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _single_rank(group) else _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, tensor_parallel_output_grad: bool = True,
                                         group=None) -> torch.Tensor:
    """All-gather along the sequence. Backward reduce-scatters the gradient, or, with
    ``tensor_parallel_output_grad=False`` (the consumer is replicated, not TP-sharded), only
    splits it."""
    group = _group(group)
    if _single_rank(group):
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    group = _group(group)
    return x if _single_rank(group) else _ReduceScatterToSequenceParallelRegion.apply(x, group)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` over the ranks and concatenate what they send along
    ``gather_dim`` (module doc); ``x``'s ``scatter_dim`` must divide by the group's size."""
    group = _group(group)
    if _single_rank(group):
        return x
    size = dist.get_world_size(group)
    if x.size(scatter_dim) % size:
        raise ValueError(f"all_to_all: dimension {scatter_dim} of size {x.size(scatter_dim)} "
                         f"is not divisible by the group's {size} ranks")
    return _Exchange.apply(x, _all_to_all, (scatter_dim, gather_dim, group),
                           (gather_dim, scatter_dim, group))


def all_to_all_by_sizes(x: torch.Tensor, output_sizes: list[int], input_sizes: list[int],
                        group=None) -> torch.Tensor:
    """Send rows ``[sum(input_sizes[:j]), sum(input_sizes[:j + 1]))`` of ``x [n, ...]`` to
    rank ``j`` and return ``[sum(output_sizes), ...]``: what each rank sent, in rank order
    (module doc). ``output_sizes[j]`` must be what rank ``j`` sends here."""
    group = _group(group)
    if sum(input_sizes) != x.size(0):
        raise ValueError(f"all_to_all_by_sizes: input_sizes={input_sizes} add up to "
                         f"{sum(input_sizes)} rows, x has {x.size(0)}")
    if _single_rank(group):
        return x
    output_sizes, input_sizes = list(output_sizes), list(input_sizes)
    return _Exchange.apply(x, _all_to_all_by_sizes, (output_sizes, input_sizes, group),
                           (input_sizes, output_sizes, group))
