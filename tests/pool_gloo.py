"""gloo in the test pool's ranks (`harness`): one transport device per rank, at the lowest
priority.

torch gives every gloo process group a transport device of its own, and every device a
thread that wakes every 10 ms (its epoll timeout) even when idle, and waits for such a tick
when a connection closes. A test that initializes model parallelism makes ten or more
groups, and a pool of 8 ranks then had a hundred such threads ticking; the three pools of a
test session, idle, kept 16 % of a 2-core machine busy, and making a group took ~20 ms.
Every gloo group of a pool rank shares one device here: making a group takes ~2.5 ms, and a
rank has one ticking thread.

That thread also spins on epoll while a message waits for its receive to be posted; with
more ranks than cores the spinning took the CPU from the very threads it waited for. It
runs at nice 19 (a 2-rank all_reduce of 256 floats: 1.8 -> 0.7-1.0 ms; 4 ranks: 6.6 ->
3.2-3.5 ms; noisy).
"""

from __future__ import annotations

import os

from torch.distributed import distributed_c10d

TRANSPORT_THREAD = "gloo_tcp_loop"


def install() -> None:
    """From now on, every gloo group of this process uses one device whose thread runs at
    nice 19. Call it before the default group is made."""
    base = distributed_c10d.ProcessGroupGloo
    before = _threads()
    device = base.create_default_device()
    for tid in _threads() - before:  # by id: the thread may not have named itself yet
        os.setpriority(os.PRIO_PROCESS, tid, 19)

    class SharedDeviceGloo(base):
        """torch's gloo backend on ``device``; distributed_c10d makes its groups with this."""

        def __init__(self, store, rank: int, size: int, timeout):
            options = base._Options()
            options._devices = [device]
            options._timeout = timeout
            super().__init__(store, rank, size, options)

    distributed_c10d.ProcessGroupGloo = SharedDeviceGloo


def _threads() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def threads_named(name: str) -> set[int]:
    found = set()
    for tid in _threads():
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    found.add(tid)
        except OSError:
            pass  # the thread ended meanwhile
    return found
