"""The experts as grouped GEMMs (``moe_grouped_gemm``, Megatron's ``--moe-grouped-gemm``)
against the experts one after another on the same weights and rows: outputs and every
gradient, with empty experts and group sizes that need padding; the gate that falls back to
the loop; the padding of the groups. On the CPU torch's grouped_mm kernel runs fp32 and bf16
(torch 2.9 and later); tests/gpu/test_gpu_moe.py runs CUDA's in bf16."""

import pytest
import torch
from harness import run_distributed

from mp import parallel_state as ps
from mp.model import TransformerConfig
from mp.model.moe import grouped_gemm
from mp.model.moe.experts import Experts

needs_grouped_mm = pytest.mark.skipif(grouped_gemm._GROUPED_MM is None,
                                      reason="this torch has no grouped_mm")
COUNTS = [5, 0, 12, 3]  # rows of each of 4 experts: an empty one, none a multiple of 4


def _config(**overrides) -> TransformerConfig:
    args = dict(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=16,
                seq_length=8, num_moe_experts=4, moe_ffn_hidden_size=32,
                bias_activation_fusion=False, moe_grouped_gemm=True)
    return TransformerConfig(**{**args, **overrides})


def grouped_and_loop(experts: Experts, rows: torch.Tensor, counts: list[int]) -> list[dict]:
    """The output and every gradient (input, each weight) of ``experts`` on ``rows``, run as
    grouped GEMMs and then as the loop, for the same output gradient."""
    assert grouped_gemm.usable(rows, experts.fc1_weight, experts.fc2_weight), \
        "torch's grouped GEMM does not run here"
    grad = torch.randn_like(rows)
    results = []
    for grouped in (True, False):
        experts.grouped = grouped
        experts.zero_grad()
        x = rows.clone().requires_grad_()
        out = experts(x, counts)
        out.backward(grad)
        results.append({"output": out.detach(), "input": x.grad,
                        **{n: p.grad.clone() for n, p in experts.named_parameters()}})
    return results


def _both_ways(overrides: dict, dtype: torch.dtype) -> list[dict]:
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    cfg = _config(**overrides)
    experts = Experts(cfg, ps.get_tensor_model_parallel_group(), 0, 1).to(dtype)
    return grouped_and_loop(experts, torch.randn(sum(COUNTS), cfg.hidden_size, dtype=dtype),
                            COUNTS)


@needs_grouped_mm
@pytest.mark.parametrize("overrides", [
    {}, {"activation": "swiglu", "add_bias_linear": False},
    {"activation": "squared_relu"}, {"activation": "swiglu"}],
    ids=["gelu-bias", "swiglu-no-bias", "squared-relu-bias", "swiglu-bias"])
def test_grouped_experts_equal_the_loop_in_fp32(overrides):
    grouped, loop = run_distributed(1, _both_ways, overrides, torch.float32)[0]
    assert grouped.keys() == loop.keys() and len(grouped) >= 4
    for name in loop:
        torch.testing.assert_close(grouped[name], loop[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_grouped_mm
def test_grouped_experts_equal_the_loop_in_bf16():
    grouped, loop = run_distributed(1, _both_ways, {"activation": "swiglu"}, torch.bfloat16)[0]
    for name in loop:
        scale = loop[name].float().abs().max()
        assert (grouped[name].float() - loop[name].float()).abs().max() <= 2e-2 * scale, name


def test_groups_are_padded_to_16_bytes():
    """fp32: groups of 5, 0, 12, 3 rows padded to 8, 0, 12, 4; the rows keep their order
    within their group, and the padding is zeros."""
    rows = grouped_gemm.GroupedRows(COUNTS, 4, torch.device("cpu"))
    assert rows.offs.tolist() == [8, 8, 20, 24]
    assert rows.positions.tolist() == [0, 1, 2, 3, 4, *range(8, 20), 20, 21, 22]
    assert rows.group.tolist() == [0] * 8 + [2] * 12 + [3] * 4
    x = torch.arange(1.0, 21.0).unsqueeze(1)
    padded = rows.pad(x)
    assert padded[rows.positions].equal(x) and padded.sum() == x.sum()
    assert rows.unpad(padded).equal(x)
    assert grouped_gemm.GroupedRows(COUNTS, 2, torch.device("cpu")).offs.tolist() == \
        [8, 8, 24, 32]  # bf16: multiples of 8


def test_the_gate_falls_back_where_the_kernel_does_not_run():
    weight = torch.zeros(4, 32, 16)
    if grouped_gemm._GROUPED_MM is None:
        assert not grouped_gemm.usable(torch.zeros(3, 16), weight)
        return
    assert grouped_gemm.usable(torch.zeros(3, 16), weight)
    assert not grouped_gemm.usable(torch.zeros(3, 16, dtype=torch.float64), weight.double())
    assert not grouped_gemm.usable(torch.zeros(3, 6), torch.zeros(4, 32, 6))  # 24-byte rows
    assert not grouped_gemm.usable(torch.zeros(3, 16), weight.bfloat16())  # dtypes differ


def _grouped_calls() -> int:
    """How many of a float64 call and an fp32 call of grouped experts ran grouped GEMMs."""
    ps.initialize_model_parallel(1)
    cfg = _config()
    experts = Experts(cfg, ps.get_tensor_model_parallel_group(), 0, 1).double()
    called = []
    original = grouped_gemm.GroupedRows
    grouped_gemm.GroupedRows = lambda *a: called.append(a) or original(*a)
    try:
        experts(torch.randn(sum(COUNTS), cfg.hidden_size, dtype=torch.float64), COUNTS)
        experts.float()(torch.randn(sum(COUNTS), cfg.hidden_size), COUNTS)
    finally:
        grouped_gemm.GroupedRows = original
    return len(called)


@needs_grouped_mm
def test_float64_experts_loop():
    """The float64 references of tests/test_moe.py run the loop, grouped GEMM asked or not."""
    assert run_distributed(1, _grouped_calls)[0] == 1  # the fp32 call only
