"""The .bin/.idx dataset: round trips for every dtype, mapped or read with plain file reads
(``mmap=False``), and the byte layout checked field by field against Megatron's documented
format (not against our own reader)."""

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from mp.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    optimal_dtype,
)

# Megatron's documented codes (REFERENCES.md), written out here rather than taken from the module.
MEGATRON_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}


def _random_documents(dtype, seed=0):
    """Documents as lists of sequences, with empty sequences and a wide value range."""
    rng = np.random.default_rng(seed)
    low, high = (
        (0, 100)
        if np.dtype(dtype).kind == "f"
        else (max(np.iinfo(dtype).min, -(2**40)), min(np.iinfo(dtype).max, 2**40))
    )
    return [
        [
            rng.integers(low, high, size=rng.integers(0, 20)).astype(dtype)
            for _ in range(rng.integers(1, 4))
        ]
        for _ in range(12)
    ]


def _build(prefix, documents, dtype, how):
    with IndexedDatasetBuilder(prefix + ".bin", dtype) as builder:
        for doc in documents:
            if how == "items":
                for seq in doc:
                    builder.add_item(seq)
                builder.end_document()
            else:
                builder.add_document(np.concatenate(doc), [len(s) for s in doc])
        builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", list(MEGATRON_CODES))
@pytest.mark.parametrize("how", ["items", "documents"])
@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "file-reads"])
def test_round_trip_every_sequence_and_document_boundary(tmp_path, dtype, how, mmap):
    documents = _random_documents(dtype)
    prefix = str(tmp_path / "data")
    _build(prefix, documents, dtype, how)
    ds = IndexedDataset(prefix, mmap=mmap)
    assert ds[0].flags.writeable is not mmap  # a view of the mapping, or an array of its own
    sequences = [s for doc in documents for s in doc]
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(sequences) and ds.num_documents == len(documents)
    for i, expected in enumerate(sequences):
        np.testing.assert_array_equal(ds[i], expected)
        assert ds[i].dtype == np.dtype(dtype)
    expected_boundaries = np.cumsum([0] + [len(doc) for doc in documents])
    np.testing.assert_array_equal(ds.document_indices, expected_boundaries)
    for got, expected in zip(ds[2:7], sequences[2:7]):
        np.testing.assert_array_equal(got, expected)
    longest = int(np.argmax(ds.sequence_lengths))
    np.testing.assert_array_equal(ds.get(longest, 2, 3), sequences[longest][2:5])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.mmap == mmap
    np.testing.assert_array_equal(clone[longest], sequences[longest])


def test_header_and_index_match_megatron_layout_byte_for_byte(tmp_path):
    prefix = str(tmp_path / "tiny")
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        builder.add_item([1, 2, 3])
        builder.add_item([4])
        builder.end_document()
        builder.add_document([5, 6], [2])
        builder.finalize(prefix + ".idx")
    idx = Path(prefix + ".idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", idx, 9) == (1,)  # version
    assert struct.unpack_from("<B", idx, 17) == (8,)  # uint16
    assert struct.unpack_from("<Q", idx, 18) == (3,)  # sequences
    assert struct.unpack_from("<Q", idx, 26) == (3,)  # documents + 1
    assert struct.unpack_from("<3i", idx, 34) == (3, 1, 2)  # lengths
    assert struct.unpack_from("<3q", idx, 46) == (0, 6, 8)  # byte offsets (2 bytes a token)
    assert struct.unpack_from("<3q", idx, 70) == (0, 2, 3)  # document indices
    assert len(idx) == 94
    assert Path(prefix + ".bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 4, 5, 6)


def _write_like_megatron(prefix, sequences, documents, dtype):
    """An independent writer following the documented layout, standing in for Megatron-LM."""
    lengths = [len(s) for s in sequences]
    itemsize = np.dtype(dtype).itemsize
    pointers = [sum(lengths[:i]) * itemsize for i in range(len(lengths))]
    with open(prefix + ".idx", "wb") as f:
        f.write(
            b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", MEGATRON_CODES[dtype])
        )
        f.write(struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(documents)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(documents)}q", *documents))
    with open(prefix + ".bin", "wb") as f:
        f.writelines(
            np.asarray(s, dtype=np.dtype(dtype).newbyteorder("<")).tobytes() for s in sequences
        )


def test_reads_files_written_by_megatron(tmp_path):
    prefix = str(tmp_path / "megatron")
    sequences = [[50256, 11, 70000], [7], [], [1, 2, 3, 4]]
    _write_like_megatron(prefix, sequences, [0, 2, 4], np.int32)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == 4 and ds.num_documents == 2
    assert [ds[i].tolist() for i in range(4)] == sequences
    assert ds.document_indices.tolist() == [0, 2, 4]


def test_optimal_dtype_follows_megatron():
    assert optimal_dtype(50257) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert {code: np.dtype(t) for t, code in MEGATRON_CODES.items()} == DTYPE_CODES


def _corrupt(path, offset, data):
    """Overwrite bytes at ``offset``, or append them when ``offset`` is None."""
    with open(path, "r+b") as f:
        f.seek(
            offset if offset is not None else 0, os.SEEK_SET if offset is not None else os.SEEK_END
        )
        f.write(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _corrupt(p + ".idx", 0, b"XXXXXXX"), "magic"),
        (lambda p: _corrupt(p + ".idx", 9, struct.pack("<Q", 2)), "version 2"),
        (lambda p: _corrupt(p + ".idx", 17, struct.pack("<B", 9)), "dtype code 9"),
        (lambda p: _corrupt(p + ".bin", None, b"\x00\x00"), "not written together"),
        (lambda p: _corrupt(p + ".idx", None, b"\x00\x00"), "multimodal"),
        (lambda p: os.remove(p + ".bin"), "no file"),
    ],
)
def test_damaged_files_fail_with_a_clear_error(tmp_path, damage, message):
    prefix = str(tmp_path / "d")
    _write_like_megatron(prefix, [[1, 2], [3]], [0, 1, 2], np.uint16)
    damage(prefix)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        IndexedDataset(prefix)


def test_out_of_range_reads_and_ids_are_errors(tmp_path):
    prefix = str(tmp_path / "d")
    _write_like_megatron(prefix, [[1, 2]], [0, 1], np.uint16)
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError, match=r"tokens \[1, 3\) are outside sequence 0 of length 2"):
        ds.get(0, 1, 2)
    out_of_range = pytest.raises(
        ValueError, match="token id 70000 does not fit the dataset dtype uint16"
    )
    with out_of_range, IndexedDatasetBuilder(str(tmp_path / "e.bin"), np.uint16) as builder:
        builder.add_item([1, 70000])
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_unfinished_build_leaves_no_file(tmp_path):
    interrupted = pytest.raises(RuntimeError, match="interrupted")
    with interrupted, IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.int32) as builder:
        builder.add_item([1, 2, 3])
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_add_index_concatenates_datasets(tmp_path):
    a, b, merged = (str(tmp_path / n) for n in "abm")
    _write_like_megatron(a, [[1], [2, 3]], [0, 2], np.uint16)
    _write_like_megatron(b, [[4, 5, 6]], [0, 1], np.uint16)
    with IndexedDatasetBuilder(merged + ".bin", np.uint16) as builder:
        builder.add_index(a)
        builder.add_index(b)
        builder.finalize(merged + ".idx")
    ds = IndexedDataset(merged)
    assert [ds[i].tolist() for i in range(3)] == [[1], [2, 3], [4, 5, 6]]
    assert ds.document_indices.tolist() == [0, 2, 3]
    mismatch = pytest.raises(ValueError, match="dtype uint16 differs")
    with mismatch, IndexedDatasetBuilder(str(tmp_path / "z.bin"), np.int32) as builder:
        builder.add_index(a)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("z")]
