"""Tokenizers: GPT-2 BPE against the original GPT-2 algorithm on small vocab/merges files,
byte-level round trips on arbitrary Unicode, Hugging Face and SentencePiece files built here,
Megatron's NullTokenizer (integer ids, eod V, vocabulary V + 1) and its config rules."""

import itertools
import json

import numpy as np
import pytest
import regex

from mp.config import ConfigError, DataConfig, load_config
from mp.data.tokenizer import (
    ByteLevelTokenizer,
    NullTokenizer,
    build_tokenizer,
    vocab_size_with_padding,
)

# GPT-2's pre-tokenizing pattern and byte-to-unicode table, from the GPT-2 paper's encoder.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = _bytes_to_unicode()
MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
    ("Ã", "©"),
    ("Ġ", "Ġ"),
    ("e", "r"),
]


def _reference_gpt2_encode(text: str, vocab: dict, ranks: dict) -> list[int]:
    """The original GPT-2 encoder: regex pieces, bytes as characters, lowest-rank merge first."""
    ids = []
    for piece in GPT2_PATTERN.findall(text):
        word = [BYTE_CHARS[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best = min(itertools.pairwise(word), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[token] for token in word)
    return ids


@pytest.fixture
def gpt2_files(tmp_path):
    vocab = {c: i for i, c in enumerate(BYTE_CHARS[b] for b in range(256))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merge_file = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merge_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), "utf-8")
    return str(vocab_file), str(merge_file), vocab


def test_gpt2_bpe_hand_checked(gpt2_files):
    vocab_file, merge_file, vocab = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    assert tok.vocab_size == 256 + len(MERGES) + 1
    assert tok.eod == vocab["<|endoftext|>"] == 268
    # "the" has no "Ġ": t + he; " the" -> Ġthe; " world" -> Ġworld; "!" is byte 33.
    assert tok.tokenize("the world the!") == [
        vocab["t"],
        vocab["he"],
        vocab["Ġworld"],
        vocab["Ġthe"],
        vocab["!"],
    ]
    # special-token text in the input is plain text, as in Megatron's GPT2BPETokenizer
    assert vocab["<|endoftext|>"] not in tok.tokenize("a<|endoftext|>b")


@pytest.mark.parametrize(
    "text",
    [
        "the world in the other world",
        "  leading spaces,\ttabs\nand newlines\n\n  ",
        "café naïve — ümlaut 数据 🚀 it's we'll I'd",
        "numbers 12345 and 3.14; punctuation!!! ...",
        "",
    ],
)
def test_gpt2_bpe_matches_the_reference_algorithm(gpt2_files, text):
    vocab_file, merge_file, vocab = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    ranks = {pair: i for i, pair in enumerate(MERGES)}
    ids = tok.tokenize(text)
    assert ids == _reference_gpt2_encode(text, vocab, ranks)
    assert tok.detokenize(ids) == text


def _random_unicode(rng, n):
    """Scalar values from every plane (surrogates excluded: UTF-8 cannot encode them)."""
    points = rng.integers(0, 0x110000, size=n)
    points = points[(points < 0xD800) | (points > 0xDFFF)]
    return "".join(map(chr, points.tolist()))


def test_byte_level_round_trip_on_arbitrary_unicode():
    tok = ByteLevelTokenizer()
    rng = np.random.default_rng(0)
    samples = [_random_unicode(rng, n) for n in (0, 1, 7, 300)]
    samples += ["\x00\r\n\t", "e\u0301 👩‍👩‍👧 \U0010ffff \ufeff", "ascii only"]
    for text in samples:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.detokenize(ids + [tok.eod]) == text
    assert (tok.vocab_size, tok.eod) == (257, 256)


def test_byte_level_detokenize_invalid_input():
    tok = ByteLevelTokenizer()
    assert tok.detokenize([0xE6, 0x95]) == "\ufffd"  # a cut multi-byte character
    with pytest.raises(ValueError, match="id 300 is not a byte"):
        tok.detokenize([65, 300])


def _word_level_json(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path))


def test_hugging_face_tokenizer_json(tmp_path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3, "<end>": 4}
    _word_level_json(tmp_path / "tokenizer.json", vocab)
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))
    assert tok.tokenize("hello world bye") == [1, 2, 0]
    assert (tok.vocab_size, tok.eod) == (5, 3)  # "</s>" from the known eos names
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path)).eod == 4
    (tmp_path / "tokenizer_config.json").unlink()
    _word_level_json(tmp_path / "tokenizer.json", {"[UNK]": 0, "hi": 1})
    with pytest.raises(ValueError, match="no end-of-document token found"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


def test_sentencepiece_model(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            ["the quick brown fox jumps over the lazy dog"] * 20
            + ["pack my box with five dozen liquor jugs"] * 20
        )
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=40,
        model_type="bpe",
        minloglevel=2,
    )
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    assert (tok.vocab_size, tok.eod) == (40, 2)  # SentencePiece's default ids: unk 0, bos 1, eos 2
    ids = tok.tokenize("the lazy fox")
    assert ids and all(3 <= i < 40 for i in ids)
    assert tok.detokenize(ids) == "the lazy fox"
    # Llama 2's: the same pieces after the bos id, which decoding drops
    llama = build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    assert (llama.vocab_size, llama.eod, llama.tokenize("the lazy fox")) == (40, 2, [1, *ids])
    assert llama.detokenize(llama.tokenize("the lazy fox")) == "the lazy fox"
    assert llama.tokenize_piece("the lazy fox") == ids  # a piece of a text: no bos
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "no_bos"), vocab_size=40,
        model_type="bpe", minloglevel=2, bos_id=-1)
    with pytest.raises(ValueError, match="no_bos.model: the SentencePiece model has no bos"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path / "no_bos.model"))


def test_build_tokenizer_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_type='BertWordPiece' is not one of"):
        build_tokenizer("BertWordPiece")
    with pytest.raises(ValueError, match="does not take vocab_file"):
        build_tokenizer("ByteLevelTokenizer", vocab_file="v.json")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match=r"'GPT2BPETokenizer' needs merge_file \(Megatron's "
                       r"--merge-file\)"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"))
    with pytest.raises(FileNotFoundError, match="merge_file='nowhere.txt' is not a file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                        merge_file="nowhere.txt")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "vocab.json").write_text("[1, 2]")  # not a mapping of tokens to ids
    with pytest.raises(ValueError, match="vocab_file and merge_file=.* could not be read: "):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                        merge_file=str(tmp_path / "merges.txt"))
    with pytest.raises(FileNotFoundError, match="tokenizer_model='nowhere.model' is not a file"):
        build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model="nowhere.model")


def test_null_tokenizer_reads_ids_as_megatron_does():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert isinstance(tok, NullTokenizer)
    assert (tok.vocab_size, tok.eod) == (1001, 1000)  # Megatron's: the eod id V after V ids
    assert tok.tokenize("5 0 999 1000") == [5, 0, 999, 1000]
    assert tok.tokenize(" 7\t8\n") == [7, 8]  # any whitespace (Megatron: single spaces)
    assert tok.detokenize(np.array([5, 0, 999])) == "5 0 999"
    assert tok.tokenize(tok.detokenize([3, 1, 4])) == [3, 1, 4]
    with pytest.raises(ValueError, match="invalid literal for int.*'five'"):
        tok.tokenize("4 five")
    with pytest.raises(ValueError, match="id 1001 is outside 0..1000"):
        tok.tokenize("1 1001")
    with pytest.raises(ValueError, match="id -1 is outside"):
        tok.tokenize("-1")
    with pytest.raises(ValueError, match="NullTokenizer needs vocab_size .* got None"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="'GPT2BPETokenizer' does not take vocab_size"):
        build_tokenizer("GPT2BPETokenizer", vocab_size=1000)


def test_null_tokenizer_sizes_the_model_and_vocab_size_is_its_key_only():
    cfg = load_config(None, ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
                             "4", "--seq-length", "16", "--micro-batch-size", "1",
                             "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "2",
                             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                             "1000"], world_size=1)
    assert cfg.model.vocab_size == 1001  # as Megatron's --mock-data with NullTokenizer
    with pytest.raises(ConfigError) as error:
        DataConfig(tokenizer_type="HuggingFaceTokenizer", vocab_size=1000)
    assert str(error.value) == (
        "data.vocab_size=1000 is for tokenizer_type NullTokenizer only; "
        "data.tokenizer_type='HuggingFaceTokenizer' has its own vocabulary (set "
        "model.vocab_size to change the model's)")
    with pytest.raises(ConfigError, match="'NullTokenizer' needs data.vocab_size"):
        DataConfig(tokenizer_type="NullTokenizer", mock_data=True)
    with pytest.raises(ConfigError, match="data.data_path='builtin' corpus is text"):
        DataConfig(tokenizer_type="NullTokenizer", vocab_size=1000)


def test_vocab_size_with_padding_matches_megatron():
    assert vocab_size_with_padding(50257) == 50304
    assert vocab_size_with_padding(50257, 128, 8) == 51200
    assert vocab_size_with_padding(257, 128, 2) == 512
    with pytest.raises(ValueError, match="tensor_model_parallel_size=0"):
        vocab_size_with_padding(257, 128, 0)
