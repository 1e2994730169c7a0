"""The transformer MLP: column-parallel up-projection, activation, row-parallel down."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mp.jit import jit_fuser
from mp.model.config import TransformerConfig
from mp.model.init import init_method, output_init_method
from mp.tensor_parallel import ColumnParallelLinear, RowParallelLinear, checkpoint
from mp.tensor_parallel.fp8 import Fp8Recipe


class MLP(nn.Module):
    """``[s, b, h] -> [s, b, ffn / t] -> act -> (output [s, b, h], bias)``; ``ffn`` is
    ``config.ffn_hidden_size`` unless ``ffn_hidden_size`` is given (shared experts). ``fp8``
    runs the projections' products in FP8 (`mp.model.fp8_layers`).

    GeLU: ``fc2(gelu(fc1 x))``, exact (erf) or, for ``activation="gelu_tanh"``, the tanh
    approximation GPT-2 was trained with (Hugging Face's ``gelu_new``, Megatron's
    ``--openai-gelu``). Squared ReLU (So et al. 2021, Megatron's ``--squared-relu``):
    ``fc2(relu(fc1 x)^2)``. SwiGLU (Shazeer 2020):
    ``fc2(silu(gate x) * fc1 x)``; quick GeGLU (gpt-oss's, Megatron's ``--quick-geglu``):
    ``fc2(g sigmoid(1.702 g) * fc1 x)`` with ``g = gate x``. Either gated unit takes
    ``config.activation_func_clamp_value`` ``c`` (``g`` clamped to at most ``c``, ``fc1 x`` to
    ``[-c, c]``, after the biases) and ``config.glu_linear_offset`` ``o`` (``fc1 x + o``
    after the clamp), as Megatron's unfused gated unit does (`bias_glu`). The gate of either
    is its own column-parallel layer, so the sharded
    weights mean the same thing at every TP size (a fused ``[gate; up]`` weight would
    interleave differently per layout). Under sequence parallelism that costs a second
    all-gather of the input.

    The fc1 (and gate) biases are added inside the activation. With
    ``config.bias_activation_fusion`` (Megatron's ``bias_gelu_fusion`` / ``bias_swiglu_fusion``)
    bias and activation run as one compiled kernel (`mp.jit`): GeLU (squared ReLU alike) reads
    ``[s, b, ffn / t]`` once and writes it once instead of twice each; SwiGLU also saves only
    the gate and up projections for backward (the SiLU output is recomputed), two
    ``[s, b, ffn / t]`` tensors instead of three.
    """

    def __init__(self, config: TransformerConfig, group=None, ffn_hidden_size: int | None = None,
                 fp8: Fp8Recipe | None = None):
        super().__init__()
        kw = dict(bias=config.add_bias_linear, sequence_parallel=config.sequence_parallel,
                  params_dtype=config.params_dtype, group=group, fp8=fp8)
        init = init_method(config)
        h = config.hidden_size
        ffn = config.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size
        self.activation = config.activation
        self.swiglu = config.gated_linear_unit  # a gate projection (SwiGLU or quick GeGLU)
        self.fused = config.bias_activation_fusion
        self.glu_options = glu_options(config)
        self.linear_fc1 = ColumnParallelLinear(h, ffn, init_method=init, skip_bias_add=True, **kw)
        self.linear_gate = (ColumnParallelLinear(h, ffn, init_method=init, skip_bias_add=True,
                                                 **kw) if self.swiglu else None)
        self.linear_fc2 = RowParallelLinear(
            ffn, h, input_is_parallel=True, skip_bias_add=True,
            init_method=output_init_method(config),
            **kw)

    def forward(self, hidden: torch.Tensor):
        up, up_bias = self.linear_fc1(hidden)
        gate = self.linear_gate(hidden) if self.swiglu else (None, None)
        return self.linear_fc2(bias_activation(self.activation, up, up_bias, *gate,
                                               fused=self.fused, **self.glu_options))


def checkpointed(module: nn.Module, hidden: torch.Tensor):
    """``module(hidden)`` for a module that returns ``(output, bias)`` (an `MLP`, a
    mixture-of-experts layer), recomputed in backward (`mp.tensor_parallel.checkpoint`). The
    bias, a parameter or None, passes around the checkpoint: returned from it, a parameter
    would take the checkpoint's graph as its own."""
    bias = []

    def output(x):
        out, out_bias = module(x)
        bias[:] = [out_bias]
        return out
    return checkpoint(output, False, hidden), bias[0]


def glu_options(config: TransformerConfig) -> dict:
    """`bias_activation`'s ``clamp`` and ``offset`` of ``config`` (Megatron's
    ``activation_func_clamp_value`` and ``glu_linear_offset``)."""
    return {"clamp": config.activation_func_clamp_value, "offset": config.glu_linear_offset}


def bias_activation(activation: str, up: torch.Tensor, up_bias: torch.Tensor | None,
                    gate: torch.Tensor | None, gate_bias: torch.Tensor | None,
                    fused: bool, clamp: float | None = None, offset: float = 0.0
                    ) -> torch.Tensor:
    """The MLP's activation of ``up`` (plus its bias): `bias_swiglu` with ``gate`` for
    ``activation="swiglu"`` (`bias_glu` with a ``clamp`` or an ``offset``), `bias_glu` for
    ``"quick_geglu"``, else `bias_squared_relu` or `bias_gelu` (``gate``, ``clamp`` and
    ``offset`` unused: the config refuses them there)."""
    if activation == "quick_geglu" or (activation == "swiglu"
                                       and (clamp is not None or offset != 0.0)):
        return bias_glu(up, up_bias, gate, gate_bias, activation == "quick_geglu", clamp,
                        offset, fused=fused)
    if activation == "swiglu":
        return bias_swiglu(up, up_bias, gate, gate_bias, fused=fused)
    if activation == "squared_relu":
        return bias_squared_relu(up, up_bias, fused=fused)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return bias_gelu(up, up_bias, approximate, fused=fused)


def _with_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


def _bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    return F.gelu(_with_bias(x, bias), approximate=approximate)


def _bias_squared_relu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.relu(_with_bias(x, bias)).square()


def _bias_swiglu(up: torch.Tensor, up_bias: torch.Tensor | None, gate: torch.Tensor,
                 gate_bias: torch.Tensor | None) -> torch.Tensor:
    return F.silu(_with_bias(gate, gate_bias)) * _with_bias(up, up_bias)


QUICK_GELU_ALPHA = 1.702  # quick GeLU's sigmoid(1.702 x) (Hendrycks & Gimpel; Megatron's)


def _bias_glu(up: torch.Tensor, up_bias: torch.Tensor | None, gate: torch.Tensor,
              gate_bias: torch.Tensor | None, quick: bool, clamp: float | None,
              offset: float) -> torch.Tensor:
    gate, up = _with_bias(gate, gate_bias), _with_bias(up, up_bias)
    if clamp is not None:
        gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
    # quick GeLU as silu(1.702 g) / 1.702 = g sigmoid(1.702 g): backward keeps 1.702 g and
    # the output, as SwiGLU's keeps g and the output
    act = (F.silu(QUICK_GELU_ALPHA * gate) / QUICK_GELU_ALPHA) if quick else F.silu(gate)
    return act * (up + offset if offset != 0.0 else up)


_bias_gelu_fused = jit_fuser(_bias_gelu)
_bias_squared_relu_fused = jit_fuser(_bias_squared_relu)
_bias_swiglu_fused = jit_fuser(_bias_swiglu)
_bias_glu_fused = jit_fuser(_bias_glu)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str,
              fused: bool) -> torch.Tensor:
    """``gelu(x + bias)`` for ``x [s, b, ffn / t]`` and ``bias [ffn / t]`` or None;
    ``approximate`` is "none" (erf) or "tanh". ``fused``: one compiled kernel (`mp.jit`)."""
    return (_bias_gelu_fused if fused else _bias_gelu)(x, bias, approximate)


def bias_squared_relu(x: torch.Tensor, bias: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """``relu(x + bias)^2`` for ``x [s, b, ffn / t]`` and ``bias [ffn / t]`` or None.
    ``fused``: one compiled kernel (`mp.jit`)."""
    return (_bias_squared_relu_fused if fused else _bias_squared_relu)(x, bias)


def bias_swiglu(up: torch.Tensor, up_bias: torch.Tensor | None, gate: torch.Tensor,
                gate_bias: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """``silu(gate + gate_bias) * (up + up_bias)`` for ``up, gate [s, b, ffn / t]`` and biases
    ``[ffn / t]`` or None. ``fused``: one compiled kernel (`mp.jit`), which saves ``up`` and
    ``gate`` for backward and recomputes the SiLU."""
    return (_bias_swiglu_fused if fused else _bias_swiglu)(up, up_bias, gate, gate_bias)


def bias_glu(up: torch.Tensor, up_bias: torch.Tensor | None, gate: torch.Tensor,
             gate_bias: torch.Tensor | None, quick: bool, clamp: float | None, offset: float,
             fused: bool) -> torch.Tensor:
    """A gated unit as Megatron's unfused MLP computes it, for ``up, gate [s, b, ffn / t]``
    and biases ``[ffn / t]`` or None: ``g = gate + gate_bias``, ``u = up + up_bias``; with
    ``clamp`` ``c``, ``g = min(g, c)`` and ``u = clamp(u, -c, c)``; then
    ``act(g) * (u + offset)`` with ``act`` quick GeLU ``g sigmoid(1.702 g)`` (``quick``) or
    SiLU. Eager, backward keeps ``1.702 g`` (or ``g``), ``act(g)`` and ``u + offset``, and
    with a clamp the unclamped ``g`` and ``u`` too. ``fused``: one compiled kernel
    (`mp.jit`)."""
    return (_bias_glu_fused if fused else _bias_glu)(up, up_bias, gate, gate_bias, quick, clamp,
                                                     offset)
