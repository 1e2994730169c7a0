"""The embedded default corpus: the running interpreter's standard library source.

Every machine that runs ``mp`` has it, so the default pretraining run needs no download. The
corpus is the ``.py`` files under ``sysconfig``'s ``stdlib`` directory, without
``site-packages``, test suites, caches and empty files, in sorted order of their
``/``-separated relative paths, up to ``max_bytes`` (CPython 3.11's library is about 12 MB, so
the default takes all of it). Each file is one document, ended by the tokenizer's eod id.

`prepare_default_corpus` tokenizes it once into ``output_dir`` (about half a second with the
byte-level tokenizer on 2 cores) and returns the dataset prefix. The file name carries a
fingerprint of the Python version, the file list and the tokenizer, so a changed tokenizer or
interpreter gets its own dataset and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

import torch.distributed as dist

from mp.data.cache import build_once
from mp.data.indexed_dataset import IndexedDataset
from mp.data.preprocess import PreprocessStats, output_prefix_for, preprocess_files
from mp.data.tokenizer import ByteLevelTokenizer, Tokenizer

DEFAULT_CORPUS_MAX_BYTES = 16 * 2**20
_SKIPPED_DIRECTORIES = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
}
_PROBE_TEXT = "def f(x):\n    return 'naïve ✓ 数据'  # probe\n"


def stdlib_source_files(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> list[str]:
    """The corpus files, in corpus order, stopping before the file that would pass
    ``max_bytes``."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _SKIPPED_DIRECTORIES]
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith(".py") and _has_text(path):
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    found.sort()
    chosen, total = [], 0
    for _, path in found:
        total += os.path.getsize(path)
        if total > max_bytes:
            break
        chosen.append(path)
    if not chosen:
        raise FileNotFoundError(
            f"no standard-library .py files under {root} fit max_bytes={max_bytes}"
        )
    return chosen


def _has_text(path: str) -> bool:
    """Whether the file holds more than white space (many ``__init__.py`` files do not)."""
    with open(path, "rb") as f:
        return bool(f.read().strip())


def _fingerprint(files: list[str], tokenizer: Tokenizer) -> str:
    """Names what the dataset depends on: interpreter, files and sizes, tokenizer behaviour."""
    root = sysconfig.get_paths()["stdlib"]
    digest = hashlib.sha256(sys.version.encode())
    for path in files:
        digest.update(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}\n".encode())
    digest.update(
        f"{type(tokenizer).__name__} {tokenizer.vocab_size} {tokenizer.eod} "
        f"{tokenizer.tokenize(_PROBE_TEXT)}".encode()
    )
    return digest.hexdigest()[:16]


def prepare_default_corpus(
    output_dir: str,
    tokenizer: Tokenizer | None = None,
    *,
    max_bytes: int = DEFAULT_CORPUS_MAX_BYTES,
    workers: int = 1,
    group: dist.ProcessGroup | None = None,
) -> str:
    """Tokenize the standard-library corpus into ``output_dir`` unless it is there already;
    return its dataset prefix (``.bin`` / ``.idx`` beside it), ready for a ``data_path``.

    ``tokenizer`` defaults to `ByteLevelTokenizer`. Under ``torch.distributed`` the call is
    collective over ``group``: its rank 0 builds while the others wait (see `build_once`).
    """
    tokenizer = tokenizer or ByteLevelTokenizer()
    files = stdlib_source_files(max_bytes)
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    base = os.path.join(output_dir, f"stdlib-py{version}-{_fingerprint(files, tokenizer)}")
    prefix = output_prefix_for(base, "text")

    def build() -> None:
        tokenize_corpus(files, base, tokenizer, workers)

    build_once(lambda: IndexedDataset.exists(prefix), build, f"the default corpus {prefix}", group)
    return prefix


def tokenize_corpus(
    files: list[str], output_base: str, tokenizer: Tokenizer, workers: int = 1
) -> PreprocessStats:
    """Tokenize ``files``, one document each ended by the eod id, into the dataset
    ``{output_base}_text_document``; returns the run's statistics."""
    return preprocess_files(
        files,
        output_base,
        tokenizer,
        input_format="text",
        text_unit="file",
        append_eod=True,
        workers=workers,
    )
