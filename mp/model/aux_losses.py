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
its coefficient (``load_balancing_loss`` is 1 when routing is uniform), and with
``moe_per_layer_logging`` each router's under ``moe/{name}_layer_{i}`` too (Megatron's tags,
``i`` the layer's 0-based index); the training loop takes the sums once an iteration
(`take_tracked`). The scale and the sums are the state here,
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


def track(name: str, value: torch.Tensor, layer: int | None = None) -> None:
    """Add a scalar to ``name``'s sum (and count) for the log, and to layer ``layer``'s
    (`per_layer_name`) when given."""
    pair = torch.stack((value.detach().double(), torch.ones((), dtype=torch.float64,
                                                            device=value.device)))
    for key in (name,) if layer is None else (name, per_layer_name(name, layer)):
        _TRACKED[key] = _TRACKED[key] + pair if key in _TRACKED else pair


def per_layer_name(name: str, layer: int) -> str:
    """Megatron's TensorBoard tag of loss ``name`` of the layer of 0-based index ``layer``."""
    return f"moe/{name}_layer_{layer}"


def take_tracked() -> dict[str, torch.Tensor]:
    """``{name: [sum, count]}`` tracked since the last call, and forget them."""
    taken = dict(_TRACKED)
    _TRACKED.clear()
    return taken


def tracked_names(config) -> list[str]:
    """The names a model of ``config`` (`mp.model.TransformerConfig`) tracks while it
    trains: multi-token prediction's (`mp.model.mtp`) and its routers' losses, then with
    ``moe_per_layer_logging`` those of each MoE layer (`per_layer_name`)."""
    depths = config.mtp_num_layers or 0
    routers, per_layer = router_loss_names(config), []
    if routers and config.moe_per_layer_logging:  # the decoder's MoE layers, then MTP's
        layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
        if depths and config.is_moe_layer(config.num_layers - 1):
            layers += range(config.num_layers, config.num_layers + depths)
        per_layer = [per_layer_name(name, i) for i in layers for name in routers]
    return [f"mtp_{k} loss" for k in range(1, depths + 1)] + routers + per_layer


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
