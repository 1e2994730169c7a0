"""Preprocessing JSONL / text into .bin/.idx: exact token content, worker-count independence,
bad input reported with file and line (or skipped and counted), no partial output, and the CLI."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mp.data.indexed_dataset import IndexedDataset
from mp.data.preprocess import InputError, preprocess_files
from mp.data.tokenizer import ByteLevelTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOD = ByteLevelTokenizer.EOD_ID


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _documents(prefix):
    ds = IndexedDataset(prefix)
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one sequence a document
    return [ds[i].tolist() for i in range(len(ds))]


def _utf8(text, eod=True):
    return list(text.encode("utf-8")) + ([EOD] if eod else [])


def test_jsonl_documents_become_sequences_in_order(tmp_path):
    texts = ["first doc", "zweites Dokument – ü", "", "third\nwith newline"]
    path = _jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    stats = preprocess_files([path], str(tmp_path / "out"), ByteLevelTokenizer(), append_eod=True)
    prefix = str(tmp_path / "out_text_document")
    assert stats.outputs == {"text": prefix}
    assert _documents(prefix) == [_utf8(t) for t in texts if t]
    assert IndexedDataset(prefix).dtype == np.uint16  # vocab 257 < 65500
    assert (stats.documents, stats.empty) == (4, 1)
    assert stats.tokens == sum(len(_utf8(t)) for t in texts if t)


def test_output_does_not_depend_on_the_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr("mp.data.preprocess._CHUNK_RECORDS", 7)  # many chunks in flight
    rng = np.random.default_rng(0)
    rows = [
        {"text": "x" * int(n), "title": f"t{i}"} for i, n in enumerate(rng.integers(1, 50, 100))
    ]
    path = _jsonl(tmp_path / "in.jsonl", rows)
    for workers in (1, 2):
        preprocess_files(
            [path],
            str(tmp_path / f"w{workers}"),
            ByteLevelTokenizer(),
            json_keys=["text", "title"],
            workers=workers,
        )
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            one = (tmp_path / f"w1_{key}_document{ext}").read_bytes()
            assert one == (tmp_path / f"w2_{key}_document{ext}").read_bytes()
    assert _documents(str(tmp_path / "w1_title_document")) == [
        _utf8(f"t{i}", False) for i in range(100)
    ]


def test_plain_text_by_line_and_by_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("line one\n\nline two\r\n", encoding="utf-8")
    b.write_text("only line", encoding="utf-8")
    tok = ByteLevelTokenizer()
    done = []
    preprocess_files([str(a), str(b)], str(tmp_path / "lines"), tok, progress=done.append)
    assert sum(done) == a.stat().st_size + b.stat().st_size  # the progress bar reaches 100%
    assert _documents(str(tmp_path / "lines_text_document")) == [
        _utf8("line one", False),
        _utf8("line two", False),
        _utf8("only line", False),
    ]
    preprocess_files(
        [str(a), str(b)], str(tmp_path / "files"), tok, text_unit="file", append_eod=True
    )
    assert _documents(str(tmp_path / "files_text_document")) == [
        _utf8("line one\n\nline two\r\n"),
        _utf8("only line"),
    ]


BAD_INPUTS = [
    ('{"text": "ok"}\n{"text": "broken\n', "in.jsonl:2: not valid JSON", "not JSON"),
    (
        '{"text": "ok"}\n\n{"body": "x", "id": 3}\n',
        "in.jsonl:3: no key 'text' (keys: 'body', 'id')",
        "missing key",
    ),
    ('{"text": 5}\n', "in.jsonl:1: value of 'text' is int, expected a string", "not a string"),
    ("[1, 2]\n", "in.jsonl:1: expected a JSON object, got list", "not an object"),
    (b'{"text": "\xff"}\n', "in.jsonl:1: not UTF-8", "not UTF-8"),
    ("", "in.jsonl: empty file", "empty file"),
]


@pytest.mark.parametrize("content, message, reason", BAD_INPUTS)
def test_bad_input_names_file_and_line_and_leaves_no_output(tmp_path, content, message, reason):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=re.escape(message)):
        preprocess_files([str(path)], str(tmp_path / "out"), ByteLevelTokenizer(), workers=2)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_bad_input_skipped_and_counted_when_asked(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"text": "a"}, {"text": "b"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "c"}\nnot json\n{"other": 1}\n{"text": "\xff"}\n{"text": "d"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    stats = preprocess_files(
        [good, str(bad), str(empty)],
        str(tmp_path / "out"),
        ByteLevelTokenizer(),
        skip_bad_input=True,
    )
    assert _documents(str(tmp_path / "out_text_document")) == [[97], [98], [99], [100]]
    assert stats.skipped == {"not JSON": 1, "missing key": 1, "not UTF-8": 1, "empty file": 1}
    assert stats.documents == 4


def test_failed_run_keeps_an_older_dataset_intact(tmp_path):
    good = _jsonl(tmp_path / "in.jsonl", [{"text": "old"}])
    preprocess_files([good], str(tmp_path / "out"), ByteLevelTokenizer())
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.startswith("out")}
    _jsonl(tmp_path / "in.jsonl", [{"text": "new"}] * 5000 + [{"missing": 1}])
    with pytest.raises(InputError, match="in.jsonl:5001"):
        preprocess_files([good], str(tmp_path / "out"), ByteLevelTokenizer(), workers=2)
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.startswith("out")}
    assert after == before


def test_command_line_tool(tmp_path):
    path = _jsonl(tmp_path / "in.jsonl", [{"content": "héllo"}, {"content": "world"}])
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            path,
            "--json-keys",
            "content",
            "--output-prefix",
            str(tmp_path / "cli"),
            "--tokenizer-type",
            "ByteLevelTokenizer",
            "--append-eod",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"documents: 2, tokens: 13, time: [\d.]+ s, tokens/s: [\d,]+", last), last
    assert _documents(str(tmp_path / "cli_content_document")) == [_utf8("héllo"), _utf8("world")]


def test_command_line_bad_input_exits_nonzero_with_the_location(tmp_path, capsys):
    from tools.preprocess_data import main

    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n{oops}\n')
    code = main(
        [
            "--input",
            str(path),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-type",
            "ByteLevelTokenizer",
            "--no-progress",
        ]
    )
    assert code == 1
    assert "in.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert (
        main(
            [
                "--input",
                str(tmp_path / "missing*.jsonl"),
                "--output-prefix",
                "o",
                "--tokenizer-type",
                "ByteLevelTokenizer",
            ]
        )
        == 2
    )


def test_null_tokenizer_preprocesses_token_ids(tmp_path, capsys):
    from tools.preprocess_data import main

    path = tmp_path / "ids.txt"
    path.write_text("1 2 3\n499\n")
    args = ["--input", str(path), "--output-prefix", str(tmp_path / "ids"), "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "500", "--append-eod", "--no-progress"]
    assert main(args) == 0
    prefix = str(tmp_path / "ids_text_document")
    assert _documents(prefix) == [[1, 2, 3, 500], [499, 500]]  # eod is the vocab size
    assert IndexedDataset(prefix).dtype == np.uint16
    path.write_text("1 2 3\n4 x\n")
    assert main(args) == 1
    assert "ids.txt:2: NullTokenizer reads integer ids separated by whitespace" in \
        capsys.readouterr().err
