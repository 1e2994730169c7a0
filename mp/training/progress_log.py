"""Megatron's ``--log-progress`` (``logging.log_progress``): ``progress.txt`` in
``training.save`` gets a line when a job starts and one after each save into ``save``, written
by rank 0, tab-separated as Megatron writes them (``append_to_progress_log`` and
``compute_throughputs_and_append_to_progress_log`` in megatron/training), one line each::

    2026-12-06 23:10:00<TAB>Job ID: 1234<TAB># GPUs: 8<TAB>Starting job
    2026-12-06 23:20:00<TAB>Job ID: 1234<TAB># GPUs: 8<TAB>Saved checkpoint<TAB>Iteration: 100
    <TAB>Job throughput: 142.3 TFLOP/s/GPU<TAB>Cumulative throughput: 140.1 TFLOP/s/GPU
    <TAB>Floating-point operations: 1.23e+18<TAB>Tokens (in billions): 0.41

The job ID is ``SLURM_JOB_ID`` (empty outside Slurm), ``# GPUs`` the world size. Under
``training.async_save`` the save line says ``Saving async checkpoint`` and is written when the
save starts (Megatron's). The floating-point operations are the run's so far: `mp.training.
flops.num_floating_point_operations` (the count of the log line's TFLOP/s/GPU) of its consumed
samples; Megatron adds each iteration's count and keeps the sum in its checkpoints, which is
the same number for a fixed model, the count being linear in the batch. The job throughput
divides this job's share (the FLOPs since its start point) by its wall time since `pretrain`
began, 10^12 and the world size; the cumulative throughput, the FLOPs since the first job of
the same world size in the file (after its last change of world size; Megatron's
``get_start_time_from_progress_log``) by the time since that job's ``Starting job``. Tokens
are the consumed samples times the sequence length. Each line is one ``write`` to a file
opened for appending, so a reader, or another job's line, never splits one.
"""

from __future__ import annotations

import os
import time
from datetime import datetime

from mp.config import JobConfig
from mp.training.flops import num_floating_point_operations

PROGRESS_FILE = "progress.txt"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
STARTING = "Starting job"
SAVED = "Saved checkpoint"  # the only save line whose FLOPs the cumulative throughput reads
SAVING_ASYNC = "Saving async checkpoint"


def progress_line(text: str, world_size: int, now: datetime | None = None) -> str:
    """One line of the progress log: time, job ID, world size and ``text``."""
    now = datetime.now() if now is None else now
    return (f"{now.strftime(TIME_FORMAT)}\tJob ID: {os.environ.get('SLURM_JOB_ID', '')}\t"
            f"# GPUs: {world_size}\t{text}\n")


def append_to_progress_log(save_dir: str, text: str, world_size: int) -> None:
    """Append `progress_line` to ``save_dir/progress.txt`` (created with its directory), in
    one write. Call it on one rank."""
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, PROGRESS_FILE), "a", encoding="utf-8") as file:
        file.write(progress_line(text, world_size))


def _field(token: str, kind: type):
    return kind(token.split(": ", 1)[1])


def start_from_progress_log(path: str, world_size: int) -> tuple[datetime, float]:
    """Megatron's ``get_start_time_from_progress_log``: the time of the first ``Starting job``
    of ``world_size`` ranks since the file's last change of world size, and the FLOPs of the
    last ``Saved checkpoint`` line before it (0 when none). ValueError when there is no
    such start."""
    start_time = start_flops = None
    latest_flops = 0.0
    with open(path, encoding="utf-8") as file:
        for line in file:
            tokens = line.rstrip("\n").split("\t")
            if len(tokens) < 4:
                continue
            if tokens[3] == SAVED:
                latest_flops = _field(tokens[7], float)
            if _field(tokens[2], int) != world_size:
                start_time = start_flops = None  # another world size: search again
                continue
            if tokens[3] == STARTING and start_time is None:
                start_time, start_flops = tokens[0], latest_flops
    if start_time is None:
        raise ValueError(f"{path} holds no {STARTING!r} line of {world_size} GPUs since its "
                         "last change of world size (Megatron's rule for the cumulative "
                         "throughput)")
    return datetime.strptime(start_time, TIME_FORMAT), start_flops


class ProgressLog:
    """The progress log of a job of ``world_size`` ranks that began at ``start_time``
    (``time.time()``); only the rank made with ``enabled`` writes. Construction writes
    ``Starting job``; `started_from` sets the consumed samples the job starts from (its
    checkpoint's); `saved` is `mp.checkpointing.job.JobSaver`'s ``on_save``."""

    def __init__(self, cfg: JobConfig, world_size: int, start_time: float, *, enabled: bool):
        self.cfg, self.world_size, self.start_time = cfg, world_size, start_time
        self.enabled, self.save_dir = enabled, cfg.training.save
        self.flops_at_start = 0.0
        self._append(STARTING)

    def _append(self, text: str) -> None:
        if self.enabled:
            append_to_progress_log(self.save_dir, text, self.world_size)

    def flops(self, consumed_train_samples: int) -> float:
        """The FLOPs of a run that consumed ``consumed_train_samples`` samples."""
        return num_floating_point_operations(self.cfg.model, consumed_train_samples)

    def started_from(self, consumed_train_samples: int) -> None:
        """The job starts with ``consumed_train_samples`` samples already consumed."""
        self.flops_at_start = self.flops(consumed_train_samples)

    def saved(self, state) -> None:
        """Append the save line of ``state`` (a `TrainState`) after its save."""
        if not self.enabled:
            return
        flops = self.flops(state.consumed_train_samples)
        scale = 10**12 * self.world_size
        job = (flops - self.flops_at_start) / ((time.time() - self.start_time) * scale)
        start, start_flops = start_from_progress_log(
            os.path.join(self.save_dir, PROGRESS_FILE), self.world_size)
        elapsed = max((datetime.now() - start).total_seconds(), 1e-3)  # whole seconds
        cumulative = (flops - start_flops) / (elapsed * scale)
        tokens = state.consumed_train_samples * self.cfg.model.seq_length
        prefix = SAVING_ASYNC if self.cfg.training.async_save else SAVED
        self._append(f"{prefix}\tIteration: {state.iteration}\t"
                     f"Job throughput: {job:.1f} TFLOP/s/GPU\t"
                     f"Cumulative throughput: {cumulative:.1f} TFLOP/s/GPU\t"
                     f"Floating-point operations: {flops:.2e}\t"
                     f"Tokens (in billions): {tokens / 10**9:.2f}")
