"""Documents packed into one sample, kept apart (Megatron's ``--reset-position-ids`` and
``--reset-attention-mask``).

A sample of `GPTDataset` runs across document boundaries: each document ends with the
end-of-document token and the next one starts right after it. By default a token attends to
everything before it in the sample and positions count from the sample's start, as in
Megatron. ``reset_position_ids`` restarts the positions at 0 after each end-of-document token;
``reset_attention_mask`` lets a token attend only to earlier tokens of its own document (the
end-of-document token belongs to the document it ends). Rotary embeddings depend only on
relative positions, so with ``reset_attention_mask`` a document's outputs do not depend on
where it starts; learned position embeddings read the reset positions.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.data import Dataset


def document_positions_and_mask(tokens: torch.Tensor,
                                eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``tokens [s]``: each token's position in its document ``[s]``, and the attention
    mask ``[1, s, s]`` (True where query ``i`` must not see key ``j``: ``j > i`` or another
    document)."""
    starts = torch.ones_like(tokens, dtype=torch.bool)
    starts[1:] = tokens[:-1] == eod
    return segment_positions_and_mask(torch.cumsum(starts, 0))


def segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``segments [s]``, non-decreasing segment ids (a document's, a conversation's):
    each token's position in its segment ``[s]``, and the mask ``[1, s, s]`` that is True where
    query ``i`` must not see key ``j`` (``j > i``, or another segment)."""
    s = segments.size(0)
    index = torch.arange(s)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[1:] = segments[1:] != segments[:-1]
    positions = index - torch.where(starts, index, 0).cummax(0).values
    mask = torch.ones(1, s, s, dtype=torch.bool)
    bounds = [*starts.nonzero().flatten().tolist(), s]
    causal = _future_keys(s)
    for begin, end in zip(bounds, bounds[1:]):  # each segment's causal block on the diagonal
        mask[0, begin:end, begin:end] = causal[:end - begin, :end - begin]
    return positions, mask


@functools.lru_cache(maxsize=4)
def _future_keys(s: int) -> torch.Tensor:
    """``[s, s]``, True where key ``j`` comes after query ``i`` (read only, shared)."""
    return torch.ones(s, s, dtype=torch.bool).triu_(1)


class DocumentMasked(Dataset):
    """``dataset``'s items with positions and/or an ``attention_mask [1, s, s]`` that keep
    the documents of a sample apart (see the module doc)."""

    def __init__(self, dataset: Dataset, eod: int, reset_position_ids: bool,
                 reset_attention_mask: bool):
        self.dataset, self.eod = dataset, eod
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[idx])
        positions, mask = document_positions_and_mask(item["tokens"], self.eod)
        if self.reset_position_ids:
            item["position_ids"] = positions
        if self.reset_attention_mask:
            item["attention_mask"] = mask
        return item
