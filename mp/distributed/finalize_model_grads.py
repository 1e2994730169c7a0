"""After the last micro-batch's backward: make every gradient the model-replica gradient.

Megatron's ``finalize_model_grads``, in order:

1. data parallel: ``finish_grad_sync()`` on each chunk (the mean over data-parallel ranks);
2. sequence parallel: parameters replicated over TP ranks but fed only ``1/TP`` of the
   sequence (``param.sequence_parallel``: norm weights and biases, row-parallel biases) hold
   partial gradients, as do the ``qk_layernorm`` norms at any TP size (each rank normalizes
   only its heads; marked likewise); they are summed over the tensor-parallel group, all in
   one coalesced all-reduce.

3. pipeline parallel with tied word embeddings: the first stage's embedding matrix and the
   last stage's copy of it (both marked ``embedding_group_sync`` by
   `mp.model.stages.initialize_word_embeddings`) sum their gradients over the embedding group,
   so the two copies take the same step and stay equal;
4. per-token loss (``num_tokens`` given, `mp.pipeline_parallel.losses`): the token count the
   last stage added up is broadcast over the pipeline group and summed over data parallel,
   and every gradient is divided by that global count (the chunks' data-parallel reduction
   summed instead of averaging);
5. mixture-of-experts routers with an expert bias (`mp.model.moe.router`) move it by the
   iteration's token counts, summed over DP x CP.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mp import parallel_state
from mp.distributed.torch_fsdp2 import local_tensor


def _grad(param: nn.Parameter) -> torch.Tensor | None:
    """``param``'s gradient: DDP's ``main_grad``, else ``.grad`` (an FSDP parameter's local
    shard of it, which lines up across the TP and embedding groups)."""
    return param.main_grad if hasattr(param, "main_grad") else local_tensor(param.grad)


def allreduce_sequence_parallel_grads(model_chunks: Iterable[nn.Module],
                                      tensor_model_parallel_group=None) -> None:
    """Sum the gradients of ``sequence_parallel`` parameters over the TP group (in place)."""
    group = (parallel_state.get_tensor_model_parallel_group()
             if tensor_model_parallel_group is None else tensor_model_parallel_group)
    if dist.get_world_size(group) == 1:
        return
    grads = [g for chunk in model_chunks for p in chunk.parameters()
             if p.requires_grad and getattr(p, "sequence_parallel", False)
             and (g := _grad(p)) is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def allreduce_embedding_grads(model_chunks: Iterable[nn.Module]) -> None:
    """Sum the gradients of the tied embedding's two copies over the embedding group (first
    and last pipeline stage); nothing on other ranks or without pipeline parallelism."""
    grads = [_grad(p) for chunk in model_chunks for p in chunk.parameters()
             if getattr(p, "embedding_group_sync", False)]
    for grad in grads:
        dist.all_reduce(grad, group=parallel_state.get_embedding_group())


def divide_by_global_token_count(model_chunks: list[nn.Module],
                                 num_tokens: torch.Tensor | int) -> None:
    """Divide the gradients of ``model_chunks`` (`DistributedDataParallel`) by the global
    batch's token count: ``num_tokens`` of the last pipeline stage summed over the ranks the
    gradients were summed over, DP x CP (Megatron leaves them as they are when it is 0; with
    context parallelism each CP rank counts and backpropagates ``CP x`` its sequences' part,
    `mp.training.gpt_step`, which cancels here)."""
    device = next(model_chunks[0].parameters()).device
    count = torch.tensor(int(num_tokens), dtype=torch.int64, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(count, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
        dist.all_reduce(count,
                        group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    total = int(count.item())
    if total > 0:
        for chunk in model_chunks:
            chunk.scale_gradients(1.0 / total)


def finalize_model_grads(model_chunks: Iterable[nn.Module],
                         num_tokens: torch.Tensor | int | None = None) -> None:
    """Finish the data-parallel reduction of each chunk (when it has one), all-reduce the
    sequence-parallel gradients over TP and the tied embedding's over the embedding group;
    with ``num_tokens`` (per-token loss) divide by the global token count; update the routers'
    expert biases. Call once per
    iteration, after backward (Megatron's signature)."""
    chunks = list(model_chunks)
    for chunk in chunks:
        finish = getattr(chunk, "finish_grad_sync", None)
        if finish is not None:
            finish()
    allreduce_sequence_parallel_grads(chunks)
    allreduce_embedding_grads(chunks)
    if num_tokens is not None:
        divide_by_global_token_count(chunks, num_tokens)
    end_router_iterations(chunks)


def end_router_iterations(model_chunks: Iterable[nn.Module]) -> None:
    """Each mixture-of-experts router's ``end_iteration`` over the DP x CP group (its expert
    bias updated, its global load-balancing counts reset; nothing for other models)."""
    for chunk in model_chunks:
        for module in chunk.modules():
            if hasattr(module, "end_iteration"):
                module.end_iteration(
                    parallel_state.get_data_parallel_group(with_context_parallel=True))
