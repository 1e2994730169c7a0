"""The simulated cluster itself: results come back by rank, failures and hangs fail fast;
a rank's gloo groups share one transport thread at nice 19, and idle ranks are stopped."""

import os
import time

import pytest
import torch
import torch.distributed as dist
from harness import DistributedTestError, run_distributed
from pool_gloo import TRANSPORT_THREAD, threads_named

from mp import parallel_state as ps


def _all_reduce_rank() -> tuple[int, float]:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _raise_on_rank(bad_rank: int) -> None:
    if dist.get_rank() == bad_rank:
        raise ValueError(f"planted failure on rank {bad_rank}")
    dist.barrier()  # the healthy ranks wait here for the one that failed


def _sleep_forever() -> None:
    time.sleep(3600)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_results_come_back_by_rank(world_size):
    out = run_distributed(world_size, _all_reduce_rank)
    expected = sum(range(world_size))
    assert out == [(r, float(expected)) for r in range(world_size)]


def test_failing_rank_reports_its_traceback_and_pool_recovers():
    start = time.monotonic()
    with pytest.raises(DistributedTestError,
                       match="rank 1 failed:(.|\n)*planted failure on rank 1"):
        run_distributed(2, _raise_on_rank, 1)
    assert time.monotonic() - start < 60
    assert run_distributed(2, _all_reduce_rank) == [(0, 1.0), (1, 1.0)]


def _graph_tensor() -> torch.Tensor:
    return torch.ones(2, requires_grad=True) * 2  # not a leaf: pickle refuses it


def test_an_unsendable_result_fails_fast_with_the_reason():
    """Without the check the queue's feeder thread drops the pickling error and the test
    waits for its whole timeout."""
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="the result cannot be sent back (.|\n)*"
                                                   "non-leaf tensor"):
        run_distributed(1, _graph_tensor, timeout=60)
    assert time.monotonic() - start < 30
    assert run_distributed(1, _all_reduce_rank) == [(0, 0.0)]


def _transport_threads_with_model_parallelism() -> tuple[int, list[int], float]:
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    t = torch.ones(1)
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    nice = [os.getpriority(os.PRIO_PROCESS, tid) for tid in threads_named(TRANSPORT_THREAD)]
    return os.getpid(), nice, t.item()


def test_gloo_groups_share_one_low_priority_thread_and_idle_ranks_are_stopped():
    out = run_distributed(4, _transport_threads_with_model_parallelism)
    assert [(nice, total) for _, nice, total in out] == [([19], 2.0)] * 4
    states = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the test is over: its ranks stop (SIGSTOP), soon
        for pid, _, _ in out:
            with open(f"/proc/{pid}/stat") as f:
                states[pid] = f.read().rsplit(")", 1)[1].split()[0]
        if set(states.values()) == {"T"}:
            break
        time.sleep(0.05)
    assert set(states.values()) == {"T"}, states


def test_hanging_rank_times_out_and_pool_recovers():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="did not finish within 3 s"):
        run_distributed(2, _sleep_forever, timeout=3)
    assert time.monotonic() - start < 30
    assert run_distributed(2, _all_reduce_rank) == [(0, 1.0), (1, 1.0)]
