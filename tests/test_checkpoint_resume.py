"""Exact resume of the pretraining job at TP2 x DP2: 20 iterations straight against a
``torchrun`` job SIGKILLed right after its checkpoint at iteration 10 and a resume for the last
10; and a run counted in samples resumed from its checkpoint in the middle of its batch-size
ramp, with decoupled learning rates for the embedding and output weights, a weight decay that
follows Megatron's cosine schedule, and its samples read in Megatron's cyclic (shuffled) order.
The loss, the gradient norm and the learning rate of every iteration (read bit for bit, as
float.hex) and the final weights are identical. Only the killed job is launched; the others
run the launcher's job in the simulated ranks (`jobs.run_job`), which also checks that the two
compute alike."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from harness import run_distributed
from jobs import LAUNCH, ROOT, exact_values, run_job

from mp.checkpointing import load_global_model, read_latest

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
    """The launcher under `jobs.exact_lines`."""
    script = directory / "pretrain_exact.py"
    script.write_text(textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from jobs import exact_lines

        sys.argv = [{LAUNCH!r}, *sys.argv[1:]]
        with exact_lines():
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


def _killed_after_checkpoint(tmp_path, args: list[str], save_at: int):
    """A launched job of ``args`` SIGKILLed right after its checkpoint at ``save_at``: its
    directory, and the exact values it printed."""
    directory, log_path = tmp_path / "killed", tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = _start(_exact_logging_script(tmp_path), [*args, "--save", str(directory),
                                                        "--save-interval", str(save_at)], log)
        deadline = time.monotonic() + 480
        while read_latest(directory) is None and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 480 s"
            time.sleep(0.05)
        _kill_job(proc)  # mid-training, right after the checkpoint
    assert read_latest(directory) == save_at, log_path.read_text()[-3000:]
    return directory, exact_values(log_path.read_text())


@pytest.mark.parametrize("args, iters, save_at, consumed, killed", [
    (TINY, 20, 10, 80, True), (RAMPED, 19, 8, 40, False)],
    ids=["killed_iterations", "samples_ramp_schedules"])
def test_resumed_job_matches_the_straight_run(tmp_path, args, iters, save_at, consumed, killed):
    start = time.monotonic()
    common = [*args, "--data-cache-path", str(tmp_path / "cache")]
    straight_dir = tmp_path / "straight"
    straight = exact_values(run_distributed(
        4, run_job, [*common, "--save", str(straight_dir), "--save-interval", str(save_at)],
        exact=True)[0])
    assert sorted(straight) == list(range(1, iters + 1))

    if killed:
        load, first = _killed_after_checkpoint(tmp_path, common, save_at)
        step = []
    else:  # the straight run's checkpoint in the middle of the ramp
        load, first, step = straight_dir, straight, ["--ckpt-step", str(save_at)]
    resumed_dir = tmp_path / "resumed"
    out = run_distributed(4, run_job, [*common, "--load", str(load), *step,
                                       "--save", str(resumed_dir)], exact=True)[0]
    assert re.search(rf"resuming from \S+iter_{save_at:07d}: iteration {save_at}, "
                     rf"{consumed} samples consumed, RNG states restored", out), out[-3000:]
    resumed = exact_values(out)
    assert sorted(resumed) == list(range(save_at + 1, iters + 1))

    for iteration in range(1, iters + 1):
        got = (first if iteration <= save_at else resumed)[iteration]
        assert got == straight[iteration], f"iteration {iteration}: (loss, grad norm, lr) " \
                                           f"{got} after resuming, {straight[iteration]} straight"
    final, _ = load_global_model(resumed_dir)
    reference, _ = load_global_model(straight_dir)
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), f"final {name} differs"
    print(f"exact resume: {time.monotonic() - start:.1f} s")
