"""The GPT forward step the schedules call (Megatron's ``pretrain_gpt.forward_step``).

A micro-batch is the data loader's dict of ``[b, s]`` tensors (`mp.data.gpt_dataset`):
``tokens``, ``labels`` (the tokens shifted by one), ``loss_mask`` and ``position_ids``, and
``segment_ids`` when documents or conversations are kept apart, which `get_batch` turns into
the micro-batch's `mp.model.packed_documents.PackedDocuments`, passed as the model's
``attention_mask``: attention within each document, with no ``[s, s]`` mask. The
model returns the per-token loss ``[b, s]``; as in Megatron, `loss_func` returns its sum over
the tokens the mask keeps and their count, and the schedule takes the micro-batch's mean from
them, or keeps the sum for the per-token loss (`mp.pipeline_parallel.losses`).

With context parallelism each CP rank runs its part of every sequence
(`mp.model.context_parallel.get_batch_on_this_cp_rank`); the CP ranks add their loss sums and
token counts up, so the mean and the reported loss are the whole sequence's. Each rank
backpropagates ``CP x`` its own sum: the gradients are then averaged over DP x CP, which adds
the CP ranks' parts up (Megatron scales by the CP size too).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.device import get_device
from mp.model.context_parallel import get_batch_on_this_cp_rank
from mp.model.packed_documents import PackedDocuments


def get_batch(data_iterator: Iterator[dict]) -> dict:
    """The next micro-batch, on this rank's device; its ``segment_ids`` made into the
    ``attention_mask``, packed documents (module doc)."""
    device = get_device()
    batch = dict(next(data_iterator))
    segments = batch.pop("segment_ids", None)
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if segments is not None:
        batch["attention_mask"] = PackedDocuments(segments, device)
    return batch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor,
              cp_group: dist.ProcessGroup | None = None):
    """``(sum(loss * mask), sum(mask) as int64, {"lm loss": [that sum, that count]})`` for the
    per-token loss ``output_tensor [b, s]`` and ``loss_mask [b, s]``. Over a context-parallel
    group ``cp_group`` the count and the reported sum are the whole sequence's and the sum to
    backpropagate is ``CP x`` this rank's (module doc)."""
    mask = loss_mask.float()
    loss_sum = (output_tensor.float() * mask).sum()
    totals = torch.stack([loss_sum, mask.sum()]).detach()
    cp = 1 if cp_group is None else dist.get_world_size(cp_group)
    if cp > 1:
        dist.all_reduce(totals, group=cp_group)
        loss_sum = loss_sum * cp
    return loss_sum, totals[1].to(torch.int64), {"lm loss": totals}


def forward_step(data_iterator: Iterator[dict], model: nn.Module):
    """Run ``model`` on the next micro-batch (this CP rank's part of it); return
    ``(per-token loss, loss_func)``."""
    cp_group = parallel_state.get_context_parallel_group()
    batch = get_batch_on_this_cp_rank(get_batch(data_iterator), cp_group)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, functools.partial(loss_func, batch["loss_mask"], cp_group=cp_group)
