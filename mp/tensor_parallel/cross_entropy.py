"""Cross-entropy over logits split along the vocabulary, without gathering them.

Each of the ``t`` TP ranks holds logits ``[..., V / t]`` for the vocabulary range
``[r * V / t, (r + 1) * V / t)``. Per row (Shoeybi et al. 2019, section 3):

1. all-reduce MAX of the local maxima ``m`` (numerical stability);
2. the target logit ``x_y - m`` is picked by the rank whose range holds the target (0
   elsewhere), and
3. the local sums of ``exp(x - m)`` -- both summed over ranks in a single all-reduce;
4. ``loss = log(sum_exp) - (x_y - m)``. Backward is ``softmax - one_hot`` on the local range;
   the softmax is recomputed from the saved logits and one fp32 number per row,
   ``m + log(sum_exp)``, rather than saved (fp32 probabilities would take twice the memory of
   bf16 logits).

Label smoothing uses Megatron's convention: ``alpha`` is spread over the ``K - 1`` wrong
classes, so the target gets weight ``1 - alpha`` and each other class ``alpha / (K - 1)``
(``K`` = the global, padded vocabulary). This equals PyTorch's
``F.cross_entropy(label_smoothing=alpha * K / (K - 1))``, which spreads over all ``K`` classes.

The per-element work of steps 2-3 and of the backward is in two pure functions. With
``fused=True`` they are compiled (`mp.jit`, Megatron's ``cross_entropy_loss_fusion``): each is
one pass over the 16-bit logits, with no fp32 copy of them in memory; eagerly they take a few
fp32 passes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.jit import jit_fuser
from mp.tensor_parallel.utils import VocabUtility


def _row_sums(logits: torch.Tensor, logits_max: torch.Tensor, local_target: torch.Tensor,
              outside: torch.Tensor, smoothing: bool) -> torch.Tensor:
    """``[2 or 3, N]``: the shifted target logit (0 where the target is on another rank), the
    sum of ``exp`` of the shifted logits and, for label smoothing, the sum of the shifted
    logits, from ``logits [N, V / t]`` and the global row maxima ``[N]``."""
    shifted = logits - logits_max.unsqueeze(-1)  # fp32 (the maxima are), a new tensor
    target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    sum_shifted = [shifted.sum(dim=-1)] if smoothing else []  # before exp_ overwrites them
    sum_exp = shifted.exp_().sum(dim=-1)
    return torch.stack([target_logit.masked_fill(outside, 0.0), sum_exp, *sum_shifted])


def _logits_grad(logits: torch.Tensor, log_norm: torch.Tensor, local_target: torch.Tensor,
                 grad_loss: torch.Tensor, smoothing: float, vocab: int) -> torch.Tensor:
    """``d loss / d logits [N, V / t]`` in the logits' dtype: ``(softmax - (1 - s) one_hot -
    s / V) * grad_loss``, the softmax rebuilt as ``exp(x - log_norm)``; ``local_target [N]`` is
    -1 where the target is on another rank."""
    grad = (logits - log_norm.unsqueeze(-1)).exp_()  # fp32, as log_norm
    columns = torch.arange(logits.size(-1), device=logits.device)
    grad.add_(columns == local_target.unsqueeze(-1), alpha=smoothing - 1.0)
    if smoothing > 0:
        grad.sub_(smoothing / vocab)
    return grad.mul_(grad_loss.unsqueeze(-1)).to(logits.dtype)


_row_sums_fused = jit_fuser(_row_sums)
_logits_grad_fused = jit_fuser(_logits_grad)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, group, fused):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local_vocab = logits.size(-1)
        vocab = local_vocab * world
        shape = logits.shape[:-1]
        logits, target = logits.reshape(-1, local_vocab), target.reshape(-1)
        logits_max = logits.amax(dim=-1).float()  # exact: the max of 16-bit values is one
        if world > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)

        first, last = VocabUtility.vocab_range_from_per_partition_vocab_size(local_vocab, rank,
                                                                            world)
        outside = (target < first) | (target >= last)
        local_target = (target - first).masked_fill_(outside, 0)
        row_sums = _row_sums_fused if fused else _row_sums
        sums = row_sums(logits, logits_max, local_target, outside, label_smoothing > 0)
        if world > 1:
            dist.all_reduce(sums, group=group)
        target_logit, log_sum_exp = sums[0], sums[1].log()
        loss = log_sum_exp - target_logit

        smoothing = 0.0
        if label_smoothing > 0:
            smoothing = label_smoothing * vocab / (vocab - 1)
            mean_log_prob = sums[2] / vocab - log_sum_exp
            loss = (1.0 - smoothing) * loss - smoothing * mean_log_prob

        ctx.smoothing, ctx.vocab, ctx.fused = smoothing, vocab, fused
        local_target.masked_fill_(outside, -1)  # no one-hot column on this rank
        ctx.save_for_backward(logits, logits_max + log_sum_exp, local_target)
        return loss.view(shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, log_norm, local_target = ctx.saved_tensors
        logits_grad = _logits_grad_fused if ctx.fused else _logits_grad
        grad = logits_grad(logits, log_norm, local_target, grad_loss.reshape(-1), ctx.smoothing,
                           ctx.vocab)
        return grad.view(*grad_loss.shape, -1), None, None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, group=None,
                                 fused: bool = False) -> torch.Tensor:
    """Per-token loss ``[...]`` from logits ``[..., V / t]`` and integer targets ``[...]``.

    The loss is computed in fp32 whatever the logits' dtype; the gradient has the logits'
    dtype. Targets must lie in ``[0, V)``. ``fused`` compiles the per-element work (module
    doc).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(vocab_parallel_logits.shape)} and target "
                         f"{tuple(target.shape)} must agree on every dimension but the last")
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing, group,
                                            fused)
