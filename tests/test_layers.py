"""Tensor-parallel layers against a float64 dense reference built from the same full weights:
outputs, input gradients and every parameter gradient, with and without sequence
parallelism, at TP = 1, 2, 4, 8."""

import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from checks import assert_rel_close, seeded
from harness import run_distributed
from mp import parallel_state as ps
from mp import tensor_parallel as tp_

S, B, IN, OUT, VOCAB = 8, 2, 24, 16, 40
INIT = functools.partial(nn.init.normal_, std=0.3)
SEED = 1234


def _full_weight(shape) -> torch.Tensor:
    """What a serial layer gets from INIT with the same seed."""
    torch.manual_seed(SEED)
    return INIT(torch.empty(shape))


def _check_column(t: int, sequence_parallel: bool, gather_output: bool):
    ps.initialize_model_parallel(t)
    r = ps.get_tensor_model_parallel_rank()
    torch.manual_seed(SEED)
    layer = tp_.ColumnParallelLinear(IN, OUT, gather_output=gather_output, init_method=INIT,
                                     sequence_parallel=sequence_parallel)
    w, b = _full_weight((OUT, IN)), seeded(OUT, 3)
    assert torch.equal(layer.weight.detach(), w.chunk(t, 0)[r]), "init is not serial-equivalent"
    assert (layer.weight.partition_dim, layer.weight.global_shape) == (0, (OUT, IN))
    assert layer.weight.shard_offset == (r * OUT // t, 0)
    with torch.no_grad():
        layer.bias.copy_(b.chunk(t)[r])

    x, dy = seeded((S, B, IN), 1), seeded((S, B, OUT), 2)
    x_local = (x.chunk(t, 0)[r] if sequence_parallel else x).clone().requires_grad_(True)
    y, bias = layer(x_local * 1.0)
    assert bias is None
    y.backward(dy if gather_output else dy.chunk(t, -1)[r])

    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True)
    y64 = x64 @ w64.t() + b64
    y64.backward(dy.double())
    assert_rel_close(y, y64 if gather_output else y64.chunk(t, -1)[r], what="output")
    assert_rel_close(x_local.grad, x64.grad.chunk(t, 0)[r] if sequence_parallel else x64.grad,
                     what="input grad")
    assert_rel_close(layer.weight.grad, w64.grad.chunk(t, 0)[r], what="weight grad")
    assert_rel_close(layer.bias.grad, b64.grad.chunk(t)[r], what="bias grad")


@pytest.mark.parametrize("t", [1, 2, 4, 8])
@pytest.mark.parametrize("sp,gather", [(False, False), (False, True), (True, False)])
def test_column_parallel_linear(t, sp, gather):
    run_distributed(t, _check_column, t, sp, gather)


def _check_row(t: int, sequence_parallel: bool, input_is_parallel: bool, skip_bias_add: bool):
    ps.initialize_model_parallel(t)
    r = ps.get_tensor_model_parallel_rank()
    torch.manual_seed(SEED)
    layer = tp_.RowParallelLinear(IN, OUT, input_is_parallel=input_is_parallel, init_method=INIT,
                                  sequence_parallel=sequence_parallel,
                                  skip_bias_add=skip_bias_add)
    w, b = _full_weight((OUT, IN)), seeded(OUT, 3)
    assert torch.equal(layer.weight.detach(), w.chunk(t, 1)[r]), "init is not serial-equivalent"
    assert layer.bias.sequence_parallel == sequence_parallel
    assert not layer.bias.tensor_model_parallel
    with torch.no_grad():
        layer.bias.copy_(b)

    x, dy = seeded((S, B, IN), 1), seeded((S, B, OUT), 2)
    x_local = (x.chunk(t, -1)[r] if input_is_parallel else x).clone().requires_grad_(True)
    y, bias = layer(x_local * 1.0)
    if skip_bias_add:
        assert bias is layer.bias
        y = y + bias
    else:
        assert bias is None
    y.backward(dy.chunk(t, 0)[r] if sequence_parallel else dy)

    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True)
    y64 = x64 @ w64.t() + b64
    y64.backward(dy.double())
    assert_rel_close(y, y64.chunk(t, 0)[r] if sequence_parallel else y64, what="output")
    assert_rel_close(x_local.grad, x64.grad.chunk(t, -1)[r] if input_is_parallel else x64.grad,
                     what="input grad")
    assert_rel_close(layer.weight.grad, w64.grad.chunk(t, 1)[r], what="weight grad")
    bias_grad = layer.bias.grad.clone()
    if sequence_parallel:  # each rank saw 1/t of the sequence: the full grad is the TP sum
        dist.all_reduce(bias_grad, group=ps.get_tensor_model_parallel_group())
    assert_rel_close(bias_grad, b64.grad, what="bias grad")


@pytest.mark.parametrize("t", [1, 2, 4, 8])
@pytest.mark.parametrize("sp,input_is_parallel,skip_bias_add", [
    (False, True, False), (False, False, False), (True, True, False), (False, True, True)])
def test_row_parallel_linear(t, sp, input_is_parallel, skip_bias_add):
    run_distributed(t, _check_row, t, sp, input_is_parallel, skip_bias_add)


def _check_embedding(t: int, reduce_scatter: bool):
    ps.initialize_model_parallel(t)
    r = ps.get_tensor_model_parallel_rank()
    torch.manual_seed(SEED)
    layer = tp_.VocabParallelEmbedding(VOCAB, IN, init_method=INIT,
                                       reduce_scatter_embeddings=reduce_scatter)
    w = _full_weight((VOCAB, IN))
    assert torch.equal(layer.weight.detach(), w.chunk(t, 0)[r])
    assert (layer.vocab_start_index, layer.vocab_end_index) == (r * VOCAB // t,
                                                                (r + 1) * VOCAB // t)
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(5))
    ids[0, :4] = torch.tensor([0, VOCAB - 1, VOCAB // 2, VOCAB // 2 - 1])  # range edges
    dy = seeded((S, B, IN) if reduce_scatter else (B, S, IN), 2)
    y = layer(ids)
    y.backward(dy.chunk(t, 0)[r] if reduce_scatter else dy)

    w64 = w.double().requires_grad_(True)
    y64 = w64[ids]
    if reduce_scatter:
        y64 = y64.transpose(0, 1)
    y64.backward(dy.double())
    assert_rel_close(y, y64.chunk(t, 0)[r] if reduce_scatter else y64, what="output")
    assert_rel_close(layer.weight.grad, w64.grad.chunk(t, 0)[r], what="weight grad")


@pytest.mark.parametrize("t", [1, 2, 4, 8])
@pytest.mark.parametrize("reduce_scatter", [False, True])
def test_vocab_parallel_embedding(t, reduce_scatter):
    run_distributed(t, _check_embedding, t, reduce_scatter)


def _check_tied_output_layer(t: int):
    """A column-parallel output layer that borrows the embedding's weight (tied embeddings)."""
    ps.initialize_model_parallel(t)
    r = ps.get_tensor_model_parallel_rank()
    torch.manual_seed(SEED)
    emb = tp_.VocabParallelEmbedding(VOCAB, IN, init_method=INIT)
    head = tp_.ColumnParallelLinear(IN, VOCAB, bias=False, skip_weight_param_allocation=True)
    assert head.weight is None
    x, dy = seeded((S, B, IN), 1), seeded((S, B, VOCAB), 2)
    logits, _ = head(x, emb.weight)
    logits.backward(dy.chunk(t, -1)[r])
    w = _full_weight((VOCAB, IN)).double()
    assert_rel_close(logits, (x.double() @ w.t()).chunk(t, -1)[r], what="logits")
    assert_rel_close(emb.weight.grad, (dy.double().reshape(-1, VOCAB).t()
                                       @ x.double().reshape(-1, IN)).chunk(t, 0)[r],
                     what="embedding grad")
    with pytest.raises(ValueError, match="pass weight to forward"):
        head(x)


@pytest.mark.parametrize("t", [1, 2])
def test_tied_output_layer(t):
    run_distributed(t, _check_tied_output_layer, t)


def _check_bad_sizes():
    ps.initialize_model_parallel(4)
    with pytest.raises(ValueError, match="output_size=10 is not divisible by "
                                         "tensor_model_parallel_size=4"):
        tp_.ColumnParallelLinear(8, 10)
    with pytest.raises(ValueError, match="input_size=6 is not divisible by "
                                         "tensor_model_parallel_size=4"):
        tp_.RowParallelLinear(6, 8)
    with pytest.raises(ValueError, match="vocabulary size=30 is not divisible by "
                                         "tensor_model_parallel_size=4"):
        tp_.VocabParallelEmbedding(30, 8)
    with pytest.raises(ValueError, match="sequence_parallel=True needs input_is_parallel=True"):
        tp_.RowParallelLinear(8, 8, sequence_parallel=True)


def test_bad_sizes_raise_clear_errors():
    run_distributed(4, _check_bad_sizes)
