"""Profiling a range of iterations (Megatron's ``--profile``, ``--use-pytorch-profiler``,
``--profile-step-start``, ``--profile-step-end`` and ``--profile-ranks``).

With ``logging.profile``, each rank in ``logging.profile_ranks`` profiles the iterations run
while ``profile_step_start <= done < profile_step_end``, ``done`` being the count of finished
iterations: profiling starts once ``profile_step_start`` iterations are done and stops once
``profile_step_end`` are, so the defaults 10 and 12 profile the iterations numbered 11 and 12
on the log lines. A resumed run counts from the start of training, as the log lines do, and
profiles what is left of the range.

- ``use_pytorch_profiler``: `torch.profiler` over CPU and, on a GPU, CUDA activity, recording
  shapes and Python stacks, after one warm-up iteration (as Megatron does). Each iteration is
  one ``ProfilerStep#N``, from its start to the start of the next (its logging, evaluation and
  checkpoint included); N counts this run's iterations from 1, the numbers on the log lines
  unless the run was resumed. At the end of the range ``tensorboard_trace_handler`` writes the
  trace into ``logging.tensorboard_dir`` (a config rule requires it) as
  ``rank<R>.<nanoseconds>.pt.trace.json``, which TensorBoard's profiler plugin, Perfetto and
  ``chrome://tracing`` read. (Megatron's own schedule records one iteration earlier than its
  CUDA-profiler range; here both record the same iterations.)
- Otherwise, on CUDA: ``cudaProfilerStart`` / ``cudaProfilerStop`` around the range, with an
  NVTX range for each autograd op (``emit_nvtx``), for ``nsys profile
  --capture-range=cudaProfilerApi``. On the CPU that has nothing to capture: the rank says so
  in one line and trains on.
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import ProfilerAction

from mp.config import LoggingConfig


class IterationProfiler:
    """The profiling range of ``cfg`` on ``rank``, computing on ``device`` (nothing happens on
    other ranks, or without ``cfg.profile``). The loop calls `before_iteration` and, at the end
    of the iteration, `after_iteration` with its count of finished iterations; used as a
    context manager, it ends a range that the run leaves early."""

    def __init__(self, cfg: LoggingConfig, rank: int, device: torch.device):
        self.start, self.end = cfg.profile_step_start, cfg.profile_step_end
        self.use_pytorch_profiler, self.trace_dir = cfg.use_pytorch_profiler, cfg.tensorboard_dir
        self.rank, self.device = rank, device
        self.on = cfg.profile and rank in cfg.profile_ranks
        if self.on and not self.use_pytorch_profiler and device.type != "cuda":
            print(f"rank {rank}: logging.profile without logging.use_pytorch_profiler marks "
                  f"iterations for the CUDA profiler (nsys); on the {device.type} there is "
                  "nothing to capture", flush=True)
            self.on = False
        self._running = contextlib.ExitStack()  # what ends the profiling that runs
        self._profiler: torch.profiler.profile | None = None
        self._capturing = False  # the CUDA profiler's range has started

    def __enter__(self) -> IterationProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self._running.close()

    def before_iteration(self, done: int) -> None:
        """Before the iteration numbered ``done + 1`` on the log lines."""
        if not self.on or done >= self.end:
            return
        if self.use_pytorch_profiler:
            if self._profiler is None:
                self._profiler = self._running.enter_context(self._pytorch_profiler(done))
            self._profiler.step()
        elif self.start <= done and not self._capturing:
            self._running.enter_context(torch.cuda.profiler.profile())
            self._running.enter_context(torch.autograd.profiler.emit_nvtx(record_shapes=True))
            self._capturing = True

    def after_iteration(self, done: int) -> None:
        if self.on and done >= self.end:
            self._running.close()  # the PyTorch profiler writes its trace
            self.on = False

    def _pytorch_profiler(self, done: int) -> torch.profiler.profile:
        """A profiler whose step ``s`` (from 1) is the iteration numbered ``done + s`` on the
        log lines (step 0 comes before the first), recording this rank's range."""

        def action(step: int) -> ProfilerAction:
            iteration = done + step
            if iteration == self.end:
                return ProfilerAction.RECORD_AND_SAVE
            if self.start < iteration < self.end:
                return ProfilerAction.RECORD
            return ProfilerAction.WARMUP if iteration == self.start else ProfilerAction.NONE

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        return torch.profiler.profile(
            activities=activities, schedule=action, record_shapes=True, with_stack=True,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                self.trace_dir, worker_name=f"rank{self.rank}"))
