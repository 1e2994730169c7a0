"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Shapes follow Megatron: activations are ``[s, b, h]`` (any leading dims work for the linears;
with sequence parallelism the first dim is the sequence, split over TP ranks). With ``t`` ranks
in the tensor-parallel group:

- ``ColumnParallelLinear``: ``Y = X A^T + b`` with ``A`` split by rows (output features):
  weight ``[out / t, in]``, bias ``[out / t]``; output ``[..., out / t]`` (or gathered).
- ``RowParallelLinear``: ``A`` split by columns (input features): weight ``[out, in / t]``,
  bias ``[out]`` added once, after the reduction.
- ``VocabParallelEmbedding``: table split by vocabulary rows: ``[V / t, h]``.
- ``DuplicatedLinear``: ``Y = X A^T + b`` with ``A`` whole on every rank (Megatron's
  "duplicated" mode): small projections that each rank computes for its own tokens.

Every parameter says how it is sharded: ``tensor_model_parallel``, ``partition_dim``,
``partition_stride`` (Megatron's attributes) plus ``global_shape`` and ``shard_offset``, so a
checkpoint can place each shard in the full tensor without knowing the layout. Parameters
that are replicated over TP ranks but see only part of the sequence under sequence
parallelism carry ``sequence_parallel = True``: their gradients must be all-reduced over TP.

Initialisation is serial-equivalent: each rank draws the full weight with ``init_method``
from the (TP-identical) default generator and keeps its slice, so a model's weights do not
depend on the TP size. (Megatron's GPU path draws per-shard from the TP-specific stream, so its
weights change with TP; this is the fix.)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mp import parallel_state
from mp.comm import all_gather_single, reduce_scatter_single
from mp.device import get_device
from mp.tensor_parallel.fp8 import (
    PLAIN,
    Fp8Gemms,
    Fp8Recipe,
    Gemms,
    check_fp8_device,
    check_fp8_dims,
)
from mp.tensor_parallel.mappings import (
    _gather_along_first_dim,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from mp.tensor_parallel.utils import VocabUtility, divide

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int,
                                         stride: int = 1, group=None) -> None:
    """Mark ``tensor`` as shard ``rank`` of ``world`` along ``dim`` of its global tensor."""
    world = dist.get_world_size(group) if is_parallel else 1
    rank = dist.get_rank(group) if is_parallel else 0
    global_shape = list(tensor.shape)
    offset = [0] * tensor.dim()
    if is_parallel:
        global_shape[dim] *= world
        offset[dim] = rank * tensor.shape[dim]
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride
    tensor.global_shape = tuple(global_shape)
    tensor.shard_offset = tuple(offset)


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor, group=None) -> bool:
    """True for sharded parameters, and for replicated ones on TP rank 0 only: count each
    parameter once when summing over the TP group (grad-norm, parameter counts)."""
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return getattr(param, "tensor_model_parallel", False) or dist.get_rank(group) == 0


def _resolve_group(group):
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def _sharded_parameter(full_shape: tuple[int, int], partition_dim: int, init_method: InitMethod,
                       group, params_dtype: torch.dtype, device, perform_initialization: bool
                       ) -> nn.Parameter:
    """This rank's slice of a ``full_shape`` weight initialised as a serial one would be."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    what = f"dimension {partition_dim} of a {tuple(full_shape)} weight"
    divide(full_shape[partition_dim], world, what)
    weight = _initialized(full_shape, init_method, params_dtype, device, perform_initialization,
                          lambda master: master.chunk(world, dim=partition_dim)[rank])
    set_tensor_model_parallel_attributes(weight, True, partition_dim, 1, group)
    return weight


def _initialized(full_shape: tuple[int, int], init_method: InitMethod, params_dtype, device,
                 perform_initialization: bool, part=lambda master: master) -> nn.Parameter:
    """``part`` of a ``full_shape`` weight drawn in fp32 by ``init_method`` from the default
    generator (left empty on the meta device or without ``perform_initialization``)."""
    device = get_device() if device is None else torch.device(device)
    local_shape = part(torch.empty(full_shape, device="meta")).shape
    weight = nn.Parameter(torch.empty(local_shape, dtype=params_dtype, device=device))
    if perform_initialization and device.type != "meta":
        master = torch.empty(full_shape, dtype=torch.float32, device=device)
        init_method(master)
        with torch.no_grad():
            weight.copy_(part(master))
    return weight


def _bias(size: int, params_dtype, device, sharded: bool, group) -> nn.Parameter:
    device = get_device() if device is None else torch.device(device)
    bias = nn.Parameter(torch.zeros(size, dtype=params_dtype, device=device))
    set_tensor_model_parallel_attributes(bias, sharded, 0, 1, group)
    return bias


class LinearWithAsyncGradReduce(torch.autograd.Function):
    """``F.linear`` of a column-parallel layer with its TP communication fused in, its
    products by ``gemms`` (`mp.tensor_parallel.fp8`: plain or FP8).

    Forward: with sequence parallelism, all-gather the input ``[s/t, b, in]`` -> ``[s, b, in]``.
    Backward: compute the input gradient first, start its all-reduce (or reduce-scatter with
    sequence parallelism) asynchronously, and compute the weight gradient while it is in
    flight (Megatron's overlap; on CUDA set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` so the
    communication kernel is scheduled before the weight-gradient GEMM). With sequence
    parallelism only the local ``[s/t, b, in]`` input is saved and re-gathered in backward.
    ``group`` None: no communication (an FP8 linear of any other kind, `_linear`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel, gemms: Gemms = PLAIN):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.sequence_parallel, ctx.has_bias = group, sequence_parallel, bias is not None
        ctx.gemms = gemms
        total = _gather_along_first_dim(x, group) if sequence_parallel else x
        return gemms.linear(total, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        group, sp = ctx.group, ctx.sequence_parallel
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if sp:
            total = torch.empty((x.size(0) * dist.get_world_size(group), *x.shape[1:]),
                                dtype=x.dtype, device=x.device)
            gather = all_gather_single(total, x.contiguous(), group=group, async_op=True)
        else:
            total, gather = x, None
        grad_x, reduce = None, None
        dy = ctx.gemms.gradient(grad_output)
        if need_x:
            grad_total = ctx.gemms.dgrad(dy, weight)
            if group is None:
                grad_x = grad_total
            elif sp:
                grad_x = torch.empty_like(x)
                reduce = reduce_scatter_single(grad_x, grad_total, group=group,
                                               async_op=True)
            else:
                grad_x = grad_total
                reduce = dist.all_reduce(grad_x, group=group, async_op=True)
        if gather is not None:
            gather.wait()
        grad_w = ctx.gemms.wgrad(dy, total) if need_w else None
        rows = grad_output.reshape(-1, grad_output.size(-1))
        grad_b = rows.sum(0) if ctx.has_bias and need_b else None
        if reduce is not None:
            reduce.wait()
        return grad_x, grad_w, grad_b, None, None, None


def _linear(x, weight, bias, gemms: Fp8Gemms | None):
    """``F.linear``, or ``gemms``' FP8 products when the layer has them."""
    if gemms is None:
        return F.linear(x, weight, bias)
    return LinearWithAsyncGradReduce.apply(x, weight, bias, None, False, gemms)


def _fp8_gemms(fp8: Fp8Recipe | None, group, in_size: int, out_size: int, device,
               replicated: str) -> Fp8Gemms | None:
    """The FP8 products of a ``[out_size, in_size]`` weight shard on ``device`` (sizes and
    device checked), amaxes all-reduced over ``group`` but the ``replicated`` operand's
    (`Fp8Gemms`); None without ``fp8``."""
    if fp8 is None:
        return None
    check_fp8_device(get_device() if device is None else torch.device(device))
    check_fp8_dims(f"an FP8 linear layer's [{out_size}, {in_size}] weight shard",
                   in_features=in_size, out_features=out_size)
    return Fp8Gemms(fp8, group, replicated)


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its output features over TP ranks.

    Args follow Megatron: ``gather_output`` all-gathers ``Y`` (otherwise each rank keeps
    ``[..., out / t]``); ``skip_bias_add`` returns the bias instead of adding it, so the caller
    can fuse it; ``sequence_parallel`` takes a ``[s / t, b, in]`` input and all-gathers it;
    ``skip_weight_param_allocation`` makes ``forward`` take the weight (a tied output layer).
    ``fp8`` runs its products in FP8 (`mp.tensor_parallel.fp8`).

    Returns ``(output, bias)``, ``bias`` being ``None`` unless ``skip_bias_add``.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True,
                 gather_output: bool = False, init_method: InitMethod = nn.init.xavier_normal_,
                 skip_bias_add: bool = False, sequence_parallel: bool = False,
                 skip_weight_param_allocation: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None, group=None,
                 perform_initialization: bool = True, fp8: Fp8Recipe | None = None):
        super().__init__()
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel=True and gather_output=True "
                             "cannot be combined")
        self.group = _resolve_group(group)
        self.world_size = dist.get_world_size(self.group)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, self.world_size, "output_size")
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel = sequence_parallel
        self.weight = None if skip_weight_param_allocation else _sharded_parameter(
            (output_size, input_size), 0, init_method, self.group, params_dtype, device,
            perform_initialization)
        self.bias = _bias(self.output_size_per_partition, params_dtype, device, True,
                          self.group) if bias else None
        self.gemms = _fp8_gemms(fp8, self.group, input_size, self.output_size_per_partition,
                                device, replicated="input")

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None):
        if weight is None:
            if self.weight is None:
                raise ValueError("ColumnParallelLinear was built with "
                                 "skip_weight_param_allocation=True: pass weight to forward")
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            raise ValueError(f"weight of shape {tuple(weight.shape)} passed to forward; expected "
                             f"{(self.output_size_per_partition, self.input_size)}")
        bias = None if self.skip_bias_add else self.bias
        if self.world_size == 1:
            output = _linear(input_, weight, bias, self.gemms)
        else:
            output = LinearWithAsyncGradReduce.apply(input_, weight, bias, self.group,
                                                     self.sequence_parallel,
                                                     self.gemms or PLAIN)
        if self.gather_output:
            output = gather_from_tensor_model_parallel_region(output, group=self.group)
        return output, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its input features over TP ranks.

    ``input_is_parallel`` says the input is already split ``[..., in / t]`` (the output of a
    ColumnParallelLinear); otherwise it is split here. The partial products are all-reduced,
    or reduce-scattered to ``[s / t, b, out]`` with ``sequence_parallel``; the bias is added
    after the reduction. ``fp8`` runs its product in FP8. Returns ``(output, bias)`` as
    ColumnParallelLinear does.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True,
                 input_is_parallel: bool = False, init_method: InitMethod = nn.init.xavier_normal_,
                 skip_bias_add: bool = False, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None, group=None,
                 perform_initialization: bool = True, fp8: Fp8Recipe | None = None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs "
                             "input_is_parallel=True")
        self.group = _resolve_group(group)
        self.world_size = dist.get_world_size(self.group)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, self.world_size, "input_size")
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = sequence_parallel
        self.weight = _sharded_parameter((output_size, input_size), 1, init_method, self.group,
                                         params_dtype, device, perform_initialization)
        self.bias = _bias(output_size, params_dtype, device, False, self.group) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = sequence_parallel
        self.gemms = _fp8_gemms(fp8, self.group, self.input_size_per_partition, output_size,
                                device, replicated="gradient")

    def forward(self, input_: torch.Tensor):
        if self.world_size == 1:
            if self.skip_bias_add:
                return _linear(input_, self.weight, None, self.gemms), self.bias
            return _linear(input_, self.weight, self.bias, self.gemms), None
        if not self.input_is_parallel:
            input_ = scatter_to_tensor_model_parallel_region(input_, group=self.group)
        partial = _linear(input_, self.weight, None, self.gemms)
        if self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(partial, group=self.group)
        else:
            output = reduce_from_tensor_model_parallel_region(partial, group=self.group)
        if self.skip_bias_add or self.bias is None:
            return output, (self.bias if self.skip_bias_add else None)
        return output + self.bias, None


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary: rank ``r`` holds rows
    ``[r * V / t, (r + 1) * V / t)``.

    ``forward(input_ids [b, s]) -> [b, s, h]``: each rank looks up the ids in its range, zeroes
    the rest, and the partial results are all-reduced. With ``reduce_scatter_embeddings``
    (sequence parallelism) the output is transposed to ``[s, b, h]`` and reduce-scattered to
    ``[s / t, b, h]`` instead.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 init_method: InitMethod = nn.init.xavier_normal_,
                 reduce_scatter_embeddings: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None, group=None,
                 perform_initialization: bool = True):
        super().__init__()
        self.group = _resolve_group(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.world_size = world = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        self.vocab_start_index, self.vocab_end_index = (
            VocabUtility.vocab_range_from_global_vocab_size(num_embeddings, rank, world))
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), 0, init_method,
                                         self.group, params_dtype, device,
                                         perform_initialization)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            output = F.embedding(input_ids, self.weight)
        else:
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index).masked_fill_(outside, 0)
            output = F.embedding(local_ids, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            output = output.transpose(0, 1).contiguous()
            return reduce_scatter_to_sequence_parallel_region(output, group=self.group)
        return reduce_from_tensor_model_parallel_region(output, group=self.group)


class DuplicatedLinear(nn.Module):
    """``Y = X A^T + b`` with the whole ``A [out, in]`` on every TP rank (Megatron's
    "duplicated" parallel mode), drawn as a serial layer's. Each rank computes it for the rows
    it holds; with ``sequence_parallel`` those are its own ``s / t`` tokens, the weight's
    gradient is partial over the TP group and its parameters say so (``sequence_parallel``,
    summed by `mp.distributed.finalize_model_grads`). Returns ``(output, None)``, as the
    parallel linears do without ``skip_bias_add``.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True,
                 init_method: InitMethod = nn.init.xavier_normal_, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None,
                 perform_initialization: bool = True):
        super().__init__()
        self.weight = _initialized((output_size, input_size), init_method, params_dtype, device,
                                   perform_initialization)
        set_tensor_model_parallel_attributes(self.weight, False, 0)
        self.bias = _bias(output_size, params_dtype, device, False, None) if bias else None
        for param in self.parameters():
            param.sequence_parallel = sequence_parallel

    def forward(self, input_: torch.Tensor):
        return F.linear(input_, self.weight, self.bias), None
