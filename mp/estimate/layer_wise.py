"""What each data-parallel rank owns under Muon's layer-wise distributed optimizer
(`mp.optim.layer_wise`, ``optimizer="muon"`` with ``distributed_optimizer``).

The optimizer deals whole parameters, a Muon unit as one card, round-robin over the DP x CP
ranks (experts' over the expert-data-parallel ranks, a counter of their own), in the order of
its param groups: `mp.optim.get_param_groups`' groups sorted by (decoupled, no decay), each
split into its Muon parameters, then the rest (``_split_muon_groups``), every group in the
chunks' ``named_parameters`` order. `stage_cards` lists one TP rank's cards in that order
without building the model (``tests/test_estimate_layer_wise.py`` checks the order against
the built optimizer's deal): the layers' Muon units (`mp.estimate.newton_schulz.layer_units`),
then the other weights that decay (the embeddings, the output layer, the experts' stacked
biases), then the rest (norms, 1-D biases, attention sinks; the embeddings too when
``embedding_init_method_std`` keeps them from decaying). The estimator has no
``decoupled_lr``, whose groups would come after these.

A rank's state covers its own cards: the fp32 master of a 16-bit parameter, Muon's fp32
momentum for a unit's matrices, AdamW's moments and step counter for the others
(`owned_state_bytes`). The deal is uneven: each rank's bytes differ, and a rank's total is its
DP x CP rank's dense part plus its expert-DP rank's experts' part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mp.estimate.newton_schulz import MuonMatrix, depth_units, layer_units
from mp.estimate.params import (
    FP32,
    MOMENTUM_BYTES,
    STEP_COUNTER_BYTES,
    mtp_layer_is_moe,
    norm_params,
)
from mp.estimate.setup import Setup
from mp.estimate.storage import expert_tensor_parallel_size
from mp.model.config import TransformerConfig


@dataclass(frozen=True)
class Card:
    """One parameter, or one Muon unit (its ``matrices``; none: an AdamW parameter), dealt
    whole to one rank; ``decays``: in a weight-decaying group (2-D parameters but the
    embeddings under ``embedding_init_method_std``)."""

    elements: int
    matrices: tuple[MuonMatrix, ...] = ()
    expert: bool = False
    decays: bool = False


def _unit(matrices: list[MuonMatrix]) -> Card:
    return Card(sum(m.elements for m in matrices), tuple(matrices), matrices[0].expert, True)


def _norm(cfg: TransformerConfig, width: int | None = None) -> list[Card]:
    """A norm's weight (and LayerNorm's bias)."""
    elements, tensors = norm_params(cfg, width)[:2]
    return [Card(elements // tensors)] * tensors


def _biases(cfg: TransformerConfig, width: int, t: int, experts: int | None = None
            ) -> list[Card]:
    """An MLP's biases under ``add_bias_linear``: fc1's (and the gate's) ``width / t``, fc2's
    ``h``; with ``experts``, that many experts' stacked (2-D: they decay)."""
    if not cfg.add_bias_linear:
        return []
    widths = [width // t] * (2 if cfg.gated_linear_unit else 1) + [cfg.hidden_size]
    stacked = experts is not None
    return [Card((experts or 1) * w, expert=stacked, decays=stacked) for w in widths]


def _layer_adamw(cfg: TransformerConfig, moe: bool) -> list[Card]:
    """One layer's AdamW parameters on one TP rank, in ``named_parameters`` order."""
    h, t, a = cfg.hidden_size, cfg.tensor_model_parallel_size, cfg.num_attention_heads
    out = _norm(cfg)
    if cfg.multi_latent_attention:
        out += ([] if cfg.q_lora_rank is None else _norm(cfg, cfg.q_lora_rank))
        out += _norm(cfg, cfg.kv_lora_rank)
    else:
        out += [Card(cfg.qkv_size // t)] if cfg.add_bias_linear or cfg.add_qkv_bias else []
        out += _norm(cfg, cfg.kv_channels) * 2 if cfg.qk_layernorm else []
    out += [Card(a // t)] if cfg.softmax_type == "learnable" else []
    out += ([Card(h)] if cfg.add_bias_linear else []) + _norm(cfg)
    if not moe:
        return out + _biases(cfg, cfg.ffn_hidden_size, t)
    out += [Card(cfg.num_moe_experts)] if cfg.moe_router_bias else []
    out += _biases(cfg, cfg.moe_ffn_hidden_size, expert_tensor_parallel_size(cfg),
                   cfg.num_moe_experts // cfg.expert_model_parallel_size)
    if cfg.moe_shared_expert_intermediate_size is not None:
        out += _biases(cfg, cfg.moe_shared_expert_intermediate_size, t)
    return out


def stage_cards(cfg: TransformerConfig, pp_rank: int = 0, split_qkv: bool = True
                ) -> list[Card]:
    """One TP rank's cards on stage ``pp_rank``, in dealing order (module doc)."""
    pp, h, t = cfg.pipeline_model_parallel_size, cfg.hidden_size, cfg.tensor_model_parallel_size
    first, last = pp_rank == 0, pp_rank == pp - 1
    predicts_more = last and cfg.mtp_num_layers is not None
    decays = cfg.embedding_init_method_std is None  # embeddings, and the tied output's copy
    vocab = Card(cfg.padded_vocab_size // t * h, decays=decays)
    units, adamw = [], []  # in named_parameters order
    if first or predicts_more:
        adamw.append(vocab)
        if cfg.position_embedding_type == "learned_absolute":
            adamw.append(Card(cfg.max_position_embeddings * h, decays=decays))
    for index in cfg.stage_layers(pp_rank):
        moe = cfg.is_moe_layer(index)
        units += map(_unit, layer_units(cfg, moe, split_qkv))
        adamw += _layer_adamw(cfg, moe)
    if last:
        adamw += _norm(cfg)
        if cfg.untie_embeddings_and_output_weights or not (first or predicts_more):
            adamw.append(vocab if not cfg.untie_embeddings_and_output_weights
                         else Card(vocab.elements, decays=True))
    for _ in range(cfg.mtp_num_layers or 0) if predicts_more else ():
        units += map(_unit, depth_units(cfg, split_qkv))
        adamw += _norm(cfg) * 2 + _layer_adamw(cfg, mtp_layer_is_moe(cfg)) + _norm(cfg)
    return units + [c for c in adamw if c.decays] + [c for c in adamw if not c.decays]


def dealt_cards(setup: Setup, pp_rank: int = 0) -> tuple[list[list[Card]], list[list[Card]]]:
    """The cards of each DP x CP rank (dense) and of each expert-DP rank (experts) of stage
    ``pp_rank``: card ``k`` of a kind to rank ``k mod D`` of its group."""
    sizes = {False: setup.gradient_group_size, True: setup.expert_data_parallel_size}
    hands = {kind: [[] for _ in range(size)] for kind, size in sizes.items()}
    turn = {False: 0, True: 0}
    for card in stage_cards(setup.model, pp_rank, setup.muon.split_qkv):
        hands[card.expert][turn[card.expert]].append(card)
        turn[card.expert] = (turn[card.expert] + 1) % sizes[card.expert]
    return hands[False], hands[True]


def owned_state_bytes(setup: Setup, cards: list[Card]) -> float:
    """Optimizer state of ``cards``: masters (16-bit models), Muon's momentum, AdamW's
    moments and step counter."""
    master = 0 if setup.model.precision == "fp32" else FP32
    return sum(c.elements * (master + (MOMENTUM_BYTES if c.matrices else setup.moment_bytes))
               + (0 if c.matrices else STEP_COUNTER_BYTES) for c in cards)


def busiest(setup: Setup, pp_rank: int, measure: Callable[[list[Card]], float]) -> float:
    """The most of ``measure`` (of a rank's cards) a rank of stage ``pp_rank`` has: the
    busiest DP x CP rank's dense cards' plus the busiest expert-DP rank's experts' (exact
    without experts; with them an upper bound, reached when the two fall on one rank)."""
    return sum(max(map(measure, hands)) for hands in dealt_cards(setup, pp_rank))


def busiest_state_bytes(setup: Setup, pp_rank: int = 0) -> float:
    """`owned_state_bytes` of the busiest rank of stage ``pp_rank`` (`busiest`)."""
    return busiest(setup, pp_rank, lambda cards: owned_state_bytes(setup, cards))
