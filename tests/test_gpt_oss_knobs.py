"""gpt-oss's layer knobs as Megatron-LM has them, against float64 references written out here:
the quick GeGLU gated unit (``--quick-geglu``: ``g sigmoid(1.702 g)`` times the linear half)
with ``--activation-func-clamp-value`` (the gate half clamped to at most ``c``, the linear half
to ``[-c, c]``, after the biases) and ``--glu-linear-offset`` (added to the linear half), in the
dense MLP (eager and compiled) and the experts; and attention sinks (``--softmax-type``:
off-by-one, a 0 logit in every softmax row's denominator, or learnable, one learned logit per
head) in both attention cores, with masks, windows, grouped keys and queries after cached keys,
gradients of the sinks included. The model at TP 2 (SP) against TP 1 on the same weights
reuses test_gpt_model's check."""

import contextlib

import pytest
import torch
from checks import assert_rel_close, jit_compiled_on_cpu, seeded
from harness import run_distributed
from test_gpt_model import _check_against_tp1
from test_sliding_window import _reference

from mp import parallel_state as ps
from mp.model import TransformerConfig
from mp.model.attention import CoreAttention
from mp.model.attention_masks import sdpa_bias
from mp.model.mlp import MLP
from mp.model.moe.experts import Experts

S, B, H = 6, 2, 16
HEADS, D = 4, 8


def _config(**overrides) -> TransformerConfig:
    kw = dict(num_layers=1, hidden_size=H, num_attention_heads=HEADS, vocab_size=64,
              seq_length=S, hidden_dropout=0.0, attention_dropout=0.0, ffn_hidden_size=24)
    return TransformerConfig(**{**kw, **overrides})


def _glu_reference(up, gate, quick: bool, clamp, offset) -> torch.Tensor:
    """The gated unit in float64 from the biased halves, written as Megatron's unfused MLP."""
    up, gate = up.double(), gate.double()
    if clamp is not None:
        gate = torch.minimum(gate, torch.tensor(clamp, dtype=torch.float64))
        up = torch.maximum(torch.minimum(up, torch.tensor(clamp, dtype=torch.float64)),
                           torch.tensor(-clamp, dtype=torch.float64))
    act = gate * torch.sigmoid(1.702 * gate) if quick else gate * torch.sigmoid(gate)
    return act * (up + offset)


GLU_CASES = {  # name -> (activation, clamp, offset)
    "quick_geglu": ("quick_geglu", None, 0.0),
    "quick_geglu_clamp_offset": ("quick_geglu", 0.7, 1.0),
    "swiglu_clamp_offset": ("swiglu", 0.7, -0.5),
}


def _check_mlp(case: str, compiled: bool):
    ps.initialize_model_parallel(1)
    activation, clamp, offset = GLU_CASES[case]
    cfg = _config(activation=activation, activation_func_clamp_value=clamp,
                  glu_linear_offset=offset, bias_activation_fusion=compiled)
    torch.manual_seed(0)
    mlp = MLP(cfg)
    with torch.no_grad():
        for i, p in enumerate(mlp.parameters()):
            p.copy_(seeded(p.shape, 10 + i, scale=0.4))
    x = seeded((S, B, H), 1).requires_grad_()
    with jit_compiled_on_cpu() if compiled else contextlib.nullcontext():
        out, bias = mlp(x)
    probe = seeded(out.shape, 2)
    (out * probe).sum().backward()
    named = [(n, p) for n, p in mlp.named_parameters() if n != "linear_fc2.bias"]  # returned
    params = [x] + [p for _, p in named]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    fc1, gate_layer, fc2 = mlp.linear_fc1, mlp.linear_gate, mlp.linear_fc2
    up = x.double() @ fc1.weight.double().T + fc1.bias.double()
    gate = x.double() @ gate_layer.weight.double().T + gate_layer.bias.double()
    if clamp is not None:  # the clamp bites on both halves, on both sides of the linear one
        assert (gate > clamp).any() and (up > clamp).any() and (up < -clamp).any()
    expected = _glu_reference(up, gate, activation == "quick_geglu", clamp, offset) \
        @ fc2.weight.double().T
    assert_rel_close(out, expected, rtol=1e-6, what="MLP output")
    assert bias is fc2.bias
    (expected * probe.double()).sum().backward()
    names = ["input"] + [n for n, _ in named]
    for name, g, p in zip(names, got, params):
        assert_rel_close(g, p.grad, rtol=1e-6, what=f"gradient of {name}")


@pytest.mark.parametrize("case", list(GLU_CASES))
def test_gated_mlp_equals_the_float64_unit(case):
    run_distributed(1, _check_mlp, case, False)


def test_compiled_quick_geglu_equals_the_float64_unit():
    run_distributed(1, _check_mlp, "quick_geglu_clamp_offset", True)


def _check_experts(grouped: bool):
    """Two experts of four (EP rank 1 of 2): each runs the unit on its rows."""
    ps.initialize_model_parallel(1)
    cfg = _config(activation="quick_geglu", activation_func_clamp_value=0.7,
                  glu_linear_offset=1.0, num_moe_experts=4, moe_ffn_hidden_size=12,
                  expert_model_parallel_size=2, moe_grouped_gemm=grouped,
                  bias_activation_fusion=False)
    torch.manual_seed(0)
    experts = Experts(cfg, ps.get_tensor_model_parallel_group(), ep_rank=1, ep_size=2)
    with torch.no_grad():
        for i, p in enumerate(experts.parameters()):
            p.copy_(seeded(p.shape, 20 + i, scale=0.4))
    counts = [3, 5]
    tokens = seeded((sum(counts), H), 3)
    out = experts(tokens, counts)
    rows = tokens.double().split(counts)
    expected = []
    for e, r in enumerate(rows):
        up = r @ experts.fc1_weight[e].double().T + experts.fc1_bias[e].double()
        gate = r @ experts.gate_weight[e].double().T + experts.gate_bias[e].double()
        y = _glu_reference(up, gate, True, 0.7, 1.0) @ experts.fc2_weight[e].double().T
        expected.append(y + experts.fc2_bias[e].double())
    assert_rel_close(out, torch.cat(expected), rtol=1e-6, what="experts' output")


def test_experts_take_the_gated_unit():
    run_distributed(1, _check_experts, False)


SINK_CASES = {  # name -> (backend, softmax_type, groups, window, documents, queries)
    "sdpa_learnable": ("sdpa", "learnable", HEADS, None, False, S),
    "unfused_learnable_gqa_window": ("unfused", "learnable", 2, 2, False, S),
    "sdpa_learnable_gqa_documents_after_keys": ("sdpa", "learnable", 2, None, True, 4),
    "unfused_off_by_one_documents": ("unfused", "off-by-one", HEADS, None, True, S),
    "sdpa_off_by_one_window_after_keys": ("sdpa", "off-by-one", HEADS, 3, False, 4),
}


def _check_sinks():
    ps.initialize_model_parallel(1)
    for name, (backend, kind, groups, window, documents, queries) in SINK_CASES.items():
        cfg = _config(attention_backend=backend, softmax_type=kind, num_query_groups=groups,
                      kv_channels=D, hidden_size=HEADS * D)
        core = CoreAttention(cfg, window)
        if kind == "learnable":
            with torch.no_grad():  # logits that matter beside scores of O(1)
                core.softmax_offset.copy_(seeded((HEADS,), 5, scale=1.5))
            sinks = core.softmax_offset
        else:
            sinks = torch.zeros(HEADS)
            assert not list(core.parameters())
        g = torch.Generator().manual_seed(queries)
        q = torch.randn(queries, B, HEADS, D, generator=g, requires_grad=True)
        k, v = (torch.randn(S, B, groups, D, generator=g, requires_grad=True) for _ in range(2))
        mask = given = None
        if documents:  # a document ends after key 2: later queries do not see keys 0..2
            positions = torch.arange(S - queries, S)[:, None]
            keys = torch.arange(S)
            mask = (keys > positions) | ((positions > 2) & (keys <= 2))
            given = (sdpa_bias(mask, torch.float32) if backend == "sdpa" else mask)[None, None]
        out = core(q, k, v, given)
        probe = torch.randn(out.shape, generator=g)
        (out * probe).sum().backward()
        leaves = [q, k, v] + ([core.softmax_offset] if kind == "learnable" else [])
        got = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        expected = _reference(q, k, v, window, mask, sinks)
        assert_rel_close(out, expected, rtol=1e-6, what=f"{name}: output")
        (expected * probe.double()).sum().backward()
        for label, a, t in zip("qkvs", got, leaves):
            assert_rel_close(a, t.grad, rtol=1e-6, what=f"{name}: gradient of {label}")


def test_attention_sinks_equal_the_float64_softmax():
    run_distributed(1, _check_sinks)


GPT_OSS = {"activation": "quick_geglu", "activation_func_clamp_value": 0.1,
           "glu_linear_offset": 1.0, "softmax_type": "learnable", "normalization": "RMSNorm",
           "position_embedding_type": "rope", "num_attention_heads": 8, "num_query_groups": 4,
           "window_size": [3, 0], "window_attn_skip_freq": 2}


@pytest.mark.parametrize("overrides", [
    {**GPT_OSS, "sequence_parallel": True},
    {**GPT_OSS, "attention_backend": "unfused", "softmax_type": "off-by-one",
     "num_moe_experts": 4, "moe_ffn_hidden_size": 16, "moe_router_topk": 2},
], ids=["sdpa_learnable_sp", "unfused_off_by_one_moe"])
def test_gpt_oss_layers_at_tp2_equal_tp1(overrides):
    run_distributed(2, _check_against_tp1, 2, overrides)


@pytest.mark.parametrize("overrides,message", [
    ({"activation_func_clamp_value": 7.0}, "needs activation 'swiglu' or 'quick_geglu'"),
    ({"glu_linear_offset": 1.0, "activation": "squared_relu"}, "glu_linear_offset=1.0 acts"),
    ({"activation": "quick_geglu", "activation_func_clamp_value": 0.0}, "must be > 0"),
    ({"softmax_type": "sink"}, "softmax_type='sink' must be one of"),
    # every cp_comm_type takes sinks; the hierarchical one needs its sizes
    ({"softmax_type": "learnable", "context_parallel_size": 2, "cp_comm_type": "a2a+p2p"},
     r"cp_comm_type='a2a\+p2p' needs hierarchical_context_parallel_sizes \[A, P\]"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(**overrides)


def test_megatron_flags_set_the_knobs():
    from test_config import shipped
    m = shipped("gpt-tiny", "--quick-geglu", "--activation-func-clamp-value", "7",
                "--glu-linear-offset", "1", "--softmax-type", "learnable").model
    assert (m.activation, m.activation_func_clamp_value, m.glu_linear_offset,
            m.softmax_type) == ("quick_geglu", 7.0, 1.0, "learnable")


def test_megatron_checkpoints_carry_the_knobs_and_hugging_face_refuses_them():
    """Megatron's args carry the four options both ways, the sinks' logits keep Megatron's
    name, quick GeGLU's fused ``[gate; up]`` splits as SwiGLU's; Hugging Face exports refuse."""
    from mp.checkpointing import hf_gpt2, hf_llama_config
    from mp.checkpointing.megatron import config_from_args, fused_gate, megatron_names
    from mp.checkpointing.megatron_export import args_from_config, check_exportable

    cfg = _config(**{k: v for k, v in GPT_OSS.items() if k not in ("window_size",
                                                                  "window_attn_skip_freq")},
                  hidden_size=32, add_bias_linear=False)
    check_exportable(cfg)  # every field read back as it was
    args = args_from_config(cfg)
    assert (args.quick_geglu, args.swiglu, args.activation_func_clamp_value,
            args.glu_linear_offset, args.softmax_type) == (True, False, 0.1, 1.0, "learnable")
    back = config_from_args(args, vocab_size=cfg.vocab_size)
    assert (back.activation, back.softmax_type) == ("quick_geglu", "learnable")
    sink = "decoder.layers.0.self_attention.core_attention.softmax_offset"
    assert megatron_names(cfg)[sink] == sink
    assert fused_gate(cfg, "decoder.layers.0.mlp.linear_fc1.weight") == \
        ("decoder.layers.0.mlp.linear_gate.weight", 0)
    llama = dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
                 add_bias_linear=False)
    for overrides, refused in (({"activation_func_clamp_value": 7.0}, "clamp_value=7.0"),
                               ({"glu_linear_offset": 1.0}, "glu_linear_offset=1.0"),
                               ({"softmax_type": "off-by-one"}, "softmax_type='off-by-one'")):
        with pytest.raises(ValueError, match=refused):
            hf_llama_config.hf_config(_config(**llama, **overrides))
    with pytest.raises(ValueError, match="softmax_type='learnable'"):
        hf_gpt2.hf_config(_config(softmax_type="learnable"))
