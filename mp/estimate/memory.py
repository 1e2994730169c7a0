"""Peak memory of each pipeline stage: model state plus the activations in flight.

A stage's peak is its model state (`mp.estimate.params`) plus, at the worst moment of an
iteration, the activations saved for backward by every micro-batch it has in flight, plus the
working memory of that moment:

- **In flight** (Narayanan et al. 2021; Megatron's schedules): under 1F1B, stage ``r`` of ``p``
  runs ``min(p - r - 1, m)`` warm-up forwards and one more forward before its first backward,
  so it holds ``min(p - r, m)`` micro-batches: the first stage ``p``, the last one. Interleaved
  with ``v`` chunks per rank, Megatron warms up ``2 (p - r - 1) + (v - 1) N`` chunk forwards
  for micro-batch groups of ``N`` (default ``p``; all ``m v`` when ``m = p``), each chunk
  holding ``1 / v`` of the stage's layers: with ``N = p`` the first stage holds
  ``p (1 + (p - 1) / (p v))`` micro-batches' worth (Korthikanti et al. 2022).
- **First stage**: the token ids (and, under TP, the out-of-range flags and shifted ids) the
  embedding saves, the position ids, the embedding dropout mask, for each micro-batch in
  flight (`mp.estimate.stage_ends`).
- **Last stage**: the final norm's input and statistics, the output layer's input, and what
  the cross-entropy keeps for backward -- the logits ``[s, b, V / t]`` in the activation
  dtype, one fp32 normalizer per row, the target ids -- and multi-token prediction's depths
  (`mp.estimate.mtp`), for the one micro-batch whose backward comes next. The loss adds
  working memory beside them, the largest transient of a step for GPT-3's vocabulary:
  compiled (`mp.jit`, CUDA), only the logits' gradient, ``e s b V / t`` bytes; eagerly, an
  fp32 copy of the logits, a bool one-hot and the gradient, ``(5 + e) s b V / t`` (one loss
  at a time: the depths' run one after the other).
- **Ring attention** (``p2p`` context parallelism) works on one ``[tile, L]`` block of scores
  per head at a time, in forward and in backward (`ring_working_set`; by the code, not
  measured).
- **Full recompute** keeps each checkpointed chunk's input (fp32 with
  ``fp32_residual_connection``; a ``1 / t`` slice of it with
  ``distribute_saved_activations``) and, with RoPE, the angles they all take (one fp32
  ``[s / c, rotary_dim]`` tensor a model chunk); in backward one chunk of layers is
  recomputed, so its full activations are a transient.
- **Selective recompute** keeps less of each layer (`mp.estimate.activations`; with
  ``mla_up_proj`` also the chunk's RoPE angles, `rope_angle_bytes`), and in the backward of
  a layer brings back, one half of the layer at a time (the MLP's, then the attention's),
  what that half's recomputes refill and rebuild (`rebuilt_bytes`): the transient is the
  largest half of the chunk's layers (multi-token prediction's layers recompute too, which
  full recompute leaves alone).

Each layer counts as dense or mixture-of-experts (``cfg.is_moe_layer``), and with its sliding
window or none (``cfg.attention_window``), so a chunk's bytes and its largest recomputed group
depend on which layers it holds (``cfg.chunk_layers``). A window's tile mask
(`mp.estimate.attention_calls.split_tile_masks`: one cached tensor whose views the tiled layers
save) counts once for a chunk (`chunk_saves`) and once for a stage, whatever its chunks,
depths and micro-batches in flight; it stays through the backward (the cache holds it), and
a recompute counts it only where the stage saves none (``core_attn``, full recompute).

Gradients flowing through backward (a few ``s b h``-sized tensors at a time) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from mp.estimate.activations import layer_halves, layer_terms
from mp.estimate.attention_activations import attention_heads
from mp.estimate.attention_calls import exchange_sizes, split_tile_masks
from mp.estimate.mtp import mtp_saves
from mp.estimate.params import (
    RankParams,
    StateBytes,
    mtp_layer_is_moe,
    rank_params,
    state_bytes,
)
from mp.estimate.setup import Setup
from mp.estimate.stage_ends import embedding_terms, loss_transient, output_terms
from mp.estimate.storage import (
    CUDA,
    FP32,
    Kernels,
    activation_bytes,
    local_tokens,
    residual_bytes,
    sequence_rows,
)
from mp.model.config import TransformerConfig
from mp.model.ring_attention import tile_bytes
from mp.pipeline_parallel.pipelined import interleaved_warmup


def microbatches_in_flight(pp: int, pp_rank: int, num_microbatches: int, vpp: int = 1,
                           group: int | None = None) -> float:
    """Micro-batches' worth of a stage's activations held at its peak (see the module doc):
    chunk forwards in flight divided by the chunks per rank. ``group``: the interleaved
    schedule's micro-batch group size (None: ``pp``)."""
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, pp={pp})")
    m = num_microbatches
    if vpp == 1:
        return min(pp - pp_rank, m)
    total = m * vpp
    warmup = interleaved_warmup(pp, pp_rank, m, vpp, group or pp)
    return min(warmup + 1, total) / vpp


def chunk_saved_bytes(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA,
                      layers: range | int | None = None) -> float:
    """The transformer layers of one pipeline chunk for one micro-batch: every layer's
    `layer_bytes` (dense or mixture-of-experts, as ``cfg.is_moe_layer`` says), or with full
    recompute the checkpointed chunks' inputs (and the layers left out of ``block`` recompute
    whole); and the RoPE angles the checkpoints keep (`rope_angle_bytes`); a window's tile
    mask once (`chunk_saves`). ``layers``: the chunk's 0-based layer indices over the model
    (``cfg.chunk_layers(pp_rank, chunk)``; default the first chunk's); a count of layers
    stands for a dense model's chunk of that many."""
    own, masks = chunk_saves(cfg, micro_batch, kernels, layers)
    return own + sum(masks.values())


def chunk_saves(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA,
                layers: range | int | None = None) -> tuple[float, dict[str, float]]:
    """`chunk_saved_bytes` in two: the bytes but the sliding windows' tile masks, and those
    masks by name, each once (`mp.estimate.attention_calls.split_tile_masks`: the layers of a
    window, and every micro-batch and chunk of a stage, share one)."""
    layers = _chunk_range(cfg, layers)
    angles = rope_angle_bytes(cfg) if len(layers) else 0
    if cfg.recompute_granularity != "full":
        return split_tile_masks(_layers_terms(cfg, micro_batch, kernels, layers), angles)
    n = cfg.recompute_num_layers
    checkpoint_input = residual_bytes(cfg) * sequence_rows(cfg, micro_batch) * cfg.hidden_size
    if cfg.distribute_saved_activations:
        checkpoint_input /= cfg.tensor_model_parallel_size
    if cfg.recompute_method == "uniform":
        return math.ceil(len(layers) / n) * checkpoint_input + angles, {}
    n = min(n, len(layers))
    return split_tile_masks(_layers_terms(cfg, micro_batch, kernels, layers[n:], modules=()),
                            n * checkpoint_input + angles)


def rope_angle_bytes(cfg: TransformerConfig) -> float:
    """The RoPE angles ``[s / c, 1, 1, rotary_dim]`` (fp32) that the model hands every layer
    of a chunk, one tensor for all of them: kept for backward by full recompute's checkpoints
    and by ``mla_up_proj``'s (which rotate again in backward); 0 otherwise."""
    kept = cfg.recompute_granularity == "full" or cfg.recomputes("mla_up_proj")
    if not kept or cfg.position_embedding_type != "rope":
        return 0.0
    return FP32 * local_tokens(cfg, 1) * cfg.rotary_dim


def recompute_working_set(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA,
                          layers: range | int | None = None, held: Collection[str] = ()
                          ) -> float:
    """Activations rebuilt at once during backward in the chunk of ``layers`` (as in
    `chunk_saved_bytes`): its largest checkpointed group of layers (full; a window's tile
    mask once, none of those ``held`` already, by name), the largest `selective_working_set`
    of its layers (selective), nothing otherwise."""
    layers = _chunk_range(cfg, layers)
    if cfg.recompute_granularity == "full":
        n = cfg.recompute_num_layers
        if cfg.recompute_method != "uniform":  # block: the first n layers, one checkpoint each
            layers, n = layers[:n], 1
        terms = _layers_terms(cfg, micro_batch, kernels, layers, modules=())
        sizes = (split_tile_masks(terms[start:start + n]) for start in range(0, len(terms), n))
        return max((own + sum(size for name, size in masks.items() if name not in held)
                    for own, masks in sizes), default=0.0)
    return max((selective_working_set(cfg, micro_batch, kernels, moe, i)
                for (moe, *_), i in _kinds(cfg, layers).items()), default=0.0)


def selective_working_set(cfg: TransformerConfig, micro_batch: int, kernels: Kernels,
                          moe: bool, layer: int = 0) -> float:
    """What selective recompute rebuilds at once in the backward of one layer: the larger
    of its halves' `rebuilt_bytes` (the MLP half's backward ends before the attention half's
    begins)."""
    return max(rebuilt_bytes(cfg, micro_batch, kernels, moe, layer))


def rebuilt_bytes(cfg: TransformerConfig, micro_batch: int, kernels: Kernels, moe: bool,
                  layer: int = 0) -> tuple[float, float]:
    """What the recomputes of each half of layer ``layer`` (0-based, for its sliding window;
    `layer_halves`: attention, MLP) bring back in backward, (0, 0) without selective
    recompute: the outputs they refill, and every tensor the half saves without recompute
    and does not hold at the height of its recompute (the recomputed functions' graphs; a
    term counts the part of it not held under the same name)."""
    plain = layer_halves(cfg, micro_batch, kernels, (), moe, layer=layer)
    kept = layer_halves(cfg, micro_batch, kernels, None, moe, layer=layer)
    refilled = layer_halves(cfg, micro_batch, kernels, None, moe, refilled=True, layer=layer)
    return tuple(sum(r.values()) - sum(k.values())
                 + sum(max(0.0, size - r.get(name, 0)) for name, size in p.items())
                 for p, k, r in zip(plain, kept, refilled))


def _chunk_range(cfg: TransformerConfig, layers: range | int | None) -> range:
    if layers is None:
        return cfg.chunk_layers()
    if isinstance(layers, int):
        if cfg.num_moe_experts is not None:
            raise ValueError(f"layers={layers}: a mixture-of-experts model needs the chunk's "
                             "layer indices (cfg.chunk_layers(pp_rank, chunk)), not a count")
        return range(layers)
    return layers


def _is_moe(cfg: TransformerConfig, index: int) -> bool:
    return cfg.num_moe_experts is not None and cfg.is_moe_layer(index)


def _kinds(cfg: TransformerConfig, layers: range) -> dict[tuple[bool, int | None, bool], int]:
    """The kinds of ``layers`` (0-based over the model), dense or MoE, with their sliding
    window or none, rotating q and k or not (``no_rope_freq``), each with its first layer: the
    layers of a kind save alike."""
    kinds: dict = {}
    for i in layers:
        kinds.setdefault(_kind(cfg, i), i)
    return kinds


def _kind(cfg: TransformerConfig, i: int) -> tuple[bool, int | None, bool]:
    return _is_moe(cfg, i), cfg.attention_window(i + 1), cfg.applies_rope(i + 1)


def _layers_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels, layers: range,
                  modules: Collection[str] | None = None) -> list[dict[str, float]]:
    """`layer_terms` of each of ``layers``, computed once for each of their `_kinds`."""
    terms = {kind: layer_terms(cfg, micro_batch, kernels, modules, kind[0], i)
             for kind, i in _kinds(cfg, layers).items()}
    return [terms[_kind(cfg, i)] for i in layers]


def ring_working_set(cfg: TransformerConfig, micro_batch: int) -> float:
    """The block of scores ``p2p``'s (and ``a2a+p2p``'s) ring attention works on at once
    (`mp.model.ring_attention.tile_bytes`, chunks of ``s / 2P`` keys); 0 for the other
    exchanges, whose kernels keep theirs within the saved terms."""
    ring = exchange_sizes(cfg)[1]
    if ring == 1:
        return 0.0
    return tile_bytes(micro_batch, attention_heads(cfg), cfg.seq_length // (2 * ring),
                      element_bytes=activation_bytes(cfg))


@dataclass(frozen=True)
class StageMemory:
    """One rank of pipeline stage ``pp_rank`` at its peak, in bytes."""

    pp_rank: int
    params: RankParams
    state: StateBytes
    in_flight: float  # micro-batches' worth of the stage's activations
    activations: float  # saved for backward at the peak
    transient: float  # working memory at the peak: the loss forward, or a recompute

    @property
    def peak(self) -> float:
        return self.state.total + self.activations + self.transient


def stage_memory(setup: Setup, pp_rank: int, kernels: Kernels = CUDA) -> StageMemory:
    """The peak of one rank of stage ``pp_rank`` (see the module doc)."""
    cfg, b = setup.model, setup.micro_batch_size
    params = rank_params(cfg, pp_rank)
    in_flight = microbatches_in_flight(setup.pp, pp_rank, setup.num_microbatches, setup.vpp,
                                       cfg.microbatch_group_size)
    chunks = [cfg.chunk_layers(pp_rank, c) for c in range(len(cfg.chunk_layer_counts[pp_rank]))]
    saves = [chunk_saves(cfg, b, kernels, layers) for layers in chunks]
    saved = in_flight * sum(own for own, _ in saves)
    masks = {name: size for _, chunk in saves for name, size in chunk.items()}
    if pp_rank == 0:
        saved += min(in_flight, setup.num_microbatches) * sum(
            embedding_terms(cfg, b, kernels).values())
    forward_extra = backward_extra = depth_extra = 0.0
    if pp_rank == setup.pp - 1:
        output = sum(output_terms(cfg, b, kernels).values())
        depths, depth_masks = mtp_saves(cfg, b, kernels)
        masks.update(depth_masks)
        saved += output + depths
        forward_extra = loss_transient(cfg, b, kernels)
        backward_extra = -output - depths  # freed by the losses' and the depths' backward
        # before any recompute of the decoder (not the tile masks: the cache holds them); a
        # depth's own attention core is recomputed (selective) after the main loss's backward
        if depths and cfg.recompute_granularity == "selective":
            depth_extra = -output + selective_working_set(cfg, b, kernels,
                                                          mtp_layer_is_moe(cfg), cfg.num_layers)
    saved += sum(masks.values())  # once for every micro-batch, chunk and depth
    ring = ring_working_set(cfg, b)  # inside every layer's attention, forward and backward
    transient = max(forward_extra, ring, depth_extra + ring,
                    backward_extra + max(recompute_working_set(cfg, b, kernels, layers, masks)
                                         for layers in chunks) + ring)
    return StageMemory(pp_rank=pp_rank, params=params, state=state_bytes(setup, params),
                       in_flight=in_flight, activations=saved, transient=max(transient, 0.0))
