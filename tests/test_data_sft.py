"""Supervised fine-tuning data (``--sft``): the prompt formats against their templates written
out as strings, the samples against a packing written with loops, the conversation files'
rules, the split of their lines and the cache of their line index, the embedded conversations
against the source they come from, and the config's refusals."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from harness import run_distributed

from mp.config import ConfigError, load_config
from mp.data import conversations
from mp.data.conversation_corpus import function_conversations, prepare_default_conversations
from mp.data.conversations import ConversationFile, cache_file, split_conversations
from mp.data.dataset_builder import build_sft_datasets
from mp.data.document_masks import segment_mask
from mp.data.prompt_formats import get_prompt_format
from mp.data.sft_dataset import SFTDataset
from mp.data.tokenizer import ByteLevelTokenizer, HuggingFaceTokenizer, build_tokenizer

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "gpt-tiny.yaml")
BYTES = ByteLevelTokenizer()
EOD = BYTES.eod
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 2+2? "},
        {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"}]


def _expected(text: str, trained: list[str]) -> tuple[list[int], list[bool]]:
    """Byte ids of ``text`` and the eod, and which are trained: the bytes of each string of
    ``trained``, found in order in ``text``, and the eod."""
    mask = [False] * len(text)
    start = 0
    for part in trained:
        start = text.index(part, start)
        mask[start:start + len(part)] = [True] * len(part)
        start += len(part)
    return [*text.encode(), EOD], [*mask, True]


@pytest.mark.parametrize("name,text,trained", [
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n 2+2? <|im_end|>\n"
               "<|im_start|>assistant\n 4 <|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n"
               "<|im_start|>assistant\n6<|im_end|>\n",
     [" 4 <|im_end|>\n", "6<|im_end|>\n"]),
    ("llama3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n 2+2? <|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n 4 <|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n3+3?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>",
     [" 4 <|eot_id|>", "6<|eot_id|>"]),
    ("nemotron-h-aligned", "<SPECIAL_10>System\nBe brief.\n<SPECIAL_11>User\n2+2?\n"
                           "<SPECIAL_11>Assistant\n4\n<SPECIAL_11>User\n3+3?\n"
                           "<SPECIAL_11>Assistant\n6\n",
     ["4\n", "6\n"]),
])
def test_prompt_formats_write_their_templates(name, text, trained):
    ids, mask = get_prompt_format(name).encode(CHAT, BYTES)
    assert (ids, mask) == _expected(text, trained)


def test_a_prompt_ends_with_the_assistants_header():
    for name, text in (("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU"
                                  "<|im_end|>\n<|im_start|>assistant\n"),
                       ("nemotron-h-aligned", "<SPECIAL_10>System\nS\n<SPECIAL_11>User\nU\n"
                                              "<SPECIAL_11>Assistant\n")):
        ids = get_prompt_format(name).prompt([{"role": "system", "content": "S"},
                                              {"role": "user", "content": "U"}], BYTES)
        assert BYTES.detokenize(ids) == text


def test_the_eod_is_trained_only_after_the_assistant():
    ids, mask = get_prompt_format("chatml").encode(CHAT[:2], BYTES)
    assert ids[-1] == EOD and not any(mask)


def test_special_tokens_and_no_bos_between_pieces(tmp_path):
    """A Hugging Face tokenizer that puts a BOS before every text and knows the chatml markers
    as special tokens: one id per marker, and no BOS inside the conversation."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "user": 3, "assistant": 4, "hi": 5, "yo": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken("<|im_start|>"), AddedToken("<|im_end|>")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer("SFTTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"),
                          eod_token="</s>")  # Megatron's name for a Hugging Face one
    assert isinstance(tok, HuggingFaceTokenizer)
    start, end = backend.token_to_id("<|im_start|>"), backend.token_to_id("<|im_end|>")
    assert tok.tokenize("hi") == [1, 5] and tok.tokenize_piece("hi") == [5]
    ids, mask = get_prompt_format("chatml").encode(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tok)
    assert ids == [start, 3, 5, end, start, 4, 6, end, 2]
    assert mask == [False] * 6 + [True] * 3


def test_split_conversations_at_system_messages():
    s, u, a = ({"role": r, "content": r[0]} for r in ("system", "user", "assistant"))
    assert split_conversations([u, a, s, u, a, u, a, s, u]) == [[u, a], [s, u, a, u, a], [s, u]]


def _write(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(line if isinstance(line, str) else json.dumps(line)
                          for line in lines) + "\n")
    return str(path)


def _line(*turns: str) -> dict:
    """Messages from ``"role:content"`` strings."""
    return {"messages": [dict(zip(("role", "content"), t.split(":", 1))) for t in turns]}


def _packed_reference(conversations: list[list[dict]], s: int):
    """The sample of module doc `mp.data.sft_dataset`, with loops: ids, loss mask, positions
    and the attention mask (True = masked)."""
    ids, trained, segment = [], [], []
    for k, conversation in enumerate(conversations):
        more, more_trained = get_prompt_format("chatml").encode(conversation, BYTES)
        ids, trained, segment = ids + more, trained + more_trained, segment + [k] * len(more)
    while len(ids) < s + 1:
        ids, trained, segment = ids + [EOD], trained + [False], segment + [len(conversations)]
    ids, trained, segment = ids[:s + 1], trained[:s + 1], segment[:s]
    positions, mask = [], torch.ones(s, s, dtype=torch.bool)
    for i in range(s):
        positions.append(sum(segment[j] == segment[i] for j in range(i)))
        for j in range(i + 1):
            mask[i, j] = segment[j] != segment[i]
    return ids, trained, positions, mask


@pytest.mark.parametrize("seq_length", [40, 120, 400], ids=["cut", "second-cut", "padded"])
def test_a_sample_packs_its_lines_conversations_apart(tmp_path, seq_length):
    line = _line("system:S", "user:hello", "assistant:hi there", "system:T", "user:ok?",
                 "assistant:ok")
    file = ConversationFile(_write(tmp_path / "c.jsonl", [line]))
    item = SFTDataset(file, np.arange(1), 1, seq_length, BYTES, get_prompt_format("chatml"),
                      0)[0]
    ids, trained, positions, mask = _packed_reference(split_conversations(line["messages"]),
                                                      seq_length)
    assert item["tokens"].tolist() == ids[:-1] and item["labels"].tolist() == ids[1:]
    assert item["loss_mask"].tolist() == [float(t) for t in trained[1:]]
    assert item["position_ids"].tolist() == positions
    assert torch.equal(segment_mask(item["segment_ids"]), mask[None])
    assert {k: v.dtype for k, v in item.items()} == {
        "tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
        "position_ids": torch.int64, "segment_ids": torch.int64}


def test_lines_are_shuffled_once_per_epoch(tmp_path):
    lines = [_line("user:q", f"assistant:{'a' * (i + 1)}") for i in range(7)]
    file = ConversationFile(_write(tmp_path / "c.jsonl", lines))

    def order(seed, n=17):
        ds = SFTDataset(file, np.arange(2, 7), n, 96, BYTES, get_prompt_format("chatml"), seed)
        return [int(ds[i]["loss_mask"].sum()) - 12 for i in range(len(ds))]  # answer length
    first = order(1)
    assert len(first) == 17
    for epoch in range(3):  # lines 2..6 have answers of 3..7 characters
        assert sorted(first[epoch * 5:epoch * 5 + 5]) == [3, 4, 5, 6, 7]
    assert set(first[15:]) <= {3, 4, 5, 6, 7}
    assert order(1) == first and order(2) != first
    assert sorted(order(1, None)) == [3, 4, 5, 6, 7]  # None: one epoch


@pytest.mark.parametrize("line,rule", [
    ("{not json", r"c.jsonl:2: not a JSON object"),
    ('{"text": "x"}', r'c.jsonl:2: expected an object with a non-empty "messages" list'),
    ('{"messages": []}', r'c.jsonl:2: expected an object with a non-empty "messages" list'),
    (json.dumps(_line("tool:x")), r"c.jsonl:2: message 0 must be an object with a role among "
                                  r"system, user, assistant and a string content"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"message 0 must be an object"),
    (json.dumps(_line("user:x", "assistant:")), r"c.jsonl:2: message 1 is an empty assistant"),
    (json.dumps(_line("system:x", "assistant:y")), r"c.jsonl:2: message 1 is an assistant "
                                                   r"message that does not follow a user"),
])
def test_a_bad_line_is_named_when_the_file_is_opened(tmp_path, line, rule):
    path = _write(tmp_path / "c.jsonl", [_line("user:q", "assistant:a"), line])
    with pytest.raises(ValueError, match=rule):
        ConversationFile(path)


def test_blank_lines_are_skipped_and_an_empty_file_refused(tmp_path):
    path = _write(tmp_path / "c.jsonl", ["", _line("user:q", "assistant:a"), "  ",
                                         _line("user:r", "assistant:b")])
    file = ConversationFile(path)
    assert len(file) == 2 and file[1] == _line("user:r", "assistant:b")["messages"]
    with pytest.raises(ValueError, match="holds no conversations"):
        ConversationFile(_write(tmp_path / "e.jsonl", ["", ""]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ConversationFile(str(tmp_path / "missing.jsonl"))


def test_the_line_index_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    lines = [_line("user:q", f"assistant:a{i}") for i in range(3)]
    path = _write(tmp_path / "c.jsonl", lines)
    first = ConversationFile(path)
    assert first.read_anew and os.path.isfile(cache_file(path, None))
    assert os.path.dirname(cache_file(path, None)) == str(tmp_path / "cache" /
                                                          "ConversationFile_lines")

    def unread(path):
        raise AssertionError(f"{path} read again")
    with monkeypatch.context() as patch:
        patch.setattr(conversations, "line_ranges", unread)
        again = ConversationFile(path)
    assert not again.read_anew and [again[i] for i in range(3)] == [m["messages"]
                                                                     for m in lines]
    with open(path, "a") as f:  # one more line: a new size
        f.write(json.dumps(_line("user:q", "assistant:a3")) + "\n")
    grown = ConversationFile(path)
    assert grown.read_anew and len(grown) == 4
    text = open(path).read().replace("a3", "b3")  # the same size, a new modification time
    with open(path, "w") as f:
        f.write(text)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    edited = ConversationFile(path)
    assert edited.read_anew and edited[3][1]["content"] == "b3"


def test_a_cache_that_cannot_be_written_leaves_the_file_read_each_time(tmp_path, capsys):
    path = _write(tmp_path / "c.jsonl", [_line("user:q", "assistant:a")])
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    for _ in range(2):
        file = ConversationFile(path, str(blocked))
        assert file.read_anew and file[0] == _line("user:q", "assistant:a")["messages"]
        assert "mp.data: cannot cache the line index of" in capsys.readouterr().out


def _opened_by_two_ranks(path: str, cache: str) -> tuple[bool, list, str]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        file = ConversationFile(path, cache)
    return file.read_anew, [file[i] for i in range(len(file))], out.getvalue()


@pytest.mark.parametrize("writable", [True, False])
def test_one_rank_reads_the_file_and_the_others_load_its_index(tmp_path, writable):
    """A cache that cannot be written: each rank reads, the first one says so."""
    lines = [_line("user:q", f"assistant:a{i}") for i in range(5)]
    path = _write(tmp_path / "c.jsonl", lines)
    cache = tmp_path / "index"
    if not writable:
        cache.write_text("")
    (read0, got0, said0), (read1, got1, said1) = run_distributed(2, _opened_by_two_ranks, path,
                                                                 str(cache))
    assert (read0, read1) == (True, not writable)
    assert got0 == got1 == [m["messages"] for m in lines]
    assert ("cannot cache the line index" in said0, said1) == (not writable, "")


def _answers(dataset) -> set[str]:
    """The answers (``assistant:...``) of the lines a dataset reads."""
    return {BYTES.detokenize(dataset[i]["labels"][dataset[i]["loss_mask"] > 0].tolist()[:-12])
            for i in range(len(dataset))}


def test_split_blend_and_per_split_files(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_line("user:q", f"assistant:a{i}") for i in range(9)])
    b = _write(tmp_path / "b.jsonl", [_line("user:q", f"assistant:b{i}") for i in range(3)])
    chatml = {"tokenizer": BYTES, "prompt_format": get_prompt_format("chatml")}
    train, valid, test = build_sft_datasets([a], "2,1,0", 96, 0, 30, None, 0, **chatml)
    assert _answers(train) == {f"a{i}" for i in range(6)} and len(train) == 30
    assert _answers(valid) == {"a6", "a7", "a8"} and len(valid) == 3 and test is None
    blend = build_sft_datasets(["1", a, "3", b], "1", 96, 0, 400, 0, 0, **chatml)[0]
    drawn = [_answers(torch.utils.data.Subset(blend, [i])).pop()[0] for i in range(len(blend))]
    assert len(drawn) == 400 and drawn.count("b") == 300  # weights 1 : 3
    per_split = build_sft_datasets(None, None, 96, 0, 5, 3, None,
                                   per_split_data_path=[[a], [b], None], **chatml)
    assert _answers(per_split[1]) == {"b0", "b1", "b2"} and per_split[2] is None


def test_embedded_conversations_come_from_the_source(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text('def f(x):\n    """Twice x.\n\n    More."""\n    return 2 * x\n\n\n'
                      'class C:\n    def g(self):\n        """G\n        it."""\n'
                      '        return 1\n\n    def h(self):\n        return 0\n')
    assert list(function_conversations(str(source), "pkg.mod")) == [
        _line("user:Write `f` of `pkg.mod`: Twice x.",
              'assistant:def f(x):\n    """Twice x.\n\n    More."""\n    return 2 * x'),
        _line("user:Write `g` of `pkg.mod`: G it.",
              'assistant:def g(self):\n    """G\n    it."""\n    return 1')]
    path = prepare_default_conversations(str(tmp_path / "cache"), max_bytes=200_000)
    stamp = os.stat(path).st_mtime_ns
    file = ConversationFile(path)  # every line passes the file's rules
    assert len(file) > 20 and file[0][0]["role"] == "user"
    assert prepare_default_conversations(str(tmp_path / "cache"), max_bytes=200_000) == path
    assert os.stat(path).st_mtime_ns == stamp  # built once


@pytest.mark.parametrize("flags,rule", [
    (["--sft", "--mock-data"], "data.sft=true reads conversations; data.mock_data=true"),
    (["--sft", "--reset-attention-mask"], "data.reset_attention_mask=true with data.sft=true"),
    (["--sft", "--tokenizer-type", "NullTokenizer", "--vocab-size", "9", "--data-path", "x"],
     "data.sft=true writes its prompt format as text"),
    (["--sft-tokenizer-prompt-format", "alpaca"],
     "data.sft_tokenizer_prompt_format='alpaca' must be one of 'nemotron-h-aligned', "
     "'chatml', 'llama3'"),
])
def test_the_config_refuses_what_sft_cannot_do(flags, rule):
    with pytest.raises(ConfigError, match=rule.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, flags, world_size=4)


def test_megatrons_flags():
    cfg = load_config(TINY, ["--sft", "--sft-tokenizer-prompt-format", "chatml"], world_size=4)
    assert cfg.data.sft and cfg.data.sft_tokenizer_prompt_format == "chatml"
    assert load_config(TINY, [], world_size=4).data.sft_tokenizer_prompt_format == \
        "nemotron-h-aligned"  # Megatron's default
