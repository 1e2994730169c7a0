"""Muon (Megatron-Core's ``--optimizer muon``): momentum orthogonalized by Newton-Schulz.

Each matrix ``W [m, n]`` with gradient ``G`` steps as Megatron's ``TensorParallelMuon`` (over
NVIDIA's Emerging-Optimizers ``OrthogonalizedOptimizer``) does:

1. ``M = mu M + (1 - mu) G`` (``muon_momentum``; ``M`` starts at zero);
2. ``U = (1 - mu) G + mu M`` with ``muon_use_nesterov``, else ``U = M``;
3. ``O = NS(U) * scale(m, n) * muon_extra_scale_factor``, ``NS`` the Newton-Schulz iteration
   (`newton_schulz`) and ``scale`` by ``muon_scale_mode`` (`scale_factor`);
4. ``W = W (1 - lr wd) - lr O`` (decoupled weight decay, the group's ``lr`` and
   ``weight_decay`` as the schedule sets them).

Megatron's split (`is_muon_parameter`): the 2-D weights of the linear layers (attention, MLP,
experts, routers, multi-token prediction's projection) take Muon; the word embedding, output
layer, norms and biases take AdamW. Unlike Megatron, the learned position table (2-D, but an
embedding: Megatron only marks the word embedding) takes AdamW too. mp stacks a layer's
experts into one ``[E, m, n]`` tensor per weight kind: each expert's matrix is orthogonalized
on its own, as Megatron's per-expert weights are.

Fused weights, as Megatron treats them: the QKV projection ``[g (q + 2 d), h]`` is split per
query group into its queries, keys and values, each orthogonalized and scaled on its own
(``muon_split_qkv``, Megatron's default); SwiGLU's gate and up projections, which are one
fused ``fc1`` weight in Megatron, are two parameters in mp and are orthogonalized together as
that one ``[gate; up]`` matrix (`muon_units`).

Under tensor parallelism a rank holds a shard of a weight; ``muon_tp_mode`` picks how it is
orthogonalized (Megatron's modes): ``blockwise`` (Megatron's default) orthogonalizes and
scales each rank's shard as a matrix of its own, so the result depends on the TP size;
``duplicated`` all-gathers the whole matrix, orthogonalizes it on every rank and keeps this
rank's shard; ``distributed`` runs the iteration on the shards, all-reducing the Gram matrices
``X X^T`` over the sharded dimension. The last two equal the TP 1 update.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.optim.param_groups import is_embedding_or_output_parameter

#: Newton-Schulz coefficients ``(a, b, c)`` of ``X <- a X + (b A + c A^2) X``, ``A = X X^T``:
#: "simple" repeats Keller Jordan's, "quintic" cycles the five tuned per step (a multiple of
#: five steps), as Emerging-Optimizers' sets of those names.
NS_COEFFICIENTS = {
    "simple": ((3.4445, -4.7750, 2.0315),),
    "quintic": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377),
                (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
                (2.8366, -3.0525, 1.2012)),
}
SCALE_MODES = ("spectral", "unit_rms_norm", "shape_scaling")
TP_MODES = ("blockwise", "duplicated", "distributed")
FP32_MATMUL_PRECISIONS = ("medium", "high")


@dataclass(frozen=True)
class MuonSettings:
    """Muon's hyper-parameters (Megatron's ``--muon-*`` flags, same defaults)."""

    momentum: float = 0.9
    use_nesterov: bool = False
    num_ns_steps: int = 5
    coefficient_type: str = "quintic"
    scale_mode: str = "spectral"
    extra_scale_factor: float = 1.0
    fp32_matmul_prec: str = "medium"  # medium: the iteration in bf16; high: fp32 (TF32)
    tp_mode: str = "blockwise"
    split_qkv: bool = True

    def __post_init__(self):
        problems = [f"{name}={getattr(self, name)!r} must be one of {', '.join(allowed)}"
                    for name, allowed in (("coefficient_type", tuple(NS_COEFFICIENTS)),
                                          ("scale_mode", SCALE_MODES),
                                          ("fp32_matmul_prec", FP32_MATMUL_PRECISIONS),
                                          ("tp_mode", TP_MODES))
                    if getattr(self, name) not in allowed]
        if self.num_ns_steps < 1 or self.num_ns_steps % len(
                NS_COEFFICIENTS.get(self.coefficient_type, ((),))):
            problems.append(f"num_ns_steps={self.num_ns_steps} must be a positive multiple of "
                            f"the {len(NS_COEFFICIENTS.get(self.coefficient_type, ((),)))} "
                            f"coefficient sets of coefficient_type={self.coefficient_type!r}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum={self.momentum} must be in [0, 1)")
        if problems:
            raise ValueError("Muon: " + "; ".join(problems))


def newton_schulz(x: torch.Tensor, steps: int, coefficient_type: str = "quintic",
                  bf16: bool = True, group=None, transpose: bool | None = None,
                  eps: float = 1e-7) -> torch.Tensor:
    """The orthogonalization ``~ U V^T`` of ``x [..., m, n]`` (``x = U S V^T``; fp32, batched
    over leading dims), by ``steps`` Newton-Schulz iterations on ``x / ||x||_F``, transposed to
    iterate on the smaller side (or as ``transpose`` says). ``bf16``: iterate in bf16 (Megatron's
    ``fp32_matmul_prec="medium"``). With ``group`` the columns (after the transpose) are split
    over its ranks: the squared norm and each ``X X^T`` are summed over them."""
    sets = NS_COEFFICIENTS[coefficient_type]
    if steps % len(sets):
        raise ValueError(f"steps={steps} is not a multiple of the {len(sets)} coefficient sets "
                         f"of {coefficient_type!r}")
    if transpose is None:
        transpose = x.size(-2) > x.size(-1)
    if transpose:
        x = x.mT
    squared = x.square().sum(dim=(-2, -1), keepdim=True)
    if group is not None:
        dist.all_reduce(squared, group=group)
    X = x / squared.sqrt().clamp_min(eps)
    if bf16:
        X = X.bfloat16()
    for a, b, c in sets * (steps // len(sets)):
        A = X @ X.mT
        if group is not None:
            dist.all_reduce(A, group=group)
        X = a * X + (b * A + c * (A @ A)) @ X
    X = X.float()
    return X.mT if transpose else X


def scale_factor(rows: int, cols: int, mode: str) -> float:
    """The update's scale for a ``[rows, cols]`` matrix (Megatron's ``get_muon_scale_factor``):
    ``spectral`` ``sqrt(max(rows, cols))``, ``shape_scaling`` ``sqrt(max(1, rows / cols))``
    (Keller Jordan's), ``unit_rms_norm`` ``sqrt(rows / cols)``."""
    if mode == "spectral":
        return math.sqrt(max(rows, cols))
    if mode == "shape_scaling":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "unit_rms_norm":
        return math.sqrt(rows / cols)
    raise ValueError(f"scale_mode={mode!r} must be one of {', '.join(SCALE_MODES)}")


def _stacked(name: str) -> bool:
    """Whether ``name`` is a layer's stacked experts ``[E, ...]`` (not a shared expert's)."""
    return ".experts." in "." + name and "shared_experts" not in name


def is_muon_parameter(name: str, param: nn.Parameter) -> bool:
    """Whether Muon updates ``param`` (called ``name`` in a chunk): a trained matrix, per
    expert for stacked experts, other than the word and position embeddings and the output
    layer (module doc)."""
    return (param.requires_grad and param.dim() - _stacked(name) == 2
            and not is_embedding_or_output_parameter(name)
            and not name.endswith("position_embeddings.weight"))


#: suffix of a gate weight -> that of the up projection it is fused with in Megatron's fc1
_FUSED_WITH = {"linear_gate.weight": "linear_fc1.weight",
               "experts.gate_weight": "experts.fc1_weight"}


@dataclass(eq=False)
class MuonUnit:
    """Tensors orthogonalized as one matrix: concatenated along their rows (a gate and its up
    projection), or, with ``qkv_split``, one QKV weight cut per query group into queries,
    keys and values of those row counts. ``partition_dim``: the dimension split over
    ``group`` (the TP group) when the tensors are TP shards, else None."""

    tensors: tuple[torch.Tensor, ...]
    qkv_split: tuple[int, int, int] | None
    partition_dim: int | None
    group: object = None

    def with_tensors(self, tensors) -> MuonUnit:
        return MuonUnit(tuple(tensors), self.qkv_split, self.partition_dim, self.group)


def muon_units(model_chunks, split_qkv: bool = True) -> list[MuonUnit]:
    """The `MuonUnit`s of the chunks' Muon parameters (`is_muon_parameter`), each parameter
    in one unit; QKV weights split per query group when ``split_qkv``. A TP shard's group is
    the TP group, or for experts the expert TP group (none with ETP = 1: whole experts)."""
    named = {name: param for chunk in model_chunks for name, param in chunk.named_parameters()
             if is_muon_parameter(name, param)}
    configs = [m.config for chunk in model_chunks for m in chunk.modules()
               if hasattr(getattr(m, "config", None), "kv_channels")]
    partner = {}  # gate name -> its up projection's name
    for name in named:
        for gate, up in _FUSED_WITH.items():
            if name.endswith(gate) and name[:-len(gate)] + up in named:
                partner[name] = name[:-len(gate)] + up
    units, fused_ups = [], set(partner.values())
    for name, param in named.items():
        if name in fused_ups:
            continue  # in its gate's unit
        tensors, split = (param,), None
        if name in partner:
            tensors = (param, named[partner[name]])  # [gate; up], Megatron's fc1 order
        if split_qkv and name.endswith("query_key_value.weight"):
            cfg = configs[0]
            groups = cfg.num_query_groups or cfg.num_attention_heads
            d = cfg.kv_channels
            split = (cfg.num_attention_heads // groups * d, d, d)
        group = (parallel_state.get_expert_tensor_parallel_group() if _stacked(name)
                 else parallel_state.get_tensor_model_parallel_group())
        sharded = getattr(param, "tensor_model_parallel", False) and group is not None \
            and dist.get_world_size(group) > 1
        units.append(MuonUnit(tensors, split, param.partition_dim if sharded else None,
                              group if sharded else None))
    return units


class TensorParallelMuon(torch.optim.Optimizer):
    """Muon over ``units`` (`MuonUnit`s of the tensors in ``params``, fp32), by the module
    doc's steps. ``params``: ``torch.optim`` groups (``lr``, ``weight_decay`` per group, set by
    the schedule). State per tensor: ``momentum_buffer``, shaped like it."""

    def __init__(self, params, units: list[MuonUnit], settings: MuonSettings, lr: float):
        super().__init__(params, dict(lr=lr, weight_decay=0.0, momentum=settings.momentum,
                                      nesterov=settings.use_nesterov))
        self.units, self.settings = units, settings
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        held = [id(t) for u in units for t in u.tensors]
        if len(held) != len(set(held)) or set(held) != mine:
            raise ValueError("TensorParallelMuon: the units must hold each of the optimizer's "
                             "parameters once")

    @torch.no_grad()
    def step(self, closure=None):
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for unit in self.units:
            if any(t.grad is None for t in unit.tensors):
                continue
            updates = []
            for tensor in unit.tensors:
                group = group_of[id(tensor)]
                state = self.state[tensor]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(tensor)
                buf, mu = state["momentum_buffer"], group["momentum"]
                buf.lerp_(tensor.grad, 1 - mu)
                updates.append(tensor.grad.lerp(buf, mu) if group["nesterov"] else buf)
            for tensor, update in zip(unit.tensors, self._orthogonalize_unit(unit, updates)):
                group = group_of[id(tensor)]
                tensor.mul_(1 - group["lr"] * group["weight_decay"])
                tensor.add_(update, alpha=-group["lr"])

    def _orthogonalize_unit(self, unit: MuonUnit, updates: list[torch.Tensor]
                            ) -> list[torch.Tensor]:
        """The scaled orthogonal updates of ``unit``'s tensors (``updates`` shaped like
        them): its QKV parts each on their own, else its tensors' rows together."""
        if unit.qkv_split is not None:
            (update,) = updates
            groups = update.size(-2) // sum(unit.qkv_split)
            parts = update.unflatten(-2, (groups, -1)).split(unit.qkv_split, dim=-2)
            done = [self._orthogonalize(p.flatten(-3, -2), unit).unflatten(-2, (groups, -1))
                    for p in parts]
            return [torch.cat(done, dim=-2).flatten(-3, -2)]
        fused = self._orthogonalize(torch.cat(updates, dim=-2), unit)
        return list(fused.split([u.size(-2) for u in updates], dim=-2))

    def _orthogonalize(self, x: torch.Tensor, unit: MuonUnit) -> torch.Tensor:
        """``NS(x) * scale`` for ``x [..., m, n]``, this rank's shard of the matrix when
        ``unit`` is sharded, by ``tp_mode`` (module doc)."""
        s = self.settings
        ns = dict(steps=s.num_ns_steps, coefficient_type=s.coefficient_type,
                  bf16=s.fp32_matmul_prec == "medium")
        dim, group = unit.partition_dim, unit.group
        mode = "blockwise" if dim is None else s.tp_mode
        shape = list(x.shape)
        with _matmul_precision(s.fp32_matmul_prec):
            if mode == "duplicated":
                world = dist.get_world_size(group)
                gathered = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(gathered, x.contiguous(), group=group)
                whole = torch.cat(gathered, dim=dim)
                out = newton_schulz(whole, **ns).chunk(world, dim=dim)[dist.get_rank(group)]
                shape[dim] *= world
            elif mode == "distributed":  # rows sharded: iterate on x^T, whose columns are
                out = newton_schulz(x, **ns, group=group, transpose=dim == x.dim() - 2)
                shape[dim] *= dist.get_world_size(group)
            else:
                out = newton_schulz(x, **ns)
        return out * (scale_factor(shape[-2], shape[-1], s.scale_mode) * s.extra_scale_factor)


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """torch's fp32 matmul precision set to ``precision`` (Megatron's
    ``muon_fp32_matmul_prec``) for the iteration."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
