"""Text generation (`mp.generation`, `tools/generate.py`): greedy decoding at TP=2 against
Hugging Face's ``generate`` on the same GPT-2, Llama and StarCoder2 weights (learned and rotary
positions, grouped-query attention, sliding windows, end-of-document handling), with the
key/value cache; the cache against running the whole sequence at each step; the temperature,
top-k and top-p filters against transformers' logits warpers; sampled tokens the same on every
tensor-parallel rank; the command line on a converted checkpoint."""

from pathlib import Path

import pytest
import torch
from checks import assert_rel_close
from harness import run_distributed
from jobs import GENERATE, generated, script
from test_checkpoint_hf import VOCAB, _convert_to_mp, _gpt2
from test_checkpoint_hf_llama import _llama, _to_mp
from test_checkpoint_hf_starcoder2 import _starcoder2
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, read_checkpoint_info
from mp.generation import SamplingParams, filter_logits, generate
from mp.model import GPTModel, TransformerConfig
from mp.model.inference import InferenceParams

NEW = 12


def gpt2_checkpoint(directory: Path):
    """A perturbed random GPT-2 (`test_checkpoint_hf`) and its mp checkpoint in
    ``directory``: ``(model, path)``."""
    model = _gpt2("gelu_new")
    model.save_pretrained(directory / "hf")
    _convert_to_mp(directory / "hf", directory / "mp")
    return model, str(directory / "mp")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return gpt2_checkpoint(tmp_path_factory.mktemp("generation"))


def _prompts() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(11))


def _hf_greedy(model, prompts: torch.Tensor, eod: int | None) -> torch.Tensor:
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW,
                          do_sample=False, eos_token_id=eod, pad_token_id=eod or 0)


def _mp_generate(path: str, prompts: torch.Tensor, params: SamplingParams, eod: int | None,
                 seed: int, kv_cache: bool = True, **model) -> torch.Tensor:
    ps.initialize_model_parallel(2)
    saved = read_checkpoint_info(path).model_config
    model = GPTModel(TransformerConfig(**{**saved, "tensor_model_parallel_size": 2, **model}))
    load_checkpoint(path, model)
    # each rank its own seed: rank 0's draws must count everywhere
    generator = torch.Generator().manual_seed(100 * seed + torch.distributed.get_rank())
    return generate(model, prompts, NEW, params, eod=eod, generator=generator,
                    kv_cache=kv_cache)


def test_greedy_generation_matches_transformers_at_tp2(converted):
    hf_model, path = converted
    prompts = _prompts()
    with torch.no_grad():
        expected = _hf_greedy(hf_model, prompts, None)
    got = run_distributed(2, _mp_generate, path, prompts, SamplingParams(greedy=True), None, 0)
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0], expected)
    assert len(set(expected[:, 5:].flatten().tolist())) > 3, "a degenerate reference"

    # the first prompt's third new token ends its document: it is padded with the token after
    # that, the others go on (Hugging Face pads with pad_token_id, set to the same token)
    eod = int(expected[0, 5 + 2])
    with torch.no_grad():
        expected = _hf_greedy(hf_model, prompts, eod)
    got = run_distributed(2, _mp_generate, path, prompts, SamplingParams(greedy=True), eod, 0)
    assert torch.equal(got[0], expected)
    assert (expected[0, 5 + 2:] == eod).all()


@pytest.mark.parametrize("family, head_dim, window", [
    ("Llama", None, {}), ("Qwen3", 12, {}), ("Qwen2", None, {}),
    ("Mistral", None, {"sliding_window": 4}), ("Starcoder2", None, {"sliding_window": 4})])
def test_greedy_llama_generation_matches_transformers_at_tp2(tmp_path, family, head_dim,
                                                             window):
    """Grouped-query attention and rotary embeddings: the cache's positions and heads (Qwen3:
    keys normalized before they are cached, heads 12 wide; Qwen2: keys and values with their
    biases; Mistral: a sliding window of 4 keys over the cached ones, which changes
    transformers' tokens; StarCoder2: Mistral's window with LayerNorm, GeLU and biases)."""
    hf_model = _starcoder2(**window) if family == "Starcoder2" else \
        _llama(2, head_dim=head_dim, family=family, **window)
    hf_model.save_pretrained(tmp_path / "hf")
    _to_mp(tmp_path / "hf", tmp_path / "mp", 2)
    prompts = _prompts()
    with torch.no_grad():
        expected = _hf_greedy(hf_model, prompts, None)
        if window:  # the same model without its window generates other tokens
            hf_model.config.sliding_window = None
            assert not torch.equal(_hf_greedy(hf_model, prompts, None), expected)
    got = run_distributed(2, _mp_generate, str(tmp_path / "mp"), prompts,
                          SamplingParams(greedy=True), None, 0)
    assert torch.equal(got[0], expected)
    assert len(set(expected[:, 5:].flatten().tolist())) > 3, "a degenerate reference"


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_cached_generation_equals_running_the_whole_sequence(converted, backend):
    """The key/value cache against no cache: the same tokens, greedy and sampled (the
    unfused core takes the cache's explicit causal mask, SDPA its own for the prompt)."""
    _, path = converted
    for params in (SamplingParams(greedy=True), SamplingParams(temperature=1.5)):
        runs = [run_distributed(2, _mp_generate, path, _prompts(), params, None, 3, kv_cache,
                                attention_backend=backend)[0] for kv_cache in (True, False)]
        assert torch.equal(*runs), params


def _logits_in_pieces(path: str, tokens: torch.Tensor, cuts: list[int], backend: str):
    """Logits of ``tokens`` in one forward, and through the cache in pieces split at
    ``cuts`` (the later pieces see the earlier through the cache and its causal mask)."""
    ps.initialize_model_parallel(2)
    saved = read_checkpoint_info(path).model_config
    model = GPTModel(TransformerConfig(**{**saved, "tensor_model_parallel_size": 2,
                                          "attention_backend": backend})).eval()
    load_checkpoint(path, model)
    cache = InferenceParams(tokens.size(1))
    pieces = []
    with torch.no_grad():
        whole = model(tokens)
        for start, end in zip([0, *cuts], [*cuts, tokens.size(1)]):
            pieces.append(model(tokens[:, start:end], inference_params=cache))
            cache.sequence_len_offset = end
    return whole, torch.cat(pieces, dim=1)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "llama_head_dim_12"])
def test_a_cache_fed_in_pieces_gives_the_whole_sequences_logits(converted, tmp_path, family,
                                                                 backend):
    if family.startswith("llama"):  # heads hidden / heads = 8 wide, or 12 (kv_channels)
        _llama(2, head_dim=12 if family.endswith("12") else None).save_pretrained(tmp_path / "hf")
        _to_mp(tmp_path / "hf", tmp_path / "mp", 2)
        path = str(tmp_path / "mp")
    else:
        path = converted[1]
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    whole, pieces = run_distributed(2, _logits_in_pieces, path, tokens, [7, 8, 15],
                                    backend)[0]
    assert_rel_close(pieces, whole, rtol=1e-5, what=f"{family} logits through the cache")


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 7, 0.6), (0.5, 0, 0.05)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, each as transformers' warper does it."""
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(5)) * 3
    expected = scores.clone()
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    for warper in warpers:
        expected = warper(None, expected)
    got = filter_logits(scores, SamplingParams(temperature=temperature, top_k=top_k,
                                               top_p=top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-6, atol=0)
    if top_k or top_p < 1.0:
        assert (~kept).any(), "the filter removed nothing: a test that cannot fail"


def test_sampling_draws_the_same_tokens_on_every_tp_rank(converted):
    _, path = converted
    params = SamplingParams(temperature=1.5, top_p=0.95)
    seeded = [run_distributed(2, _mp_generate, path, _prompts(), params, None, seed)
              for seed in (1, 2)]
    for run in seeded:
        assert torch.equal(run[0], run[1])
    assert not torch.equal(seeded[0][0], seeded[1][0]), "the seed changed nothing"


@pytest.mark.parametrize("params, message", [
    (dict(temperature=0.0), "temperature=0.0 must be > 0"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]")])
def test_sampling_params_are_checked(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**params)


def test_command_line_continues_prompts(converted, capsys):
    """One process (TP 1) on the checkpoint padded for TP 2. A converted checkpoint names no
    tokenizer: without one the tool refuses; with the byte-level one (the prompts' bytes are
    below the model's VOCAB, whose ids are the only ones drawn) it prints each prompt and its
    continuation."""
    _, path = converted
    args = ["--load", path, "--prompt", "ab", "--prompt", "xyz", "--max-new-tokens", "6",
            "--greedy"]
    with pytest.raises(SystemExit, match="holds no job config to take the tokenizer from"):
        script(GENERATE).main(args)  # before any process group: here
    out = generated([*args, "--tokenizer-type", "ByteLevelTokenizer"], capsys)
    assert out.startswith("ab\n" + "-" * 40 + "\n")
    assert "\nxyz\n" + "-" * 40 + "\n" in out
