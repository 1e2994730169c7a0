"""FP8 linear layers (`mp.tensor_parallel.fp8`) against a float64 reference that quantizes
the whole tensors by the recipe written out here: outputs, input gradients and every parameter
gradient of column- and row-parallel layers at TP 1, 2, 4 (with and without sequence
parallelism), so a TP layout scales as one process does; and the quantization itself against
the float8 formats' limits."""

import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from checks import assert_rel_close, jit_compiled_on_cpu, seeded
from harness import run_distributed
from mp import parallel_state as ps
from mp import tensor_parallel as tp_
from mp.tensor_parallel.fp8 import E4M3, E5M2, Fp8Recipe, check_fp8_device, quantize

S, B, IN, OUT = 8, 2, 64, 128  # 16 tokens; every shard a multiple of 16 up to TP 4
INIT = functools.partial(nn.init.normal_, std=0.3)
SEED = 1234


def fake_quantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64: ``t`` scaled by ``finfo(dtype).max / amax(t)`` in fp32, rounded to ``dtype``,
    scaled back."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().max().float()
    q = (t.detach().float() * (fmax / amax)).clamp(-fmax, fmax).to(dtype)
    return q.double() * (amax.double() / fmax)


def reference(x, w, b, dy, recipe: Fp8Recipe):
    """``y, dx, dw, db`` of ``y = x w^T + b`` with FP8 products, in float64."""
    grad_dtype = E5M2 if recipe.format == "hybrid" else E4M3
    xq, wq, dyq = fake_quantized(x, E4M3), fake_quantized(w, E4M3), fake_quantized(dy, grad_dtype)
    rows = lambda t: t.reshape(-1, t.size(-1))  # noqa: E731
    dw = rows(dyq).t() @ rows(xq) if recipe.wgrad else rows(dy.double()).t() @ rows(x.double())
    return xq @ wq.t() + b.double(), dyq @ wq, dw, rows(dy.double()).sum(0)


RECIPES = [Fp8Recipe("hybrid"), Fp8Recipe("e4m3"), Fp8Recipe("hybrid", wgrad=False)]


def _check_column(t: int, sp: bool, recipe: Fp8Recipe):
    ps.initialize_model_parallel(t)
    r = ps.get_tensor_model_parallel_rank()
    torch.manual_seed(SEED)
    layer = tp_.ColumnParallelLinear(IN, OUT, init_method=INIT, sequence_parallel=sp, fp8=recipe)
    b = seeded(OUT, 3)
    with torch.no_grad():
        layer.bias.copy_(b.chunk(t)[r])
    w = torch.cat(_gathered(layer.weight.detach(), 0))
    x, dy = seeded((S, B, IN), 1), seeded((S, B, OUT), 2, scale=1e-3)
    x_local = (x.chunk(t, 0)[r] if sp else x).clone().requires_grad_(True)
    y, _ = layer(x_local * 1.0)
    y.backward(dy.chunk(t, -1)[r])
    y64, dx64, dw64, db64 = reference(x, w, b, dy, recipe)
    assert_rel_close(y, y64.chunk(t, -1)[r], rtol=1e-5, what="output")
    assert_rel_close(x_local.grad, dx64.chunk(t, 0)[r] if sp else dx64, rtol=1e-5,
                     what="input grad")
    assert_rel_close(layer.weight.grad, dw64.chunk(t, 0)[r], rtol=1e-5, what="weight grad")
    assert_rel_close(layer.bias.grad, db64.chunk(t)[r], rtol=1e-5, what="bias grad")


def _check_row(t: int, sp: bool, recipe: Fp8Recipe):
    ps.initialize_model_parallel(t)
    r = ps.get_tensor_model_parallel_rank()
    torch.manual_seed(SEED)
    layer = tp_.RowParallelLinear(IN, OUT, input_is_parallel=True, init_method=INIT,
                                  sequence_parallel=sp, fp8=recipe)
    b = seeded(OUT, 3)
    with torch.no_grad():
        layer.bias.copy_(b)
    w = torch.cat(_gathered(layer.weight.detach(), 1), dim=1)
    x, dy = seeded((S, B, IN), 1), seeded((S, B, OUT), 2, scale=1e-3)
    x_local = x.chunk(t, -1)[r].clone().requires_grad_(True)
    y, _ = layer(x_local * 1.0)
    y.backward(dy.chunk(t, 0)[r] if sp else dy)
    y64, dx64, dw64, _ = reference(x, w, b, dy, recipe)
    assert_rel_close(y, y64.chunk(t, 0)[r] if sp else y64, rtol=1e-5, what="output")
    assert_rel_close(x_local.grad, dx64.chunk(t, -1)[r], rtol=1e-5, what="input grad")
    assert_rel_close(layer.weight.grad, dw64.chunk(t, 1)[r], rtol=1e-5, what="weight grad")


def _gathered(shard: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Every TP rank's ``shard``, in rank order (the whole weight the layer drew)."""
    parts = [torch.empty_like(shard) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


@pytest.mark.parametrize("recipe", RECIPES, ids=["hybrid", "e4m3", "hybrid-no-fp8-wgrad"])
@pytest.mark.parametrize("t,sp", [(1, False), (2, False), (2, True), (4, True)])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_fp8_linear_matches_whole_tensor_quantization(kind, t, sp, recipe):
    run_distributed(t, _check_column if kind == "column" else _check_row, t, sp, recipe)


@pytest.mark.parametrize("dtype,mantissa_bits", [(E4M3, 3), (E5M2, 2)])
def test_quantize_fills_the_format(dtype, mantissa_bits):
    t = seeded((64, 48), 7, scale=5.0)
    t[3, 5] = -40.0  # the amax, negative
    q = quantize(t, dtype)
    assert q.data.dtype == dtype and q.scale_inv.dtype == torch.float32
    assert q.data.float()[3, 5] == -torch.finfo(dtype).max  # the amax meets the format's max
    back = q.data.float() * q.scale_inv
    info = torch.finfo(dtype)
    normal = t.abs() * (info.max / 40.0) >= info.smallest_normal  # a full mantissa's range
    error = ((back - t).abs() / t.abs())[normal]
    assert error.max() <= 2.0 ** -(mantissa_bits + 1) * 1.0001  # half a unit in the last place
    zeros = quantize(torch.zeros(16, 16), dtype)
    assert zeros.scale_inv == 1 and not zeros.data.float().any()
    assert quantize(torch.tensor([1.0, float("nan")]), dtype).data.float().isnan().any()


def _check_amax_group():
    ps.initialize_model_parallel(2)
    r, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    t = seeded((32, 16), 4)
    whole = quantize(t, E4M3)
    shard = quantize(t.chunk(2)[r], E4M3, group)
    assert torch.equal(shard.scale_inv, whole.scale_inv)
    assert torch.equal(shard.data.float(), whole.data.float().chunk(2)[r])


def test_amax_reduced_over_the_group():
    run_distributed(2, _check_amax_group)


def _check_sizes():
    ps.initialize_model_parallel(2)
    with pytest.raises(ValueError, match="out_features=24 is not a multiple of 16"):
        tp_.ColumnParallelLinear(64, 48, fp8=Fp8Recipe())
    with pytest.raises(ValueError, match="in_features=8 is not a multiple of 16"):
        tp_.RowParallelLinear(16, 32, input_is_parallel=True, fp8=Fp8Recipe())
    layer = tp_.ColumnParallelLinear(64, 64, fp8=Fp8Recipe())
    with pytest.raises(ValueError, match=r"\[12, 64\] x \[64, 32\]: m=12 is not a multiple"):
        layer(torch.ones(6, 2, 64))
    with pytest.raises(ValueError, match="format='e5m2': must be one of"):
        Fp8Recipe("e5m2")


def test_sizes_fp8_cannot_multiply_are_refused():
    run_distributed(2, _check_sizes)


def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer \(Ada, Hopper, "
                                         r"Blackwell\); NVIDIA A100 is 8.0"):
        check_fp8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda"))
    check_fp8_device(torch.device("cpu"))


def _check_compiled_cast():
    for dtype in (E4M3, E5M2):
        t = seeded((96, 80), 8, dtype=torch.bfloat16, scale=3.0)
        eager = quantize(t, dtype)
        with jit_compiled_on_cpu():
            compiled = quantize(t, dtype)
        assert torch.equal(compiled.scale_inv, eager.scale_inv)
        assert torch.equal(compiled.data.view(torch.uint8), eager.data.view(torch.uint8))


def test_compiled_scale_and_cast_quantizes_as_eagerly():
    """On CUDA the scale and cast run as one compiled kernel (`mp.jit`): the same bytes (in a
    rank, as the other compiled tests: the test process itself never imports the compiler)."""
    run_distributed(1, _check_compiled_cast)


def _amax_reductions(kind: str) -> int:
    """All-reduces (max) in one forward+backward of a TP 2 + SP FP8 layer of ``kind``."""
    ps.initialize_model_parallel(2)
    column = kind == "column"
    layer = (tp_.ColumnParallelLinear(IN, OUT, sequence_parallel=True, fp8=Fp8Recipe())
             if column else tp_.RowParallelLinear(IN, OUT, input_is_parallel=True,
                                                   sequence_parallel=True, fp8=Fp8Recipe()))
    x = seeded((S // 2, B, IN) if column else (S, B, IN // 2), 1).requires_grad_()
    calls, all_reduce = [], dist.all_reduce

    def counted(tensor, op=dist.ReduceOp.SUM, *args, **kwargs):
        calls.append(op)
        return all_reduce(tensor, op, *args, **kwargs)

    dist.all_reduce = counted
    try:
        layer(x)[0].sum().backward()
    finally:
        dist.all_reduce = all_reduce
    return calls.count(dist.ReduceOp.MAX)


def test_operands_every_rank_holds_whole_skip_the_amax_reduction():
    """A column-parallel layer's (gathered) input and a row-parallel layer's output gradient
    are the same on every TP rank: their amaxes are not all-reduced. Left: the weight in the
    forward and the input gradient's product, and the sharded operand once or twice."""
    assert run_distributed(2, _amax_reductions, "column") == [3, 3]  # w, w, dy
    assert run_distributed(2, _amax_reductions, "row") == [4, 4]  # x, w, w, x
