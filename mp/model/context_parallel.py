"""Context parallelism: each sequence split over the CP ranks, attention across them.

With ``c`` context-parallel ranks a sequence of ``s`` tokens is cut into ``2c`` chunks of
``L = s / (2c)`` tokens, and CP rank ``r`` holds chunks ``r`` and ``2c - 1 - r`` (Megatron's
load balancing: under a causal mask a late chunk attends to many keys and an early one to
few, so pairing them gives every rank the same work). Everything outside attention is per
token and runs on the rank's ``s / c`` tokens unchanged; the batch is cut with
`get_batch_on_this_cp_rank`, RoPE takes the angles of the rank's positions
(`local_positions`).

Attention runs one of Megatron's four ways (``--cp-comm-type``, `CP_COMM_TYPES`):

- ``all_gather`` (the default): each layer gathers the keys and values of the whole sequence
  over the CP group (backward reduce-scatters their gradients) and puts them back in sequence
  order. Each of the rank's two query chunks then attends to the keys up to its own end,
  causally: the mask is aligned to the bottom right, the queries being the last ``L`` of those
  keys. A given attention mask (document masks, ``[b, 1, s / c, s]``: the rank's queries
  against every key) is cut the same way.
- ``a2a`` (Jacobs et al. 2023, DeepSpeed-Ulysses): an all-to-all trades the rank's tokens of
  every head for every token of ``1 / c`` of the heads (its query heads and, as many groups,
  its key/value heads: both must divide by ``c``); the rank attends causally over the whole
  sequence for those heads, and a second all-to-all trades back. Four all-to-alls of a
  ``1 / c`` share each per layer, whatever ``c``, and no rank ever holds a whole sequence of
  every head. A given attention mask is all-gathered over the query rows, once for all
  layers (`gather_query_rows`, called by the transformer block). Per-head parameters follow
  the heads (`heads_of_this_rank`: the sinks' logits).
- ``p2p`` (Megatron's default): the key/value blocks travel around a ring of the CP ranks
  and the partial attentions merge by their log-sum-exp (`mp.model.ring_attention`); no rank
  holds the whole sequence's keys and values.
- ``a2a+p2p`` (hierarchical: Megatron's ``--hierarchical-context-parallel-sizes A P``, ``A x
  P = c``): ``a2a`` inside each group of A consecutive CP ranks, ``p2p`` across the P groups
  (`mp.parallel_state.get_hierarchical_context_parallel_groups`: ``[a2a group, p2p group]``,
  Transformer Engine's ``cp_group[0]`` and ``cp_group[1]`` in ``attn_forward_func_with_cp``).
  It composes: after the all-to-all in group ``g`` (CP ranks ``gA .. gA + A - 1``, chunks
  ``gA + j`` and ``2c - 1 - gA - j``) the A front chunks in order and the A back chunks in
  order (`_in_sequence_order` over the group) are super-chunks ``g`` and ``2P - 1 - g`` of
  ``2P``: the load-balanced layout of a CP-P ring, for ``1 / A`` of the heads, whose ring
  then runs over the p2p group (ring rank ``g``), before the all-to-all back. The all-to-alls
  stay within A (fast, intra-node) ranks; the ring's blocks are ``1 / A`` of p2p's. Sinks'
  logits follow the heads (`heads_of_this_rank` over the a2a group) into the ring; a mask
  gathers its query rows over the a2a group (`gather_query_rows`). With ``A = 1`` it is
  ``p2p``, with ``P = 1`` ``a2a``, over the whole CP group (`exchange_groups`).

The loss of a micro-batch is the sum over every token of the sequence, so the CP ranks add
their sums and token counts up (`mp.training.gpt_step.loss_func`), and gradients, which each
rank holds for its own tokens, are reduced over DP x CP
(``get_data_parallel_group(with_context_parallel=True)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.comm import all_gather_single
from mp.model.packed_documents import PackedDocuments
from mp.tensor_parallel.mappings import all_to_all, gather_from_sequence_parallel_region

if TYPE_CHECKING:
    from mp.model.config import TransformerConfig


def local_positions(seq_length: int, cp_size: int, cp_rank: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The positions (int64, ``[seq_length / cp_size]``) of the tokens CP rank ``cp_rank``
    holds: chunks ``cp_rank`` and ``2 cp_size - 1 - cp_rank`` of ``2 cp_size``."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"seq_length={seq_length} is not divisible by 2 x "
                         f"context_parallel_size={2 * cp_size}")
    chunk = seq_length // (2 * cp_size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device)
                      for c in (cp_rank, 2 * cp_size - 1 - cp_rank)])


def get_batch_on_this_cp_rank(batch: dict[str, torch.Tensor], group: dist.ProcessGroup
                              ) -> dict[str, torch.Tensor]:
    """This CP rank's part of a micro-batch of ``[b, s]`` tensors (``tokens``, ``labels``,
    ``loss_mask``, ``position_ids``); an ``attention_mask [b, 1, s, s]`` keeps the rank's
    query rows and every key (Megatron's ``get_batch_on_this_cp_rank``); packed documents
    (`mp.model.packed_documents`) stay whole (the model takes what its CP kind needs)."""
    cp = dist.get_world_size(group)
    if cp == 1:
        return batch
    seq_length = batch["tokens"].size(1)
    index = local_positions(seq_length, cp, dist.get_rank(group), batch["tokens"].device)
    return {key: value if isinstance(value, PackedDocuments)
            else value.index_select(2 if key == "attention_mask" else 1, index)
            for key, value in batch.items()}


CP_COMM_TYPES = ("all_gather", "a2a", "p2p", "a2a+p2p")


def exchange_groups(config: TransformerConfig) -> tuple[dist.ProcessGroup | None,
                                                        dist.ProcessGroup | None]:
    """``(heads, ring)``: the group whose all-to-all trades tokens for heads
    (`attention_over_heads`) and the ring's (`mp.model.ring_attention`) under ``config``'s
    context parallelism, None where there is none: both without CP and under ``all_gather``,
    ``(CP, None)`` under ``a2a``, ``(None, CP)`` under ``p2p``, ``(a2a group, p2p group)``
    under ``a2a+p2p``, whose level of one rank leaves the other level's exchange over the
    whole CP group (``[1, P]`` is ``p2p``, ``[A, 1]`` ``a2a``, as Transformer Engine's
    ``attn_forward_func_with_cp`` falls back)."""
    comm = config.cp_comm_type
    if config.context_parallel_size == 1 or comm == "all_gather":
        return None, None
    if comm == "a2a+p2p":
        a2a, p2p = config.hierarchical_context_parallel_sizes
        if a2a > 1 and p2p > 1:
            heads, ring = parallel_state.get_hierarchical_context_parallel_groups()
            return heads, ring
        comm = "a2a" if a2a > 1 else "p2p"
    group = parallel_state.get_context_parallel_group()
    return (group, None) if comm == "a2a" else (None, group)


def _in_sequence_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """``[s, ...]`` gathered rank by rank (rank ``r``'s chunks ``r`` and ``2c - 1 - r``) ->
    ``[s, ...]`` in sequence order. A concatenation of views: autograd saves nothing for it."""
    chunks = gathered.chunk(2 * cp_size)  # rank r's two chunks are entries 2r and 2r + 1
    return torch.cat([chunks[2 * r] for r in range(cp_size)]
                     + [chunks[2 * r + 1] for r in reversed(range(cp_size))])


def _in_rank_order(x: torch.Tensor, cp_size: int) -> torch.Tensor:
    """The inverse of `_in_sequence_order` (along dim 0)."""
    chunks = x.chunk(2 * cp_size)
    return torch.cat([chunks[c] for r in range(cp_size) for c in (r, 2 * cp_size - 1 - r)])


def attention_over_gathered_keys(attend: Callable, q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, attention_mask: torch.Tensor | None,
                                 group: dist.ProcessGroup) -> torch.Tensor:
    """``all_gather``: ``attend(q, k, v, mask)`` over the whole sequence for this rank's
    queries.

    ``q [s / c, b, np, d]`` and ``k, v [s / c, b, ng, d]`` hold this rank's two chunks;
    ``attention_mask`` is None (causal) or ``[b or 1, 1, s / c, s]``. ``attend`` treats a None
    mask as causal with the queries at the end of the keys. Returns ``attend``'s context for
    the rank's queries, ``[s / c, b, np * d]``.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    local = q.size(0)
    chunk = local // 2
    k, v = (_in_sequence_order(gather_from_sequence_parallel_region(t, True, group=group), cp)
            for t in (k, v))
    contexts = []
    for half, c in enumerate((rank, 2 * cp - 1 - rank)):
        rows = slice(half * chunk, (half + 1) * chunk)
        keys = slice(0, (c + 1) * chunk)
        mask = None if attention_mask is None else attention_mask[:, :, rows, keys]
        contexts.append(attend(q[rows], k[keys], v[keys], mask))
    return torch.cat(contexts, dim=0)


def gather_query_rows(attention_mask: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``a2a``'s mask: this CP rank's query rows ``[b, 1, s / c, s]`` -> every row in sequence
    order, ``[b, 1, s, s]``, gathered over the CP group (boolean or additive); ``a2a+p2p``'s,
    over the a2a group: the rows of its two super-chunks, ``[b, 1, s / P, s]``."""
    rows = attention_mask.movedim(2, 0).contiguous()
    if rows.dtype == torch.bool:  # gloo has no bools
        rows = rows.view(torch.uint8)
    gathered = rows.new_empty((rows.size(0) * dist.get_world_size(group), *rows.shape[1:]))
    all_gather_single(gathered, rows, group=group)
    ordered = _in_sequence_order(gathered, dist.get_world_size(group))
    return ordered.view(attention_mask.dtype).movedim(0, 2)


def attention_over_heads(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         attention_mask: torch.Tensor | None, group: dist.ProcessGroup
                         ) -> torch.Tensor:
    """``a2a``: `attention_over_gathered_keys`'s arguments and result, but every token of
    ``1 / c`` of the heads attended causally and traded back; a mask has every query row,
    ``[b or 1, 1, s, s]`` (`gather_query_rows`), and packed documents are the whole
    sequence's (`mp.model.packed_documents`: the tokens come back in sequence order). Under
    ``a2a+p2p`` ``group`` is the a2a group (A ranks) and ``attend`` the ring over the p2p
    group: the tokens traded are the group's, super-chunks ``g`` and ``2P - 1 - g`` (module
    doc), and a mask has their rows, ``[b or 1, 1, s / P, s]``."""
    cp = dist.get_world_size(group)
    q, k, v = (_in_sequence_order(all_to_all(t, 2, 0, group), cp) for t in (q, k, v))
    context = attend(q, k, v, attention_mask)  # [s, b, np / c * d], causal
    return all_to_all(_in_rank_order(context, cp), 0, 2, group)


def heads_of_this_rank(per_head: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``a2a``: the entries of ``per_head [np]`` (a value per query head of this TP rank: the
    sinks' logits) of the ``np / c`` heads this CP rank attends in `attention_over_heads`
    (the all-to-all hands CP rank ``r`` the ``r``-th ``1 / c`` of them); a view. Under
    ``a2a+p2p`` over the a2a group: ``1 / A`` of them."""
    return per_head.chunk(dist.get_world_size(group))[dist.get_rank(group)]
