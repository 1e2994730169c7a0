"""The text-generation server (`mp.text_generation_server`, Megatron's ``PUT /api``) at TP 2:
greedy answers against transformers' ``generate`` on the same GPT-2 weights, sampled answers
reproducible by their seed, bad requests answered 400 with the rule and no rank involved (the
server goes on), idle time bridged by heartbeats, and the command line's refusals;
conversation prompts written in the prompt format."""

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from harness import run_distributed
from jobs import script
from test_checkpoint_hf import VOCAB
from test_generation import gpt2_checkpoint

from mp import parallel_state as ps
from mp.checkpointing import read_checkpoint_info
from mp.data.prompt_formats import get_prompt_format
from mp.data.tokenizer import ByteLevelTokenizer, NullTokenizer
from mp.generation_setup import generation_config, load_for_generation
from mp.text_generation_server import parse_request, serve

EOD = VOCAB - 1  # NullTokenizer(VOCAB - 1): ids 0 .. VOCAB - 2 and the eod id VOCAB - 1
SERVER = Path(__file__).resolve().parents[1] / "tools" / "run_text_generation_server.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return gpt2_checkpoint(tmp_path_factory.mktemp("server"))


def _put(port: int, body) -> tuple[int, dict]:
    data = (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api", data=data, method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _serve_and_ask(path: str, bodies: list, idle_s: float) -> list[tuple[int, dict]] | None:
    """Serve ``path`` at TP 2 (heartbeats every 0.1 s); rank 0's client thread sends each of
    ``bodies`` after ``idle_s`` seconds, then stops the server. Returns the answers on rank 0."""
    ps.initialize_model_parallel(2)
    config = generation_config(read_checkpoint_info(path).model_config, 2)
    model = load_for_generation(path, config)
    tokenizer = NullTokenizer(EOD)
    stop, answers = threading.Event(), []

    def client(port: int) -> None:
        def ask():
            try:
                for body in bodies:
                    time.sleep(idle_s)
                    answers.append(_put(port, body))
            finally:
                stop.set()
        threading.Thread(target=ask, daemon=True).start()

    serve(model, tokenizer, "127.0.0.1", 0, heartbeat_s=0.1, stop=stop, on_listening=client)
    return answers if torch.distributed.get_rank() == 0 else None


def _continuations(texts: list[str], prompts: torch.Tensor) -> list[list[int]]:
    """The new ids of each answer (the text is the prompt's ids, then the new ones)."""
    return [[int(t) for t in text.split()][len(p):] for text, p in zip(texts, prompts.tolist())]


def test_greedy_answers_are_transformers_greedy_generation(converted):
    hf, path = converted
    prompts = torch.randint(0, EOD, (3, 5), generator=torch.Generator().manual_seed(2))
    texts = [" ".join(map(str, p)) for p in prompts.tolist()]
    (status, answer), = run_distributed(2, _serve_and_ask, path, [
        {"prompts": texts, "tokens_to_generate": 10, "top_k": 1}], 0.3)[0]
    assert status == 200
    assert [t.split()[:5] for t in answer["text"]] == [t.split() for t in texts]
    for prompt, new in zip(prompts, _continuations(answer["text"], prompts)):
        expected = hf.generate(prompt[None], attention_mask=torch.ones(1, 5, dtype=torch.long),
                               max_new_tokens=10, do_sample=False, eos_token_id=EOD,
                               pad_token_id=EOD)[0, 5:].tolist()
        assert new == [t for t in expected if t != EOD]


def test_logprobs_are_transformers_log_softmax(converted):
    """Scoring prompts alone (``tokens_to_generate`` 0) and with their greedy continuation:
    each token's log-probability given the ones before it, against transformers' log-softmax
    over its vocabulary (mp's padding rows left out)."""
    hf, path = converted
    prompts = torch.randint(0, EOD, (2, 7), generator=torch.Generator().manual_seed(5))
    texts = [" ".join(map(str, p)) for p in prompts.tolist()]
    scored, generated = run_distributed(2, _serve_and_ask, path, [
        {"prompts": texts, "tokens_to_generate": 0, "logprobs": True},
        {"prompts": texts, "tokens_to_generate": 6, "top_k": 1, "logprobs": True}], 0.05)[0]
    for (status, answer), extra in ((scored, 0), (generated, 6)):
        assert status == 200
        for text, segments, logprobs in zip(answer["text"], answer["segments"],
                                            answer["logprobs"]):
            ids = torch.tensor([[int(t) for t in segments]])
            assert segments[:7] == text.split()[:7] and len(ids[0]) <= 7 + extra
            with torch.no_grad():
                expected = hf(ids).logits.log_softmax(-1)[0, :-1].gather(
                    -1, ids[0, 1:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(logprobs), expected, rtol=1e-5, atol=1e-5)


def test_sampling_follows_the_seed_and_bad_requests_are_refused(converted):
    _, path = converted
    sampled = {"prompts": ["1 2 3"], "tokens_to_generate": 8, "temperature": 1.5,
               "random_seed": 7}
    bad = [
        ({"prompts": []}, "prompts=[] must be a non-empty list of non-empty strings"),
        ({"prompts": ["1"], "tokens_to_generate": "8"}, "tokens_to_generate='8' must be an int"),
        ({"prompts": ["1"], "top_k": 5, "top_p": 0.9}, "top_k=5 and top_p=0.9: set one"),
        ({"prompts": ["1"], "beam_width": 2}, "beam_width: mp decodes greedily or by sampling"),
        ({"prompts": ["1 2"], "tokens_to_generate": 0}, "tokens_to_generate=0 must be at least "
                                                         "1, or 0 with logprobs"),
        ({"prompts": ["1"], "tokens_to_generate": 0, "logprobs": True},
         "prompt '1' is 1 token: logprobs scores each token given those before it"),
        ({"prompts": ["1"], "logprobs": "yes"}, "logprobs='yes' must be true or false"),
        ({"prompts": ["1"], "tokens": 3}, "unknown field 'tokens'"),
        ({"prompts": ["1 2"], "tokens_to_generate": 31},
         "prompt '1 2' is 2 tokens; with tokens_to_generate=31 it must fit in the model's "
         "max_position_embeddings=32"),
        ({"prompts": ["x"]}, "NullTokenizer reads integer ids"),
        (b"{not json", "Expecting property name"),
    ]
    answers = run_distributed(2, _serve_and_ask, path, [
        sampled, *(body for body, _ in bad), sampled, {**sampled, "random_seed": 8}], 0.05)[0]
    first, *refused, again, other = answers
    assert first[0] == again[0] == other[0] == 200
    assert first[1] == again[1]  # the same seed, the same draws
    assert first[1] != other[1]
    for (status, answer), (_, message) in zip(refused, bad):
        assert status == 400 and message in answer["error"], answer


def test_the_command_line_refuses_a_checkpoint_without_a_tokenizer(converted):
    _, path = converted
    with pytest.raises(SystemExit, match="holds no job config to take the tokenizer from"):
        script(SERVER).main(["--load", path])  # before any process group: here


def test_a_conversation_prompt_is_written_in_the_prompt_format():
    """A conversation becomes the chatml template written out, with the assistant's header;
    a bad one, or one sent to a server without a prompt format, is refused by name."""
    tok, chatml = ByteLevelTokenizer(), get_prompt_format("chatml")
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    request = parse_request({"prompts": [conversation, "text"]}, tok, 512, chatml)
    assert request.tokens == [list(b"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi"
                                   b"<|im_end|>\n<|im_start|>assistant\n"), list(b"text")]
    with pytest.raises(ValueError, match="prompt 1 is a conversation, and this server has no "
                                         "prompt format"):
        parse_request({"prompts": ["text", conversation]}, tok, 512)
    with pytest.raises(ValueError, match="prompt 0: message 1 is an assistant message that "
                                         "does not follow a user message"):
        parse_request({"prompts": [[conversation[0], {"role": "assistant", "content": "x"}]]},
                      tok, 512, chatml)
