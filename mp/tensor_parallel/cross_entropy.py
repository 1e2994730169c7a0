"""Cross-entropy over logits split along the vocabulary, without gathering them.

Each of the ``t`` TP ranks holds logits ``[..., V / t]`` for the vocabulary range
``[r * V / t, (r + 1) * V / t)``. Per row (Shoeybi et al. 2019, section 3):

1. all-reduce MAX of the local maxima, subtract it (numerical stability);
2. the target logit is picked by the rank whose range holds the target (0 elsewhere), and
3. the local sums of ``exp`` -- both summed over ranks in a single all-reduce;
4. ``loss = log(sum_exp) - target_logit``; backward is ``softmax - one_hot`` on the local range,
   from the softmax saved in forward.

Label smoothing uses Megatron's convention: ``alpha`` is spread over the ``K - 1`` wrong
classes, so the target gets weight ``1 - alpha`` and each other class ``alpha / (K - 1)``
(``K`` = the global, padded vocabulary). This equals PyTorch's
``F.cross_entropy(label_smoothing=alpha * K / (K - 1))``, which spreads over all ``K`` classes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.tensor_parallel.utils import VocabUtility


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local_vocab = logits.size(-1)
        vocab = local_vocab * world
        logits = logits.float()
        logits_max = logits.amax(dim=-1)
        if world > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        first, last = VocabUtility.vocab_range_from_per_partition_vocab_size(local_vocab, rank,
                                                                            world)
        outside = (target < first) | (target >= last)
        local_target = (target - first).masked_fill_(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit.masked_fill_(outside, 0.0)

        # the sum of the logits (for the mean log-probability) must be taken before exp_
        sum_shifted = shifted.sum(dim=-1) if label_smoothing > 0 else None
        exp = shifted.exp_()
        sums = torch.stack([target_logit, exp.sum(dim=-1)]
                           + ([sum_shifted] if sum_shifted is not None else []))
        if world > 1:
            dist.all_reduce(sums, group=group)
        target_logit, sum_exp = sums[0], sums[1]
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit

        smoothing = 0.0
        if label_smoothing > 0:
            smoothing = label_smoothing * vocab / (vocab - 1)
            mean_log_prob = sums[2] / vocab - log_sum_exp
            loss = (1.0 - smoothing) * loss - smoothing * mean_log_prob

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.smoothing, ctx.vocab = smoothing, vocab
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax  # reused in place: backward runs once
        inside = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1),
                          -(1.0 - ctx.smoothing) * inside.unsqueeze(-1))
        if ctx.smoothing > 0:
            grad.sub_(ctx.smoothing / ctx.vocab)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, group=None) -> torch.Tensor:
    """Per-token loss ``[...]`` from logits ``[..., V / t]`` and integer targets ``[...]``.

    The loss is computed in fp32 whatever the logits' dtype; the gradient returned to the
    logits is fp32 too (autograd casts it back). Targets must lie in ``[0, V)``.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(vocab_parallel_logits.shape)} and target "
                         f"{tuple(target.shape)} must agree on every dimension but the last")
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing, group)
