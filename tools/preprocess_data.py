"""Tokenize JSONL or plain-text files into Megatron ``.bin`` / ``.idx`` datasets.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my-gpt2 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \\
        --merge-file gpt2-merges.txt --append-eod --workers 2

writes ``data/my-gpt2_text_document.bin`` and ``.idx`` (one dataset per ``--json-keys`` key,
named as Megatron-LM's tool names them), shows a progress bar on stderr and ends with a line
giving documents, tokens and tokens/s. The flags are Megatron-LM's; ``--input`` also takes
several files or glob patterns (processed in sorted order), plain text is read one document a
line (``--text-unit file``: a file a document), and ``--skip-bad-input`` skips and counts bad
lines instead of stopping at the first. See ``mp/data/preprocess.py`` for the rules.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mp.data.preprocess import InputError, preprocess_files
from mp.data.tokenizer import TOKENIZER_TYPES, build_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="input files or glob patterns (.jsonl/.json: JSON lines; other: text)",
    )
    group.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto")
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys whose text is tokenized, one output dataset each",
    )
    group.add_argument(
        "--text-unit",
        choices=("line", "file"),
        default="line",
        help="plain text: one document per non-blank line, or per file",
    )
    group.add_argument(
        "--skip-bad-input",
        action="store_true",
        help="skip and count bad lines and empty files instead of stopping",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    group.add_argument(
        "--tokenizer-model",
        help="HuggingFaceTokenizer: tokenizer.json or its directory; "
        "GPTSentencePieceTokenizer, Llama2Tokenizer: the .model file",
    )
    group.add_argument(
        "--vocab-size",
        type=int,
        help="NullTokenizer: the input is token ids below this; the eod id is this value",
    )
    group.add_argument(
        "--append-eod", action="store_true", help="end every document with the tokenizer's eod id"
    )
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx"
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Each pattern's matches in sorted order (a plain path stands for itself)."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"--input {pattern!r} names no file")
        paths.extend(matches)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = expand_inputs(args.input)
        tokenizer = build_tokenizer(
            args.tokenizer_type,
            args.vocab_file,
            args.merge_file,
            args.tokenizer_model,
            vocab_size=args.vocab_size,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(os.path.getsize(p) for p in paths),
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            file=sys.stderr,
        )
    try:
        stats = preprocess_files(
            paths,
            args.output_prefix,
            tokenizer,
            json_keys=args.json_keys,
            input_format=args.input_format,
            text_unit=args.text_unit,
            append_eod=args.append_eod,
            workers=args.workers,
            skip_bad_input=args.skip_bad_input,
            progress=bar.update if bar is not None else None,
        )
    except InputError as error:
        print(
            f"\nerror: {error}\n(pass --skip-bad-input to skip and count such input)",
            file=sys.stderr,
        )
        return 1
    finally:
        if bar is not None:
            bar.close()
    for key, prefix in stats.outputs.items():
        print(f"wrote {prefix}.bin and {prefix}.idx ({key})")
    if stats.skipped:
        print(
            "skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped.items()))
        )
    if stats.empty:
        print(f"dropped {stats.empty} documents that tokenized to nothing")
    print(
        f"documents: {stats.documents}, tokens: {stats.tokens}, "
        f"time: {stats.seconds:.2f} s, tokens/s: {stats.tokens_per_second:,.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
