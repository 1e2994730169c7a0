"""The routers' auxiliary losses (attached to the gradients by `mp.model.aux_losses`):

- load balancing (Switch Transformer, Fedus et al. 2021, eq. 4, for top-k routing):
  ``coeff x E x sum_e f_e P_e`` over the ``N`` tokens of one micro-batch on one
  data-parallel rank (its whole sequences: the router sums its statistics over context
  parallelism), where ``f_e`` is the fraction of the ``N k`` routed slots that went to expert
  ``e`` and ``P_e`` the mean over tokens of the softmax probability of ``e``; it is ``coeff``
  when routing is uniform and grows as it concentrates. The sequence-level form
  (``moe_router_load_balancing_type="seq_aux_loss"``, DeepSeek-V2's, logged as
  ``seq_load_balancing_loss``) is the mean over the micro-batch's sequences of each
  sequence's own loss, which balances every sequence rather than the batch;
- z-loss (ST-MoE, Zoph et al. 2022): ``coeff x mean over tokens of logsumexp(logits)^2``,
  which keeps the router logits small.

Both take sums over tokens and the token count, so that context-parallel ranks can add
their parts first.
"""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or as it is when its dtype is wider (float64 in tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def load_balancing_loss(prob_sums: torch.Tensor, tokens_per_expert: torch.Tensor,
                        num_tokens: int, topk: int, coeff: float) -> torch.Tensor:
    """Switch's loss from ``prob_sums [E]`` (each expert's softmax probability summed over
    the ``num_tokens`` tokens, fp32) and ``tokens_per_expert [E]`` (routed slots, ``N k`` in
    all); ``[B, E]`` for ``B`` sequences of ``num_tokens`` tokens each: the mean of their
    losses."""
    fraction = tokens_per_expert.to(prob_sums.dtype) / (num_tokens * topk)
    return coeff * prob_sums.size(-1) * torch.sum(fraction * prob_sums / num_tokens,
                                                  dim=-1).mean()


def z_loss(lse_square_sum: torch.Tensor, num_tokens: int, coeff: float) -> torch.Tensor:
    """ST-MoE's router z-loss from ``sum over tokens of logsumexp(logits)^2``."""
    return coeff * lse_square_sum / num_tokens
