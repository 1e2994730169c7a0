"""The tensor/sequence-parallel collectives and the all-to-all of context parallelism,
forward and backward, against the analytic result computed from every rank's (reproducible)
tensors."""

import pytest
import torch
import torch.distributed as dist

from checks import assert_rel_close, seeded
from harness import run_distributed
from mp import parallel_state as ps
from mp import tensor_parallel as tp_

S, B, H = 8, 2, 16  # divisible by every TP size tested


def _per_rank(seed: int, t: int, shape) -> list[torch.Tensor]:
    """The tensor each TP rank contributes; every rank can rebuild all of them."""
    return [seeded(shape, seed * 100 + r) for r in range(t)]


def _run(fn, x, grad):
    x = x.clone().requires_grad_(True)
    y = fn(x * 1.0)  # a non-leaf input, as inside a model
    y.backward(grad)
    return y.detach(), x.grad


def _check_mapping(t: int, name: str):
    ps.initialize_model_parallel(t)
    r = ps.get_tensor_model_parallel_rank()
    full = (S, B, H)
    xs = _per_rank(1, t, full)
    x_last = [x.chunk(t, -1)[i] for i, x in enumerate(xs)]   # rank i's [S, B, H/t]
    x_first = [x.chunk(t, 0)[i] for i, x in enumerate(xs)]   # rank i's [S/t, B, H]
    gs = _per_rank(2, t, full)
    g_last = [g.chunk(t, -1)[i] for i, g in enumerate(gs)]
    g_first = [g.chunk(t, 0)[i] for i, g in enumerate(gs)]
    total_x, total_g = sum(xs), sum(gs)

    if name == "copy":
        y, gx = _run(tp_.copy_to_tensor_model_parallel_region, xs[r], gs[r])
        want_y, want_gx = xs[r], total_g
    elif name == "reduce":
        y, gx = _run(tp_.reduce_from_tensor_model_parallel_region, xs[r], gs[r])
        want_y, want_gx = total_x, gs[r]
    elif name == "scatter":
        y, gx = _run(tp_.scatter_to_tensor_model_parallel_region, xs[0], g_last[r])
        want_y, want_gx = xs[0].chunk(t, -1)[r], torch.cat(g_last, -1)
    elif name == "gather":
        y, gx = _run(tp_.gather_from_tensor_model_parallel_region, x_last[r], gs[r])
        want_y, want_gx = torch.cat(x_last, -1), gs[r].chunk(t, -1)[r]
    elif name == "scatter_seq":
        y, gx = _run(tp_.scatter_to_sequence_parallel_region, xs[0], g_first[r])
        want_y, want_gx = xs[0].chunk(t, 0)[r], torch.cat(g_first, 0)
    elif name == "gather_seq":
        y, gx = _run(tp_.gather_from_sequence_parallel_region, x_first[r], gs[r])
        want_y, want_gx = torch.cat(x_first, 0), total_g.chunk(t, 0)[r]
    elif name == "gather_seq_replicated_grad":
        fn = lambda x: tp_.gather_from_sequence_parallel_region(  # noqa: E731
            x, tensor_parallel_output_grad=False)
        y, gx = _run(fn, x_first[r], gs[r])
        want_y, want_gx = torch.cat(x_first, 0), gs[r].chunk(t, 0)[r]
    elif name == "reduce_scatter_seq":
        y, gx = _run(tp_.reduce_scatter_to_sequence_parallel_region, xs[r], g_first[r])
        want_y, want_gx = total_x.chunk(t, 0)[r], torch.cat(g_first, 0)
    elif name == "all_to_all":  # the last dim's blocks for the first dim's: [t S, B, H / t]
        g_out = _per_rank(3, t, (t * S, B, H // t))
        y, gx = _run(lambda x: tp_.all_to_all(x, 2, 0), xs[r], g_out[r])
        want_y = torch.cat([x.chunk(t, 2)[r] for x in xs], 0)
        want_gx = torch.cat([g.chunk(t, 0)[r] for g in g_out], 2)
    else:
        raise AssertionError(name)
    assert_rel_close(y, want_y, what=f"{name} forward")
    assert_rel_close(gx, want_gx, what=f"{name} backward")


NAMES = ["copy", "reduce", "scatter", "gather", "scatter_seq", "gather_seq",
         "gather_seq_replicated_grad", "reduce_scatter_seq", "all_to_all"]


@pytest.mark.parametrize("t", [1, 2, 4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_mapping(t, name):
    run_distributed(t, _check_mapping, t, name)


def _check_explicit_group_and_errors():
    """Mappings over an explicit group work without parallel_state, and reject bad shapes."""
    group = dist.new_group([0, 1])
    y = tp_.gather_from_tensor_model_parallel_region(torch.full((2, 3), float(dist.get_rank())),
                                                     group=group)
    assert y.shape == (2, 6) and y[0].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="first \\(sequence\\) dimension 3 is not divisible "
                                         "by the group size 2"):
        tp_.scatter_to_sequence_parallel_region(torch.zeros(3, 1, 2), group=group)


def test_explicit_group_and_shape_errors():
    run_distributed(2, _check_explicit_group_and_errors)


def _check_reduce_refuses_tensor_autograd_needs():
    ps.initialize_model_parallel(2)
    x = torch.ones(4, requires_grad=True)
    y = x.exp()  # exp saves its output for backward
    z = tp_.reduce_from_tensor_model_parallel_region(y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_in_place_reduce_is_safe():
    run_distributed(2, _check_reduce_refuses_tensor_autograd_needs)
