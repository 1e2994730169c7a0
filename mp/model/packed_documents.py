"""Attention that keeps a sample's documents apart without an ``[s, s]`` mask (what Megatron's
packed sequences, its ``thd`` format with ``cu_seqlens``, are for).

A micro-batch whose samples pack several documents (``--reset-attention-mask``) or
conversations (``--sft``) carries each token's segment id ``[b, s]``
(`mp.data.document_masks`). `PackedDocuments` turns those into gather indices once per
micro-batch, and the attention core takes it where it would take a mask: the documents become
the batch of a plain causal attention, each padded at its end to its bucket's length
(`bucket_lengths`), and the context is gathered back into ``[s, b, ...]``. So the flash kernels
run (a mask rules them out), a document of ``n`` tokens costs ``~n^2`` scores instead of the
sample's ``s^2``, and no ``[b, 1, s, s]`` mask is made or kept.

Exact: a document's padding comes after its last token, so causality hides it from the real
queries; the padded queries' outputs are dropped, so no gradient reaches what they read
(padding reads token 0 of the micro-batch and adds exact zeros to its gradient).

Buckets are 1, 2, 3, 4, 6, 8, 12, 16, 24, ... tokens (powers of two and 1.5 times them,
capped at ``s``): a document is padded to less than 1.5 times its length, and a micro-batch
calls the core once per bucket its documents fall in, at most ``2 log2(s)`` times. A
micro-batch whose every sample is one document attends as it is, causally (no gathers).
Under ``a2a`` context parallelism each rank attends every token of its share of the heads, in
sequence order: the documents are gathered there as without CP. ``all_gather``, ``p2p`` and
``a2a+p2p`` split a document over ranks: there the documents become the rank's rows of the
dense mask (`mask`, in `mp.model.attention_masks.mask_for_layers`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mp.data.document_masks import segment_mask


def bucket_lengths(lengths: torch.Tensor, limit: int) -> torch.Tensor:
    """The padded length of documents of ``lengths [D]`` (all >= 1) tokens: the least of 1, 2,
    3, 4, 6, 8, 12, ... (``2^k`` and ``3 * 2^(k-1)``) not below each, at most ``limit``."""
    power = torch.ones_like(lengths) << torch.ceil(torch.log2(lengths.double())).long()
    three_quarters = power * 3 // 4
    fits = (power % 4 == 0) & (lengths <= three_quarters)
    return torch.where(fits, three_quarters, power).clamp(max=limit)


class PackedDocuments:
    """Where the documents of a micro-batch lie, as the attention core gathers them.

    ``segment_ids [b, s]``: each token's document, non-decreasing along each sample (equal
    ids in two samples are different documents). The indices are made on the host (their
    shapes decide the calls) and moved to ``device``. Attributes: ``shape`` ``(s, b)``;
    ``segment_ids`` on ``device``; ``calls``, one ``(L, index [L * D])`` per bucket: ``D``
    documents padded to ``L`` tokens, ``index`` into the ``[s * b]`` tokens of the
    ``[s, b, ...]`` layout, row ``j * D + d`` the ``j``-th token of document ``d``;
    ``inverse [s * b]``: each token's row in the buckets' outputs, concatenated;
    ``whole_samples``: every sample is one document (`attend` gathers nothing).
    """

    def __init__(self, segment_ids: torch.Tensor, device: torch.device | str | None = None):
        if segment_ids.dim() != 2:
            raise ValueError(f"segment_ids must be [b, s], got shape {tuple(segment_ids.shape)}")
        segments = segment_ids.cpu()
        b, s = segments.shape
        starts = torch.ones(b, s, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        if bool((segments[:, 1:] < segments[:, :-1]).any()):
            raise ValueError("segment_ids must not decrease along a sample (a document's "
                             "tokens are consecutive)")
        sample, first = starts.nonzero(as_tuple=True)  # [D], sample by sample
        flat_first = sample * s + first  # each document's first token, sample-major
        lengths = torch.diff(flat_first, append=torch.tensor([b * s]))
        sizes, bucket = bucket_lengths(lengths, s).unique(return_inverse=True)
        counts = torch.bincount(bucket)  # documents per bucket
        order = torch.sort(bucket, stable=True).indices  # the documents, bucket by bucket
        begins = torch.cumsum(counts, 0) - counts  # each bucket's first in `order`
        rank = torch.empty_like(order)  # each document's place in its bucket
        rank[order] = torch.arange(order.numel()) - begins[bucket[order]]
        offsets = torch.cumsum(sizes * counts, 0) - sizes * counts  # of its rows
        document = starts.flatten().cumsum(0) - 1  # each token's, sample-major [b * s]
        position = torch.arange(b * s) - flat_first[document]  # in its document
        mine = bucket[document]
        where = offsets[mine] + position * counts[mine] + rank[document]
        self.calls: list[tuple[int, torch.Tensor]] = []
        for length, members in zip(sizes.tolist(), order.split(counts.tolist())):
            step = torch.arange(length)[:, None]  # [L, 1]
            index = torch.where(step < lengths[members], (first[members] + step) * b
                                + sample[members], 0)
            self.calls.append((length, index.flatten().to(device, non_blocking=True)))
        self.shape = (s, b)
        self.whole_samples = lengths.numel() == b
        self.inverse = where.view(b, s).t().flatten().to(device, non_blocking=True)
        self.segment_ids = segment_ids.to(device, non_blocking=True)

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The same attention as a boolean ``[b, 1, s, s]`` mask, True = masked out; with
        ``rows [r]`` (query positions) only theirs, ``[b, 1, r, s]``."""
        return segment_mask(self.segment_ids, rows)

    def attend(self, attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> torch.Tensor:
        """``q [s, b, np, hd]``, ``k [s, b, ng, hd]``, ``v [s, b, ng, vd]`` -> ``[s, b, F]``:
        ``attend(q', k', v', None)`` on each bucket's ``[L, D, ...]`` gathers, causal within
        each document, its ``[L, D, F]`` gathered back. Compiled layers must not trace it:
        the calls' number and shapes change with every micro-batch, and a compiled layer would
        compile again for each (`mp.model.attention.CoreAttention` runs it outside them)."""
        if tuple(q.shape[:2]) != self.shape:
            raise ValueError(f"queries [s, b] = {list(q.shape[:2])} do not match the packed "
                             f"documents' [s, b] = {list(self.shape)}")
        if self.whole_samples:
            return attend(q, k, v, None)
        flat = [t.flatten(0, 1) for t in (q, k, v)]
        contexts = [attend(*(t.index_select(0, index).unflatten(0, (length, -1))
                             for t in flat), None).flatten(0, 1)
                    for length, index in self.calls]
        context = contexts[0] if len(contexts) == 1 else torch.cat(contexts)
        return context.index_select(0, self.inverse).unflatten(0, self.shape)
