"""Text generation from a GPT: greedy or sampled decoding, one token at a time, under tensor
parallelism (`tools/generate.py` is the command line).

The prompt runs through the model once; then each step feeds only the newest token, its
attention reading the keys and values of the earlier ones from a cache
(`mp.model.inference.InferenceParams`). ``kv_cache=False`` runs the whole sequence so far
at every step instead: the same tokens, ``n`` times the work, kept as the plain reference.
Prompts of one call share a length; this is for looking at what a model learned, not a
serving engine. `token_logprobs` scores a sequence instead: each token's log-probability
given the ones before it, from one forward.

Sampling follows the usual order (Hugging Face's): logits divided by ``temperature``, then
only the ``top_k`` largest kept, then only the smallest set of the largest whose
probabilities sum to at least ``top_p`` (the one that crosses included), then a draw from
the softmax of what is left. The vocabulary's padding rows (`TransformerConfig.
padded_vocab_size`) are never drawn. Every tensor-parallel rank ends with the same tokens:
the vocab-parallel logits are gathered, and the first rank of the group draws the token and
broadcasts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.model import GPTModel
from mp.model.inference import InferenceParams
from mp.tensor_parallel import gather_from_tensor_model_parallel_region


@dataclass(frozen=True)
class SamplingParams:
    """How each token is chosen: ``greedy`` takes the most likely one; otherwise a draw after
    ``temperature`` (> 0), ``top_k`` (0: no limit) and ``top_p`` (1.0: no limit)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits [b, V]`` scaled by the temperature, with ``-inf`` outside the top-k and the
    top-p sets (a new tensor)."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # the larger ones reach top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop),
                                    float("-inf"))
    return logits


def next_token(logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``[b]`` tokens chosen from ``logits [b, V]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPTModel, tokens: torch.Tensor, max_new_tokens: int,
             params: SamplingParams = SamplingParams(), *, eod: int | None = None,
             generator: torch.Generator | None = None, group=None,
             kv_cache: bool = True) -> torch.Tensor:
    """``tokens [b, s]`` followed by up to ``max_new_tokens`` generated ones, ``[b, s + n]``.
    A sequence that produces ``eod`` is finished: it is padded with ``eod`` until every
    sequence is finished or ``n = max_new_tokens``. Collective over the tensor-parallel
    ``group`` (default: `parallel_state`'s); every rank passes the same ``tokens``."""
    config = model.config
    _check_whole_model(model)
    if tokens.dim() != 2 or tokens.size(1) == 0:
        raise ValueError(f"tokens must be [batch, length >= 1], got {list(tokens.shape)}")
    limit = config.max_position_embeddings
    if tokens.size(1) + max_new_tokens > limit:
        raise ValueError(f"{tokens.size(1)} prompt tokens + max_new_tokens={max_new_tokens} "
                         f"exceed max_position_embeddings={limit}")
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    source = dist.get_global_rank(group, 0)
    was_training = model.training
    model.eval()
    done = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
    cache = InferenceParams(tokens.size(1) + max_new_tokens) if kv_cache else None
    new = tokens  # what the model has not seen yet
    try:
        for _ in range(max_new_tokens):
            logits = _vocabulary_logits(model, model(new, inference_params=cache)[:, -1],
                                        group)  # [b, V padded]
            token = next_token(logits, params, generator)
            dist.broadcast(token, source, group=group)
            if eod is not None:
                token = token.masked_fill(done, eod)
                done |= token == eod
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if cache is not None:
                cache.sequence_len_offset += new.size(1)
            new = tokens if cache is None else token[:, None]
            if done.all():
                break
    finally:
        model.train(was_training)
    return tokens


@torch.no_grad()
def token_logprobs(model: GPTModel, tokens: torch.Tensor, group=None) -> torch.Tensor:
    """``[b, s - 1]`` float32: the log-probability of each token of ``tokens [b, s]`` but the
    first given the ones before it, under the softmax over the real vocabulary (the padding
    rows left out, as `generate` draws). Collective over the tensor-parallel ``group``."""
    _check_whole_model(model)
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens must be [batch, length >= 2], got {list(tokens.shape)}")
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    was_training = model.training
    model.eval()
    try:
        logits = _vocabulary_logits(model, model(tokens[:, :-1]), group)  # [b, s - 1, V]
    finally:
        model.train(was_training)
    return logits.log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _vocabulary_logits(model: GPTModel, local: torch.Tensor, group) -> torch.Tensor:
    """Vocab-parallel logits ``[..., V / t]`` gathered in fp32, ``-inf`` on the padding rows."""
    logits = gather_from_tensor_model_parallel_region(local, group).float()
    logits[..., model.config.vocab_size:] = float("-inf")
    return logits


def _check_whole_model(model: GPTModel) -> None:
    """ValueError unless ``model`` decodes: the whole model on each rank, no SP."""
    config = model.config
    if config.pipeline_model_parallel_size > 1 or not (model.pre_process and model.post_process):
        raise ValueError(f"mp.generation needs the whole model on each rank "
                         f"(pipeline_model_parallel_size=1, got "
                         f"{config.pipeline_model_parallel_size}); a checkpoint loads at any "
                         "layout")
    if config.sequence_parallel:
        raise ValueError("mp.generation needs sequence_parallel=False (the sequence grows a "
                         "token at a time); sequence parallelism changes no weight, so build "
                         "the model without it")
