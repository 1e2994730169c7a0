"""Optimizers: AdamW, SGD or Muon over fp32 master weights, loss scaling, clipping, and the LR
schedule."""

from mp.optim.clip_grads import (
    clip_grad_by_total_norm_fp32,
    counts_in_grad_norm,
    get_grad_norm_fp32,
)
from mp.optim.distrib_optimizer import DistributedOptimizer
from mp.optim.factory import get_megatron_optimizer
from mp.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler
from mp.optim.layer_wise import LayerWiseDistributedOptimizer
from mp.optim.lr_scheduler import OptimizerParamScheduler
from mp.optim.muon import MuonSettings, TensorParallelMuon
from mp.optim.optimizer import MixedPrecisionOptimizer, ParamShard, StepResult
from mp.optim.param_groups import get_param_groups
from mp.optim.precision_aware import PrecisionAwareAdamW

__all__ = [
    "ConstantGradScaler", "DistributedOptimizer", "DynamicGradScaler",
    "LayerWiseDistributedOptimizer", "MixedPrecisionOptimizer", "MuonSettings", "ParamShard",
    "PrecisionAwareAdamW", "OptimizerParamScheduler", "StepResult", "TensorParallelMuon",
    "clip_grad_by_total_norm_fp32", "counts_in_grad_norm", "get_grad_norm_fp32",
    "get_megatron_optimizer", "get_param_groups",
]
