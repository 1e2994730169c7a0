"""The meters the estimator is checked with: they must count what is there, once, and refuse
what they cannot count."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from mp import parallel_state as ps
from mp.estimate import CollectiveMeter, SavedTensorMeter
from mp.pipeline_parallel.p2p import P2P


def test_saved_tensor_meter_counts_each_storage_once_and_skips_parameters():
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(8, 3))
    with SavedTensorMeter(exclude=[weight]) as meter:
        flat = x.view(32)
        y = flat * flat.flip(0)  # saves a view of x and a new tensor: x's storage counted once
        z = x @ weight  # saves x (already counted) and the weight (excluded)
    (y.sum() + z.sum()).backward()
    assert meter.bytes == 32 * 4 + 32 * 4
    assert [counted for *_, counted in meter.entries].count(True) == 2


def _meter_collectives() -> tuple[list, bool]:
    ps.initialize_model_parallel(1, 2)  # two pipeline stages, for the point-to-point calls
    rank = dist.get_rank()
    with CollectiveMeter() as meter:
        dist.all_reduce(torch.ones(3, 4))
        out = torch.empty(4, dtype=torch.bfloat16)
        dist.all_gather_into_tensor(out, torch.ones(2, dtype=torch.bfloat16))
        dist.reduce_scatter_tensor(torch.empty(2), torch.ones(4))
        p2p = P2P((5,), torch.float32, torch.device("cpu"))
        if rank == 0:
            p2p.send_forward(torch.ones(5))
        else:
            p2p.recv_forward()
        try:
            dist.all_gather([torch.empty(1), torch.empty(1)], torch.ones(1))
            refused = False
        except RuntimeError:
            refused = True
    restored = dist.all_reduce.__module__ == "torch.distributed.distributed_c10d"
    return meter.calls, refused and restored


def test_collective_meter_counts_every_kind():
    world = (0, 1)
    for rank, (calls, refused_and_restored) in enumerate(run_distributed(2, _meter_collectives)):
        p2p = ("send", world, 20) if rank == 0 else ("recv", world, 20)
        assert calls == [("all_reduce", world, 48), ("all_gather", world, 8),
                         ("reduce_scatter", world, 16), p2p]
        assert refused_and_restored, "an unmodelled call went through, or wrappers stayed"


def test_saved_tensor_meter_refuses_meta_tensors():
    x = torch.empty(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="meta device"), SavedTensorMeter():
        (x * x).sum()
