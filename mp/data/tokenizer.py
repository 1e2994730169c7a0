"""Tokenizers: one small interface over GPT-2 BPE, Hugging Face, SentencePiece and raw bytes.

Every tokenizer has ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``, ``vocab_size``
and ``eod`` (the end-of-document id that preprocessing appends with ``--append-eod``), and
``tokenize_piece(text)``: the ids of a piece of a longer text, without the special tokens
(a BOS) that ``tokenize`` puts around a whole text (the SFT prompt formats use it). The
merging itself is done by the maintained libraries (``tokenizers``, ``sentencepiece``, both in the
``data`` extra), imported only when such a tokenizer is built. `build_tokenizer` takes Megatron's
``--tokenizer-type`` names and file arguments (behaviour as in Megatron-LM):

- ``GPT2BPETokenizer`` (``vocab_file``, ``merge_file``): GPT-2 byte-level BPE; eod is
  ``<|endoftext|>``; special-token text in the input is encoded as plain text.
- ``HuggingFaceTokenizer`` (``tokenizer_model``, optional ``eod_token``): a ``tokenizer.json``
  or a directory holding one; the special tokens of its post-processor (e.g. BOS) are added, as
  ``AutoTokenizer(text)`` does.
- ``SFTTokenizer`` (Megatron's for ``--sft``: ``tokenizer_model``, optional ``eod_token``):
  ``HuggingFaceTokenizer``; the prompt format it applies in Megatron is
  ``--sft-tokenizer-prompt-format`` here (`mp.data.prompt_formats`).
- ``GPTSentencePieceTokenizer`` (``tokenizer_model``): a SentencePiece ``.model``; eod is its
  eos (``</s>``) id.
- ``Llama2Tokenizer`` (``tokenizer_model``): the same with the model's bos id (``<s>``) before
  every text, as Llama 2 was trained (Megatron's text-completion default: no eos added).
- ``ByteLevelTokenizer`` (no files): ids 0..255 are the UTF-8 bytes, eod is 256, vocab_size 257.
- ``NullTokenizer`` (``vocab_size`` V, no files): the text is already token ids, written as
  integers separated by whitespace; eod is V and vocab_size V + 1.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence

import numpy as np


class Tokenizer(abc.ABC):
    """The interface the data pipeline and the model rely on."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """The number of ids (before the model pads it, see `vocab_size_with_padding`)."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """The end-of-document id."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text to ids."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Ids to text."""

    def tokenize_piece(self, text: str) -> list[int]:
        """``text`` as a piece of a longer text: its ids with no special token added around
        them (the same as `tokenize` for tokenizers that add none)."""
        return self.tokenize(text)


class ByteLevelTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus an end-of-document id 256; needs no files.

    ``detokenize(tokenize(s)) == s`` for every string of Unicode scalar values. ``detokenize``
    drops the eod id and decodes invalid UTF-8 (a model may generate it) with U+FFFD.
    """

    EOD_ID = 256

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return self.EOD_ID

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        values = np.asarray(ids, dtype=np.int64)
        values = values[values != self.EOD_ID]
        if values.size and (values.min() < 0 or values.max() > 255):
            bad = values[(values < 0) | (values > 255)][0]
            raise ValueError(f"id {bad} is not a byte (0..255) nor the eod id {self.EOD_ID}")
        return values.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class NullTokenizer(Tokenizer):
    """Megatron's ``NullTokenizer`` (``--tokenizer-type NullTokenizer --vocab-size V``), for data
    that is token ids already: ``tokenize("5 0 17")`` is ``[5, 0, 17]``, ``detokenize`` joins the
    ids with single spaces; ids lie in ``0..V``, where V is the eod id, so ``vocab_size`` is
    V + 1.

    Megatron splits the text on single spaces only; here any run of whitespace separates ids (a
    trailing newline is no error), and an id outside ``0..V`` is an error instead of an
    out-of-range embedding lookup later.
    """

    def __init__(self, vocab_size: int | None) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"NullTokenizer needs vocab_size (the number of ids before its eod "
                             f"id) as an integer >= 1, got {vocab_size!r}")
        self._eod = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._eod + 1

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError as error:
            raise ValueError(f"NullTokenizer reads integer ids separated by whitespace: "
                             f"{error}") from None
        bad = next((i for i in ids if not 0 <= i <= self._eod), None)
        if bad is not None:
            raise ValueError(f"NullTokenizer: id {bad} is outside 0..{self._eod} (vocab_size "
                             f"{self._eod} and the eod id {self._eod})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


class _HFTokenizerBase(Tokenizer):
    """Shared by the tokenizers backed by a ``tokenizers.Tokenizer``."""

    def __init__(self, backend, eod_token: str, source: str, add_special_tokens: bool) -> None:
        self._backend = backend
        self._add_special_tokens = add_special_tokens
        eod = backend.token_to_id(eod_token)
        if eod is None:
            raise ValueError(
                f"{source}: the end-of-document token {eod_token!r} is not in the vocabulary"
            )
        self._eod = eod

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=self._add_special_tokens).ids

    def tokenize_piece(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)


class GPT2BPETokenizer(_HFTokenizerBase):
    """GPT-2's byte-level BPE from ``vocab.json`` and ``merges.txt`` (Megatron's
    ``GPT2BPETokenizer``): the GPT-2 pre-tokenizing regex, no prefix space, eod
    ``<|endoftext|>``."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers

        _require_file(vocab_file, "vocab_file")
        _require_file(merge_file, "merge_file")
        backend = Backend(_read("vocab_file and merge_file", (vocab_file, merge_file),
                                lambda: models.BPE.from_file(vocab_file, merge_file)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        super().__init__(backend, "<|endoftext|>", vocab_file, add_special_tokens=False)


#: Tried in order when a Hugging Face tokenizer names no eos token.
EOD_TOKEN_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class HuggingFaceTokenizer(_HFTokenizerBase):
    """A Hugging Face ``tokenizer.json`` (a file, or a model directory holding one).

    The eod token is ``eod_token`` when given, else the ``eos_token`` of a
    ``tokenizer_config.json`` beside the file, else the first of `EOD_TOKEN_CANDIDATES` in the
    vocabulary.
    """

    def __init__(self, tokenizer_model: str, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as Backend

        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        _require_file(path, "tokenizer_model")
        backend = _read("tokenizer_model", path, lambda: Backend.from_file(path))
        if eod_token is None:
            eod_token = _configured_eos(os.path.dirname(path)) or next(
                (t for t in EOD_TOKEN_CANDIDATES if backend.token_to_id(t) is not None), None
            )
        if eod_token is None:
            raise ValueError(
                f"{path}: no end-of-document token found (no eos_token in tokenizer_config.json "
                f"and none of {', '.join(EOD_TOKEN_CANDIDATES)} in the vocabulary); pass eod_token"
            )
        super().__init__(backend, eod_token, path, add_special_tokens=True)


def _configured_eos(directory: str) -> str | None:
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


class GPTSentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Megatron's ``GPTSentencePieceTokenizer``): plain ``encode`` /
    ``decode``, eod is the model's eos id."""

    def __init__(self, tokenizer_model: str) -> None:
        import sentencepiece

        _require_file(tokenizer_model, "tokenizer_model")
        self._processor = _read("tokenizer_model", tokenizer_model, lambda: (
            sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)))
        self._eod = self._processor.eos_id()
        if self._eod < 0:
            raise ValueError(f"{tokenizer_model}: the SentencePiece model has no eos piece for eod")

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron's ``Llama2Tokenizer``: a SentencePiece model whose texts each start with its
    bos id; eod is its eos id."""

    def __init__(self, tokenizer_model: str) -> None:
        super().__init__(tokenizer_model)
        self._bos = self._processor.bos_id()
        if self._bos < 0:
            raise ValueError(f"{tokenizer_model}: the SentencePiece model has no bos piece, "
                             "which Llama2Tokenizer puts before every text")

    def tokenize(self, text: str) -> list[int]:
        return [self._bos, *super().tokenize(text)]

    def tokenize_piece(self, text: str) -> list[int]:
        return super().tokenize(text)


def _require_file(path: str | None, role: str) -> None:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{role}={path!r} is not a file")


def _read(role: str, path, load):
    """``load()``, with the tokenizer libraries' own errors (a file they cannot parse) as a
    ``ValueError`` that names ``role`` and its ``path``."""
    try:
        return load()
    except (OSError, ValueError):
        raise
    except Exception as error:  # tokenizers raises Exception, sentencepiece RuntimeError
        raise ValueError(f"{role}={path!r} could not be read: {error}") from error


TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "ByteLevelTokenizer",
    "NullTokenizer",
    "SFTTokenizer",
)


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    eod_token: str | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """The tokenizer named by Megatron's ``--tokenizer-type`` (see the module table).

    Raises ``ValueError`` for an unknown type, an argument the type does not take, a file
    argument it needs and lacks, or a file its library cannot read, and ``FileNotFoundError``
    naming the argument whose file is missing.
    """
    given = {
        "vocab_file": vocab_file,
        "merge_file": merge_file,
        "tokenizer_model": tokenizer_model,
        "eod_token": eod_token,
        "vocab_size": vocab_size,
    }
    takes = {
        "GPT2BPETokenizer": ("vocab_file", "merge_file"),
        "HuggingFaceTokenizer": ("tokenizer_model", "eod_token"),
        "SFTTokenizer": ("tokenizer_model", "eod_token"),
        "GPTSentencePieceTokenizer": ("tokenizer_model",),
        "Llama2Tokenizer": ("tokenizer_model",),
        "ByteLevelTokenizer": (),
        "NullTokenizer": ("vocab_size",),
    }
    if tokenizer_type not in takes:
        raise ValueError(
            f"tokenizer_type={tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}"
        )
    extra = [
        name
        for name, value in given.items()
        if value is not None and name not in takes[tokenizer_type]
    ]
    if extra:
        raise ValueError(
            f"tokenizer_type={tokenizer_type!r} does not take {', '.join(extra)} "
            f"(it takes: {', '.join(takes[tokenizer_type]) or 'no files'})"
        )
    missing = [name for name in takes[tokenizer_type]
               if name in ("vocab_file", "merge_file", "tokenizer_model") and given[name] is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(f"tokenizer_type={tokenizer_type!r} needs {' and '.join(missing)} "
                         f"(Megatron's {flags})")
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type in ("HuggingFaceTokenizer", "SFTTokenizer"):
        return HuggingFaceTokenizer(tokenizer_model, eod_token)
    if tokenizer_type == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    return ByteLevelTokenizer()


def vocab_size_with_padding(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """The embedding rows Megatron allocates: ``vocab_size`` rounded up to a multiple of
    ``make_vocab_size_divisible_by * tensor_model_parallel_size``."""
    if vocab_size < 1 or make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            f"vocab_size={vocab_size}, make_vocab_size_divisible_by={make_vocab_size_divisible_by} "
            f"and tensor_model_parallel_size={tensor_model_parallel_size} must all be >= 1"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
