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

A sample carries its tokens' segment ids ``[s]`` (each token's document, or conversation for
`mp.data.sft_dataset`), not the ``[1, s, s]`` mask: the training step makes the mask from
them (`mp.training.gpt_step.get_batch`: `mp.model.packed_documents.PackedDocuments`, or
`segment_mask`) on its own device, so that the data loader's workers neither build nor pass
``s^2`` bytes a sample (64 MiB at 8192 tokens).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def document_segments(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """For ``tokens [s]``: each token's document, counted from 0 ``[s]`` (int64); the
    end-of-document token belongs to the document it ends."""
    starts = torch.zeros_like(tokens, dtype=torch.int64)
    starts[1:] = tokens[:-1] == eod
    return torch.cumsum(starts, 0)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """For ``segments [s]``, non-decreasing: each token's position in its segment ``[s]``."""
    index = torch.arange(segments.size(0), device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[1:] = segments[1:] != segments[:-1]
    return index - torch.where(starts, index, 0).cummax(0).values


def segment_mask(segments: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """For ``segments [..., s]``: the attention mask ``[..., 1, s, s]``, True where query ``i``
    must not see key ``j`` (``j > i``, or another segment), on ``segments``' device; with
    ``rows [r]`` (positions) only those queries' rows, ``[..., 1, r, s]``."""
    index = torch.arange(segments.size(-1), device=segments.device)
    queries = index if rows is None else rows
    later = index[None, :] > queries[:, None]
    return (later | (segments[..., None, :] != segments[..., queries, None])).unsqueeze(-3)


def document_positions_and_mask(tokens: torch.Tensor,
                                eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``tokens [s]``: each token's position in its document ``[s]``, and the attention
    mask ``[1, s, s]`` (True where query ``i`` must not see key ``j``: ``j > i`` or another
    document)."""
    segments = document_segments(tokens, eod)
    return segment_positions(segments), segment_mask(segments)


class DocumentMasked(Dataset):
    """``dataset``'s items with positions that restart with each document
    (``reset_position_ids``) and/or the ``segment_ids [s]`` the step makes the attention mask
    from (``reset_attention_mask``; see the module doc)."""

    def __init__(self, dataset: Dataset, eod: int, reset_position_ids: bool,
                 reset_attention_mask: bool):
        self.dataset, self.eod = dataset, eod
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[idx])
        segments = document_segments(item["tokens"], self.eod)
        if self.reset_position_ids:
            item["position_ids"] = segment_positions(segments)
        if self.reset_attention_mask:
            item["segment_ids"] = segments
        return item
