"""Mixture-of-experts layers on a GPU: the experts as torch's grouped GEMM (CUDA's bf16
kernel, ``moe_grouped_gemm``) against the experts one after another on the same weights and
rows, outputs and every gradient, with empty experts and group sizes that need padding; and a
whole MoE layer's forward and backward on CUDA (routing, sort, regrouping, combine)."""

import pytest
import torch
from test_moe_grouped_gemm import grouped_and_loop

from mp import parallel_state as ps
from mp.model import TransformerConfig
from mp.model.moe import MoELayer
from mp.model.moe.experts import Experts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("one_gpu_world", "model_parallel")]

COUNTS = [37, 0, 200, 5, 64, 1, 90, 3]  # rows of 8 experts: an empty one, few multiples of 8


def _config(**overrides) -> TransformerConfig:
    args = dict(num_layers=1, hidden_size=1024, num_attention_heads=8, vocab_size=128,
                seq_length=256, num_moe_experts=8, moe_ffn_hidden_size=512, precision="bf16",
                moe_grouped_gemm=True, hidden_dropout=0.0, attention_dropout=0.0)
    return TransformerConfig(**{**args, **overrides})


@pytest.mark.parametrize("overrides", [{"activation": "swiglu", "add_bias_linear": False},
                                       {}], ids=["swiglu-no-bias", "gelu-bias"])
def test_grouped_gemm_equals_the_loop(overrides):
    torch.manual_seed(0)
    experts = Experts(_config(**overrides), ps.get_tensor_model_parallel_group(), 0, 1)
    rows = torch.randn(sum(COUNTS), 1024, device="cuda", dtype=torch.bfloat16)
    results = grouped_and_loop(experts, rows, COUNTS)
    for name, want in results[1].items():
        got = results[0][name]
        assert torch.isfinite(got).all(), name
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max(), name


def test_moe_layer_forward_and_backward_on_cuda():
    """Top 2 of 8 with both auxiliary losses, bf16: finite, every parameter gets a gradient,
    and the grouped layer agrees with the looping one."""
    torch.manual_seed(0)
    layer = MoELayer(_config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
                             activation="swiglu"))
    x = torch.randn(256, 2, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outputs = []
    for grouped in (True, False):
        layer.experts.grouped = grouped
        layer.zero_grad()
        out, _ = layer(x)
        out.float().square().mean().backward()
        outputs.append(out.detach().float())
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in layer.parameters())
    assert (outputs[0] - outputs[1]).abs().max() <= 2e-2 * outputs[1].abs().max()
