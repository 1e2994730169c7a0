"""The masks attention takes, in the forms its cores take them (Megatron's: boolean
``[b or 1, 1, sq, sk]``, ``True`` = masked out; `sdpa_bias`'s additive form for SDPA).

A sliding window of ``window`` earlier keys masks the keys after a query or more than
``window`` before it (`window_mask`, added to a given mask by `with_window`). Long windowed
sequences attend tile by tile (`window_tile` query rows, at least `WINDOW_TILE`): every tile and
layer of one window shares one cached ``[tile, tile + window]`` mask (`tile_mask`).
`mask_for_layers` prepares a batch's mask once for all the layers of a block.
"""

from __future__ import annotations

import functools

import torch

from mp import parallel_state
from mp.model.config import TransformerConfig
from mp.model.context_parallel import exchange_groups, gather_query_rows, local_positions
from mp.model.packed_documents import PackedDocuments


def sdpa_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (``True`` = masked out) as SDPA's additive bias in ``dtype``: 0 where a
    key is kept, -inf where it is masked."""
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device
                       ).masked_fill_(attention_mask, float("-inf"))


def window_mask(queries: int, keys: int, window: int, device) -> torch.Tensor:
    """``[queries, keys]`` boolean, True where a key is masked out for a query under a sliding
    window of ``window`` earlier keys: after the query, or more than ``window`` before it. The
    queries are the last ``queries`` of the ``keys`` positions."""
    distance = (torch.arange(keys - queries, keys, device=device)[:, None]
                - torch.arange(keys, device=device))  # query position - key position
    return (distance < 0) | (distance > window)


WINDOW_TILE = 1024  # the fewest query rows of a tile of windowed attention


def window_tile(window: int) -> int:
    """The query rows of a tile under a window of ``window`` earlier keys: at least
    `WINDOW_TILE` and the window, and such that ``tile + window`` is a multiple of 16 (the
    keys of a whole tile, so that a CUDA kernel takes the shared mask without padding it)."""
    tile = max(WINDOW_TILE, window)
    return tile + (-(tile + window)) % 16


@functools.lru_cache(maxsize=16)
def tile_mask(tile: int, window: int, form: torch.dtype, device: torch.device
              ) -> torch.Tensor:
    """``[1, 1, tile, tile + window]``: a tile's queries against the ``window`` keys before
    its first query and its own (`window_mask`); boolean (True = masked) for
    ``form=torch.bool``, else `sdpa_bias`'s additive form in ``form``. Cached: the tiles and
    layers of one window share it (never written)."""
    masked = window_mask(tile, tile + window, window, device)[None, None]
    return masked if form == torch.bool else sdpa_bias(masked, form)


def with_window(attention_mask: torch.Tensor | None, queries: int, keys: int, window: int,
                 device) -> torch.Tensor:
    """``attention_mask`` (None for causal; boolean or `sdpa_bias`'s additive form) with the
    keys out of the window masked too, in the same form (boolean for None)."""
    outside = window_mask(queries, keys, window, device)
    if attention_mask is None:
        return outside[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask | outside
    return attention_mask.masked_fill(outside, float("-inf"))


def mask_for_layers(attention_mask: torch.Tensor | PackedDocuments, config: TransformerConfig,
                    dtype: torch.dtype) -> torch.Tensor | PackedDocuments:
    """A batch's boolean mask as every layer's attention takes it, made once for all of them:
    every query row under ``a2a`` context parallelism (`gather_query_rows`; its a2a group's
    under ``a2a+p2p``), and SDPA's additive form (`sdpa_bias`) for the SDPA core (the ring
    attention of ``p2p`` and ``a2a+p2p`` keeps it boolean). `PackedDocuments` of the whole
    sequence are taken as they are without context parallelism and under ``a2a``; under the
    other CP kinds they become the rank's query rows of their mask first (`local_positions`)."""
    heads, ring = exchange_groups(config)
    if isinstance(attention_mask, PackedDocuments):
        cp = config.context_parallel_size
        if cp == 1 or (heads is not None and ring is None):
            return attention_mask
        rows = local_positions(attention_mask.shape[0], cp,
                               parallel_state.get_context_parallel_rank(),
                               attention_mask.segment_ids.device)
        attention_mask = attention_mask.mask(rows)
    if heads is not None:
        attention_mask = gather_query_rows(attention_mask, heads)
    if ring is not None:  # ring attention takes the boolean mask
        return attention_mask
    return sdpa_bias(attention_mask, dtype) if config.attention_backend == "sdpa" \
        else attention_mask
