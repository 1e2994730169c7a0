"""The global gradient norm over a model split across ranks, clipping by it, and the count of
zero gradient elements.

One model replica lives on the TP x PP ranks of a model-parallel group. Its squared L2 norm
is the sum over those ranks of the squared norms of the gradients each holds, counting every
parameter once: sharded parameters on every rank, parameters replicated over TP (norm weights,
row-parallel biases) only on TP rank 0 (``param_is_not_tensor_parallel_duplicate``), and never
a pipeline stage's copy of a weight owned by another stage (``param.shared``, the last stage's
copy of tied word embeddings). Data-parallel replicas hold the same (already averaged)
gradients, so the data-parallel group takes no part. Experts (`mp.model.moe`) differ across
the expert-parallel ranks: their squares are summed over the EP ranks at this TP rank first
(``expert_grads``, ``expert_parallel_group``: `mp.parallel_state.get_expert_grad_norm_group`,
the EP group itself when experts are split over TP as the layer is).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.tensor_parallel import param_is_not_tensor_parallel_duplicate


def counts_in_grad_norm(param: torch.Tensor, tensor_model_parallel_group=None) -> bool:
    """Whether this rank adds ``param``'s gradient to the model's norm (see the module doc)."""
    return (not getattr(param, "shared", False)
            and param_is_not_tensor_parallel_duplicate(param, tensor_model_parallel_group))


def _expert_part(total: torch.Tensor, expert_grads: list[torch.Tensor], expert_parallel_group,
                 each) -> torch.Tensor:
    """``total`` plus ``each(expert_grads)`` summed over the expert-parallel group."""
    if not expert_grads:
        return total
    part = each(expert_grads).to(total.device)
    if expert_parallel_group is not None and dist.get_world_size(expert_parallel_group) > 1:
        dist.all_reduce(part, group=expert_parallel_group)
    return total + part


def _sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the squares of ``grads``' elements in fp32, also for bf16 gradients (the
    precision-aware optimizer's): each tensor's norm comes out in fp32, not rounded to bf16.
    On the first tensor's device; host tensors among device ones (offloaded masters) count
    too."""
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    return torch.stack([n.to(norms[0].device) for n in norms]).square().sum()


def get_grad_norm_fp32(grads_for_norm: list[torch.Tensor], model_parallel_group=None, *,
                       other_grads: list[torch.Tensor] = (),
                       expert_grads: list[torch.Tensor] = (), expert_parallel_group=None,
                       device: torch.device | None = None) -> float:
    """``sqrt(sum over model-parallel ranks of sum_g |g|^2)``; each rank passes the gradients
    it counts (`counts_in_grad_norm`) as ``grads_for_norm``, those of experts among them as
    ``expert_grads`` (summed over ``expert_parallel_group`` too).

    The result is inf or NaN on every rank of the group when any gradient holds an inf or
    NaN, including ``other_grads`` (the ones this rank holds but does not count): they add
    ``0 * |g|``, which is 0 when finite and NaN otherwise, so one all-reduce of one scalar is
    both the norm and the overflow check. ``device`` places the sum (where the all-reduce
    runs; tensors may be elsewhere, as offloaded masters are) and is needed when this rank has
    no gradients at all.
    """
    group = parallel_state.get_model_parallel_group() if model_parallel_group is None \
        else model_parallel_group
    total = torch.zeros((), dtype=torch.float32, device=device)
    if grads_for_norm:
        total = _sum_of_squares(grads_for_norm)
        total = total if device is None else total.to(device)
    total = _expert_part(total, expert_grads, expert_parallel_group, _sum_of_squares)
    if other_grads:
        total = total + 0.0 * torch.stack(torch._foreach_norm(list(other_grads), 2.0)).sum()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total.sqrt().item()


def _zeros(grads: list[torch.Tensor]) -> torch.Tensor:
    return sum(grad.numel() - torch.count_nonzero(grad) for grad in grads)


def count_zeros_fp32(grads_for_norm: list[torch.Tensor], model_parallel_group=None, *,
                     expert_grads: list[torch.Tensor] = (), expert_parallel_group=None,
                     device: torch.device | None = None) -> int:
    """Zero elements of the gradients each rank counts (`counts_in_grad_norm`), summed over
    the model-parallel group (the experts' over the expert-parallel group too): every element
    of the model once (Megatron's ``count_zeros_fp32``)."""
    group = parallel_state.get_model_parallel_group() if model_parallel_group is None \
        else model_parallel_group
    zeros = torch.zeros((), dtype=torch.int64, device=device) + _zeros(grads_for_norm)
    zeros = _expert_part(zeros, expert_grads, expert_parallel_group, _zeros)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(zeros, group=group)
    return int(zeros.item())


def clip_grad_by_total_norm_fp32(grads: list[torch.Tensor], max_norm: float,
                                 total_norm: float) -> None:
    """Scale ``grads`` in place by `clip_coefficient` when that is below 1."""
    coeff = clip_coefficient(max_norm, total_norm)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def clip_coefficient(max_norm: float, total_norm: float) -> float:
    """What clipping to ``max_norm`` multiplies the gradients by: ``max_norm / (total_norm +
    1e-6)`` when that is below 1, else 1 (Megatron's rule)."""
    return min(1.0, max_norm / (total_norm + 1.0e-6))
