"""Megatron's GPT samples: documents concatenated and cut into ``seq_length + 1`` token windows.

Three indices, built with vectorized numpy and cached on disk beside the data:

document index ``[num_epochs * num_documents]`` int32
    the split's document ids repeated once per epoch and shuffled with
    ``numpy.random.RandomState(seed)``. When the last epoch is used for less than 80% of its
    samples it is shuffled on its own (Megatron's ``separate_final_epoch``), so the first
    epochs are not skewed towards the documents of a partial one.
sample index ``[num_samples + 1, 2]``
    row ``j`` is (position in the document index, token offset in that document) of token
    ``j * seq_length`` of the concatenation; sample ``j`` is tokens ``[j * seq_length,
    (j + 1) * seq_length]`` inclusive, so consecutive samples share one token and a sample may
    cross document boundaries. Only full windows are kept.
shuffle index ``[num_samples]``
    a permutation of the samples (the separated final epoch, if any, is permuted on its own).

These are the arrays of Megatron-Core's ``GPTDataset`` for the same documents, sequence length
and seed (its compiled ``build_sample_idx`` is a loop; here it is one ``searchsorted``), so
samples come in Megatron's order. Enough epochs are built for ``num_samples``; ``len()`` counts
every full window of those epochs and may be larger. ``num_samples=None`` builds one epoch
(Megatron's size ``None``, used by ``--full-validation``): every full window of the documents
once.

An item is a dict, as Megatron-Core's GPT dataset returns, each tensor ``[seq_length]``:
``tokens`` (int64, the window without its last token), ``labels`` (int64, the window shifted by
one: the next-token targets), ``loss_mask`` (float32, ones; zero where ``tokens`` is the eod id
when ``eod_mask_loss``) and ``position_ids`` (int64, ``0..seq_length-1``). The causal
attention mask is left to the model. Batched by the default collate each becomes ``[b, s]``.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from mp.data.cache import atomic_path, build_once, save_array
from mp.data.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    """The fewest epochs (at least 1) whose tokens hold ``num_samples`` windows of
    ``seq_length + 1`` tokens that overlap by one; 1 for ``num_samples=None`` (one epoch)."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """``documents`` repeated ``num_epochs`` times and shuffled: int32 ``[num_epochs * D]``."""
    if separate_final_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        return np.concatenate([first, build_document_index(documents, 1, rng, False)])
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int
) -> np.ndarray:
    """Where each window starts: ``[num_samples + 1, 2]`` rows of (position in
    ``document_index``, token offset in that document), for every full window of
    ``seq_length + 1`` tokens over the documents in ``document_index`` order.
    int32 when it fits, else int64."""
    lengths = np.asarray(sequence_lengths)[document_index].astype(np.int64)
    starts = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    num_samples = max(0, (int(starts[-1]) - 1) // seq_length)
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    document = np.searchsorted(starts, positions, side="right") - 1
    index = np.stack([document, positions - starts[document]], axis=1)
    fits_int32 = document_index.size < np.iinfo(np.int32).max
    return index.astype(np.int32) if fits_int32 else index


def build_shuffle_index(
    num_samples: int, total_size: int, rng: np.random.RandomState
) -> np.ndarray:
    """A shuffled ``[0, num_samples)`` followed by a separately shuffled
    ``[num_samples, total_size)``: ``[total_size]``, uint32 when it fits, else int64."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_indices(
    sequence_lengths: np.ndarray,
    documents: np.ndarray,
    num_samples: int | None,
    seq_length: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The document, sample and shuffle indices of a split (see the module doc)."""
    tokens_per_epoch = int(np.asarray(sequence_lengths)[documents].sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    separate_final_epoch = num_epochs > 1 and (
        num_samples - samples_before_final
        < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
    )
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length)
    total = sample_index.shape[0] - 1
    shuffled_together = samples_before_final if separate_final_epoch else total
    return document_index, sample_index, build_shuffle_index(shuffled_together, total, rng)


def _cache_paths(
    indexed_dataset: IndexedDataset,
    document_ids: np.ndarray,
    split_name: str,
    num_samples: int | None,
    seq_length: int,
    seed: int,
    path_to_cache: str | None,
) -> dict[str, str]:
    """The cache file of each index, the description file (written last: its presence means
    the cache is complete) and the description text. Names start with the md5 of the
    description, as Megatron's do, so any change of input gets new files."""
    prefix = indexed_dataset.path_prefix
    if path_to_cache is None:
        path_to_cache = os.path.join(
            os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices"
        )
    description = json.dumps(
        {
            "class": "GPTDataset",
            "dataset_path": os.path.abspath(prefix),
            "idx_bytes": os.path.getsize(get_idx_path(prefix)),
            "bin_bytes": os.path.getsize(get_bin_path(prefix)),
            "split": split_name,
            "documents": hashlib.md5(document_ids.tobytes()).hexdigest(),
            "num_samples": num_samples,
            "sequence_length": seq_length,
            "random_seed": seed,
        },
        indent=4,
    )
    digest = hashlib.md5(description.encode()).hexdigest()
    base = os.path.join(path_to_cache, f"{digest}-GPTDataset-{split_name}")
    paths = {name: f"{base}-{name}.npy" for name in _INDEX_NAMES}
    return {**paths, "description": f"{base}-description.txt", "description_text": description}


class GPTDataset(torch.utils.data.Dataset):
    """GPT training windows over documents ``document_ids`` of ``indexed_dataset``.

    Args:
        indexed_dataset: the tokenized documents (one sequence per document, as preprocessing
            writes them).
        document_ids: the sequence ids of this split, e.g. ``numpy.arange(begin, end)``.
        num_samples: how many samples the caller will draw at least; None for one epoch
            (every full window once).
        seq_length: tokens per sample; each window holds ``seq_length + 1``.
        seed: the shuffle seed.
        split_name: ``train``, ``valid`` or ``test``; part of the cache file names.
        eod, eod_mask_loss: with ``eod_mask_loss``, ``loss_mask`` is 0 where ``tokens == eod``.
        path_to_cache: where the indices are cached; default ``cache/GPTDataset_indices`` in the
            directory of the data.
        group: the process group of the build-once collective (default: the world); every rank
            of it must construct the dataset.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        document_ids: np.ndarray,
        num_samples: int | None,
        seq_length: int,
        seed: int,
        *,
        split_name: str = "train",
        eod: int | None = None,
        eod_mask_loss: bool = False,
        path_to_cache: str | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if seq_length < 1 or (num_samples is not None and num_samples < 0):
            raise ValueError(
                f"seq_length={seq_length} must be >= 1 and num_samples={num_samples} >= 0"
            )
        if eod_mask_loss and eod is None:
            raise ValueError("eod_mask_loss=True needs the eod id")
        self.dataset = indexed_dataset
        self.seq_length = seq_length
        self.eod = eod
        self.eod_mask_loss = eod_mask_loss
        self.built_anew = False
        document_ids = np.asarray(document_ids, dtype=np.int64)
        tokens = int(indexed_dataset.sequence_lengths[document_ids].sum(dtype=np.int64))
        if tokens == 0:
            raise ValueError(
                f"{split_name} split of {indexed_dataset.path_prefix}: its {document_ids.size} "
                "documents hold no tokens"
            )
        paths = _cache_paths(
            indexed_dataset, document_ids, split_name, num_samples, seq_length, seed, path_to_cache
        )

        def build() -> None:
            arrays = build_indices(
                indexed_dataset.sequence_lengths, document_ids, num_samples, seq_length, seed
            )
            try:
                os.makedirs(os.path.dirname(paths["description"]), exist_ok=True)
                for name, values in zip(_INDEX_NAMES, arrays):
                    save_array(paths[name], values)
                with atomic_path(paths["description"]) as tmp, open(tmp, "w") as f:
                    f.write(paths["description_text"])
            except OSError as error:
                raise OSError(
                    f"cannot write the GPTDataset index cache in "
                    f"{os.path.dirname(paths['description'])} ({error}); "
                    "pass path_to_cache=<a writable directory>"
                ) from error
            self.built_anew = True

        what = f"the GPTDataset indices {paths['description']}"
        build_once(lambda: os.path.isfile(paths["description"]), build, what, group)
        # plain ndarray views of the mappings: indexing a numpy.memmap costs microseconds more
        self.document_index, self.sample_index, self.shuffle_index = (
            np.load(paths[name], mmap_mode="r").view(np.ndarray) for name in _INDEX_NAMES
        )

    def __len__(self) -> int:
        return self.shuffle_index.shape[0]

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``idx`` (after the shuffle), int64."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} is outside 0..{len(self) - 1}")
        i = int(self.shuffle_index[idx])
        (first, offset), (last, end) = (
            self.sample_index[i].tolist(),
            self.sample_index[i + 1].tolist(),
        )
        get, docs = self.dataset.get, self.document_index
        if first == last:
            return get(int(docs[first]), offset, end - offset + 1).astype(np.int64)
        parts = [get(int(docs[first]), offset)]
        parts += [get(int(docs[d])) for d in range(first + 1, last)]
        parts.append(get(int(docs[last]), 0, end + 1))
        return np.concatenate(parts, dtype=np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        text = self.sample_tokens(idx)
        tokens, labels = torch.from_numpy(text[:-1]), torch.from_numpy(text[1:])
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod] = 0.0
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }
