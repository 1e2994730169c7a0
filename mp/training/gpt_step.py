"""The GPT forward step the schedules call (Megatron's ``pretrain_gpt.forward_step``).

A micro-batch is the data loader's dict of ``[b, s]`` tensors (`mp.data.gpt_dataset`):
``tokens``, ``labels`` (the tokens shifted by one), ``loss_mask`` and ``position_ids``, and
``attention_mask [b, 1, s, s]`` when documents are kept apart (`mp.data.document_masks`). The
model returns the per-token loss ``[b, s]``; as in Megatron, `loss_func` returns its sum over
the tokens the mask keeps and their count, and the schedule takes the micro-batch's mean from
them, or keeps the sum for the per-token loss (`mp.pipeline_parallel.losses`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import nn

from mp.device import get_device


def get_batch(data_iterator: Iterator[dict]) -> dict[str, torch.Tensor]:
    """The next micro-batch, on this rank's device."""
    device = get_device()
    return {key: value.to(device, non_blocking=True) for key, value in next(data_iterator).items()}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """``(sum(loss * mask), sum(mask) as int64, {"lm loss": [that sum, that count]})`` for the
    per-token loss ``output_tensor [b, s]`` and ``loss_mask [b, s]``."""
    mask = loss_mask.float()
    loss_sum = (output_tensor.float() * mask).sum()
    num_tokens = mask.sum()
    return loss_sum, num_tokens.to(torch.int64), \
        {"lm loss": torch.stack([loss_sum, num_tokens]).detach()}


def forward_step(data_iterator: Iterator[dict], model: nn.Module):
    """Run ``model`` on the next micro-batch; return ``(per-token loss, loss_func)``."""
    batch = get_batch(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"])
