"""A text-generation endpoint over HTTP, as Megatron-LM's
``tools/run_text_generation_server.py`` serves it: ``PUT /api`` with a JSON body, every
tensor-parallel rank generating together (`mp.generation`).

Request (Megatron's names; only ``prompts`` is required)::

    {"prompts": ["def main(", "import "], "tokens_to_generate": 64, "temperature": 1.0,
     "top_k": 0, "top_p": 0.0, "random_seed": 1234, "logprobs": false}

A prompt may also be a conversation, a list of ``{"role", "content"}`` messages (a model
fine-tuned with ``--sft``): it is written in the server's prompt format and followed by the
assistant's header (`mp.data.prompt_formats`), so the continuation is the assistant's answer.
``top_k`` 1 is greedy decoding; ``top_k`` 0 and ``top_p`` 0 (Megatron's "off" for both) keep
every token; Megatron refuses ``top_k`` and ``top_p`` together, and so does this. The answer
is ``{"text": [prompt and continuation, ...]}`` (the tokens of both, detokenized together),
each prompt continued until ``tokens_to_generate`` or the end-of-document token. With
``logprobs`` it also holds, per prompt, ``"segments"`` (each token of the prompt and its
continuation, the end-of-document token included when drawn, detokenized alone) and
``"logprobs"`` (each but the first's log-probability given those before it,
`mp.generation.token_logprobs`); ``tokens_to_generate`` 0 then scores the prompts alone, as in
Megatron. A request that breaks a rule (a missing or empty prompt, a wrong type, a prompt that
with its new tokens exceeds the model's positions, a field Megatron has and mp does not, such
as ``beam_width``) gets status 400 and the rule, before any rank is involved.

Rank 0 answers HTTP; the world is one tensor-parallel group. For each request rank 0
broadcasts the checked request to the other ranks (`torch.distributed.broadcast_object_list`)
and they generate together; while no request comes, it broadcasts a heartbeat every
``heartbeat_s`` seconds, so idle ranks never reach the collectives' timeout. `serve` returns,
on every rank, once ``stop`` (an event rank 0 watches) is set.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch
import torch.distributed as dist

from mp.data.conversations import check_messages
from mp.data.prompt_formats import PromptFormat
from mp.device import get_device
from mp.generation import SamplingParams, generate, token_logprobs
from mp.model import GPTModel

#: Megatron's request fields that mp does not implement -> why.
UNSUPPORTED_FIELDS = {
    "add_BOS": "mp's tokenizers add no beginning-of-sequence token",
    "stop_on_double_eol": "mp stops at the end-of-document token only",
    "stop_on_eol": "mp stops at the end-of-document token only",
    "prevent_newline_after_colon": "mp does not filter newlines",
    "beam_width": "mp decodes greedily or by sampling, not by beam search",
}
_FIELDS = ("prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "random_seed",
           "logprobs")


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: each prompt's token ids, how many tokens to add, how to choose them,
    the sampling seed, and whether to score the tokens."""

    prompts: list[str | list[dict]]
    tokens: list[list[int]]
    tokens_to_generate: int
    params: SamplingParams
    seed: int
    logprobs: bool


def parse_request(body: dict, tokenizer, max_positions: int,
                  prompt_format: PromptFormat | None = None) -> GenerationRequest:
    """``body`` (the request's JSON) as a `GenerationRequest`, or a ValueError naming the
    field, its value and the rule (module doc); conversations are written in
    ``prompt_format`` (None: refused)."""
    if not isinstance(body, dict):
        raise ValueError(f"the request must be a JSON object, not {type(body).__name__}")
    for field in body:
        if field in UNSUPPORTED_FIELDS:
            raise ValueError(f"{field}: {UNSUPPORTED_FIELDS[field]}")
        if field not in _FIELDS:
            raise ValueError(f"unknown field {field!r}; the fields are {', '.join(_FIELDS)}")
    prompts = body.get("prompts")
    if not (isinstance(prompts, list) and prompts
            and all(isinstance(p, str | list) and p for p in prompts)):
        raise ValueError(f"prompts={prompts!r} must be a non-empty list of non-empty strings "
                         "or conversations (lists of messages)")
    count = _number(body, "tokens_to_generate", int, 64)
    top_k = _number(body, "top_k", int, 0)
    top_p = _number(body, "top_p", float, 0.0)
    temperature = _number(body, "temperature", float, 1.0)
    seed = _number(body, "random_seed", int, 1234)
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise ValueError(f"logprobs={logprobs!r} must be true or false")
    if count < (0 if logprobs else 1):
        raise ValueError(f"tokens_to_generate={count} must be at least 1, or 0 with logprobs "
                         "(scoring the prompts)")
    if top_k > 0 and top_p > 0:
        raise ValueError(f"top_k={top_k} and top_p={top_p}: set one of them (Megatron's rule)")
    params = SamplingParams(greedy=top_k == 1, temperature=temperature, top_k=top_k,
                            top_p=top_p if top_p > 0 else 1.0)
    tokens = [tokenizer.tokenize(prompt) if isinstance(prompt, str)
              else _conversation(prompt, i, tokenizer, prompt_format)
              for i, prompt in enumerate(prompts)]
    for prompt, ids in zip(prompts, tokens):
        if not ids or len(ids) + count > max_positions:
            raise ValueError(f"prompt {prompt!r} is {len(ids)} tokens; with "
                             f"tokens_to_generate={count} it must fit in the model's "
                             f"max_position_embeddings={max_positions}")
        if logprobs and len(ids) + count < 2:
            raise ValueError(f"prompt {prompt!r} is {len(ids)} token: logprobs scores each "
                             "token given those before it, so it needs two at least")
    return GenerationRequest(prompts, tokens, count, params, seed, logprobs)


def _conversation(messages: list, index: int, tokenizer,
                  prompt_format: PromptFormat | None) -> list[int]:
    """The ids of conversation ``messages`` (prompt ``index``) with the assistant's header."""
    if prompt_format is None:
        raise ValueError(f"prompt {index} is a conversation, and this server has no prompt "
                         "format to write it in")
    check_messages({"messages": messages}, f"prompt {index}")
    return prompt_format.prompt(messages, tokenizer)


def _number(body: dict, field: str, kind: type, default):
    """``body[field]`` (an int, or for ``float`` an int or float; not a bool), or
    ``default``."""
    value = body.get(field, default)
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"{field}={value!r} must be {'a number' if kind is float else 'an int'}")
    return kind(value)


def answer(model: GPTModel, tokenizer, request: GenerationRequest) -> dict:
    """The response (module doc): each prompt's tokens and their continuation, detokenized
    together as Megatron does, and with ``logprobs`` the segments and their scores
    (collective over the tensor-parallel group: each rank passes the same request)."""
    generator = torch.Generator(get_device()).manual_seed(request.seed)
    response = {"text": []}
    if request.logprobs:
        response.update(segments=[], logprobs=[])
    for ids in request.tokens:
        tokens = torch.tensor([ids], device=get_device())
        out = generate(model, tokens, request.tokens_to_generate, request.params,
                       eod=tokenizer.eod, generator=generator)[0].tolist()
        new = out[len(ids):]  # padded with the end-of-document token after the first one
        drawn = new[:new.index(tokenizer.eod) + 1] if tokenizer.eod in new else new
        response["text"].append(tokenizer.detokenize(
            ids + [t for t in drawn if t != tokenizer.eod]))
        if request.logprobs:
            scored = torch.tensor([ids + drawn], device=get_device())
            response["segments"].append([tokenizer.detokenize([t]) for t in ids + drawn])
            response["logprobs"].append(token_logprobs(model, scored)[0].tolist())
    return response


def _broadcast(command: tuple) -> tuple:
    """Rank 0's ``command`` on every rank."""
    box = [command]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def serve(model: GPTModel, tokenizer, host: str, port: int, *, heartbeat_s: float = 60.0,
          stop: threading.Event | None = None, on_listening=None,
          prompt_format: PromptFormat | None = None) -> None:
    """Answer ``PUT /api`` on rank 0 at ``host:port`` (``port`` 0: any free one) until
    ``stop`` is set; the other ranks follow rank 0's commands. ``on_listening(port)`` is
    called on rank 0 once the socket listens; conversations are written in
    ``prompt_format``."""
    if dist.get_rank() != 0:
        while (command := _broadcast(None))[0] != "stop":
            if command[0] == "generate":
                answer(model, tokenizer, command[1])
        return
    stop = stop or threading.Event()
    max_positions = model.config.max_position_embeddings

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 (http.server's name)
            if self.path != "/api":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no {self.path}; PUT /api"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                request = parse_request(body, tokenizer, max_positions, prompt_format)
            except ValueError as error:  # json's errors are ValueErrors too
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            _broadcast(("generate", request))
            self._reply(HTTPStatus.OK, answer(model, tokenizer, request))

        def _reply(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # no line per request on stderr
            pass

    with HTTPServer((host, port), Handler) as server:
        server.timeout = heartbeat_s
        if on_listening is not None:
            on_listening(server.server_address[1])
        while not stop.is_set():
            server.handle_request()  # returns after a request or heartbeat_s without one
            _broadcast(("heartbeat",))
    _broadcast(("stop",))
