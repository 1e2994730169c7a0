"""``qk_layernorm`` and ``activation="squared_relu"`` against float64 references written out
here: the attention's normalized queries and keys are each head of the QKV projection's
output normalized over its ``kv_channels`` (LayerNorm or RMSNorm, eps, zero-centred weight),
one weight shared by all query heads and one by all key heads; the MLP's activation is
``relu(x + bias)^2``, eager and compiled."""

import contextlib

import pytest
import torch
from checks import assert_rel_close, jit_compiled_on_cpu, seeded
from harness import run_distributed

from mp import parallel_state as ps
from mp.model import TransformerConfig
from mp.model.attention import SelfAttention
from mp.model.mlp import MLP

S, B, H, HEADS, GROUPS, D = 6, 2, 32, 8, 2, 12
EPS = 1e-3


def _config(**overrides) -> TransformerConfig:
    kw = dict(num_layers=1, hidden_size=H, num_attention_heads=HEADS, vocab_size=64,
              seq_length=S, num_query_groups=GROUPS, kv_channels=D, qk_layernorm=True,
              layernorm_epsilon=EPS, hidden_dropout=0.0, attention_dropout=0.0)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _reference_norm(x: torch.Tensor, weight, bias, layer_norm: bool) -> torch.Tensor:
    """Each ``[d]`` row of ``x`` normalized in float64."""
    x = x.double()
    if layer_norm:
        x = x - x.mean(-1, keepdim=True)
    y = x / (x.square().mean(-1, keepdim=True) + EPS).sqrt()
    return y * weight.double() + (0 if bias is None else bias.double())


def _check_normalized_heads(normalization: str, zero_centered: bool):
    ps.initialize_model_parallel(1)
    cfg = _config(normalization=normalization, layernorm_zero_centered_gamma=zero_centered)
    attention = SelfAttention(cfg)
    layer_norm = normalization == "LayerNorm"
    with torch.no_grad():
        for i, norm in enumerate((attention.q_layernorm, attention.k_layernorm)):
            for j, p in enumerate(norm.parameters()):
                p.copy_(seeded(p.shape, 10 * i + j, scale=0.5))
    seen = {}
    for name in ("q_layernorm", "k_layernorm"):
        getattr(attention, name).register_forward_hook(
            lambda _, args, out, name=name: seen.__setitem__(name, out))
    x = seeded((S, B, H), 1)
    attention(x)

    qkv = x.double() @ attention.query_key_value.weight.double().T \
        + attention.query_key_value.bias.double()
    per_group = qkv.view(S, B, GROUPS, HEADS // GROUPS + 2, D)  # queries, key, value per group
    q = per_group[:, :, :, :-2].reshape(S, B, HEADS, D)
    k = per_group[:, :, :, -2]
    for name, heads in (("q_layernorm", q), ("k_layernorm", k)):
        norm = getattr(attention, name)
        weight = norm.weight + 1 if zero_centered else norm.weight
        expected = _reference_norm(heads, weight.detach(),
                                   norm.bias.detach() if layer_norm else None, layer_norm)
        assert seen[name].shape == expected.shape, name
        assert_rel_close(seen[name], expected, rtol=1e-5, what=name)
    assert (norm.weight.numel(), len(list(norm.parameters()))) == (D, 2 if layer_norm else 1)


@pytest.mark.parametrize("normalization,zero_centered", [("LayerNorm", False),
                                                         ("RMSNorm", True)])
def test_queries_and_keys_are_normalized_per_head(normalization, zero_centered):
    run_distributed(1, _check_normalized_heads, normalization, zero_centered)


def _check_squared_relu(compiled: bool):
    ps.initialize_model_parallel(1)
    cfg = _config(activation="squared_relu", bias_activation_fusion=compiled)
    mlp = MLP(cfg)
    with torch.no_grad():
        mlp.linear_fc1.bias.copy_(seeded(mlp.linear_fc1.bias.shape, 3, scale=0.1))
    x = seeded((S, B, H), 2).requires_grad_()
    with jit_compiled_on_cpu() if compiled else contextlib.nullcontext():
        out, bias = mlp(x)
    up = x.double() @ mlp.linear_fc1.weight.double().T + mlp.linear_fc1.bias.double()
    expected = torch.relu(up) ** 2 @ mlp.linear_fc2.weight.double().T
    assert (up < 0).any() and (up > 0).any(), "relu is the identity or zero on this input"
    assert_rel_close(out, expected, rtol=1e-5, what="MLP output")
    assert bias is mlp.linear_fc2.bias


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_squared_relu_mlp_is_relu_squared(compiled):
    run_distributed(1, _check_squared_relu, compiled)
