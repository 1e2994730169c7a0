"""Sparse upcycling: a dense model's checkpoint as the start of a mixture-of-experts model
(Megatron's ``--moe-use-upcycling``; Komatsuzaki et al. 2023, "Sparse Upcycling"; He et al.
2024, "Upcycling Large Language Models into Mixture of Experts", arXiv 2410.07524).

The MoE model is the dense one with experts in its MoE layers: every other weight (attention,
norms, embeddings, the dense layers under ``moe_layer_freq``) is the dense checkpoint's, and
``ffn_hidden_size`` stays the dense MLP's width, as Megatron builds the dense model from the
same flags. With granularity ``G = ffn_hidden_size / moe_ffn_hidden_size`` each dense MLP
is cut into ``G`` pieces along its hidden units (the rows of ``linear_fc1`` and
``linear_gate`` with their biases, the columns of ``linear_fc2``), and expert ``e`` is piece
``e mod G``: the ``E`` experts are ``E / G`` copies of the whole MLP ("virtual groups" of
``G`` consecutive experts). Each group shares one router row (``E / G`` rows drawn as the
model draws its router, each repeated ``G`` times), so the router weighs a group's pieces
alike. The expert weights are scaled so that the routed sum keeps the dense MLP's size
(He et al.; Megatron's rule): by ``a^(1/3)`` on each of the gated unit's three projections
(SwiGLU, quick GeGLU) and under squared ReLU, ``a^(1/2)`` on both otherwise, where the
activation scale ``a`` is ``G`` with the softmax over the top ``k`` (the default) and
``E G / k`` with ``moe_router_pre_softmax``; ``linear_fc2``'s bias is every expert's,
unscaled.

With ``G = 1`` and the softmax over the top ``k`` (no ``moe_router_topk_scaling_factor``,
no capacity), a token's ``k`` weights sum to 1 over identical experts: the MoE model computes
exactly the dense model's logits at the start. Otherwise the start only approximates them.

`upcycled_start` is the job's side: rank 0 reads the dense checkpoint of ``training.load``,
upcycles it and writes it into ``training.save`` as a weights-only checkpoint (iteration 0),
which every rank then loads like any other (at any layout); the run starts at iteration 0
with a fresh optimizer. ``training.save`` must not hold a checkpoint yet, as in Megatron:
later runs resume ``training.save`` without the flag.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from mp.checkpointing.checkpoint import load_global_model, save_global_model
from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.files import find_checkpoint
from mp.checkpointing.fit import architecture_problems
from mp.checkpointing.job import StartPoint
from mp.config import JobConfig
from mp.model.config import TransformerConfig
from mp.model.init import init_method, init_method_normal
from mp.model.layer_pattern import moe_layer_pattern

_DENSE_MLP = re.compile(r"decoder\.layers\.(\d+)\.mlp\.linear_(gate|fc1|fc2)\.(weight|bias)")


def check_upcycling(cfg: JobConfig) -> None:
    """Refuse ``training.moe_use_upcycling`` where it cannot run (ValueError); reads
    metadata only and needs no process group."""
    tr, m = cfg.training, cfg.model
    if not tr.moe_use_upcycling:
        return
    rules = [(m.num_moe_experts is None, "model.num_moe_experts is not set: upcycling makes "
              "the experts of a mixture-of-experts model"),
             (find_checkpoint(tr.load) is None,
              f"training.load={tr.load!r} holds no dense checkpoint to upcycle"),
             (tr.save is None, "training.save is not set: the upcycled checkpoint is written "
              "there"),
             (tr.pretrained_checkpoint is not None or tr.finetune,
              "training.pretrained_checkpoint and training.finetune take another start"),
             (bool(m.moe_shared_expert_intermediate_size), "model.moe_shared_expert_"
              "intermediate_size is set: a shared expert has no dense counterpart"),
             (bool(m.mtp_num_layers), "model.mtp_num_layers is set: mp upcycles the decoder's "
              "layers only")]
    for broken, why in rules:
        if broken:
            raise ValueError(f"training.moe_use_upcycling=true: {why}")
    if find_checkpoint(tr.save) is not None:
        raise ValueError(f"training.moe_use_upcycling=true but training.save={tr.save!r} holds "
                         "a checkpoint already: upcycling runs once, on the first run; resume "
                         "it with --load pointing there and without --moe-use-upcycling "
                         "(Megatron's rule)")
    pieces_of_granularity(m)


def pieces_of_granularity(config: TransformerConfig) -> int:
    """``G = ffn_hidden_size / moe_ffn_hidden_size``, checked to divide both it and the
    number of experts (ValueError)."""
    dense, expert = config.ffn_hidden_size, config.moe_ffn_hidden_size
    if dense % expert:
        raise ValueError(f"model.ffn_hidden_size={dense} (the dense MLP's) is not divisible by "
                         f"model.moe_ffn_hidden_size={expert}: upcycling cuts each dense MLP "
                         "into whole experts")
    if config.num_moe_experts % (dense // expert):
        raise ValueError(f"model.num_moe_experts={config.num_moe_experts} is not divisible by "
                         f"the granularity ffn_hidden_size / moe_ffn_hidden_size = "
                         f"{dense // expert}: each copy of the dense MLP takes that many experts")
    return dense // expert


def weight_scale(config: TransformerConfig) -> float:
    """What every upcycled expert projection is multiplied by (module doc)."""
    pieces, topk = pieces_of_granularity(config), config.moe_router_topk
    activation_scale = (config.num_moe_experts * pieces / topk if config.moe_router_pre_softmax
                        else pieces)
    root = 3 if config.gated_linear_unit or config.activation == "squared_relu" else 2
    return activation_scale ** (1 / root)


def upcycle(dense: dict[str, torch.Tensor], config: TransformerConfig, seed: int
            ) -> dict[str, torch.Tensor]:
    """The MoE model's whole weights ``{global name: tensor}`` from the dense model's; the
    router rows drawn from ``seed``. Expert tensors are ``[E, ...]``: ``experts.fc1_weight
    [E, moe_ffn, h]`` from ``linear_fc1.weight [ffn, h]`` and so on."""
    pieces, scale = pieces_of_granularity(config), weight_scale(config)
    experts, copies = config.num_moe_experts, config.num_moe_experts // pieces
    pattern = moe_layer_pattern(config.num_layers, experts, config.moe_layer_freq)
    weights, generator_state = {}, torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name, tensor in dense.items():
            match = _DENSE_MLP.fullmatch(name)
            if match is None or not pattern[int(match[1])]:
                weights[name] = tensor
                continue
            layer, projection, kind = match[1], match[2], match[3]
            prefix = f"decoder.layers.{layer}.mlp."
            if projection == "fc2" and kind == "bias":
                weights[f"{prefix}experts.fc2_bias"] = tensor.expand(experts, -1).clone()
                continue
            cut = tensor.float() * scale
            along = 1 if projection == "fc2" else 0  # fc2's input columns, else output rows
            group = torch.stack(cut.tensor_split(pieces, dim=along))  # [G, ...] the pieces
            weights[f"{prefix}experts.{projection}_{kind}"] = \
                group.repeat(copies, *[1] * cut.dim()).to(tensor.dtype)
            if projection == "fc1" and kind == "weight":
                weights.update(_router(prefix, config, copies, pieces))
    finally:
        torch.random.set_rng_state(generator_state)
    return weights


def _router(prefix: str, config: TransformerConfig, copies: int, pieces: int
            ) -> dict[str, torch.Tensor]:
    """A MoE layer's router: ``copies`` rows drawn as `mp.model.moe.router` draws its weight,
    each repeated for its group's ``pieces`` experts; a bias likewise, the expert bias 0."""
    rows = torch.empty(copies, config.hidden_size)
    init_method(config)(rows)
    router = {f"{prefix}router.weight": rows.repeat_interleave(pieces, dim=0)}
    if config.moe_router_bias:
        bias = torch.empty(copies)
        init_method_normal(config.init_method_std)(bias)
        router[f"{prefix}router.bias"] = bias.repeat_interleave(pieces)
    if config.moe_router_enable_expert_bias:
        router[f"{prefix}router.expert_bias"] = torch.zeros(config.num_moe_experts)
    return router


def upcycle_checkpoint(dense_dir: str | Path, save_dir: str | Path, config: TransformerConfig,
                       seed: int) -> Path:
    """Read the dense checkpoint in ``dense_dir``, upcycle it (`upcycle`) and write it as
    a weights-only checkpoint (iteration 0) into ``save_dir``; one process. CheckpointError
    when the dense model is not ``config``'s without its experts."""
    dense, info = load_global_model(dense_dir)
    saved = info.model_config
    if saved.get("num_moe_experts") is not None:
        raise CheckpointError(f"{info.path} holds a model with {saved['num_moe_experts']} "
                              "experts already: upcycling takes a dense one")
    moe_fields = {name: getattr(config, name) for name in ("num_moe_experts", "moe_layer_freq",
                                                           "moe_ffn_hidden_size",
                                                           "moe_shared_expert_gate")}
    problems = architecture_problems({**saved, **moe_fields}, config)
    if problems:
        raise CheckpointError(f"cannot upcycle {info.path} into this model: "
                              + "; ".join(problems))
    return save_global_model(save_dir, config, upcycle(dense, config, seed))


def upcycled_start(cfg: JobConfig) -> StartPoint:
    """The job's start under ``training.moe_use_upcycling``: rank 0 writes the upcycled
    checkpoint into ``training.save`` while the others wait; then every rank starts from it,
    weights only. Collective; an error on rank 0 is raised on every rank."""
    tr = cfg.training
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = upcycle_checkpoint(tr.load, tr.save, cfg.model, tr.seed)
            print(f"upcycled the dense checkpoint of {tr.load} into {outcome[0]} "
                  f"({cfg.model.num_moe_experts} experts, granularity "
                  f"{pieces_of_granularity(cfg.model)})", flush=True)
        except (CheckpointError, ValueError) as error:
            outcome[0] = error
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise CheckpointError(str(outcome[0]))
    return StartPoint(Path(outcome[0]))
