"""The shared experts of a mixture-of-experts layer: a dense MLP that every token takes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mp.device import get_device
from mp.model.config import TransformerConfig
from mp.model.init import init_method
from mp.model.mlp import MLP


class SharedExperts(MLP):
    """`MLP` ``moe_shared_expert_intermediate_size`` wide (Megatron's ``SharedExpertMLP``):
    ``hidden [s, b, h]`` (``[s / t, b, h]`` with sequence parallelism) -> ``(output, None)``
    of the same shape, the output's bias added.

    With ``moe_shared_expert_gate`` (Qwen2-MoE's) each token's output is scaled by
    ``sigmoid(x . gate_weight)``, ``gate_weight [1, h]`` whole on every TP rank. Under
    sequence parallelism each rank gates its own tokens, so its gradient is partial over TP
    (marked ``sequence_parallel``, summed by `mp.distributed.finalize_model_grads`);
    without, every rank gates every token alike and holds the whole gradient.
    """

    def __init__(self, config: TransformerConfig, group=None):
        super().__init__(config, group, config.moe_shared_expert_intermediate_size)
        self.gate_weight = None
        if config.moe_shared_expert_gate:
            full = torch.empty(1, config.hidden_size, dtype=torch.float32, device=get_device())
            init_method(config)(full)
            self.gate_weight = nn.Parameter(full.to(config.params_dtype))
            self.gate_weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor):
        output, bias = super().forward(hidden)
        if bias is not None:
            output = output + bias
        if self.gate_weight is not None:
            output = output * torch.sigmoid(F.linear(hidden, self.gate_weight))
        return output, None
