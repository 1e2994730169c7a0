"""The embedded corpus: the standard library's source, one document per file, byte for byte,
built once and reused; ready for build_gpt_datasets."""

import os
import sysconfig

import numpy as np
import torch.distributed as dist
from harness import run_distributed

from mp.data.corpus import prepare_default_corpus, stdlib_source_files
from mp.data.dataset_builder import build_gpt_datasets
from mp.data.indexed_dataset import IndexedDataset
from mp.data.tokenizer import ByteLevelTokenizer

SMALL = 300_000  # bytes of source: keeps the test fast


def test_files_are_standard_library_source_in_sorted_order():
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_source_files(SMALL)
    relative = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    assert relative == sorted(relative) and all(r.endswith(".py") for r in relative)
    assert not any(
        part in ("test", "tests", "site-packages") for r in relative for part in r.split("/")
    )
    assert sum(os.path.getsize(f) for f in files) <= SMALL
    assert stdlib_source_files(2 * SMALL)[: len(files)] == files


def test_corpus_holds_each_file_then_eod_and_is_reused(tmp_path):
    prefix = prepare_default_corpus(str(tmp_path), max_bytes=SMALL)
    ds = IndexedDataset(prefix)
    files = stdlib_source_files(SMALL)
    assert len(ds) == ds.num_documents == len(files)
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            expected = list(f.read()) + [ByteLevelTokenizer.EOD_ID]
        assert ds[i].tolist() == expected
    mtime = os.path.getmtime(prefix + ".bin")
    assert prepare_default_corpus(str(tmp_path), max_bytes=SMALL) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime  # reused, not rebuilt
    assert stdlib_source_files(SMALL // 20) != files
    assert prepare_default_corpus(str(tmp_path), max_bytes=SMALL // 20) != prefix
    train, _, _ = build_gpt_datasets([prefix], "95,5,0", 128, 1, 100, 5, 0)
    assert len(train) >= 100 and train[0]["tokens"].shape == (128,)


class _ShiftedBytes(ByteLevelTokenizer):
    """Another tokenizer: its corpus must not be mistaken for the byte-level one."""

    def tokenize(self, text):
        return [(b + 1) % 256 for b in text.encode("utf-8")]


def test_another_tokenizer_gets_its_own_dataset(tmp_path):
    plain = prepare_default_corpus(str(tmp_path), max_bytes=SMALL // 4)
    shifted = prepare_default_corpus(str(tmp_path), _ShiftedBytes(), max_bytes=SMALL // 4)
    assert plain != shifted
    assert np.array_equal(
        (IndexedDataset(plain)[0][:-1] + 1) % 256, IndexedDataset(shifted)[0][:-1]
    )


def _prepare_on_every_rank(output_dir):
    prefix = prepare_default_corpus(output_dir, max_bytes=SMALL)
    return dist.get_rank(), prefix, os.path.getmtime(prefix + ".bin")


def test_ranks_share_one_build(tmp_path):
    out = run_distributed(2, _prepare_on_every_rank, str(tmp_path))
    assert out[0][1:] == out[1][1:]
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(out[0][1]) + e for e in (".bin", ".idx")
    )
