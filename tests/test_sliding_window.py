"""Sliding-window attention (Megatron's ``--window-size``, ``--window-attn-skip-freq``): the
attention cores against the window written out query by query in float64 (forward and
gradients; with document masks, grouped queries, queries after cached keys), which layers
slide, the config's rules, and a model fed through the key/value cache in pieces against one
forward. The parallel layouts are checked against one process in test_gpt_model.py (TP, SP),
test_context_parallel.py (every CP exchange) and test_pipeline.py (layer numbers over
stages)."""

import math

import pytest
import torch
from harness import run_distributed

from mp import parallel_state as ps
from mp.model import GPTModel, TransformerConfig, attention_masks
from mp.model.attention import CoreAttention
from mp.model.attention_masks import sdpa_bias, tile_mask, window_tile
from mp.model.inference import InferenceParams

S, HEADS, D = 12, 4, 8


def _config(**overrides) -> TransformerConfig:
    kw = dict(num_layers=4, hidden_size=HEADS * D, num_attention_heads=HEADS, vocab_size=64,
              seq_length=S, hidden_dropout=0.0, attention_dropout=0.0)
    return TransformerConfig(**{**kw, **overrides})


def _reference(q, k, v, window: int | None, mask: torch.Tensor | None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention in float64 with each query's keys listed one by one: query ``i`` (at
    position ``sk - sq + i``) keeps key ``j`` when ``j`` is not after it, at most ``window``
    before it, and ``mask`` (``[sq, sk]``, True = masked) keeps it. ``sinks`` (``[heads]``):
    each softmax row also takes the head's sink logit, which adds no value."""
    sq, sk, groups = q.size(0), k.size(0), k.size(2)
    k, v = (t.double().repeat_interleave(HEADS // groups, dim=2) for t in (k, v))
    rows = []
    for i in range(sq):
        position = sk - sq + i
        keys = [j for j in range(sk) if j <= position
                and (window is None or position - j <= window)
                and (mask is None or not mask[i, j])]
        scores = torch.einsum("bhd,kbhd->bhk", q[i].double(), k[keys]) / math.sqrt(D)
        if sinks is not None:
            sink = sinks.double().view(1, HEADS, 1).expand(scores.size(0), HEADS, 1)
            probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        rows.append(torch.einsum("bhk,kbhd->bhd", probs, v[keys]))
    return torch.stack(rows).flatten(2)  # [sq, b, heads * d]


def _documents(sq: int, sk: int) -> torch.Tensor:
    """``[sq, sk]``: the keys of a document that ends after key 6 are masked for the later
    queries (mp's document masks, causal part included)."""
    positions = torch.arange(sk - sq, sk)[:, None]
    keys = torch.arange(sk)
    return (keys > positions) | ((positions > 6) & (keys <= 6))


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("window", [0, 3, S - 2, S - 1])
@pytest.mark.parametrize("groups", [HEADS, 2])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("queries", [S, 5], ids=["all_queries", "queries_after_keys"])
def test_core_attention_equals_the_window_written_out(backend, window, groups, documents,
                                                      queries):
    """``window = S - 1`` covers every key (no mask is made); ``S - 2`` misses one; 5 queries
    after 7 earlier keys are a cache's or a context-parallel chunk's."""
    core = CoreAttention(_config(attention_backend=backend, num_query_groups=groups), window)
    mask = _documents(queries, S) if documents else None
    given = None
    if documents:
        given = sdpa_bias(mask, torch.float32) if backend == "sdpa" else mask
        given = given[None, None]
    _check_against_reference(core, queries, S, groups, given, mask)


def _check_against_reference(core: CoreAttention, queries: int, keys: int, groups: int,
                             given: torch.Tensor | None, mask: torch.Tensor | None) -> None:
    """``core`` on random q, k, v (``given`` as its mask) against `_reference` (``mask``):
    the output and the gradients of q, k and v."""
    g = torch.Generator().manual_seed(core.window)
    q = torch.randn(queries, 2, HEADS, D, generator=g, requires_grad=True)
    k, v = (torch.randn(keys, 2, groups, D, generator=g, requires_grad=True) for _ in range(2))
    out = core(q, k, v, given)
    expected = _reference(q, k, v, core.window, mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn(out.shape, generator=g)
    mine = torch.autograd.grad((out * weights).sum(), (q, k, v))
    theirs = torch.autograd.grad((expected * weights.double()).sum(), (q, k, v))
    for name, a, b in zip("qkv", mine, theirs):
        # fp32 sums of O(1) terms: 1.1e-6 seen on an AMD EPYC where the float64 value is ~0
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=3e-6,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("window", [0, 3, 10])
@pytest.mark.parametrize("queries", [48, 30], ids=["all_queries", "queries_after_keys"])
def test_tiled_windows_equal_the_window_written_out(monkeypatch, backend, window, queries):
    """Tiles of `window_tile` queries (at least 4 rows here, then rounded so that a tile and
    its window make a multiple of 16 keys: 16, 13 and 22 rows) over 48 keys, the last tile
    short, the first ones' windows cut at key 0."""
    monkeypatch.setattr(attention_masks, "WINDOW_TILE", 4)
    assert window_tile(window) == {0: 16, 3: 13, 10: 22}[window]
    core = CoreAttention(_config(attention_backend=backend, num_query_groups=2,
                                 seq_length=48), window)
    _check_against_reference(core, queries, 48, 2, None, None)


def test_the_layers_of_a_window_share_one_tile_mask():
    """Two sliding layers over 64 tokens in tiles of 24 rows (16, rounded so that 24 + 8
    keys make a multiple of 16; 3 tiles, the last of 16 rows): one mask is built for all
    the tiles and reused by the second layer (the layers' backward keeps one copy, not one
    each)."""
    misses, hits = run_distributed(1, _forward_in_tiles)[0]
    assert (misses, hits) == (1, 1)  # built for the first layer, found for the second


def _forward_in_tiles() -> tuple[int, int]:
    saved = attention_masks.WINDOW_TILE
    attention_masks.WINDOW_TILE = 16  # the worker's own module, put back after
    tile_mask.cache_clear()
    try:
        ps.initialize_model_parallel(1)
        model = GPTModel(_config(num_layers=2, seq_length=64, window_size=[8, 0]))
        model(torch.randint(0, 64, (2, 64))).sum().backward()
        return tile_mask.cache_info().misses, tile_mask.cache_info().hits
    finally:
        attention_masks.WINDOW_TILE = saved
        tile_mask.cache_clear()


@pytest.mark.parametrize("freq, windows", [
    (None, [3, 3, 3, 3]),
    (2, [3, None, 3, None]),  # the 1-based layer numbers 2 divides attend fully
    ([0, 1, 1, 0], [None, 3, 3, None]),
    ("([1]*3+[0])", [3, 3, 3, None]),  # Megatron's expression, read without eval
])
def test_which_layers_slide(freq, windows):
    config = _config(window_size=[3, 0], window_attn_skip_freq=freq)
    assert [config.attention_window(n) for n in range(1, 5)] == windows
    # multi-token prediction's depths attend as the last layer
    assert config.attention_window(5) == windows[-1]
    assert _config().attention_window(1) is None
    assert run_distributed(1, _core_windows, freq)[0] == windows


def _core_windows(freq) -> list[int | None]:
    ps.initialize_model_parallel(1)
    model = GPTModel(_config(window_size="3,0", window_attn_skip_freq=freq))
    return [layer.self_attention.core_attention.window for layer in model.decoder.layers]


@pytest.mark.parametrize("overrides, message", [
    ({"window_size": "4096"}, r"window_size=\[4096\] must be two integers \[left, right\]"),
    ({"window_size": [4, 2]}, "right=2 must be 0, a GPT attends causally"),
    ({"window_size": [-1, 0]}, "left=-1 must be >= 0"),
    ({"window_size": "a,0"}, "window_size='a,0' must be two integers"),
    ({"window_attn_skip_freq": 2}, "window_attn_skip_freq=2 needs window_size"),
    ({"window_size": [4, 0], "window_attn_skip_freq": [1, 0]},
     r"window_attn_skip_freq=\[1, 0\] must hold a 0 \(full attention\) or 1 \(sliding "
     r"window\) for each of the num_layers=4 layers"),
    ({"window_size": [4, 0], "window_attn_skip_freq": 0},
     "window_attn_skip_freq=0 must be a positive integer"),
])
def test_bad_windows_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_a_cache_fed_in_pieces_gives_the_whole_sequences_logits(backend):
    """The cache's causal mask gets the window too: pieces of 5, 1 and 6 tokens (the later
    ones with keys out of their window in the cache) give one forward's logits."""
    run_distributed(1, _cache_in_pieces, backend)


def _cache_in_pieces(backend: str):
    ps.initialize_model_parallel(1)
    torch.manual_seed(3)
    model = GPTModel(_config(attention_backend=backend, window_size=[2, 0],
                             window_attn_skip_freq=[1, 1, 0, 1],
                             position_embedding_type="rope")).eval()
    tokens = torch.randint(0, 64, (2, S))
    cache = InferenceParams(S)
    with torch.no_grad():
        whole = model(tokens)
        pieces = []
        for start, end in ((0, 5), (5, 6), (6, S)):
            pieces.append(model(tokens[:, start:end], inference_params=cache))
            cache.sequence_len_offset = end
        unwindowed = GPTModel(_config(attention_backend=backend,
                                      position_embedding_type="rope")).eval()
        unwindowed.load_state_dict(model.state_dict())
        assert not torch.allclose(unwindowed(tokens), whole, atol=1e-3)  # the window matters
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)
