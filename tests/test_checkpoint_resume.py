"""Exact resume of the pretraining job under ``torchrun`` at TP2 x DP2: 20 iterations straight
against 10 iterations, a SIGKILL of the whole job, and a resume for the last 10; and the same
for a run counted in samples, killed in the middle of its batch-size ramp, with decoupled
learning rates for the embedding and output weights, a weight decay that follows Megatron's
cosine schedule, and its samples read in Megatron's cyclic (shuffled) order. The loss, the
gradient norm and the learning rate of every iteration (read bit for bit, as float.hex) and
the final weights are identical."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mp.checkpointing import load_global_model, read_latest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "pretrain_gpt.py")
TINY = ["--config", os.path.join(ROOT, "configs", "gpt-tiny.yaml"),
        "--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "64",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-iters", "5", "--log-interval", "10", "--eval-iters", "0",
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1",  # the RNG states matter
        "--train-iters", "20"]
# 200 samples: batches of 4 (x6), 8 (x3), 12 (x2), then 16 (x8); the checkpoint after 8
# iterations (40 samples) is mid-ramp, the learning rate counted in samples; the embedding and
# output weights at their own rates, the weight decay rising from 0.01 to 0.3 over the run,
# the samples in the cyclic order
RAMPED = [*TINY, "--global-batch-size", "16", "--train-iters", "null", "--lr-warmup-iters", "0",
          "--train-samples", "200", "--lr-warmup-samples", "40", "--rampup-batch-size", "4", "4",
          "64", "--dataloader-type", "cyclic", "--untie-embeddings-and-output-weights",
          "--decoupled-lr", "1e-2", "--decoupled-min-lr", "1e-4",
          "--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.01",
          "--end-weight-decay", "0.3"]


def _exact_logging_script(directory) -> str:
    """The launcher, with rank 0 also printing each iteration's loss, grad norm and learning
    rate exactly (the log line rounds them)."""
    script = directory / "pretrain_exact.py"
    script.write_text(textwrap.dedent(f"""
        import runpy, sys
        from mp.training.logger import TrainingLogger

        real = TrainingLogger.training_iteration

        def exact(self, iteration, consumed, losses, lr, grad_norm, *rest, **extras):
            if self.enabled:
                print(f"exact {{iteration}} {{losses['lm loss'].hex()}} {{grad_norm.hex()}} "
                      f"{{lr.hex()}}", flush=True)
            return real(self, iteration, consumed, losses, lr, grad_norm, *rest, **extras)

        TrainingLogger.training_iteration = exact
        sys.argv = [{LAUNCH!r}, *sys.argv[1:]]
        runpy.run_path({LAUNCH!r}, run_name="__main__")
    """))
    return str(script)


def _start(script: str, args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "4", script, *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own, so
    killing torchrun's process group would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank at once, as a node failure would."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _run(script: str, args: list[str], log_path, timeout: float = 480) -> str:
    with open(log_path, "w") as log:
        proc = _start(script, args, log)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_job(proc)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def _exact(out: str) -> dict[int, tuple[str, str, str]]:
    return {int(i): rest for i, *rest in
            (line.split()[1:] for line in out.splitlines() if line.startswith("exact "))}


@pytest.mark.parametrize("args, iters, save_at, consumed", [(TINY, 20, 10, 80),
                                                             (RAMPED, 19, 8, 40)],
                         ids=["iterations", "samples_ramp_schedules"])
def test_killed_and_resumed_job_matches_the_straight_run(tmp_path, args, iters, save_at,
                                                         consumed):
    start = time.monotonic()
    script = _exact_logging_script(tmp_path)
    common = [*args, "--data-cache-path", str(tmp_path / "cache")]

    straight = _exact(_run(script, [*common, "--save", str(tmp_path / "straight")],
                           tmp_path / "straight.log"))
    assert sorted(straight) == list(range(1, iters + 1))

    killed_dir, killed_log = tmp_path / "killed", tmp_path / "killed.log"
    with open(killed_log, "w") as log:
        proc = _start(script, [*common, "--save", str(killed_dir), "--save-interval",
                               str(save_at)], log)
        deadline = time.monotonic() + 480
        while read_latest(killed_dir) is None and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 480 s"
            time.sleep(0.05)
        _kill_job(proc)  # mid-training, right after the checkpoint
    assert read_latest(killed_dir) == save_at, killed_log.read_text()[-3000:]
    killed = _exact(killed_log.read_text())

    out = _run(script, [*common, "--save", str(killed_dir), "--load", str(killed_dir)],
               tmp_path / "resumed.log")
    assert re.search(rf"resuming from \S+iter_{save_at:07d}: iteration {save_at}, "
                     rf"{consumed} samples consumed, RNG states restored", out), out[-3000:]
    resumed = _exact(out)
    assert sorted(resumed) == list(range(save_at + 1, iters + 1))

    for iteration in range(1, iters + 1):
        got = (killed if iteration <= save_at else resumed)[iteration]
        assert got == straight[iteration], f"iteration {iteration}: (loss, grad norm, lr) " \
                                           f"{got} after resuming, {straight[iteration]} straight"
    final, _ = load_global_model(killed_dir)
    reference, _ = load_global_model(tmp_path / "straight")
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), f"final {name} differs"
    print(f"exact resume: {time.monotonic() - start:.1f} s")

