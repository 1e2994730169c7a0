"""Global names and placements of a rank's parameters: what makes a checkpoint layout-free.

A checkpoint key names a parameter of the whole model, never of one rank's piece of it:

- chunk-local layer indices become global ones (``decoder.layers.3.mlp.linear_fc1.weight`` is
  global layer 3 whichever pipeline stage or virtual chunk holds it), read from each layer's
  ``layer_number`` (1-based over the whole model);
- the ``module.`` prefix of data-parallel wrappers is dropped;
- the last pipeline stage's copy of tied word embeddings (``output_layer.weight`` with
  ``shared = True``) is the word embedding: it reads ``embedding.word_embeddings.weight``.

A `Placement` says where a local tensor sits in the global one: its global shape and the
offset of its first element in every dimension, from the parameter's shard metadata
(``tensor_model_parallel``, ``partition_dim``, ``partition_stride``, ``global_shape``,
``shard_offset``; `mp.tensor_parallel.layers`; an expert's also count its place among the
experts, `mp.model.moe.experts`). Parameters without it are replicated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
TIED_OUTPUT_WEIGHT = "output_layer.weight"
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class Placement:
    """Where a local tensor lies in its global tensor."""

    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> Placement:
        """A tensor that is the entire global tensor (replicated, or not distributed)."""
        return cls(tuple(tensor.shape), (0,) * tensor.dim())

    @classmethod
    def of_parameter(cls, param: torch.Tensor) -> Placement:
        """From ``param``'s shard metadata; replicated when it has none."""
        if not hasattr(param, "global_shape"):
            return cls.whole(param)
        if getattr(param, "tensor_model_parallel", False) \
                and getattr(param, "partition_stride", 1) != 1:
            raise ValueError(f"a parameter of shape {tuple(param.shape)} has partition_stride="
                             f"{param.partition_stride}; checkpoints support contiguous shards "
                             "(partition_stride=1) only")
        placement = cls(tuple(param.global_shape), tuple(param.shard_offset))
        if len(placement.global_shape) != param.dim() or len(placement.offsets) != param.dim():
            raise ValueError(f"a parameter of shape {tuple(param.shape)} has global_shape="
                             f"{placement.global_shape} and shard_offset={placement.offsets} "
                             "of another rank")
        return placement

    def of_flat_range(self, shape: tuple[int, ...], start: int, end: int
                      ) -> list[tuple[tuple[int, ...], Placement]]:
        """Elements ``[start, end)`` (row-major) of a local tensor of ``shape`` placed here,
        as rectangles: ``(sizes, placement)`` of each, in element order (at most
        ``2 * len(shape) - 1`` of them, each contiguous in the flat range)."""
        return [(sizes, Placement(self.global_shape,
                                  tuple(o + b for o, b in zip(self.offsets, offsets))))
                for offsets, sizes in flat_range_boxes(tuple(shape), start, end)]


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int
                     ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(offsets, sizes)`` of the rectangles that tile elements ``[start, end)`` of a
    row-major tensor of ``shape``, in element order: a partial first row, whole rows, a
    partial last row, each partial row split the same way one dimension down."""
    if start >= end:
        return []
    if not shape:
        return [((), ())]
    row = 1
    for size in shape[1:]:
        row *= size
    first, last = -(-start // row), end // row  # the whole rows [first, last)
    if first > last:  # inside one row
        index = start // row
        return [((index, *o), (1, *n))
                for o, n in flat_range_boxes(shape[1:], start - index * row, end - index * row)]
    head = [((first - 1, *o), (1, *n))
            for o, n in flat_range_boxes(shape[1:], start - (first - 1) * row, row)] \
        if start < first * row else []
    middle = [((first, *(0,) * (len(shape) - 1)), (last - first, *shape[1:]))] \
        if last > first else []
    tail = [((last, *o), (1, *n)) for o, n in flat_range_boxes(shape[1:], 0, end - last * row)]
    return head + middle + tail


@dataclass(frozen=True)
class NamedParameter:
    """One parameter of this rank: its global name, placement, and whether this rank writes
    it (False for the tied embedding's ``shared`` copy, which its owner stage writes)."""

    name: str
    param: nn.Parameter
    placement: Placement
    owner: bool


def unwrap(chunk: nn.Module) -> nn.Module:
    """The model inside a data-parallel wrapper (or ``chunk`` itself)."""
    return getattr(chunk, "module", chunk)


def _global_name(chunk: nn.Module, local_name: str, param: nn.Parameter) -> str:
    match = _LAYER.fullmatch(local_name)
    if match:
        layer = chunk.decoder.layers[int(match[1])]
        return f"decoder.layers.{layer.layer_number - 1}.{match[2]}"
    if local_name == TIED_OUTPUT_WEIGHT and getattr(param, "shared", False):
        return WORD_EMBEDDINGS
    return local_name


def named_parameters(model_chunks: Iterable[nn.Module]) -> list[NamedParameter]:
    """Every parameter of this rank's chunks under its global name, in chunk order.

    Raises ValueError when two of this rank's parameters claim the same global name (chunks
    that overlap, or a model whose layers do not carry global ``layer_number``s).
    """
    entries, seen = [], {}
    for chunk in model_chunks:
        chunk = unwrap(chunk)
        for local_name, param in chunk.named_parameters():
            name = _global_name(chunk, local_name, param)
            if name in seen:
                raise ValueError(f"two parameters of this rank are both global {name!r} "
                                 f"(local {seen[name]!r} and {local_name!r})")
            seen[name] = local_name
            entries.append(NamedParameter(name, param, Placement.of_parameter(param),
                                          owner=not getattr(param, "shared", False)))
    return entries
