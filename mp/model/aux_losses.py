"""Auxiliary losses: losses that reach a layer's gradients but not the reported loss (the
routers' load-balancing and z-losses, `mp.model.moe.aux_loss`; multi-token prediction's,
`mp.model.mtp`), as in Megatron.

`attach_aux_loss` ties a loss to an activation: the activation passes unchanged, and backward
gives the loss the gradient ``weight x scale``, the scale captured at forward from
`set_aux_loss_scale`. The schedules set that to what the language-model loss of a micro-batch
is multiplied by before its backward (``loss scale / micro-batches``,
`mp.pipeline_parallel.losses.scale_aux_losses`), so an auxiliary loss weighs the same on every
pipeline stage and at every layout (Megatron's ``MoEAuxLossAutoScaler`` and
``MTPLossAutoScaler``).

For the log, each loss is also tracked (`track`) under a name `tracked_names` lists, without
its coefficient (``load_balancing_loss`` is 1 when routing is uniform); the training loop
takes the sums once an iteration (`take_tracked`). The scale and the sums are the state here,
held for one iteration.
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
    balancing = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                 "global_aux_loss": "global_load_balancing_loss"}
    name = balancing.get(config.moe_router_load_balancing_type)
    names = [name] if name and config.moe_aux_loss_coeff > 0 else []
    return names + (["z_loss"] if config.moe_z_loss_coeff else [])


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
