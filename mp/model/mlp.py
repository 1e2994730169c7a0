"""The transformer MLP: column-parallel up-projection, activation, row-parallel down."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mp.model.config import TransformerConfig
from mp.model.init import init_method_normal, scaled_init_method_normal
from mp.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """``[s, b, h] -> [s, b, ffn / t] -> act -> (output [s, b, h], bias)``.

    GeLU: ``fc2(gelu(fc1 x))``, exact (erf) or, for ``activation="gelu_tanh"``, the tanh
    approximation GPT-2 was trained with (Hugging Face's ``gelu_new``). SwiGLU (Shazeer 2020):
    ``fc2(silu(gate x) * fc1 x)``; the gate is its own column-parallel layer, so the sharded
    weights mean the same thing at every TP size (a fused ``[gate; up]`` weight would
    interleave differently per layout). Under sequence parallelism that costs a second
    all-gather of the input.
    """

    def __init__(self, config: TransformerConfig, group=None):
        super().__init__()
        kw = dict(bias=config.add_bias_linear, sequence_parallel=config.sequence_parallel,
                  params_dtype=config.params_dtype, group=group)
        init = init_method_normal(config.init_method_std)
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.swiglu = config.activation == "swiglu"
        self.gelu_approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.linear_fc1 = ColumnParallelLinear(h, ffn, init_method=init, skip_bias_add=True, **kw)
        self.linear_gate = (ColumnParallelLinear(h, ffn, init_method=init, skip_bias_add=True,
                                                 **kw) if self.swiglu else None)
        self.linear_fc2 = RowParallelLinear(
            ffn, h, input_is_parallel=True, skip_bias_add=True,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            **kw)

    def forward(self, hidden: torch.Tensor):
        up = _with_bias(*self.linear_fc1(hidden))
        if self.swiglu:
            up = F.silu(_with_bias(*self.linear_gate(hidden))) * up
        else:
            up = F.gelu(up, approximate=self.gelu_approximate)
        return self.linear_fc2(up)


def _with_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias
