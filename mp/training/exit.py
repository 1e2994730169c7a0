"""Stopping a run early and cleanly, with a checkpoint (Megatron's ``--exit-interval``,
``--exit-duration-in-mins`` and ``--exit-signal-handler``).

After each iteration the loop asks `ExitConditions.reason`; a reason ends the run there: the
job saves a checkpoint (when ``training.save`` is set), skips the final evaluation and returns,
so the process exits with status 0 and ``--load`` resumes exactly. The three conditions:

- ``exit_interval=N``: after every iteration that is a multiple of N (a fixed slice of a run,
  for profiling or a scheduler's fixed-length jobs);
- ``exit_duration_in_mins=M``: once M minutes have passed since the job started (model and
  data set-up included), so a run stops inside a cluster's time limit;
- ``exit_signal_handler``: once any rank has received ``exit_signal`` (default SIGTERM, the
  signal of a preemption or of Slurm's ``--signal``).

The signal and the clock are per rank, but the decision must be the same everywhere: with
either of those two on, every iteration ends with one all-reduce (MAX) of two numbers over all
ranks.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from mp.config import TrainingConfig
from mp.device import get_device


class ExitConditions:
    """The exit rules of ``tr``, timed from ``start`` (``time.monotonic()``; default: now).
    Used as a context manager, it installs the signal handler (when asked) and restores the
    previous one on leaving."""

    def __init__(self, tr: TrainingConfig, start: float | None = None):
        self.interval = tr.exit_interval
        self.duration_mins = tr.exit_duration_in_mins
        self.signum = signal.Signals[tr.exit_signal] if tr.exit_signal_handler else None
        self.start = time.monotonic() if start is None else start
        self.received = False
        self._previous = None

    def __enter__(self) -> ExitConditions:
        if self.signum is not None:
            self._previous = signal.signal(self.signum, self._receive)
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is not None:
            signal.signal(self.signum, self._previous)

    def _receive(self, signum, frame) -> None:
        self.received = True  # acted on at the end of the iteration

    def reason(self, iteration: int) -> str | None:
        """Why the run stops after ``iteration``, or None; the same answer on every rank
        (collective over all ranks when the signal handler or the time limit is on)."""
        if self.signum is not None or self.duration_mins is not None:
            local = [float(self.received), (time.monotonic() - self.start) / 60]
            agreed = torch.tensor(local, dtype=torch.float64, device=get_device())
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            received, minutes = agreed.tolist()
            if received:
                return f"{self.signum.name} received (training.exit_signal_handler)"
            if self.duration_mins is not None and minutes >= self.duration_mins:
                return (f"{minutes:.1f} minutes since the job started (training."
                        f"exit_duration_in_mins={self.duration_mins:g})")
        if self.interval is not None and iteration % self.interval == 0:
            return f"iteration {iteration} (training.exit_interval={self.interval})"
        return None
