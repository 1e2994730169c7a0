"""The experts of a mixture-of-experts layer that one rank holds."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mp.device import get_device
from mp.model.config import TransformerConfig
from mp.model.init import init_method, output_init_method
from mp.model.mlp import bias_activation, glu_options
from mp.model.moe import grouped_gemm
from mp.tensor_parallel import CheckpointWithoutOutput


class Experts(nn.Module):
    """Experts ``first .. first + E / EP - 1`` of a layer, each an MLP split over the ``t``
    ranks of ``tp_group`` (the expert TP group: TP, or None for whole experts, ETP=1) as
    `mp.model.mlp.MLP` is, their weights stacked:

    - ``fc1_weight`` (and for SwiGLU or quick GeGLU ``gate_weight``) ``[E / EP, f / t, h]``,
      ``fc2_weight [E / EP, h, f / t]``; biases ``fc1_bias``, ``gate_bias [E / EP, f / t]``
      and ``fc2_bias [E / EP, h]`` (with ``add_bias_linear``).

    ``forward(tokens [M, h], counts)`` runs expert ``first + l`` on the ``counts[l]`` rows
    after those of the experts before it and returns ``[M, h]``: this TP rank's partial sums
    (the layer reduces them over TP once for all experts). ``fc2_bias``, replicated over TP,
    is added as ``fc2_bias / t`` on each TP rank, so the sum holds it once; its gradient is
    then partial and summed over TP (``sequence_parallel``, with ``t > 1`` only).

    With ``moe_grouped_gemm`` each weight kind's products run as one grouped GEMM over all
    the experts (`mp.model.moe.grouped_gemm`) where torch's kernel takes the dtype and device;
    otherwise, and by default, the experts run one after another.

    Every parameter is marked ``allreduce = False`` (Megatron's marker: reduced over the
    expert-data-parallel ranks, `mp.distributed`) and placed in its global ``[E, ...]`` tensor
    (``global_shape``, ``shard_offset``), so checkpoints load at any EP, TP and ETP.
    ``tensor_model_parallel`` (Megatron's marker; the gradient norm counts a parameter
    without it on TP rank 0 only) is set where no other TP rank holds a copy: on the shards
    over ``t > 1`` ranks, and on every whole expert under TP > 1 (ETP=1), the TP ranks then
    holding different experts. Weights are drawn as a serial model's would be, expert by
    expert, whatever the layout.
    """

    def __init__(self, config: TransformerConfig, tp_group, ep_rank: int, ep_size: int):
        super().__init__()
        e, f, h = config.num_moe_experts, config.moe_ffn_hidden_size, config.hidden_size
        self.local = e // ep_size
        first = ep_rank * self.local
        self.tp_size, tp_rank = ((1, 0) if tp_group is None else
                                 (dist.get_world_size(tp_group), dist.get_rank(tp_group)))
        self.folded = self.tp_size < config.tensor_model_parallel_size  # whole, ETP=1
        self.activation, self.fused = config.activation, config.bias_activation_fusion
        self.glu_options = glu_options(config)  # clamp and offset of a gated unit
        self.recompute_activation = config.recomputes("moe_act")
        self.grouped = config.moe_grouped_gemm
        swiglu = config.gated_linear_unit  # a gate weight: SwiGLU or quick GeGLU
        shard = f // self.tp_size
        # (name, full [f, h] or [h, f] of one expert, the TP-split dim of it, init)
        weights = [("fc1_weight", (f, h), 0, init_method(config))]
        if swiglu:
            weights.append(("gate_weight", (f, h), 0, init_method(config)))
        weights.append(("fc2_weight", (h, f), 1, output_init_method(config)))
        device = get_device()
        stacked = {}  # this rank's slices, filled expert by expert
        for name, shape, dim, _ in weights:
            sizes = [shard if d == dim else n for d, n in enumerate(shape)]
            stacked[name] = torch.empty(self.local, *sizes, dtype=config.params_dtype,
                                        device=device)
        # one full fp32 weight alive at a time; none on the meta device (a build that counts
        # parameters), where there are no values to draw
        for expert in range(e if device.type != "meta" else 0):
            for name, shape, dim, init in weights:
                full = torch.empty(shape, dtype=torch.float32, device=device)
                init(full)
                if first <= expert < first + self.local:
                    stacked[name][expert - first].copy_(full.narrow(dim, tp_rank * shard, shard))
        for name, shape, dim, _ in weights:
            self._register(name, stacked[name], (e, *shape),
                           (first, *(tp_rank * shard if d == dim else 0 for d in range(2))),
                           dim + 1)
        if config.add_bias_linear:
            for name in ("fc1_bias", "gate_bias") if swiglu else ("fc1_bias",):
                self._register(name, torch.zeros(self.local, shard, dtype=config.params_dtype,
                                                 device=device), (e, f),
                               (first, tp_rank * shard), 1)
            self._register("fc2_bias", torch.zeros(self.local, h, dtype=config.params_dtype,
                                                   device=device), (e, h), (first, 0), None)
            self.fc2_bias.sequence_parallel = self.tp_size > 1
        else:
            self.fc1_bias = self.gate_bias = self.fc2_bias = None
        if not swiglu:
            self.gate_weight = self.gate_bias = None

    def _register(self, name: str, value: torch.Tensor, global_shape: tuple,
                  offsets: tuple, tp_dim: int | None) -> None:
        param = nn.Parameter(value)
        param.allreduce = False
        param.tensor_model_parallel = self.folded or (tp_dim is not None and self.tp_size > 1)
        param.partition_dim = -1 if tp_dim is None else tp_dim
        param.partition_stride = 1
        param.global_shape, param.shard_offset = tuple(global_shape), tuple(offsets)
        setattr(self, name, param)

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        weights = [w for w in (self.fc1_weight, self.gate_weight, self.fc2_weight)
                   if w is not None]
        recomputed = []  # with moe_act: the activations to recompute in backward
        if self.grouped and grouped_gemm.usable(tokens, *weights):
            output = self._grouped(tokens, counts, recomputed)
        else:
            output = torch.cat([self._expert(index, rows, recomputed)
                                for index, rows in enumerate(tokens.split(counts))])
        for activation in recomputed:
            activation.discard_output_and_register_recompute(output)
        return output

    def _expert(self, index: int, rows: torch.Tensor, recomputed: list) -> torch.Tensor:
        """Local expert ``index`` on its ``rows [m, h]`` -> ``[m, h]``."""
        def pick(param):
            return None if param is None else param[index]
        up = F.linear(rows, self.fc1_weight[index])
        gate = None if self.gate_weight is None else F.linear(rows, self.gate_weight[index])
        act = self._activation(recomputed, up, pick(self.fc1_bias), gate, pick(self.gate_bias))
        out = F.linear(act, self.fc2_weight[index])
        if self.fc2_bias is not None:
            out = out + self.fc2_bias[index] / self.tp_size
        return out

    def _grouped(self, tokens: torch.Tensor, counts: list[int], recomputed: list
                 ) -> torch.Tensor:
        """`forward` with one grouped GEMM per weight kind."""
        rows = grouped_gemm.GroupedRows(counts, tokens.element_size(), tokens.device)

        def per_row(bias):  # each padded row's expert's bias
            return None if bias is None else bias.index_select(0, rows.group)
        x = rows.pad(tokens)
        up = rows.mm(x, self.fc1_weight)
        gate = None if self.gate_weight is None else rows.mm(x, self.gate_weight)
        act = self._activation(recomputed, up, per_row(self.fc1_bias), gate,
                               per_row(self.gate_bias))
        out = rows.mm(act, self.fc2_weight)
        if self.fc2_bias is not None:
            out = out + per_row(self.fc2_bias) / self.tp_size
        return rows.unpad(out)

    def _activation(self, recomputed: list, up, up_bias, gate, gate_bias) -> torch.Tensor:
        """`mp.model.mlp.bias_activation` of ``up`` (and ``gate``). With ``moe_act`` among
        the recompute modules its output (fc2's input, the experts' widest tensor) is not kept
        for backward but recomputed from ``up`` and ``gate``, which the activation's backward
        keeps anyway: the `CheckpointWithoutOutput` joins ``recomputed``."""
        def activation(up, up_bias, gate, gate_bias):
            return bias_activation(self.activation, up, up_bias, gate, gate_bias, self.fused,
                                   **self.glu_options)
        if not (self.recompute_activation and self.training and torch.is_grad_enabled()):
            return activation(up, up_bias, gate, gate_bias)
        recomputed.append(CheckpointWithoutOutput())
        return recomputed[-1].checkpoint(activation, up, up_bias, gate, gate_bias)
