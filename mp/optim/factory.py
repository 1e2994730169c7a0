"""`get_megatron_optimizer`: the training optimizer for a model's chunks, as Megatron builds it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from mp.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler
from mp.optim.muon import MuonSettings, is_muon_parameter, muon_units
from mp.optim.optimizer import MixedPrecisionOptimizer
from mp.optim.param_groups import get_param_groups


def get_megatron_optimizer(model_chunks: Iterable[nn.Module], *, lr: float,
                           weight_decay: float = 0.01, adam_beta1: float = 0.9,
                           adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                           clip_grad: float = 1.0, loss_scale: float | None = None,
                           initial_loss_scale: float = 2.0**32, min_loss_scale: float = 1.0,
                           loss_scale_window: int = 1000, hysteresis: int = 2,
                           use_distributed_optimizer: bool = False,
                           optimizer_impl: str = "torch", decoupled_lr: float | None = None,
                           log_num_zeros_in_grad: bool = False,
                           use_precision_aware_optimizer: bool = False,
                           exp_avg_dtype: torch.dtype = torch.float32,
                           exp_avg_sq_dtype: torch.dtype = torch.float32,
                           optimizer: str = "adam", sgd_momentum: float = 0.9,
                           muon: MuonSettings | None = None, optimizer_cpu_offload: bool = False,
                           optimizer_offload_fraction: float = 1.0) -> MixedPrecisionOptimizer:
    """The training optimizer for ``model_chunks`` (Megatron's name and arguments):
    a `DistributedOptimizer` when ``use_distributed_optimizer`` (the chunks must then be
    `DistributedDataParallel` built for it), for Muon the `LayerWiseDistributedOptimizer`
    (the chunks then built without it: plain all-reduce), else a `MixedPrecisionOptimizer`;
    the update rule ``optimizer`` (`mp.optim.update_rules`): AdamW (torch's, or apex's
    ``FusedAdam`` for ``optimizer_impl="apex"``), SGD with ``sgd_momentum``, or Muon
    (hyper-parameters ``muon``, default `MuonSettings()`) for the linear layers' matrices
    (`mp.optim.muon`) and AdamW for the rest; the groups of `get_param_groups`
    (``decoupled_lr``: the embedding and output weights apart); `PrecisionAwareAdamW` with
    ``use_precision_aware_optimizer``, its moments stored in ``exp_avg_dtype`` /
    ``exp_avg_sq_dtype``. (Megatron's ``main_grads_dtype`` is the dtype of the chunks'
    gradient buffers; its ``main_params_dtype`` fp16 is not supported.) With
    ``optimizer_cpu_offload`` the masters and state of the first ``optimizer_offload_fraction``
    of each rank's optimizer elements live and step in host memory.

    Loss scaling is switched on exactly when a parameter is fp16: a fixed ``loss_scale`` when
    given, else dynamic from ``initial_loss_scale``. The loss-scale arguments are ignored for
    fp32 and bf16 models. Muon refuses, as Megatron does, FSDP (it orthogonalizes whole
    matrices) and fp16 parameters.
    """
    chunks = list(model_chunks)
    fsdp = any(getattr(chunk, "fully_sharded", False) for chunk in chunks)
    groups = get_param_groups(chunks, weight_decay, decoupled_lr)
    fp16 = any(p.dtype == torch.float16 for g in groups for p in g["params"])
    units = []
    if optimizer == "muon":
        if fsdp or fp16:
            raise ValueError("optimizer='muon' needs whole matrices and no fp16 (Megatron's "
                             "rule): not with FSDP or fp16 parameters")
        muon = MuonSettings() if muon is None else muon
        units = muon_units(chunks, muon.split_qkv)
        groups = _split_muon_groups(chunks, groups)
    scaler = None
    if fp16:
        scaler = ConstantGradScaler(loss_scale) if loss_scale is not None else \
            DynamicGradScaler(initial_scale=initial_loss_scale, min_scale=min_loss_scale,
                              growth_interval=loss_scale_window, hysteresis=hysteresis)
    kwargs = dict(lr=lr, betas=(adam_beta1, adam_beta2), eps=adam_eps, clip_grad=clip_grad,
                  grad_scaler=scaler, impl=optimizer_impl,
                  log_num_zeros_in_grad=log_num_zeros_in_grad,
                  use_precision_aware_optimizer=use_precision_aware_optimizer,
                  exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype,
                  optimizer=optimizer, sgd_momentum=sgd_momentum, muon=muon, muon_units=units,
                  cpu_offload=optimizer_cpu_offload, offload_fraction=optimizer_offload_fraction)
    if use_distributed_optimizer and optimizer == "muon":
        from mp.optim.layer_wise import LayerWiseDistributedOptimizer  # it subclasses this one
        return LayerWiseDistributedOptimizer(groups, chunks, **kwargs)
    if use_distributed_optimizer:
        from mp.optim.distrib_optimizer import DistributedOptimizer  # it subclasses this one
        return DistributedOptimizer(groups, chunks, **kwargs)
    if fsdp:  # every rank holds other rows of the same replica, so the norm sums over all
        kwargs["model_parallel_group"] = dist.group.WORLD
    return MixedPrecisionOptimizer(groups, **kwargs)


def _split_muon_groups(chunks: list[nn.Module], groups: list[dict]) -> list[dict]:
    """``groups`` with each split into its Muon parameters (a group marked ``"muon": True``)
    and the others, empty parts dropped."""
    muon = {id(p) for chunk in chunks for name, p in chunk.named_parameters()
            if is_muon_parameter(name, p)}
    out = []
    for group in groups:
        for marked in (True, False):
            params = [p for p in group["params"] if (id(p) in muon) == marked]
            if params:
                out.append({**group, "params": params, **({"muon": True} if marked else {})})
    return out
