"""The calls of the attention core the estimate counts (`mp.estimate.activations`): which
``(queries, keys)`` calls each CP rank makes for one sequence, through which mask, as
`mp.model.attention.CoreAttention` makes them under a sliding window (one call, or tiles of
`mp.model.attention_masks.window_tile` queries through one shared tile mask), and that shared
mask counted once for the layers held together; how many CP ranks share the heads and how
many pass the ring's blocks (`exchange_sizes`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from mp.model.attention_masks import window_tile
from mp.model.config import TransformerConfig


class AttentionCall(NamedTuple):
    """One call of the attention core on one rank for one sequence: ``queries``, the last of
    the ``keys`` positions, and the ``mask`` it attends through: ``"causal"`` (none: the
    square causal form, or the bottom-right one for fewer queries than keys), ``"window"``
    (a sliding window's own ``[sq, sk]`` mask) or ``"tile"`` (a view of the window's
    ``[T, T + W]`` tile mask, which every tile and layer of that window shares)."""

    queries: int
    keys: int
    mask: str


def exchange_sizes(cfg: TransformerConfig) -> tuple[int, int]:
    """``(A, P)``: the CP ranks whose all-to-all trades tokens for heads and those around the
    ring, as `mp.model.context_parallel.exchange_groups` forms them: ``(c, 1)`` under
    ``a2a``, ``(1, c)`` under ``p2p``, ``hierarchical_context_parallel_sizes`` under
    ``a2a+p2p`` (``[1, c]`` is ``p2p``, ``[c, 1]`` ``a2a``), ``(1, 1)`` without CP and under
    ``all_gather``."""
    c, comm = cfg.context_parallel_size, cfg.cp_comm_type
    if c == 1 or comm == "all_gather":
        return 1, 1
    if comm == "a2a+p2p":
        a2a, p2p = cfg.hierarchical_context_parallel_sizes
        return a2a, p2p
    return (c, 1) if comm == "a2a" else (1, c)


def rank_calls(cfg: TransformerConfig, window: int | None = None
               ) -> list[list[AttentionCall]]:
    """The attention calls of each CP rank that may save the most for one sequence, under a
    sliding window of ``window`` keys (None: none); `busiest_calls` picks one. One candidate
    over the whole sequence, ``(s, s)`` (also ``a2a``'s, over fewer heads:
    `attention_heads`); with ``c > 1`` ``all_gather`` ranks, each of the rank's two chunks of
    ``L = s / (2c)`` queries against the keys up to its end (`mp.model.context_parallel`):
    CP rank ``r``'s ``[(L, (r + 1) L), (L, (2c - r) L)]``, for every rank (rank 0's first
    chunk is square, but under a window its tiles near the start copy their masks); each
    attended as `window_calls` says. No
    calls under ``p2p`` and ``a2a+p2p``: their ring attention runs no core
    (`mp.model.ring_attention`)."""
    s, c = cfg.seq_length, cfg.context_parallel_size
    heads, ring = exchange_sizes(cfg)
    if ring > 1:
        return [[]]
    if heads > 1 or c == 1:
        return [window_calls(s, s, window)]
    chunk = s // (2 * c)
    return [window_calls(chunk, (r + 1) * chunk, window)
            + window_calls(chunk, (2 * c - r) * chunk, window) for r in range(c)]


def window_calls(queries: int, keys: int, window: int | None) -> list[AttentionCall]:
    """The core's calls for ``queries`` against ``keys``, as `mp.model.attention.CoreAttention`
    makes them under a window of ``window`` earlier keys (None: none): one causal call when
    no key falls out of the window (``keys - 1 <= window``); one call through the window's
    mask when the queries fit a tile (`mp.model.attention_masks.window_tile`); else a call per tile
    of ``T`` queries (the last one shorter), each against the ``W`` keys before the tile and
    its own, through the shared tile mask, but for the first tiles, cut at key 0, which take a
    copy of their part (a mask of their own, as a one-call window's)."""
    if window is None or keys - 1 <= window:
        return [AttentionCall(queries, keys, "causal")]
    tile = window_tile(window)
    if queries <= tile:
        return [AttentionCall(queries, keys, "window")]
    first = keys - queries  # the position of the first query
    return [AttentionCall(min(tile, queries - start),
                          first + min(start + tile, queries) - max(0, first + start - window),
                          "tile" if first + start >= window else "window")
            for start in range(0, queries, tile)]


TILE_MASK = "sliding-window tile mask"


def tile_mask_name(window: int) -> str:
    """The term of the tile mask that the layers with a sliding window of ``window`` keys
    share (`split_tile_masks` counts it once for the layers held together)."""
    return f"{TILE_MASK} of window {window} (one for its layers)"


def split_tile_masks(terms: Iterable[dict[str, float]], base: float = 0.0
                     ) -> tuple[float, dict[str, float]]:
    """The terms of several layers held at once: (their sum without the tile masks, plus
    ``base``; each tile mask once, by its `tile_mask_name`, any prefix before it dropped).
    The tiles of all the layers of a window attend through views of one cached mask
    (`mp.model.attention_masks.tile_mask`), which the meter, and the memory, hold once."""
    own, masks = base, {}
    for layer in terms:
        for name, size in layer.items():
            if TILE_MASK in name:
                masks[name[name.index(TILE_MASK):]] = size
            else:
                own += size
    return own, masks
