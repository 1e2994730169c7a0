"""Simulated clusters for tests: run one function on N ranks, one process per rank.

    from harness import run_distributed
    results = run_distributed(4, check_column_parallel, 2, sequence_parallel=True)

Each world size gets a pool of worker processes that join one ``torch.distributed`` group
(gloo, CPU; its store is served from this process) when the pool starts and then serve test
after test, stopped (SIGSTOP) in between. CPU workers are forked from one fork server that
imported torch and mp once, so a pool starts in a fraction of a second (a fresh Python
importing them takes seconds a rank). ``run_distributed`` returns the function's return
values ordered by rank. Workers see the environment of the test session as it was when the
first pool started.

Failure is bounded in time. A rank that raises fails the call with that rank's traceback; a
rank that hangs (or that is left waiting in a collective by a rank that failed) fails it after
``timeout`` seconds. A pool whose ranks did not all come back is killed and rebuilt on next use,
so one broken test never poisons or hangs the ones after it. The gloo groups of a rank share
one transport device, whose thread runs at the lowest priority (`pool_gloo`).

Workers compute on the CPU unless ``MP_TEST_DEVICE`` names another device (``cuda``: gloo
then carries CUDA tensors, which covers the collectives but not send/recv).

The same functions run unchanged on a GPU cluster: under ``torchrun`` (``WORLD_SIZE`` set),
``run_distributed`` runs the function in-process on every rank over the already-started
process group (NCCL when CUDA is there) and skips cases written for another world size:

    torchrun --nproc-per-node 8 -m pytest -x tests/test_layers.py

Functions must live at module level of an importable module (they are pickled by reference).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp_proc
import os
import pickle
import queue
import signal
import time
import traceback
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import pool_gloo
from torch.distributed import TCPStore

DEFAULT_TIMEOUT_S = float(os.environ.get("MP_TEST_TIMEOUT", "180"))
FAILURE_GRACE_S = 5.0  # after one rank fails, how long the others get to finish on their own
# What every rank imports, imported once in the fork server that starts the ranks, so that a
# new rank is a fork (a quarter of a second for 8 ranks) instead of a fresh Python importing
# torch, TorchDynamo (the optimizers import it) and mp (10 s for 8 ranks on 2 cores). Ranks
# that compute on CUDA are spawned.
PRELOAD = ["torch", "torch._dynamo", "mp.training.pretrain", "harness", "checks", "gpt_runs"]


class DistributedTestError(AssertionError):
    """One or more ranks raised, hung or died; the message holds each rank's story."""


def _reset_rank_state() -> None:
    """Undo what a test left behind in this rank, so the next test starts clean."""
    import sys

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    ps = sys.modules.get("mp.parallel_state")
    if ps is not None:
        ps.destroy_model_parallel()
    # groups made elsewhere (a test's own, DeepSpeed's): each keeps gloo threads polling, and
    # hundreds of them left in a long-lived pool slow every later test down
    for group in list(distributed_c10d._world.pg_map):
        if group is not distributed_c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)
    rnd = sys.modules.get("mp.tensor_parallel.random")
    if rnd is not None:
        rnd.get_cuda_rng_tracker().reset()


def _worker_main(rank: int, world_size: int, store_port: int, tasks, results) -> None:
    os.environ["MP_DEVICE"] = os.environ.get("MP_TEST_DEVICE", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    pool_gloo.install()
    dist.init_process_group(
        "gloo",
        store=dist.TCPStore("127.0.0.1", store_port, is_master=False,
                            timeout=timedelta(seconds=DEFAULT_TIMEOUT_S + 60)),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=DEFAULT_TIMEOUT_S + 60),
    )
    results.put(("ready", rank, _pickled((True, None))))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            outcome = (True, fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent
            outcome = (False, traceback.format_exc())
        try:
            _reset_rank_state()
        except BaseException:  # noqa: BLE001
            outcome = (False, "state reset after the test failed:\n" + traceback.format_exc())
        results.put((task_id, rank, _pickled(outcome)))
    dist.destroy_process_group()


def _pickled(outcome: tuple[bool, object]) -> bytes:
    """``outcome`` pickled as the queue would (torch's reductions included), here, where a
    failure can be reported: the queue pickles in a thread of its own and would drop it."""
    try:
        return bytes(ForkingPickler.dumps(outcome))
    except Exception:  # noqa: BLE001 - the reason goes back to the parent instead
        return bytes(ForkingPickler.dumps((False, "the result cannot be sent back (detach "
                                                  "tensors that require grad):\n"
                                                  + traceback.format_exc())))


class _Pool:
    """N worker processes that share one gloo process group."""

    def __init__(self, world_size: int, start_timeout: float):
        if os.environ.get("MP_TEST_DEVICE", "cpu") == "cpu":
            ctx = mp_proc.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
        else:  # CUDA in a process forked after anything touched the driver fails: start anew
            ctx = mp_proc.get_context("spawn")
        self.world_size = world_size
        # the ranks' rendezvous store lives here, in the parent, for the pool's lifetime
        self._store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, world_size, self._store.port, self._tasks[r], self._results),
                daemon=True,
                name=f"mp-test-rank{r}-of-{world_size}",
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._next_id = 0
        got = self._collect("ready", start_timeout)
        bad = {r: v for r, v in got.items() if v[0] is not True}
        if len(got) < world_size or bad:
            self.kill()
            raise DistributedTestError(
                f"could not start {world_size} ranks: "
                + self._describe(got, "did not start within %.0f s" % start_timeout)
            )

    def run(self, fn, args, kwargs, timeout: float) -> list:
        self._next_id += 1
        task_id = self._next_id
        self.resume()
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        got = self._collect(task_id, timeout)
        failed = any(not ok for ok, _ in got.values())
        if len(got) == self.world_size and not failed:
            return [got[r][1] for r in range(self.world_size)]
        if len(got) < self.world_size:
            self.kill()
        raise DistributedTestError(
            f"{getattr(fn, '__qualname__', fn)} on {self.world_size} ranks:\n"
            + self._describe(got, "did not finish within %.0f s (hung or waiting on a failed rank)"
                             % timeout)
        )

    def _collect(self, task_id, timeout: float) -> dict[int, tuple[bool, object]]:
        """Gather (ok, value) per rank until all answered, one failed and the grace ran out,
        a worker died, or the deadline passed."""
        got: dict[int, tuple[bool, object]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size and time.monotonic() < deadline:
            try:
                tid, rank, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
                for r in dead:
                    got[r] = (False, f"process exited with code {self._procs[r].exitcode}")
                continue
            if tid != task_id:
                continue  # a late answer from an earlier, already-failed task
            ok, value = got[rank] = pickle.loads(payload)
            if not ok:
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        return got

    def _describe(self, got: dict, missing_reason: str) -> str:
        lines = []
        for r in range(self.world_size):
            if r not in got:
                lines.append(f"--- rank {r}: {missing_reason}")
            elif not got[r][0]:
                lines.append(f"--- rank {r} failed:\n{got[r][1]}")
        return "\n".join(lines)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def pause(self) -> None:
        """Stop the ranks (SIGSTOP) until the next test: idle, each would still wake its gloo
        transport thread a hundred times a second, taking CPU from the other pools and from
        the jobs that tests launch."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        for p in self._procs:
            if p.is_alive():
                os.kill(p.pid, sig)

    def close(self) -> None:
        self.resume()
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=5)
        self.kill()

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)


_pools: dict[int, _Pool] = {}


def run_distributed(world_size: int, fn, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs):
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the results by rank.

    Raises ``DistributedTestError`` with every failing rank's traceback when a rank raises,
    dies, or does not finish within ``timeout`` seconds.
    """
    if "WORLD_SIZE" in os.environ:
        return _run_in_torchrun(world_size, fn, args, kwargs)
    pool = _pools.get(world_size)
    if pool is not None and not pool.alive():
        pool.kill()
        pool = None
    if pool is None:
        pool = _Pool(world_size, start_timeout=60 + 10 * world_size)
        _pools[world_size] = pool
    try:
        return pool.run(fn, args, kwargs, timeout)
    finally:
        if pool.alive():
            pool.pause()
        else:
            _pools.pop(world_size, None)


def _run_in_torchrun(world_size: int, fn, args, kwargs) -> list:
    """Under torchrun: every rank runs the same pytest session and calls ``fn`` directly."""
    import pytest
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() != world_size:
        pytest.skip(f"written for {world_size} ranks, running on {dist.get_world_size()}")
    try:
        value = fn(*args, **kwargs)
    finally:
        _reset_rank_state()
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


@atexit.register
def shutdown_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()
