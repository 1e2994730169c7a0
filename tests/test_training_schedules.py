"""``forward_backward_no_pipelining``: the mean loss over micro-batches, gradient sync only at
the last micro-batch, the loss-scale hook, forward-only evaluation, and the schedule choice."""

import functools

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from test_grad_sync import B, H, S, ToyModel, dense_grads, local_batch, local_loss, local_shard

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel
from mp.pipeline_parallel.pipelined import forward_backward_pipelining_without_interleaving
from mp.pipeline_parallel.schedules import forward_backward_no_pipelining, get_forward_backward_func

MICROBATCHES = 3


def _toy_step(events: list, data_iterator, model):
    """A forward step on the toy model; records which micro-batch is running."""
    x = next(data_iterator)
    events.append("forward")
    out = model(x)

    def loss_func(output):
        loss = local_loss(output)
        return loss, {"loss": loss.detach()}
    return out, loss_func


def _check_schedule(grad_scale: float | None):
    ps.initialize_model_parallel(1)
    dp = ps.get_data_parallel_world_size()
    model = DistributedDataParallel(ToyModel(), bucket_size=1)
    events = []
    launch = model._launch
    model._launch = lambda bucket: (events.append("all-reduce"), launch(bucket))
    x = seeded((S, B * dp * MICROBATCHES, H), 21)
    data = iter([local_batch(x, m, False) for m in range(MICROBATCHES)])
    model.zero_grad_buffer()
    reported = forward_backward_no_pipelining(
        forward_step_func=functools.partial(_toy_step, events), data_iterator=[data],
        model=[model], num_microbatches=MICROBATCHES, seq_length=S, micro_batch_size=B,
        grad_scale_func=None if grad_scale is None else (lambda loss: loss * grad_scale))
    assert len(reported) == MICROBATCHES and set(reported[0]) == {"loss"}
    # nothing is communicated before the last micro-batch's forward
    assert events[:MICROBATCHES] == ["forward"] * MICROBATCHES
    assert events.count("all-reduce") == len(model.buckets)
    expected = dense_grads(x)
    for name, param in model.module.named_parameters():
        if name in expected:
            assert_rel_close(param.main_grad / (grad_scale or 1.0),
                             local_shard(param, expected[name]), what=name)


@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_microbatches_average_and_sync_once(grad_scale):
    run_distributed(2, _check_schedule, grad_scale)


def _check_forward_only():
    ps.initialize_model_parallel(1)
    model = DistributedDataParallel(ToyModel())
    x = seeded((S, B * MICROBATCHES, H), 22)
    data = iter([local_batch(x, m, False) for m in range(MICROBATCHES)])
    model.zero_grad_buffer()
    assert get_forward_backward_func() is forward_backward_no_pipelining
    reported = get_forward_backward_func()(
        forward_step_func=functools.partial(_toy_step, []), data_iterator=data, model=model,
        num_microbatches=MICROBATCHES, seq_length=S, micro_batch_size=B, forward_only=True)
    assert not reported[0]["loss"].requires_grad
    assert torch.count_nonzero(model.grad_buffer) == 0
    want = [local_loss(ToyModel()(local_batch(x, m, False))).item()
            for m in range(MICROBATCHES)]
    assert [r["loss"].item() for r in reported] == pytest.approx(want, rel=1e-6)


def test_forward_only_touches_no_gradient():
    run_distributed(1, _check_forward_only)


def _check_schedule_choice():
    ps.initialize_model_parallel(1, 2)
    assert get_forward_backward_func() is forward_backward_pipelining_without_interleaving
    with pytest.raises(ValueError, match="num_microbatches=0 must be a positive integer"):
        forward_backward_no_pipelining(forward_step_func=None, data_iterator=None, model=None,
                                       num_microbatches=0, seq_length=S, micro_batch_size=B)


def test_schedule_choice_and_argument_checks():
    run_distributed(2, _check_schedule_choice)
