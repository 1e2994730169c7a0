"""GPT samples: windows checked against slices of the concatenated split, Megatron's
sample-index loop, epochs and seeds, splits, the on-disk cache built once by one rank."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from mp.data.dataset_builder import (
    build_gpt_datasets,
    parse_data_path,
    parse_split,
    split_document_ranges,
)
from mp.data.gpt_dataset import GPTDataset, build_indices, build_sample_index
from mp.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

EOD = 0


def make_dataset(prefix, num_docs=60, max_len=40, seed=0, low=1, high=1000):
    """Random documents ending in EOD; returns the IndexedDataset."""
    rng = np.random.default_rng(seed)
    docs = [
        np.append(rng.integers(low, high, rng.integers(1, max_len)), EOD) for _ in range(num_docs)
    ]
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        builder.add_documents(np.concatenate(docs), [len(d) for d in docs])
        builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(str(tmp_path / "docs"))


def _concatenation(ds, document_index):
    return np.concatenate([ds[int(d)] for d in document_index]).astype(np.int64)


def test_windows_are_slices_of_the_concatenated_split(dataset, tmp_path):
    s = 16
    docs = np.arange(10, 50)
    gpt = GPTDataset(
        dataset, docs, num_samples=150, seq_length=s, seed=7, path_to_cache=str(tmp_path)
    )
    concat = _concatenation(dataset, gpt.document_index)
    num_windows = (concat.size - 1) // s
    assert len(gpt) == num_windows >= 150
    # the unshuffled windows: sample j is concat[j*s : j*s + s + 1]
    order = np.argsort(np.asarray(gpt.shuffle_index))
    windows = np.stack([gpt.sample_tokens(int(i)) for i in order])
    expected = np.stack([concat[j * s : j * s + s + 1] for j in range(num_windows)])
    np.testing.assert_array_equal(windows, expected)
    np.testing.assert_array_equal(windows[:-1, -1], windows[1:, 0])  # overlap by one token
    # every token of the used part of the concatenation is in its one (or, at a seam, two) windows
    covered = np.zeros(concat.size, dtype=int)
    for j in range(num_windows):
        covered[j * s : j * s + s + 1] += 1
    seams = np.arange(1, num_windows) * s
    assert (covered[seams] == 2).all()
    assert (np.delete(covered[: num_windows * s + 1], seams) == 1).all()


def test_epochs_repeat_every_document_and_a_short_final_epoch_is_shuffled_apart(dataset):
    lengths = dataset.sequence_lengths
    docs = np.arange(dataset.num_documents)
    tokens = int(lengths.sum())
    per_epoch = (tokens - 1) // 8
    # 2 epochs, final one used for a few samples only -> separate final epoch
    document_index, _, shuffle = build_indices(lengths, docs, per_epoch + 3, 8, seed=1)
    assert np.array_equal(np.sort(document_index), np.repeat(docs, 2))
    assert np.array_equal(np.sort(document_index[: docs.size]), docs)  # epoch 1 is whole
    samples_before_final = (tokens - 1) // 8
    assert np.array_equal(np.sort(shuffle[:samples_before_final]), np.arange(samples_before_final))
    # 3 epochs, final one mostly used -> one shuffle over all of it
    document_index, sample_index, shuffle = build_indices(
        lengths, docs, 3 * per_epoch - 1, 8, seed=1
    )
    assert np.array_equal(np.sort(document_index), np.repeat(docs, 3))
    assert not np.array_equal(np.sort(document_index[: docs.size]), docs)
    assert np.array_equal(np.sort(shuffle), np.arange(sample_index.shape[0] - 1))


def _megatron_sample_index_loop(sizes, document_index, seq_length):
    """Megatron's build_sample_idx (helpers.cpp) as a plain loop, with one extra token."""
    tokens = int(sum(sizes[d] for d in document_index))
    num_samples = (tokens - 1) // seq_length
    rows, doc, offset = [(0, 0)], 0, 0
    while len(rows) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            length = sizes[document_index[doc]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                doc += 1
                offset = 0
        rows.append((doc, offset))
    return np.array(rows)


@pytest.mark.parametrize("seq_length", [1, 5, 64, 300])
def test_sample_index_equals_megatrons_loop(dataset, seq_length):
    rng = np.random.RandomState(3)
    document_index = np.tile(np.arange(dataset.num_documents, dtype=np.int32), 2)
    rng.shuffle(document_index)
    ours = build_sample_index(dataset.sequence_lengths, document_index, seq_length)
    reference = _megatron_sample_index_loop(
        dataset.sequence_lengths.tolist(), document_index, seq_length
    )
    np.testing.assert_array_equal(ours, reference)


def test_seed_decides_the_order(dataset, tmp_path):
    def first_samples(seed):
        gpt = GPTDataset(dataset, np.arange(60), 100, 16, seed, path_to_cache=str(tmp_path))
        return np.stack([gpt.sample_tokens(i) for i in range(20)])

    np.testing.assert_array_equal(first_samples(5), first_samples(5))
    assert not np.array_equal(first_samples(5), first_samples(6))


def test_item_holds_megatron_inputs_labels_and_masks(dataset, tmp_path):
    gpt = GPTDataset(
        dataset, np.arange(60), 50, 32, 0, eod=EOD, eod_mask_loss=True, path_to_cache=str(tmp_path)
    )
    for i in range(10):
        item, text = gpt[i], torch.from_numpy(gpt.sample_tokens(i))
        assert torch.equal(item["tokens"], text[:-1]) and torch.equal(item["labels"], text[1:])
        assert torch.equal(item["loss_mask"], (text[:-1] != EOD).float())
        assert torch.equal(item["position_ids"], torch.arange(32))
    with pytest.raises(IndexError, match="outside"):
        gpt[len(gpt)]


def test_cache_is_reused_and_keyed_by_its_inputs(dataset, tmp_path):
    args, cache = (dataset, np.arange(60), 100, 16), str(tmp_path / "cache")
    first = GPTDataset(*args, 1, path_to_cache=cache)
    again = GPTDataset(*args, 1, path_to_cache=cache)
    other = GPTDataset(*args, 2, path_to_cache=cache)
    assert (first.built_anew, again.built_anew, other.built_anew) == (True, False, True)
    np.testing.assert_array_equal(first.shuffle_index, again.shuffle_index)
    assert len(os.listdir(cache)) == 8  # 3 indices + description, for each seed


def test_split_string_follows_megatron():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges("1,1,0", 5) == [(0, 2), (2, 5), None]  # round half to even
    for bad in ("", "a,b", "1,2,3,4", "0,0,0", "-1,2", "'99,1,0", "'a,b'", "''"):
        with pytest.raises(ValueError, match="split="):
            parse_split(bad)


def test_split_takes_megatron_scripts_quoted_value():
    # bash passes --split '99,1,0' from an unquoted array with the quotes in the value
    for quoted in ("'99,1,0'", '"99,1,0"', " '99/1/0' "):
        assert parse_split(quoted) == pytest.approx([0.99, 0.01, 0.0])


def test_data_path_forms():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    for bad in (["0.3", "a", "b"], ["0.3", "a", "b", "0.7"], []):
        with pytest.raises(ValueError, match="data_path"):
            parse_data_path(bad)


def test_build_gpt_datasets_splits_documents(dataset, tmp_path):
    train, valid, test = build_gpt_datasets(
        [dataset.path_prefix], "80,20,0", 16, 3, 200, 10, 0, path_to_cache=str(tmp_path / "c")
    )
    assert test is None and len(train) >= 200 and len(valid) >= 10
    train_docs, valid_docs = (
        set(np.asarray(train.document_index)),
        set(np.asarray(valid.document_index)),
    )
    assert train_docs == set(range(48)) and valid_docs == set(range(48, 60))
    with pytest.raises(ValueError, match="test split of .* has no documents"):
        build_gpt_datasets(
            [dataset.path_prefix],
            "99,1,0.0001",
            16,
            3,
            10,
            10,
            10,
            path_to_cache=str(tmp_path / "c"),
        )
    with pytest.raises(FileNotFoundError, match="data_path prefix 'nowhere'"):
        build_gpt_datasets(["nowhere"], "1", 16, 3, 10, 0, 0)
    with pytest.raises(ValueError, match="valid_samples=-1"):
        build_gpt_datasets([dataset.path_prefix], "1", 16, 3, 10, -1, 0)


def test_unmapped_bin_files_give_the_same_samples(dataset, tmp_path):
    built = [
        build_gpt_datasets(
            [dataset.path_prefix], "80,20,0", 16, 3, 50, 10, 0,
            path_to_cache=str(tmp_path / "c"), mmap_bin_files=mmap,
        )
        for mmap in (True, False)
    ]
    for mapped, read in zip(*built):
        if mapped is None:
            assert read is None
            continue
        assert (mapped.dataset.mmap, read.dataset.mmap) == (True, False)
        assert len(mapped) == len(read)
        for i in range(len(mapped)):
            for key, value in mapped[i].items():
                assert torch.equal(value, read[i][key]), (i, key)


def _build_on_every_rank(prefix, cache):
    """Every rank builds the same GPTDataset over one shared cache directory."""
    gpt = GPTDataset(IndexedDataset(prefix), np.arange(60), 300, 16, 11, path_to_cache=cache)
    return dist.get_rank(), gpt.built_anew, gpt.sample_tokens(0).tolist(), len(gpt)


def _fail_to_build(prefix, cache):
    try:
        GPTDataset(IndexedDataset(prefix), np.arange(60), 300, 16, 11, path_to_cache=cache)
    except (OSError, RuntimeError) as error:
        return str(error)
    return "no error"


def test_indices_are_built_once_by_rank_zero_while_others_wait(dataset, tmp_path):
    cache = str(tmp_path / "cache")
    out = run_distributed(2, _build_on_every_rank, dataset.path_prefix, cache)
    assert [(rank, built) for rank, built, _, _ in out] == [(0, True), (1, False)]
    assert out[0][2:] == out[1][2:]
    local = GPTDataset(dataset, np.arange(60), 300, 16, 11, path_to_cache=cache)
    assert not local.built_anew and local.sample_tokens(0).tolist() == out[0][2]
    # a failed build on rank 0 is raised on every rank instead of leaving them waiting
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    errors = run_distributed(2, _fail_to_build, dataset.path_prefix, str(blocker / "cache"))
    assert "cannot write the GPTDataset index cache" in errors[0]
    assert errors[1].startswith("rank 0 failed to build the GPTDataset indices")
