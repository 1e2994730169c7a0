"""Muon's Newton-Schulz matrix products in one optimizer step, per rank (`mp.optim.muon`).

Muon orthogonalizes each matrix it updates on its own (`muon_matrices`, as
`mp.optim.muon.muon_units` cuts them: with ``muon_split_qkv`` the QKV weight into its queries,
keys and values, each across the query groups; SwiGLU's gate and up projection as one
``[gate; up]`` matrix; each expert's; the routers', multi-latent attention's projections,
multi-token prediction's ``eh_proj``, a shared expert's gate). `mp.optim.muon.newton_schulz`
runs ``muon_num_ns_steps`` iterations of ``X <- a X + (b A + c A A) X``, ``A = X X^T``, on
``X [m, n]``; each runs three matrix products: ``X X^T`` (``2 m^2 n`` FLOPs), ``A A``
(``2 m^3``) and ``(b A + c A A) X`` (``2 m^2 n``), ``4 m^2 n + 2 m^3`` in all. For a matrix
sharded over ``t`` ranks (TP; an expert over ETP), ``muon_tp_mode`` sets ``m`` and ``n``:

- ``blockwise`` (and any matrix whole on the rank): the rank's shard, transposed so that
  ``m`` is its smaller side;
- ``duplicated``: the whole matrix, gathered, on every rank (``t`` times the work);
- ``distributed``: the shard, with ``m`` the unsharded side (whatever its size) and ``n`` the
  shard's; ``X X^T`` is all-reduced over the ``t`` ranks and ``A A`` runs whole on each.

`newton_schulz_flops` sums them on one rank of a stage; each count is checked against the
matrix products mp runs in a Muon step (``torch.utils.flop_counter``). The iteration runs in
bf16 (``muon_fp32_matmul_prec="medium"``) or in fp32 matrix products at torch's ``"high"``
precision, TF32 on NVIDIA GPUs (`mp.estimate.step_time` prices each).
"""

from __future__ import annotations

from dataclasses import dataclass

from mp.estimate.collective import Collective
from mp.estimate.params import FP32, mtp_layer_is_moe
from mp.estimate.setup import Setup
from mp.estimate.storage import expert_tensor_parallel_size
from mp.model.config import TransformerConfig


@dataclass(frozen=True)
class MuonMatrix:
    """``count`` matrices ``[rows, cols]`` Muon orthogonalizes each on its own on one rank:
    the rank's shards, their dimension ``split`` (0 rows, 1 columns) cut over ``ranks`` ranks
    (``split`` None: whole on the rank)."""

    rows: int
    cols: int
    count: int = 1
    split: int | None = None
    ranks: int = 1
    expert: bool = False  # the experts' (dealt over the expert-data-parallel ranks)

    @property
    def elements(self) -> int:
        return self.count * self.rows * self.cols

    def flops(self, steps: int, tp_mode: str) -> int:
        """Matrix-product FLOPs of ``steps`` Newton-Schulz iterations on all ``count``
        (module doc)."""
        shape = [self.rows, self.cols]
        if self.split is None or tp_mode == "blockwise":
            m, n = sorted(shape)
        elif tp_mode == "duplicated":
            shape[self.split] *= self.ranks
            m, n = sorted(shape)
        else:  # distributed: the sharded side is n
            m, n = shape[1 - self.split], shape[self.split]
        return self.count * steps * (4 * m * m * n + 2 * m ** 3)


def _shard(rows: int, cols: int, split: int, ranks: int, count: int = 1,
           expert: bool = False) -> MuonMatrix:
    """The shard of ``count`` ``[rows, cols]`` matrices whose dimension ``split`` is cut over
    ``ranks`` ranks (whole at 1)."""
    if ranks == 1:
        return MuonMatrix(rows, cols, count, expert=expert)
    shape = [rows, cols]
    shape[split] //= ranks
    return MuonMatrix(*shape, count, split, ranks, expert)


def _mlp(cfg: TransformerConfig, width: int, ranks: int, count: int = 1,
         expert: bool = False) -> list[list[MuonMatrix]]:
    """An MLP ``width`` wide over ``ranks``, as units: fc1 with a gated unit's gate as one
    matrix (column-parallel), fc2 (row-parallel)."""
    h, up = cfg.hidden_size, (2 if cfg.gated_linear_unit else 1) * width
    return [[_shard(up, h, 0, ranks, count, expert)], [_shard(h, width, 1, ranks, count, expert)]]


def layer_units(cfg: TransformerConfig, moe: bool = False,
                split_qkv: bool = True) -> list[list[MuonMatrix]]:
    """The matrices of one transformer layer on one rank (module doc), by Muon unit
    (`mp.optim.muon.muon_units`: the QKV weight's queries, keys and values are one) in the
    order of the layer's parameters; ``moe``: a mixture-of-experts layer's."""
    h, t = cfg.hidden_size, cfg.tensor_model_parallel_size
    if cfg.multi_latent_attention:  # down projections whole, up projections column-parallel
        a, dn, dr = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
        c, r = cfg.kv_lora_rank, cfg.q_lora_rank
        out = ([[_shard(a * (dn + dr), h, 0, t)]] if r is None
               else [[MuonMatrix(r, h)], [_shard(a * (dn + dr), r, 0, t)]])
        out += [[MuonMatrix(c + dr, h)], [_shard(a * (dn + cfg.v_head_dim), c, 0, t)]]
    elif split_qkv:  # queries, keys, values
        d, groups = cfg.kv_channels, cfg.num_query_groups or cfg.num_attention_heads
        out = [[_shard(cfg.num_attention_heads * d, h, 0, t)] + [_shard(groups * d, h, 0, t)] * 2]
    else:
        out = [[_shard(cfg.qkv_size, h, 0, t)]]
    out.append([_shard(h, cfg.query_projection_size, 1, t)])
    if not moe:
        return out + _mlp(cfg, cfg.ffn_hidden_size, t)
    out.append([MuonMatrix(cfg.num_moe_experts, h)])  # the router
    out += _mlp(cfg, cfg.moe_ffn_hidden_size, expert_tensor_parallel_size(cfg),
                cfg.num_moe_experts // cfg.expert_model_parallel_size, expert=True)
    if cfg.moe_shared_expert_gate:
        out.append([MuonMatrix(1, h)])
    if cfg.moe_shared_expert_intermediate_size is not None:
        out += _mlp(cfg, cfg.moe_shared_expert_intermediate_size, t)
    return out


def depth_units(cfg: TransformerConfig, split_qkv: bool = True) -> list[list[MuonMatrix]]:
    """One multi-token prediction depth's units: ``eh_proj [h, 2h]`` (whole), then a layer."""
    return [[MuonMatrix(cfg.hidden_size, 2 * cfg.hidden_size)],
            *layer_units(cfg, mtp_layer_is_moe(cfg), split_qkv)]


def muon_matrices(cfg: TransformerConfig, pp_rank: int = 0,
                  split_qkv: bool = True) -> list[MuonMatrix]:
    """The matrices Muon updates on one rank of stage ``pp_rank``: its layers', and on the
    last stage multi-token prediction's depths (each ``eh_proj [h, 2h]``, whole, and a
    layer)."""
    units = [u for index in cfg.stage_layers(pp_rank)
             for u in layer_units(cfg, cfg.is_moe_layer(index), split_qkv)]
    if pp_rank == cfg.pipeline_model_parallel_size - 1:
        units += depth_units(cfg, split_qkv) * (cfg.mtp_num_layers or 0)
    return [m for unit in units for m in unit]


def newton_schulz_flops(setup: Setup, pp_rank: int = 0) -> int:
    """Matrix-product FLOPs of one Muon step's Newton-Schulz iterations on one rank of stage
    ``pp_rank`` (0 for the other optimizers); with the layer-wise distributed optimizer
    (`mp.estimate.layer_wise`) the busiest rank's, which orthogonalizes its own units only
    (every TP rank of an owner the same ones, duplicated or distributed as without it)."""
    if setup.optimizer != "muon":
        return 0
    settings = setup.muon

    def flops(matrices) -> int:
        return sum(m.flops(settings.num_ns_steps, settings.tp_mode) for m in matrices)

    if setup.distributed_optimizer:  # layer-wise: the busiest rank's own units
        from mp.estimate.layer_wise import busiest  # it imports this module
        return busiest(setup, pp_rank, lambda cards: flops(m for c in cards for m in c.matrices))
    return flops(muon_matrices(setup.model, pp_rank, settings.split_qkv))


def tp_mode_bytes(setup: Setup, matrices) -> float:
    """Bytes ``muon_tp_mode``'s collectives move over TP in one step for ``matrices`` (the
    shards split over TP ranks; blockwise moves none): ``duplicated`` all-gathers each whole
    fp32 matrix; ``distributed`` all-reduces each one's squared norm (fp32) and, every
    iteration, its ``X X^T [m, m]`` (``m`` the unsharded side; bf16 at ``"medium"``)."""
    settings, total = setup.muon, 0
    for m in matrices:
        if m.split is None or m.ranks != setup.tp or settings.tp_mode == "blockwise":
            continue
        if settings.tp_mode == "duplicated":
            total += FP32 * m.elements * m.ranks
            continue
        side = (m.rows, m.cols)[1 - m.split]
        gram = 2 if settings.fp32_matmul_prec == "medium" else FP32
        total += m.count * (FP32 + settings.num_ns_steps * side * side * gram)
    return total


def tp_mode_collectives(setup: Setup, pp_rank: int = 0) -> list[Collective]:
    """``muon_tp_mode``'s calls over TP in one step on a rank of stage ``pp_rank``
    (`tp_mode_bytes`; with the layer-wise distributed optimizer the busiest rank's own
    units). Experts split over an expert-TP size other than TP are left out."""
    if setup.optimizer != "muon" or setup.muon.tp_mode == "blockwise":
        return []
    if setup.distributed_optimizer:
        from mp.estimate.layer_wise import busiest  # it imports this module
        moved = busiest(setup, pp_rank, lambda cards: tp_mode_bytes(
            setup, [m for c in cards for m in c.matrices]))
    else:
        moved = tp_mode_bytes(setup, muon_matrices(setup.model, pp_rank, setup.muon.split_qkv))
    kind = "all_gather" if setup.muon.tp_mode == "duplicated" else "all_reduce"
    return [Collective(f"Muon's Newton-Schulz (muon_tp_mode={setup.muon.tp_mode})", kind, "tp",
                       moved)]
