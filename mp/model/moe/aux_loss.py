"""The router's auxiliary losses and how they reach backward.

Both are added to a layer's gradients, not to the reported loss, as in Megatron:

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

`attach_aux_loss` ties a loss to an activation: the activation passes unchanged, and backward
gives the loss the gradient ``scale``, captured at forward from `set_aux_loss_scale`. The
schedules set that to what the language-model loss of a micro-batch is multiplied by before
its backward (``loss scale / micro-batches``), so an auxiliary loss weighs the same on every
pipeline stage and at every layout (Megatron's ``MoEAuxLossAutoScaler``).

For the log, each attached loss is also tracked without its coefficient (`track`), as
Megatron logs them: ``load_balancing_loss`` (1 when routing is uniform) and ``z_loss``; the
training loop takes the sums once an iteration (`take_tracked`). The scale and the sums are
the state here, held for one iteration.
"""

from __future__ import annotations

import torch

_SCALE = 1.0
_TRACKED: dict[str, torch.Tensor] = {}  # name -> [sum, count] since the last take


def set_aux_loss_scale(scale: float) -> None:
    """The gradient the auxiliary losses of the coming forwards backpropagate with."""
    global _SCALE
    _SCALE = float(scale)


def aux_loss_scale() -> float:
    return _SCALE


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or as it is when its dtype is wider (float64 in tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def track(name: str, value: torch.Tensor) -> None:
    """Add a scalar to ``name``'s sum (and count) for the log."""
    pair = torch.stack((value.detach().double(), torch.ones((), dtype=torch.float64,
                                                            device=value.device)))
    _TRACKED[name] = _TRACKED[name] + pair if name in _TRACKED else pair


def take_tracked() -> dict[str, torch.Tensor]:
    """``{name: [sum, count]}`` tracked since the last call, and forget them."""
    taken = dict(_TRACKED)
    _TRACKED.clear()
    return taken


def tracked_names(config) -> list[str]:
    """The names a model of ``config`` (`mp.model.TransformerConfig`) tracks while it
    trains: its routers' losses, and multi-token prediction's (`mp.model.mtp`)."""
    return ([f"mtp_{k} loss" for k in range(1, (config.mtp_num_layers or 0) + 1)]
            + router_loss_names(config))


def router_loss_names(config) -> list[str]:
    """The routers' losses a model of ``config`` tracks: its load balancing's, then the
    z-loss, those it has."""
    if config.num_moe_experts is None:
        return []
    balancing = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}
    name = balancing.get(config.moe_router_load_balancing_type)
    names = [name] if name and config.moe_aux_loss_coeff > 0 else []
    return names + (["z_loss"] if config.moe_z_loss_coeff else [])


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


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activation, loss, scale):
        ctx.loss, ctx.scale = (loss.shape, loss.dtype, loss.device), scale
        return activation

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.loss
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def attach_aux_loss(activation: torch.Tensor, loss: torch.Tensor,
                    weight: float = 1.0) -> torch.Tensor:
    """``activation`` unchanged; its backward also backpropagates ``loss`` (a scalar) with
    gradient ``weight x`` the current `aux_loss_scale`."""
    return _AttachAuxLoss.apply(activation, loss, weight * _SCALE)
