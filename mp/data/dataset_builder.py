"""Train / valid / test GPT datasets from ``--data-path`` and ``--split``, or from
``--train-data-path``, ``--valid-data-path`` and ``--test-data-path`` (Megatron's
``BlendedMegatronDatasetBuilder`` for GPT, with its ``blend`` or ``blend_per_split``).

``data_path`` is ``["prefix"]``, several prefixes (weighted by their tokens), or weights and
prefixes in turn: ``["0.3", "a", "0.7", "b"]``. ``split`` like ``"969,30,1"`` gives each
prefix's documents in that proportion, in order: with ``N`` documents and cumulative normalized
fractions ``c``, split ``i`` holds documents ``[round(c[i] N), round(c[i+1] N))``, as in Megatron.
With per-split paths (each a list of the same form) a split holds every document of its own
datasets, and there is no ``split``; a split without a path is ``None``.

With one prefix each split is a `GPTDataset`. With several, each prefix's split is a
`GPTDataset` of ``ceil(ceil(n * w) * 1.005)`` samples (Megatron's margin) and the split is a
`BlendedDataset` of exactly ``n`` samples. A split asked for ``None`` samples (Megatron's size
``None``: ``--full-validation``'s validation split) is one epoch: each prefix's `GPTDataset` holds
every full window of its documents once and a blend of several takes all of them (weights are
refused: they need a sample count). With ``multiple_validation_sets`` (Megatron's
``--multiple-validation-sets``, per-split paths only, no weights) the validation split is a
list: one dataset per ``valid_data_path`` prefix, each built as if it were the only one, which
Megatron's builder does too. A split whose fraction is 0 or that is asked for 0
samples is ``None``; one asked for samples but left without documents is an error. Each
`GPTDataset` caches its indices under its file's path and its split's name (among others), so
different files or splits never share a cache entry.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from mp.data.blended_dataset import BlendedDataset
from mp.data.conversations import ConversationFile
from mp.data.gpt_dataset import GPTDataset
from mp.data.indexed_dataset import IndexedDataset
from mp.data.prompt_formats import PromptFormat
from mp.data.sft_dataset import SFTDataset
from mp.data.tokenizer import Tokenizer

SPLIT_NAMES = ("train", "valid", "test")
_BLEND_MARGIN = 0.005
_NUMBER = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")
_QUOTED = re.compile(r"""^\s*(['"])(.*)\1\s*$""")


def parse_data_path(
    data_path: Sequence[str], name: str = "data_path"
) -> tuple[list[str], list[float] | None]:
    """``(prefixes, weights or None)`` from a ``--data-path`` list (``name`` in messages)."""
    entries = [str(e).strip() for e in data_path]
    if not entries:
        raise ValueError(f"{name} is empty")
    numeric = [bool(_NUMBER.match(e)) for e in entries]
    if not any(numeric[0::2]):
        return entries, None
    if len(entries) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise ValueError(
            f"{name}={list(data_path)} mixes forms: give prefixes only, or weight and prefix "
            "pairs such as ['0.3', 'a', '0.7', 'b']"
        )
    weights = [float(w) for w in entries[0::2]]
    if sum(weights) <= 0:
        raise ValueError(f"{name} weights {weights} must have a positive sum")
    return entries[1::2], weights


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> normalized ``[train, valid, test]`` fractions (missing ones are 0).

    Numbers are separated by commas or slashes; quotes around the whole value are ignored, since
    Megatron's example scripts pass ``--split '99,1,0'`` from an unquoted bash array and
    Megatron picks the numbers out of whatever it gets."""
    quoted = _QUOTED.match(split)
    parts = re.split(r"[,/]", quoted.group(2) if quoted else split)
    if not 1 <= len(parts) <= 3 or not all(_NUMBER.match(p) for p in parts):
        raise ValueError(
            f"split={split!r} must be 1 to 3 non-negative numbers separated by commas or "
            "slashes, e.g. '969,30,1'"
        )
    values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if sum(values) <= 0:
        raise ValueError(f"split={split!r} must have a positive sum")
    return [v / sum(values) for v in values]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """The ``[begin, end)`` document range of each split, None where its fraction is 0."""
    fractions = parse_split(split)
    bounds = [0.0, *itertools.accumulate(fractions)]
    return [
        None if f == 0 else (round(bounds[i] * num_documents), round(bounds[i + 1] * num_documents))
        for i, f in enumerate(fractions)
    ]


def parse_data_sources(
    data_path: Sequence[str] | None,
    split: str | None,
    per_split_data_path: Sequence[Sequence[str] | None] | None,
) -> dict[str, tuple[list[str], list[float] | None]]:
    """``{"data_path": (prefixes, weights)}`` for ``data_path`` cut by ``split``, or the same
    for each ``<split>_data_path`` that ``per_split_data_path`` (``[train, valid, test]``, each
    a list or None) gives. Megatron's rules (one or the other; per-split paths take no
    ``split``) and the forms are checked: ValueError naming the values."""
    if per_split_data_path is None:
        if data_path is None or split is None:
            raise ValueError(f"data_path={data_path!r} and split={split!r}: give both, or "
                             "per-split data paths")
        parse_split(split)
        return {"data_path": parse_data_path(data_path)}
    if len(per_split_data_path) != len(SPLIT_NAMES):
        raise ValueError(f"per_split_data_path={per_split_data_path!r} must hold a path (or "
                         f"None) for each of {', '.join(SPLIT_NAMES)}")
    given = {f"{name}_data_path": path
             for name, path in zip(SPLIT_NAMES, per_split_data_path) if path is not None}
    for name, value in (("data_path", data_path), ("split", split)):
        if value is not None:
            shown = " and ".join(f"{key}={path!r}" for key, path in given.items())
            raise ValueError(f"{name}={value!r} with {shown}: each split comes whole from its "
                             f"own datasets, so {name} must be unset (null), as in Megatron-LM")
    return {key: parse_data_path(path, key) for key, path in given.items()}


def build_gpt_datasets(
    data_path: Sequence[str] | None,
    split: str | None,
    seq_length: int,
    seed: int,
    train_samples: int | None,
    valid_samples: int | None,
    test_samples: int | None,
    *,
    per_split_data_path: Sequence[Sequence[str] | None] | None = None,
    eod: int | None = None,
    eod_mask_loss: bool = False,
    path_to_cache: str | None = None,
    group: dist.ProcessGroup | None = None,
    mmap_bin_files: bool = True,
    multiple_validation_sets: bool = False,
) -> tuple[torch.utils.data.Dataset | list[torch.utils.data.Dataset] | None, ...]:
    """``(train, valid, test)``, each a `GPTDataset`, a `BlendedDataset` or None (see the module
    doc); items are `GPTDataset` dicts of ``[seq_length]`` tensors. The data is ``data_path``
    cut by ``split``, or ``per_split_data_path`` = ``[train, valid, test]`` paths (each a
    ``data_path`` list or None) with ``data_path`` and ``split`` None. ``mmap_bin_files=False``
    reads the ``.bin`` files with plain reads instead of mapping them (`IndexedDataset`'s
    ``mmap``). A split's sample count may be None (one epoch); with
    ``multiple_validation_sets`` the validation entry is a list of datasets, one per
    ``valid_data_path`` prefix in order.

    Collective over ``group`` under ``torch.distributed`` (index caches are built by its rank 0
    while the others wait): call it on every rank of the group.
    """
    sizes = (train_samples, valid_samples, test_samples)
    blends = _sources(data_path, split, per_split_data_path, sizes, multiple_validation_sets)
    for key, (prefixes, _) in blends.items():
        for prefix in prefixes:
            if not IndexedDataset.exists(prefix):
                raise FileNotFoundError(f"{key} prefix {prefix!r}: no {prefix}.bin and "
                                        f"{prefix}.idx")
    opened = {key: ([IndexedDataset(p, mmap=mmap_bin_files) for p in prefixes], weights)
              for key, (prefixes, weights) in blends.items()}

    def make(dataset: IndexedDataset, documents: np.ndarray, num_samples: int | None,
             name: str) -> GPTDataset:
        return GPTDataset(dataset, documents, num_samples, seq_length=seq_length, seed=seed,
                          eod=eod, eod_mask_loss=eod_mask_loss, path_to_cache=path_to_cache,
                          group=group, split_name=name)

    def tokens(dataset: IndexedDataset, begin: int, end: int) -> float:
        return float(dataset.sequence_lengths[begin:end].sum())
    return _build_splits(opened, split, sizes, multiple_validation_sets, make, tokens)


def build_sft_datasets(
    data_path: Sequence[str] | None,
    split: str | None,
    seq_length: int,
    seed: int,
    train_samples: int | None,
    valid_samples: int | None,
    test_samples: int | None,
    *,
    tokenizer: Tokenizer,
    prompt_format: PromptFormat,
    per_split_data_path: Sequence[Sequence[str] | None] | None = None,
    multiple_validation_sets: bool = False,
    path_to_cache: str | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.utils.data.Dataset | list[torch.utils.data.Dataset] | None, ...]:
    """`build_gpt_datasets` for supervised fine-tuning (Megatron's ``--sft``): the paths
    are conversation files (`mp.data.conversations`), ``split`` cuts each file's lines, and
    each split is an `SFTDataset` or a blend of them, weighted by their lines unless weights
    are given. Collective over ``group`` as `build_gpt_datasets` is: each file's line index is
    read and checked by its rank 0 and cached in ``path_to_cache`` (default beside the
    file)."""
    sizes = (train_samples, valid_samples, test_samples)
    blends = _sources(data_path, split, per_split_data_path, sizes, multiple_validation_sets)
    opened = {key: ([ConversationFile(p, path_to_cache, group) for p in paths], weights)
              for key, (paths, weights) in blends.items()}

    def make(conversations: ConversationFile, lines: np.ndarray, num_samples: int | None,
             name: str) -> SFTDataset:
        return SFTDataset(conversations, lines, num_samples, seq_length, tokenizer,
                          prompt_format, seed)
    return _build_splits(opened, split, sizes, multiple_validation_sets, make,
                         lambda conversations, begin, end: float(end - begin))


def _sources(data_path, split, per_split_data_path, sizes: tuple,
             multiple_validation_sets: bool) -> dict[str, tuple[list[str], list[float] | None]]:
    """The checked sources (`parse_data_sources`) of the builders' arguments, before any
    file is opened; ``sizes`` are the three splits' sample counts, each an integer >= 0 or
    None. ValueError naming the value and the rule."""
    for name, n in zip(SPLIT_NAMES, sizes):
        if n is not None and (not isinstance(n, (int, np.integer)) or n < 0):
            raise ValueError(f"{name}_samples={n!r} must be an integer >= 0 or None (one "
                             "epoch)")
    blends = parse_data_sources(data_path, split, per_split_data_path)
    check_validation_sets(blends, multiple_validation_sets, sizes[1] is None)
    return blends


def _build_splits(opened: dict, split: str | None, sizes: tuple, multiple_validation_sets: bool,
                  make, weigh) -> tuple:
    """Each split of ``sizes`` samples from the ``opened`` sources (`_split_sources`): None,
    a dataset ``make(source, ids, num_samples, split_name)`` of one member, a blend of them
    (weights given or ``weigh(source, begin, end)`` of each member) or, for the validation
    split with ``multiple_validation_sets``, a list of one per member."""
    sources = _split_sources(opened, split)
    return tuple(
        None if n == 0 or sources[i] is None
        else _build_split(name, n, *sources[i], make, weigh)
        if not (multiple_validation_sets and name == "valid")
        else [_build_split(name, n, [member], None, make, weigh) for member in sources[i][0]]
        for i, (name, n) in enumerate(zip(SPLIT_NAMES, sizes)))


def check_validation_sets(blends: dict[str, tuple[list[str], list[float] | None]],
                          multiple_validation_sets: bool, full_validation: bool) -> None:
    """Megatron's rules for ``--multiple-validation-sets`` and ``--full-validation`` on the
    parsed sources (`parse_data_sources`): several validation sets come from
    ``valid_data_path`` without weights, and a whole-epoch validation split (sample count
    None) has no weights either (Megatron: ``size_is_none => weights_are_none``). ValueError
    naming the values."""
    valid = blends.get("valid_data_path")
    if multiple_validation_sets and valid is None:
        given = f" (data_path={blends['data_path'][0]} gives one validation split)" \
            if "data_path" in blends else ""
        raise ValueError("multiple_validation_sets=true evaluates each dataset of "
                         f"valid_data_path on its own, and valid_data_path is not set{given}: "
                         "give train_data_path and valid_data_path, as in Megatron-LM")
    if multiple_validation_sets and valid is not None and valid[1] is not None:
        raise ValueError(f"multiple_validation_sets=true with valid_data_path weights "
                         f"{valid[1]}: each dataset is evaluated whole on its own, so the list "
                         "must hold prefixes only (Megatron-LM's rule)")
    blend = valid if valid is not None else blends.get("data_path")
    if full_validation and blend is not None and blend[1] is not None:
        key = "valid_data_path" if valid is not None else "data_path"
        raise ValueError(f"full_validation=true with {key} weights {blend[1]}: a full "
                         "validation takes every sample of each dataset once, and weights need "
                         "a sample count; give prefixes only (Megatron-LM's rule)")


def _split_sources(opened: dict, split: str | None) -> list[tuple[list, list | None] | None]:
    """Each split's ``(members, weights)``, members being ``(dataset, document range)`` pairs:
    ``opened["data_path"]``'s datasets cut by ``split``, or with no ``split`` the whole datasets
    of ``opened["<split>_data_path"]``; None for a split without data."""
    if split is not None:
        indexed, weights = opened["data_path"]
        ranges = [split_document_ranges(split, len(d)) for d in indexed]
        return [None if ranges[0][i] is None
                else ([(d, r[i]) for d, r in zip(indexed, ranges)], weights)
                for i in range(len(SPLIT_NAMES))]
    blends = [opened.get(f"{name}_data_path") for name in SPLIT_NAMES]
    return [None if blend is None else ([(d, (0, len(d))) for d in blend[0]], blend[1])
            for blend in blends]


def _build_split(
    name: str,
    num_samples: int | None,
    members: list[tuple[IndexedDataset | ConversationFile, tuple[int, int]]],
    weights: list[float] | None,
    make,
    weigh,
) -> torch.utils.data.Dataset:
    """One split of ``num_samples`` samples (None: one epoch): ``make``'s dataset over the
    one member's document range, or a blend of them (`_build_splits`)."""
    empty = [d.path_prefix for d, (begin, end) in members if begin == end]
    if empty:
        raise ValueError(
            f"{name} split of {', '.join(empty)} has no documents; "
            + ("a whole epoch was requested" if num_samples is None
               else f"{num_samples} {name} samples were requested")
        )
    if len(members) == 1:
        ((dataset, document_range),) = members
        return make(dataset, np.arange(*document_range), num_samples, name)
    if num_samples is None:
        if weights is not None:
            raise ValueError(f"the {name} split's weights {weights} need a sample count; a whole "
                             "epoch (num_samples None) takes no weights")
        datasets = [make(dataset, np.arange(*document_range), None, name)
                    for dataset, document_range in members]
        sizes = [len(d) for d in datasets]  # every sample of each once
        return BlendedDataset(datasets, sizes, sum(sizes))
    weights = weights or [weigh(d, b, e) for d, (b, e) in members]
    total = sum(weights)
    datasets = [
        make(dataset, np.arange(*document_range),
             math.ceil(math.ceil(num_samples * w / total) * (1 + _BLEND_MARGIN)), name)
        for (dataset, document_range), w in zip(members, weights)
    ]
    return BlendedDataset(datasets, weights, num_samples)
