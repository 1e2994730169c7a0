"""Text files to Megatron ``.bin`` / ``.idx`` datasets, tokenized by parallel workers.

Inputs are JSONL (one JSON object a line; the text under each of ``json_keys``) or plain text
(``text_unit="line"``: each non-blank line is a document; ``"file"``: each file is one). Each
document becomes one sequence; with ``append_eod`` the tokenizer's eod id ends it. One dataset
is written per key, named like Megatron's ``tools/preprocess_data.py`` does:
``{output_prefix}_{key}_document`` (plain text uses the key ``text``).

The main process reads raw lines in chunks; workers (forked, so the tokenizer is shared
without pickling) decode, parse and tokenize them; results come back in input order, so the
output does not depend on the number of workers. Blank lines are passed over. Bad input — a
line that is not UTF-8 or not a JSON object, a missing key, a value that is not a string, text
the tokenizer refuses (``NullTokenizer``'s, when it is not integer ids), an empty file —
raises `InputError` naming the file and line, or, with ``skip_bad_input``, is skipped and
counted by reason. Documents that tokenize to nothing are dropped and counted.
Outputs are written under temporary names and renamed at the end, so a failed run leaves no
file under the final names.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mp.data.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path, optimal_dtype
from mp.data.tokenizer import Tokenizer

_CHUNK_BYTES = 1 << 20  # what one worker task carries at most (one long record may exceed it)
_CHUNK_RECORDS = 2048


class InputError(ValueError):
    """Bad input; the message starts with ``file:line:``."""


@dataclass
class PreprocessStats:
    """What a run did. ``skipped`` counts skipped input by reason; ``empty`` counts documents
    that tokenized to nothing; ``outputs`` maps each key to its dataset prefix."""

    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    empty: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    outputs: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's output naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


@dataclass
class _Record:
    """A raw line (or whole file) of input, blank ones included so that every input byte is
    accounted for; or the mark of a file that holds no document."""

    path: str
    line: int  # 1-based; 1 for a whole-file record
    raw: bytes
    empty_file: bool = False


@dataclass
class _Encoded:
    """One chunk's result: per key, tokens back to back and one length per kept document."""

    tokens: dict
    lengths: dict
    documents: int
    nbytes: int
    bad: list  # (reason, message) in input order
    empty: int


class _Encoder:
    """Turns records into token arrays; inherited by each forked worker."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        keys: Sequence[str],
        is_json: bool,
        by_line: bool,
        append_eod: bool,
    ):
        self.tokenizer = tokenizer
        self.keys = list(keys)
        self.is_json = is_json
        self.by_line = by_line
        self.append_eod = append_eod
        self.dtype = optimal_dtype(tokenizer.vocab_size)

    def texts(self, record: _Record) -> dict:
        """The text per key, or raise ``_BadRecord(reason, message)``."""
        if record.empty_file:
            raise _BadRecord("empty file", f"{record.path}: empty file (no document in it)")
        where = f"{record.path}:{record.line}"
        try:
            decoded = record.raw.decode("utf-8")
        except UnicodeDecodeError as error:
            message = f"{where}: not UTF-8 (byte {error.start}: {error.reason})"
            raise _BadRecord("not UTF-8", message) from None
        if not self.is_json:
            return {self.keys[0]: decoded.rstrip("\r\n") if self.by_line else decoded}
        try:
            obj = json.loads(decoded)
        except json.JSONDecodeError as error:
            message = f"{where}: not valid JSON ({error.msg} at column {error.colno})"
            raise _BadRecord("not JSON", message) from None
        if not isinstance(obj, dict):
            raise _BadRecord(
                "not an object", f"{where}: expected a JSON object, got {type(obj).__name__}"
            )
        texts = {}
        for key in self.keys:
            if key not in obj:
                raise _BadRecord(
                    "missing key",
                    f"{where}: no key {key!r} (keys: {', '.join(map(repr, obj)) or 'none'}); "
                    "choose keys with --json-keys",
                )
            if not isinstance(obj[key], str):
                raise _BadRecord(
                    "not a string",
                    f"{where}: value of {key!r} is {type(obj[key]).__name__}, expected a string",
                )
            texts[key] = obj[key]
        return texts

    def tokenize(self, text: str, record: _Record) -> list[int]:
        """The ids of ``text``, or raise ``_BadRecord`` for text the tokenizer refuses
        (``NullTokenizer``'s: anything but integer ids in range)."""
        try:
            return self.tokenizer.tokenize(text)
        except ValueError as error:
            raise _BadRecord("not tokenizable", f"{record.path}:{record.line}: {error}") from None

    def encode(self, records: list) -> _Encoded:
        tokens = {key: [] for key in self.keys}
        lengths = {key: [] for key in self.keys}
        bad, empty, documents = [], 0, 0
        for record in records:
            if not (record.raw.strip() or record.empty_file):
                continue  # a blank line
            try:
                encoded = {key: self.tokenize(text, record)
                           for key, text in self.texts(record).items()}
            except _BadRecord as error:
                bad.append(error.args)
                continue
            documents += 1
            for key, ids in encoded.items():
                if not ids:
                    empty += 1
                    continue
                if self.append_eod:
                    ids.append(self.tokenizer.eod)
                tokens[key].append(np.asarray(ids, dtype=self.dtype))
                lengths[key].append(len(ids))
        joined = {
            key: np.concatenate(parts) if parts else np.empty(0, self.dtype)
            for key, parts in tokens.items()
        }
        return _Encoded(joined, lengths, documents, sum(len(r.raw) for r in records), bad, empty)


class _BadRecord(Exception):
    """args: (reason, message)."""


_worker_encoder: _Encoder | None = None  # set in each worker only


def _set_worker_encoder(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(records: list) -> _Encoded:
    return _worker_encoder.encode(records)


def _read_records(paths: Sequence[str], by_line: bool) -> Iterator[_Record]:
    """Raw lines (or whole files) in input order, each file followed by an empty-file mark
    when nothing in it but white space."""
    for path in paths:
        found = False
        with open(path, "rb") as f:
            for number, raw in enumerate(f if by_line else [f.read()], start=1):
                found = found or bool(raw.strip())
                yield _Record(path, number, raw)
        if not found:
            yield _Record(path, 0, b"", empty_file=True)


def _chunks(records: Iterable[_Record]) -> Iterator[list]:
    chunk, size = [], 0
    for record in records:
        chunk.append(record)
        size += len(record.raw)
        if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_RECORDS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _input_is_json(paths: Sequence[str], input_format: str) -> bool:
    if input_format not in ("auto", "jsonl", "text"):
        raise ValueError(f"input_format={input_format!r} is not one of auto, jsonl, text")
    if input_format != "auto":
        return input_format == "jsonl"
    kinds = {os.path.splitext(p)[1].lower() in (".jsonl", ".json") for p in paths}
    if len(kinds) > 1:
        raise ValueError("inputs mix .jsonl/.json and other files; give input_format explicitly")
    return kinds.pop()


def preprocess_files(
    paths: Sequence[str],
    output_prefix: str,
    tokenizer: Tokenizer,
    *,
    json_keys: Sequence[str] = ("text",),
    input_format: str = "auto",
    text_unit: str = "line",
    append_eod: bool = False,
    workers: int = 1,
    skip_bad_input: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PreprocessStats:
    """Tokenize ``paths`` (in the order given) into one dataset per key; see the module doc.

    ``progress(nbytes)`` is called as input bytes are done. Returns the run's `PreprocessStats`.
    """
    if not paths:
        raise ValueError("no input files")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if text_unit not in ("line", "file"):
        raise ValueError(f"text_unit={text_unit!r} is not one of line, file")
    is_json = _input_is_json(paths, input_format)
    keys = list(json_keys) if is_json else ["text"]
    if not keys or len(set(keys)) != len(keys):
        raise ValueError(f"json_keys={keys} must be non-empty and distinct")
    by_line = is_json or text_unit == "line"
    encoder = _Encoder(tokenizer, keys, is_json, by_line, append_eod)
    stats = PreprocessStats(outputs={key: output_prefix_for(output_prefix, key) for key in keys})
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    start = time.perf_counter()
    chunks = _chunks(_read_records(paths, by_line))
    builders = {}
    pool = None
    try:
        for key, prefix in stats.outputs.items():
            builders[key] = IndexedDatasetBuilder(get_bin_path(prefix), encoder.dtype)
        if workers == 1:
            results = map(encoder.encode, chunks)
        else:  # forked: the workers inherit the encoder (and tokenizer) without pickling
            context = multiprocessing.get_context("fork")
            pool = context.Pool(workers, initializer=_set_worker_encoder, initargs=(encoder,))
            results = pool.imap(_encode_in_worker, chunks)
        for result in results:
            _account(result.bad, skip_bad_input, stats)
            for key, builder in builders.items():
                builder.add_documents(result.tokens[key], result.lengths[key])
                stats.tokens += int(result.tokens[key].size)
            stats.documents += result.documents
            stats.empty += result.empty
            stats.bytes_read += result.nbytes
            if progress is not None:
                progress(result.nbytes)
        for key, builder in builders.items():
            builder.finalize(get_idx_path(stats.outputs[key]))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for builder in builders.values():
            builder.abort()
    stats.seconds = time.perf_counter() - start
    return stats


def _account(bad: list, skip: bool, stats: PreprocessStats) -> None:
    """Raise the first bad input, or count them when skipping."""
    for reason, message in bad:
        if not skip:
            raise InputError(message)
        stats.skipped[reason] += 1
