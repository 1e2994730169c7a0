"""Megatron-LM's memory-mapped indexed dataset: token sequences in a ``.bin`` / ``.idx`` pair.

The format is Megatron's (``MMIDIDX`` version 1), so data preprocessed by Megatron-LM loads here
and data written here loads in Megatron-LM:

``prefix.bin``
    the token ids of every sequence, back to back, in the index's dtype, no header.
``prefix.idx`` (little-endian)
    ======  =========================  ==================================================
    offset  field                      type
    ======  =========================  ==================================================
    0       magic ``MMIDIDX\\x00\\x00``   9 bytes
    9       version = 1                ``<Q``
    17      dtype code (`DTYPE_CODES`)  ``<B``
    18      sequence count ``n``        ``<Q``
    26      document count ``d``        ``<Q`` (documents + 1)
    34      sequence lengths           ``n`` x int32
    ..      sequence byte offsets      ``n`` x int64, into ``.bin``
    ..      document indices           ``d`` x int64: 0, then one past each document's last
                                       sequence
    ======  =========================  ==================================================

`IndexedDataset` maps both files; reading a sequence is two array lookups and a zero-copy
``numpy.frombuffer`` over the mapping, so it is O(1) and nothing reads the whole file. With
``mmap=False`` (Megatron's ``--no-mmap-bin-files``, for file systems where mapping large files
is slow or unsupported) the ``.bin`` is not mapped: each sequence is read from the file with one
plain read into a new array, as Megatron's ``_FileBinReader`` does; the values are the same.
`IndexedDatasetBuilder` keeps Megatron's API (``add_item``, ``end_document``, ``add_document``,
``add_index``, ``finalize``) and fixes one of its warts: it writes under temporary names and
renames on ``finalize``, so an interrupted build never leaves a partial file under the final name.
Megatron's multimodal variant (a per-sequence mode byte after the document indices) is not
supported and is rejected with a clear error.
"""

from __future__ import annotations

import array
import os
import shutil
import struct
from collections.abc import Sequence

import numpy as np
import torch

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

#: Megatron's dtype codes for the token ids in ``.bin``.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def dtype_code(dtype) -> int:
    """Megatron's code for ``dtype`` (e.g. ``numpy.uint16`` -> 8)."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF_DTYPE:
        raise ValueError(
            f"dtype={dtype} has no code in the .idx format; use one of "
            + ", ".join(str(d) for d in _CODE_OF_DTYPE)
        )
    return _CODE_OF_DTYPE[dtype]


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron's preprocessing picks: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def get_bin_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def get_idx_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def _map_read_only(path: str) -> np.ndarray:
    """A read-only uint8 view of the whole file (an empty array for an empty file, which
    ``numpy.memmap`` refuses to map)."""
    if os.path.getsize(path) == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class IndexedDataset(torch.utils.data.Dataset):
    """The sequences of a ``.bin`` / ``.idx`` pair, memory-mapped (the ``.bin`` read with plain
    file reads instead when ``mmap`` is False).

    ``dataset[i]`` is sequence ``i`` as a numpy array ``[sequence_lengths[i]]`` in `dtype` (a
    read-only view of the mapping, or a new array when not mapped); ``dataset[a:b]`` is a list of
    them; ``get(i, offset, length)`` is a slice of one sequence. The dataset pickles as its path
    and ``mmap`` (DataLoader workers re-open the files).
    """

    def __init__(self, path_prefix: str, mmap: bool = True) -> None:
        super().__init__()
        self._open(path_prefix, mmap)

    def _open(self, path_prefix: str, mmap: bool) -> None:
        self.path_prefix, self.mmap = path_prefix, mmap
        idx_path, bin_path = get_idx_path(path_prefix), get_bin_path(path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset {path_prefix!r}: no file {path}")
        idx = _map_read_only(idx_path)
        if idx.nbytes < _HEADER.size:
            raise ValueError(
                f"{idx_path}: {idx.nbytes} bytes is shorter than the {_HEADER.size}-byte header"
            )
        magic, version, code, n, d = _HEADER.unpack(idx[: _HEADER.size].tobytes())
        if magic != _MAGIC:
            raise ValueError(
                f"{idx_path}: magic {magic!r} is not {_MAGIC!r} (not an MMIDIDX index)"
            )
        if version != _VERSION:
            raise ValueError(f"{idx_path}: index version {version} is not the supported {_VERSION}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: dtype code {code} is not one of {sorted(DTYPE_CODES)}")
        expected = _HEADER.size + 12 * n + 8 * d
        if idx.nbytes != expected:
            hint = (
                " (a multimodal index with sequence modes?)" if idx.nbytes == expected + n else ""
            )
            raise ValueError(
                f"{idx_path}: {idx.nbytes} bytes, but a header with {n} sequences and {d - 1} "
                f"documents needs {expected}{hint}"
            )
        self.dtype = DTYPE_CODES[code]
        start = _HEADER.size
        self.sequence_lengths = np.frombuffer(idx, np.int32, n, start)
        self.sequence_pointers = np.frombuffer(idx, np.int64, n, start + 4 * n)
        self.document_indices = np.frombuffer(idx, np.int64, d, start + 12 * n)
        if d == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise ValueError(
                f"{idx_path}: document indices must run from 0 to the sequence count {n}, got "
                f"{self.document_indices[:1].tolist()}...{self.document_indices[-1:].tolist()}"
            )
        end = 0  # the byte after the last sequence
        if n:
            last_length = int(self.sequence_lengths[-1])
            end = int(self.sequence_pointers[-1]) + last_length * self.dtype.itemsize
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != end:
            raise ValueError(
                f"{bin_path}: {bin_bytes} bytes, but its index {idx_path} ends the last "
                f"sequence at byte {end} (the pair was not written together)"
            )
        self._bin = _map_read_only(bin_path) if mmap else None

    def __getstate__(self) -> tuple[str, bool]:
        return self.path_prefix, self.mmap

    def __setstate__(self, state: tuple[str, bool]) -> None:
        self._open(*state)

    def __len__(self) -> int:
        """The number of sequences."""
        return self.sequence_lengths.shape[0]

    @property
    def num_documents(self) -> int:
        return self.document_indices.shape[0] - 1

    def __getitem__(self, idx: int | np.integer | slice):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(
                    f"slice step {step}: slices of an IndexedDataset must be contiguous"
                )
            return [self.get(i) for i in range(start, stop)]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when ``length``
        is None): ``[length]``, a read-only view into the mapped ``.bin``, or read from it."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) are outside sequence {idx} of length {size}"
            )
        pointer = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        if self._bin is None:
            return np.fromfile(get_bin_path(self.path_prefix), self.dtype, length, offset=pointer)
        return np.frombuffer(self._bin, self.dtype, length, pointer)

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """Whether both files of the pair are there."""
        return os.path.isfile(get_idx_path(path_prefix)) and os.path.isfile(
            get_bin_path(path_prefix)
        )


def _cast_tokens(tokens, dtype: np.dtype) -> np.ndarray:
    """``tokens`` (list, numpy array or tensor) as a 1-D array in ``dtype``; integer ids that do
    not fit raise instead of wrapping around as in Megatron's builder."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.numpy()
    values = np.asarray(tokens)
    if values.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {values.shape}")
    if values.dtype != dtype and values.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise ValueError(
                f"token id {low if low < info.min else high} does not fit the dataset dtype "
                f"{dtype} (range {info.min}..{info.max})"
            )
    return values.astype(dtype, copy=False)


class IndexedDatasetBuilder:
    """Writes a ``.bin`` / ``.idx`` pair with Megatron's builder API.

    ``.bin`` is written to a temporary name as sequences arrive; `finalize` writes the index,
    then renames both into place. `abort` (or leaving a ``with`` block without `finalize`)
    deletes the temporaries.

    Args:
        bin_path: the final ``.bin`` path.
        dtype: the token dtype (`optimal_dtype` of the vocabulary size, as Megatron picks).
    """

    def __init__(self, bin_path: str, dtype=np.int32) -> None:
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validates
        self._bin_path = bin_path
        self._bin_tmp = f"{bin_path}.tmp{os.getpid()}"
        self._file = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed by finalize or abort
        self._lengths = array.array("i")
        self._document_indices = array.array("q", [0])

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self.abort()

    def add_item(self, tokens) -> None:
        """Append one sequence (a document ends at the next `end_document`)."""
        values = _cast_tokens(tokens, self.dtype)
        self._file.write(values.tobytes())
        self._lengths.append(values.size)

    def end_document(self) -> None:
        """Close the current document after the sequences added with `add_item`."""
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        """Append one document: ``tokens`` holds its sequences back to back, ``lengths`` their
        lengths."""
        self.add_documents(tokens, lengths, np.asarray([len(lengths)]))

    def add_documents(self, tokens, lengths: Sequence[int], sequences_per_document=None) -> None:
        """Append many documents at once: ``tokens`` back to back, ``lengths[j]`` the length of
        sequence ``j``; each sequence is one document unless ``sequences_per_document`` says
        how many consecutive sequences each document holds."""
        values = _cast_tokens(tokens, self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != values.size:
            raise ValueError(
                f"lengths sum to {int(lengths.sum())} but {values.size} tokens were given"
            )
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("sequence lengths must lie in 0..2**31-1 (stored as int32)")
        if sequences_per_document is None:
            sequences_per_document = np.ones(lengths.size, np.int64)
        counts = np.asarray(sequences_per_document, dtype=np.int64)
        if int(counts.sum()) != lengths.size:
            raise ValueError(
                f"sequences_per_document sums to {int(counts.sum())}, not {lengths.size} sequences"
            )
        self._file.write(values.tobytes())
        ends = len(self._lengths) + np.cumsum(counts)
        self._lengths.frombytes(lengths.astype(np.int32).tobytes())
        self._document_indices.frombytes(ends.astype(np.int64).tobytes())

    def add_index(self, path_prefix: str) -> None:
        """Append every sequence and document of the dataset at ``path_prefix``."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"{path_prefix}: dtype {other.dtype} differs from this builder's {self.dtype}"
            )
        offset = len(self._lengths)
        self._lengths.frombytes(other.sequence_lengths.tobytes())
        self._document_indices.frombytes((other.document_indices[1:] + offset).tobytes())
        with open(get_bin_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self._file)

    def finalize(self, idx_path: str) -> None:
        """Write the index and move both files to their final names."""
        self._file.close()
        self._file = None
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        documents = np.frombuffer(self._document_indices, dtype=np.int64)
        idx_tmp = f"{idx_path}.tmp{os.getpid()}"
        try:
            header = (_MAGIC, _VERSION, dtype_code(self.dtype), lengths.size, documents.size)
            with open(idx_tmp, "wb") as f:
                f.write(_HEADER.pack(*header))
                f.write(lengths.tobytes())
                f.write(pointers.tobytes())
                f.write(documents.tobytes())
            os.replace(self._bin_tmp, self._bin_path)
            os.replace(idx_tmp, idx_path)
        finally:
            for path in (self._bin_tmp, idx_tmp):
                if os.path.exists(path):
                    os.remove(path)

    def abort(self) -> None:
        """Drop everything written so far; no file remains."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self._bin_tmp):
            os.remove(self._bin_tmp)
