"""The compiled element-wise functions (`mp.jit`, run here with inductor's C++ backend).
Bias-dropout-add: the same function as the eager one, masks from the right random stream under
TP, and activation checkpointing replays its masks bit for bit. Bias-GeLU and bias-SwiGLU: the
activations' formulas in float64, values and gradients."""

import math

import pytest
import torch
import torch.distributed as dist

from checks import assert_rel_close, jit_compiled_on_cpu, seeded
from harness import run_distributed
from mp import parallel_state as ps
from mp import tensor_parallel as tp_
from mp.estimate import SavedTensorMeter
from mp.jit import jit_fuser
from mp.model.dropout import bias_dropout_add
from mp.model.mlp import bias_gelu, bias_swiglu

SEED = 1234
P = 0.3


def _compiled_against_eager(device: str = "cpu"):
    x, bias, residual, dy = (seeded(shape, seed).to(device) for seed, shape in
                             enumerate([(64, 2, 32), 32, (64, 2, 32), (64, 2, 32)]))
    with jit_compiled_on_cpu():
        for training, p in ((False, P), (True, 0.0)):  # no dropout: the same sum
            out = {}
            for fused in (False, True):
                leaves = [t.clone().requires_grad_(True) for t in (x, bias, residual)]
                y = bias_dropout_add(*leaves, p, training, False, fused)
                y.backward(dy)
                out[fused] = [y, *(t.grad for t in leaves)]
            for name, eager, compiled in zip(("out", "dx", "dbias", "dresidual"), *out.values()):
                assert_rel_close(compiled, eager, what=f"{name} training={training} p={p}")

        torch.manual_seed(SEED)
        xs = x.clone().requires_grad_(True)
        y = bias_dropout_add(xs, bias, residual, P, True, False, True)
        y.backward(dy)
        kept = (y - residual) != 0
        assert_rel_close((y - residual)[kept], ((x + bias) / (1 - P))[kept], what="kept values")
        assert abs(1 - kept.float().mean().item() - P) < 0.03, "drop rate"
        assert_rel_close(xs.grad, torch.where(kept, dy / (1 - P), 0.0), what="dx = mask * dy")
        torch.manual_seed(SEED)
        again = bias_dropout_add(x, bias, residual, P, True, False, True)
        assert torch.equal(again, y.detach()), "the same seed gave another mask"


def test_compiled_bias_dropout_add_is_the_eager_function():
    run_distributed(1, _compiled_against_eager)


def _streams(tp: int):
    """Replicated activations: one mask on every TP rank; sequence-parallel shards: a mask
    per rank."""
    ps.initialize_model_parallel(tp)
    tp_.model_parallel_cuda_manual_seed(SEED)
    ones, zeros = torch.ones(16, 2, 64), torch.zeros(16, 2, 64)
    with jit_compiled_on_cpu():
        masks = [bias_dropout_add(ones, None, zeros, 0.5, True, sp, True) != 0
                 for sp in (False, True)]
    group = ps.get_tensor_model_parallel_group()
    for sp, mask in zip((False, True), masks):
        gathered = [torch.empty_like(mask) for _ in range(tp)]
        dist.all_gather(gathered, mask, group=group)
        same = all(torch.equal(gathered[0], m) for m in gathered[1:])
        assert same != sp, f"sequence_parallel={sp}: masks {'differ' if same else 'agree'}"


def test_compiled_masks_follow_the_tp_streams():
    run_distributed(2, _streams, 2)


def _activation_formula(kind: str, up, up_bias, gate=None, gate_bias=None):
    """The activation written out (float64 in, float64 out): erf GeLU, tanh GeLU, SwiGLU."""
    z = up if up_bias is None else up + up_bias
    if kind == "none":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if kind == "tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    g = gate if gate_bias is None else gate + gate_bias
    return g * torch.sigmoid(g) * z


def _compiled_activations(kind: str, bias: bool, dtype: torch.dtype, device: str = "cpu"):
    """The compiled ``kind`` ("none"/"tanh": GeLU's ``approximate``; "swiglu") on ``[64, 2,
    96]`` inputs against the formula in float64 on the same (rounded) inputs."""
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    shapes = [(64, 2, 96), 96, (64, 2, 96), 96] if kind == "swiglu" else [(64, 2, 96), 96]
    inputs = [seeded(shape, seed, dtype, scale=2.0).to(device)
              for seed, shape in enumerate(shapes)]
    if not bias:
        inputs[1::2] = [None] * len(inputs[1::2])
    dy = seeded((64, 2, 96), 9, dtype).to(device)
    leaves = [t if t is None else t.clone().requires_grad_(True) for t in inputs]
    with jit_compiled_on_cpu():
        y = (bias_swiglu(*leaves, fused=True) if kind == "swiglu"
             else bias_gelu(*leaves, kind, fused=True))
        y.backward(dy)
    refs = [t if t is None else t.double().requires_grad_(True) for t in inputs]
    expected = _activation_formula(kind, *refs)
    expected.backward(dy.double())
    assert y.dtype == dtype
    assert_rel_close(y, expected, rtol, what=f"{kind} output")
    for i, (leaf, ref) in enumerate(zip(leaves, refs)):
        if leaf is not None:
            assert_rel_close(leaf.grad, ref.grad, rtol, what=f"{kind} grad of input {i}")


@pytest.mark.parametrize("kind", ["none", "tanh", "swiglu"], ids=["gelu", "gelu_tanh", "swiglu"])
def test_compiled_bias_activations_follow_the_formulas(kind):
    run_distributed(1, _compiled_activations, kind, True, torch.float32)
    run_distributed(1, _compiled_activations, kind, False, torch.bfloat16)


class _Block(torch.nn.Module):
    """Linear -> bias-dropout-add (replicated) -> linear -> bias-dropout-add (TP stream)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(16, 16, generator=g) / 4) for _ in range(2)])
        self.b = torch.nn.Parameter(torch.randn(16, generator=g))

    def forward(self, x):
        x = bias_dropout_add(x @ self.w[0], self.b, x, P, True, False, True)
        x = bias_dropout_add(x @ self.w[1], self.b, x, P, True, True, True)
        return torch.tanh(x)


def _checkpoint_replays(tp: int, device: str = "cpu"):
    ps.initialize_model_parallel(tp)
    block = _Block().to(device)
    x0 = seeded((8, 2, 16), 1).to(device)
    results = []
    with jit_compiled_on_cpu():
        for use_checkpoint in (False, True):
            tp_.model_parallel_cuda_manual_seed(SEED)
            block.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_(True)
            y = tp_.checkpoint(block, False, x) if use_checkpoint else block(x)
            y.pow(2).sum().backward()
            results.append([y.detach(), x.grad, *[p.grad for p in block.parameters()]])
    for plain, ckpt in zip(*results):
        assert torch.equal(plain, ckpt), "the recomputed masks differ from the forward's"


def test_checkpoint_replays_compiled_masks():
    run_distributed(2, _checkpoint_replays, 2)


def _dropout_traced_then_alone() -> list[torch.dtype]:
    """The dtypes a fused dropout saves when called alone, after an enclosing compile (as
    ``compile_layers`` does) traced it first."""
    drop = jit_fuser(lambda x: torch.nn.functional.dropout(x, P, True))
    x = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    with jit_compiled_on_cpu():
        torch.compile(lambda t: drop(t) * 2, backend="eager", fullgraph=True)(x)
        with SavedTensorMeter() as meter:
            drop(x)
    return [dtype for _, dtype, _, _ in meter.entries]


def test_a_function_traced_by_an_enclosing_compile_still_compiles_alone():
    """Its own compiled build saves a bool mask (eager CPU dropout saves bf16 noise). The
    build once became the eager function for good when the first call came while an
    enclosing compile traced it."""
    assert run_distributed(1, _dropout_traced_then_alone)[0] == [torch.bool]


def test_a_compiler_failure_falls_back_to_eager_once(monkeypatch, caplog):
    """No Triton or C++ compiler: one notice, the eager result, and no further attempts."""
    from torch._dynamo.exc import TorchDynamoException

    from mp import jit

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            attempts.append(1)
            raise TorchDynamoException("no working compiler\nthe details")
        return compiled

    attempts = []
    monkeypatch.setattr(jit, "_broken", [])
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setenv("MP_JIT_FUSION_CPU", "1")
    square_plus_one = jit.jit_fuser(lambda x: x * x + 1)
    x = seeded(5, 1)
    with caplog.at_level("WARNING", logger="mp.jit"):
        assert torch.equal(square_plus_one(x), x * x + 1)
        assert torch.equal(square_plus_one(x), x * x + 1)
    assert attempts == [1], "compiled again after a failure"
    assert [r.getMessage() for r in caplog.records] == [
        "mp.jit: torch.compile failed (no working compiler); fused functions run eagerly"]
    assert not jit.compiles_on(x.device)
