"""Per-split data (Megatron's ``--train-data-path``, ``--valid-data-path``,
``--test-data-path``): each split comes whole from its own files, sample for sample what a
one-split builder over those files gives, blended by weight within a split, cached apart per
file; the job's iterators read them; and Megatron's rules (no ``--data-path``, no ``--split``)
are refused by name."""

import json
import os

import numpy as np
import pytest
import torch
from harness import run_distributed
from test_data_gpt_dataset import EOD, make_dataset

from mp import parallel_state as ps
from mp.config import ConfigError, JobConfig, load_config
from mp.data.blended_dataset import BlendedDataset
from mp.data.dataset_builder import build_gpt_datasets
from mp.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from mp.training.data import build_data_iterators, num_evaluations

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "gpt-tiny.yaml")
SEQ, SEED = 16, 3
# token ranges of the three files, so that a sample tells which file it came from
RANGES = {"a": (1, 100), "b": (100, 200), "c": (200, 300)}


@pytest.fixture
def files(tmp_path):
    """Three files of 40 documents each, their tokens in `RANGES`: {name: prefix}."""
    return {name: make_dataset(str(tmp_path / name), num_docs=40, seed=i, low=low,
                               high=high).path_prefix
            for i, (name, (low, high)) in enumerate(RANGES.items())}


def _sources(dataset) -> set[str]:
    """The files whose tokens the samples of ``dataset`` hold; each sample must hold one's."""
    found = set()
    for i in range(len(dataset)):
        tokens = dataset[i]["tokens"].numpy()
        content = tokens[tokens != EOD]
        names = {n for n, (low, high) in RANGES.items()
                 if ((content >= low) & (content < high)).all()}
        assert len(names) == 1, f"sample {i} mixes files: {tokens}"
        found |= names
    return found


def _same_samples(got, want) -> None:
    assert type(got) is type(want) and len(got) == len(want)
    for i in range(len(want)):
        for key, value in want[i].items():
            assert torch.equal(got[i][key], value), (i, key)


def test_each_split_is_its_own_files_whole(files, tmp_path):
    cache = str(tmp_path / "cache")
    sizes = (120, 30, 20)
    per_split = build_gpt_datasets(None, None, SEQ, SEED, *sizes, path_to_cache=cache,
                                   per_split_data_path=[[files["a"]], [files["b"]],
                                                        [files["c"]]])
    for i, (name, split) in enumerate(zip("abc", ("1,0,0", "0,1,0", "0,0,1"))):
        assert _sources(per_split[i]) == {name}
        assert set(np.asarray(per_split[i].document_index)) == set(range(40))  # every document
        one_split = build_gpt_datasets([files[name]], split, SEQ, SEED, *sizes,
                                       path_to_cache=str(tmp_path / f"alone-{name}"))
        _same_samples(per_split[i], one_split[i])
    train_only = build_gpt_datasets(None, None, SEQ, SEED, *sizes, path_to_cache=cache,
                                    per_split_data_path=[[files["a"]], None, None])
    assert train_only[1:] == (None, None)


def test_blending_weights_apply_within_a_split(files, tmp_path):
    train, valid, test = build_gpt_datasets(
        None, None, SEQ, SEED, 2000, 50, 0, path_to_cache=str(tmp_path / "cache"),
        per_split_data_path=[["0.3", files["a"], "0.7", files["b"]], [files["c"]], None])
    assert isinstance(train, BlendedDataset) and test is None
    assert np.mean(train.dataset_index == 0) == pytest.approx(0.3, abs=0.01)
    assert _sources(train) == {"a", "b"} and _sources(valid) == {"c"}
    alone = build_gpt_datasets(["0.3", files["a"], "0.7", files["b"]], "1,0,0", SEQ, SEED,
                               2000, 0, 0, path_to_cache=str(tmp_path / "alone"))[0]
    _same_samples(train, alone)


def _copy_shifted(source: str, prefix: str, shift: int) -> None:
    """A file with the documents of ``source`` (same lengths, same bytes on disk) but every
    token other than EOD moved up by ``shift``."""
    dataset = IndexedDataset(source)
    docs = [np.where(dataset[i] == EOD, EOD, dataset[i] + shift) for i in range(len(dataset))]
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        builder.add_documents(np.concatenate(docs), [len(d) for d in docs])
        builder.finalize(prefix + ".idx")


def test_files_of_equal_shape_never_share_cached_indices(files, tmp_path):
    """Two files alike in every size and document length, read in turn as the training split
    over one cache directory: each gets its own cache entry and its own tokens."""
    shifted = str(tmp_path / "shifted")
    _copy_shifted(files["a"], shifted, shift=1000)
    cache = tmp_path / "cache"
    first, second = (build_gpt_datasets(None, None, SEQ, SEED, 100, 0, 0,
                                        per_split_data_path=[[prefix], None, None],
                                        path_to_cache=str(cache))[0]
                     for prefix in (files["a"], shifted))
    described = sorted(json.loads((cache / name).read_text())["dataset_path"]
                       for name in os.listdir(cache) if name.endswith("-description.txt"))
    assert described == sorted(os.path.abspath(p) for p in (files["a"], shifted))
    assert second.built_anew
    for i in range(len(first)):
        a, b = first[i]["tokens"], second[i]["tokens"]
        assert torch.equal(torch.where(a == EOD, a, a + 1000), b), i


def test_megatron_rules_are_refused_by_name(files):
    paths = [[files["a"]], None, None]
    with pytest.raises(ValueError, match=r"data_path=\['x'\] with train_data_path=\[.*\]: each "
                                         "split comes whole from its own datasets"):
        build_gpt_datasets(["x"], None, SEQ, SEED, 10, 0, 0, per_split_data_path=paths)
    with pytest.raises(ValueError, match="split='1,0,0' with train_data_path="):
        build_gpt_datasets(None, "1,0,0", SEQ, SEED, 10, 0, 0, per_split_data_path=paths)
    with pytest.raises(FileNotFoundError, match="valid_data_path prefix 'nowhere'"):
        build_gpt_datasets(None, None, SEQ, SEED, 10, 0, 0,
                           per_split_data_path=[[files["a"]], ["nowhere"], None])
    with pytest.raises(ConfigError, match=r"data.data_path=\['a'\] with train_data_path="
                                          r"\['t'\]: each split"):
        load_config(TINY, ["--data-path", "a", "--train-data-path", "t"], world_size=4)
    with pytest.raises(ConfigError, match="data.split='1,0,0' with train_data_path="):
        load_config(TINY, ["--split", "1,0,0", "--train-data-path", "t"], world_size=4)
    with pytest.raises(ConfigError, match=r"data.valid_data_path=\['v'\] and data.test_data_"
                                          "path=None without data.train_data_path"):
        load_config(TINY, ["--valid-data-path", "v"], world_size=4)
    with pytest.raises(ConfigError, match=r"data.train_data_path=\['0.5', 'a', 'b'\] mixes"):
        load_config(TINY, ["--train-data-path", "0.5", "a", "b"], world_size=4)


JOB = ["--tensor-model-parallel-size", "1", "--tokenizer-type", "NullTokenizer",
       "--vocab-size", "300", "--seq-length", str(SEQ), "--micro-batch-size", "2",
       "--global-batch-size", "8", "--train-iters", "4", "--lr-warmup-iters", "0",
       "--eval-interval", "2", "--eval-iters", "1", "--num-workers", "0", "--seed", str(SEED)]


def _first_micro_batches(cfg):
    ps.initialize_model_parallel(1)
    return [next(split)["tokens"] for split in build_data_iterators(cfg)]


def test_the_job_reads_each_split_from_its_files(files, tmp_path):
    """At DP 2 each rank's first micro-batch is its two samples of the one-split datasets
    (train from a, validation from b, test from c)."""
    cache = str(tmp_path / "cache")
    cfg = load_config(TINY, [*JOB, "--train-data-path", files["a"], "--valid-data-path",
                             files["b"], "--test-data-path", files["c"], "--data-cache-path",
                             cache], world_size=2)
    assert (cfg.data.data_path, cfg.data.split) == (None, None)
    batches = run_distributed(2, _first_micro_batches, cfg)
    datasets = []
    for i, (name, n) in enumerate((("a", 4 * 8), ("b", num_evaluations(cfg, 2) * 8),
                                   ("c", 1 * 8))):
        sizes = [n if j == i else 0 for j in range(3)]
        split = ",".join("1" if j == i else "0" for j in range(3))
        datasets.append(build_gpt_datasets([files[name]], split, SEQ, SEED, *sizes,
                                           path_to_cache=cache)[i])
    for rank, got_splits in enumerate(batches):
        for got, dataset in zip(got_splits, datasets):
            want = torch.stack([dataset[i]["tokens"] for i in (2 * rank, 2 * rank + 1)])
            assert torch.equal(got, want), rank


def test_data_paths_from_files(tmp_path):
    """Megatron's ``--data-args-path`` (whitespace-separated ``--data-path`` words) and
    ``--per-split-data-args-path`` (JSON of the three splits, lists or strings); the resolved
    config holds the paths, and rebuilds from its own dict."""
    blend = tmp_path / "blend.txt"
    blend.write_text("0.3 a\n0.7\tb\n")
    cfg = load_config(TINY, ["--data-args-path", str(blend)], world_size=4)
    assert (cfg.data.data_path, cfg.data.data_args_path) == (["0.3", "a", "0.7", "b"], None)
    assert JobConfig.from_dict(cfg.to_dict()).data == cfg.data
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": "0.5 a 0.5 b", "valid": ["c"]}))
    data = load_config(TINY, ["--per-split-data-args-path", str(splits)], world_size=4).data
    assert (data.train_data_path, data.valid_data_path, data.test_data_path, data.data_path) \
        == (["0.5", "a", "0.5", "b"], ["c"], None, None)
    bad_json, unknown = tmp_path / "bad.json", tmp_path / "unknown.json"
    bad_json.write_text("{train: a}")
    unknown.write_text(json.dumps({"training": ["a"]}))
    for flags, message in [
            (["--data-args-path", str(blend), "--data-path", "c"],
             "data.data_args_path=.* and data.data_path both give the data"),
            (["--data-args-path", str(tmp_path / "none.txt")],
             "data.data_args_path=.*none.txt': No such file"),
            (["--per-split-data-args-path", str(bad_json)], "bad.json' is not JSON"),
            (["--per-split-data-args-path", str(unknown)],
             r"must hold an object with keys among \['train', 'valid', 'test'\]"),
            (["--per-split-data-args-path", str(splits), "--train-data-path", "t"],
             "and data.train/valid/test_data_path both give the data")]:
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, flags, world_size=4)
