"""RNG tracker semantics under TP, and checkpointing that replays dropout exactly."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from checks import seeded
from harness import run_distributed
from mp import parallel_state as ps
from mp import tensor_parallel as tp_

SEED = 42


def _gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return out


def _masks(tp: int):
    ps.initialize_model_parallel(tp)
    r = ps.get_tensor_model_parallel_rank()
    tp_.model_parallel_cuda_manual_seed(SEED)
    ones = torch.ones(4096)
    outside = F.dropout(ones, 0.5) != 0
    with tp_.get_cuda_rng_tracker().fork():
        inside = F.dropout(ones, 0.5) != 0
        inside_again = F.dropout(ones, 0.5) != 0
    group = ps.get_tensor_model_parallel_group()
    outs, ins = _gather(outside, group), _gather(inside, group)
    assert all(torch.equal(o, outs[0]) for o in outs), "masks outside the fork differ over TP"
    assert all(not torch.equal(ins[i], ins[j]) for i in range(tp) for j in range(i)), \
        "masks inside the fork repeat over TP"
    # reference streams: the default generator seeded with SEED, the TP one with SEED+2718+rank
    torch.manual_seed(SEED)
    assert torch.equal(outside, F.dropout(ones, 0.5) != 0)
    torch.manual_seed(SEED + 2718 + r)
    assert torch.equal(inside, F.dropout(ones, 0.5) != 0)
    assert torch.equal(inside_again, F.dropout(ones, 0.5) != 0), "fork did not continue the stream"


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 4), (4, 2)])
def test_dropout_masks_across_tp_ranks(world, tp):
    run_distributed(world, _masks, tp)


def test_tracker_states_round_trip_and_errors():
    tracker = tp_.CudaRNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="seed 1 already exists"):
        tracker.add("b", 1)
    with pytest.raises(KeyError, match="'missing' is not in the tracker"):
        with tracker.fork("missing"):
            pass
    saved = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(8)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(8), first)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        torch.rand(8)
    assert torch.equal(torch.get_rng_state(), before), "fork leaked into the default generator"


class _Block(torch.nn.Module):
    """Linear -> dropout (replicated) -> linear -> dropout in the TP stream -> linear."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(16, 16, generator=g) / 4) for _ in range(3)])

    def forward(self, x):
        x = F.dropout(x @ self.w[0], 0.3)
        x = x @ self.w[1]
        with tp_.get_cuda_rng_tracker().fork():
            x = F.dropout(x, 0.3)
        return torch.tanh(x @ self.w[2])


def _checkpoint_replays(tp: int, distribute: bool):
    ps.initialize_model_parallel(tp)
    block = _Block()
    x0 = seeded((8, 2, 16), 1)
    results = []
    for use_checkpoint in (False, True):
        tp_.model_parallel_cuda_manual_seed(SEED)
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        y = (tp_.checkpoint(block, distribute, x) if use_checkpoint else block(x))
        y.pow(2).sum().backward()
        after = torch.rand(4)  # the stream continues from the same place either way
        with tp_.get_cuda_rng_tracker().fork():
            after_tp = torch.rand(4)
        results.append([y.detach(), x.grad, *[p.grad for p in block.w], after, after_tp])
    for plain, ckpt in zip(*results):
        assert torch.equal(plain, ckpt), "checkpointed block is not bit-identical"


@pytest.mark.parametrize("tp,distribute", [(1, False), (2, False), (2, True)])
def test_checkpoint_is_bit_identical(tp, distribute):
    run_distributed(tp, _checkpoint_replays, tp, distribute)
