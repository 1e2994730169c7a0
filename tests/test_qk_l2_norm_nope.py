"""Llama 4's two attention options from Megatron-LM: ``qk_l2_norm`` (``--qk-l2-norm``: each
query and key head divided by the root of its mean square plus eps, in fp32, no weights,
before RoPE) and ``no_rope_freq`` (``--no-rope-freq``: layers that skip RoPE). A layer against
a float64 reference written out here (forward and gradients), which layers rotate, the
config's rules and flags, the parallel layouts against one process (TP 2 with SP, CP 2 over
each exchange, PP 2) and the activation estimate at fp32 against what autograd saves (the
bf16 cases are in tests/test_estimate_activations.py)."""

import math

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from test_config import TINY
from test_context_parallel import _check_against_one_process
from test_gpt_model import _check_against_tp1
from test_pipeline import LLAMA, _check_pipeline_training

from mp import parallel_state as ps
from mp.config import parse_args
from mp.estimate import CPU, SavedTensorMeter, layer_terms
from mp.model import GPTModel, TransformerConfig
from mp.model.attention import SelfAttention
from mp.model.rope import rotary_freqs
from mp.model.transformer import TransformerLayer

S, B, HEADS, D, BASE = 6, 2, 4, 8, 10000.0
EPS = 1e-2  # large enough to matter next to the heads' mean squares
LLAMA4 = {"position_embedding_type": "rope", "qk_l2_norm": True, "no_rope_freq": 2}


def _config(**overrides) -> TransformerConfig:
    kw = dict(num_layers=4, hidden_size=HEADS * D, num_attention_heads=HEADS, vocab_size=64,
              seq_length=S, layernorm_epsilon=EPS, hidden_dropout=0.0, attention_dropout=0.0,
              position_embedding_type="rope")
    return TransformerConfig(**{**kw, **overrides})


def _reference(x, weight, bias, dense, dense_bias, groups: int, l2: bool, rotate: bool):
    """The attention in float64, written out: the QKV projection laid out per group
    (``[queries, key, value]``), each q and k head over ``mean(x^2) + EPS`` (``l2``), RoPE
    turning channel ``i`` with ``i + D / 2`` by ``p BASE^(-2i / D)`` at position ``p``
    (``rotate``), causal softmax attention and the output projection."""
    qkv = (x @ weight.T + bias).view(S, B, groups, HEADS // groups + 2, D)
    q = qkv[:, :, :, :-2].reshape(S, B, HEADS, D)
    k, v = (qkv[:, :, :, j].repeat_interleave(HEADS // groups, dim=2) for j in (-2, -1))
    if l2:
        q, k = (t / (t.square().mean(-1, keepdim=True) + EPS).sqrt() for t in (q, k))
    if rotate:
        def turn(t):
            out = t.clone()
            for p in range(S):
                for i in range(D // 2):
                    angle = p * BASE ** (-2 * i / D)
                    c, s = math.cos(angle), math.sin(angle)
                    out[p, ..., i] = t[p, ..., i] * c - t[p, ..., i + D // 2] * s
                    out[p, ..., i + D // 2] = t[p, ..., i + D // 2] * c + t[p, ..., i] * s
            return out
        q, k = turn(q), turn(k)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    context = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v).reshape(S, B, HEADS * D)
    return context @ dense.T + dense_bias


def _check_layers_against_reference(backend: str, groups: int):
    """Layers 1 (rotates) and 2 (NoPE) of ``no_rope_freq=2``, with and without the L2 norm."""
    ps.initialize_model_parallel(1)
    for layer, l2 in ((1, True), (2, True), (2, False), (1, False)):
        cfg = _config(attention_backend=backend, num_query_groups=groups, qk_l2_norm=l2,
                      no_rope_freq=2)
        torch.manual_seed(layer)
        attention = SelfAttention(cfg, layer_number=layer)
        assert attention.rotary == (layer == 1)
        x = seeded((S, B, HEADS * D), 5 + layer, scale=2.0).requires_grad_()
        freqs = rotary_freqs(S, D, BASE, x.device)
        out, out_bias = attention(x, None, freqs)
        out = out + out_bias
        params = [attention.query_key_value.weight, attention.query_key_value.bias,
                  attention.dense.weight, attention.dense.bias]
        ref_x = x.detach().double().requires_grad_()
        ref_params = [p.detach().double().requires_grad_() for p in params]
        ref = _reference(ref_x, *ref_params, groups, l2, layer == 1)
        what = f"layer {layer}, l2 {l2}"
        assert_rel_close(out, ref, what=f"output, {what}")
        upstream = seeded(out.shape, 9)
        out.backward(upstream)
        ref.backward(upstream.double())
        assert_rel_close(x.grad, ref_x.grad, what=f"input gradient, {what}")
        for p, r in zip(params, ref_params):
            assert_rel_close(p.grad, r.grad, what=f"weight gradient, {what}")


@pytest.mark.parametrize("backend,groups", [("sdpa", HEADS), ("unfused", 2)])
def test_attention_equals_the_float64_reference(backend, groups):
    run_distributed(1, _check_layers_against_reference, backend, groups)


@pytest.mark.parametrize("freq, rotates", [
    (None, [True] * 4),
    (2, [True, False, True, False]),  # the 1-based layer numbers 2 divides skip RoPE
    (4, [True, True, True, False]),
    ([1, 0, 0, 1], [False, True, True, False]),
    ("([0]*3+[1])", [True, True, True, False]),  # Megatron's expression, read without eval
])
def test_which_layers_rotate(freq, rotates):
    config = _config(no_rope_freq=freq)
    assert [config.applies_rope(n) for n in range(1, 5)] == rotates
    assert config.applies_rope(5) == rotates[-1]  # multi-token prediction: the last layer's
    assert not _config(position_embedding_type="none").applies_rope(1)
    assert run_distributed(1, _model_rotates, freq)[0] == rotates


def _model_rotates(freq) -> list[bool]:
    ps.initialize_model_parallel(1)
    model = GPTModel(_config(no_rope_freq=freq))
    return [layer.self_attention.rotary for layer in model.decoder.layers]


MLA = {"multi_latent_attention": True, "kv_lora_rank": 16, "qk_head_dim": 8,
       "qk_pos_emb_head_dim": 4, "v_head_dim": 8}


@pytest.mark.parametrize("overrides, message", [
    ({"qk_l2_norm": True, "qk_layernorm": True},
     "qk_l2_norm=True and qk_layernorm=True: choose one"),
    ({"qk_l2_norm": True, **MLA}, "qk_l2_norm=True does not apply to multi_latent_attention"),
    ({"no_rope_freq": 2, **MLA}, "no_rope_freq=2 does not apply to multi_latent_attention"),
    ({"no_rope_freq": 2, "position_embedding_type": "learned_absolute"},
     "no_rope_freq=2 names the layers that skip RoPE: it needs position_embedding_type='rope'"),
    ({"no_rope_freq": 3}, "num_layers=4 is not divisible by no_rope_freq=3"),
    ({"no_rope_freq": 0}, "no_rope_freq=0 must be a positive integer"),
    ({"no_rope_freq": [0, 1]}, r"no_rope_freq=\[0, 1\] must hold a 0 \(RoPE\) or 1 \(no RoPE\) "
     "for each of the num_layers=4 layers"),
    ({"no_rope_freq": "[0]*3+[2]"}, "must hold a 0 \\(RoPE\\) or 1"),
    ({"no_rope_freq": "every other"}, "no_rope_freq='every other' must be an integer"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_megatron_flags():
    flags = ["--config", TINY, "--num-layers", "4", "--position-embedding-type", "rope"]
    model = parse_args(flags + ["--qk-l2-norm", "--no-rope-freq", "([0]*3+[1])"],
                       world_size=4).model
    assert (model.qk_l2_norm, model.no_rope_freq) == (True, [0, 0, 0, 1])
    model = parse_args(flags + ["--no-rope-freq", "2"], world_size=4).model
    assert (model.qk_l2_norm, model.no_rope_freq) == (False, 2)


# --- parallel layouts against one process --------------------------------------------------

def test_tensor_and_sequence_parallel_equal_tp1():
    """TP 2 with SP, grouped queries: each rank normalizes its own heads (no weights to sum)."""
    overrides = {**LLAMA4, "num_layers": 4, "num_attention_heads": 8, "num_query_groups": 4,
                 "sequence_parallel": True}
    run_distributed(2, _check_against_tp1, 2, overrides)


@pytest.mark.parametrize("comm_type", ["all_gather", "a2a", "p2p"])
def test_context_parallel_equals_one_process(comm_type):
    """CP 2: each rank rotates its tokens at their positions, or not at all in layer 2."""
    run_distributed(2, _check_against_one_process, 1, 2,
                    {**LLAMA4, "cp_comm_type": comm_type, "num_query_groups": 2}, False)


def test_pipeline_parallel_equals_one_process():
    """PP 2: each stage's layers skip RoPE by their numbers over the whole model (layers 2 and
    4 of 4 on two stages); training for a few steps matches one process."""
    model = {**LLAMA, **LLAMA4, "num_layers": 4}
    run_distributed(2, _check_pipeline_training, 1, 2, None, 2, False, True, model,
                    timeout=300)


# --- what the attention saves ---------------------------------------------------------------

def _fp32_saves(cases: dict) -> dict:
    """Bytes layers 1 and 2 of each case save for backward (parameters excluded)."""
    ps.initialize_model_parallel(1)
    found = {}
    for name, overrides in cases.items():
        cfg = _config(precision="fp32", num_layers=2, **overrides)
        found[name] = []
        for number in (1, 2):
            layer = TransformerLayer(cfg, number)
            x = torch.randn(S, B, HEADS * D, requires_grad=True)
            with SavedTensorMeter(exclude=layer.parameters()) as meter:
                y = layer(x, None, rotary_freqs(S, D, BASE, x.device))
            y.square().sum().backward()
            found[name].append(meter.bytes)
    return found


FP32_CASES = {  # fp32: the L2 norm keeps its input as it comes (a view of the QKV output)
    "l2_nope": {**LLAMA4},
    "l2_gqa_unfused_nope": {**LLAMA4, "num_query_groups": 2, "attention_backend": "unfused"},
    "nope_gqa_selective": {"no_rope_freq": [1, 0], "num_query_groups": 2,
                           "recompute_granularity": "selective"},
}


def test_fp32_saves_match_the_estimate():
    """Both layers of each case (the second, or the first, without RoPE) to the byte."""
    measured = run_distributed(1, _fp32_saves, FP32_CASES)[0]
    for name, overrides in FP32_CASES.items():
        cfg = _config(precision="fp32", num_layers=2, **overrides)
        expected = [sum(layer_terms(cfg, B, CPU, layer=i).values()) for i in (0, 1)]
        assert measured[name] == expected, name
