"""Early exit with a checkpoint (Megatron's ``--exit-interval``, ``--exit-duration-in-mins``,
``--exit-signal-handler``): the config rules, every rank agreeing when only one got the
signal or ran out of time, the loop stopping, saving and skipping the final evaluation, and
the pretraining job under ``torchrun`` saving and stopping on SIGTERM, then resuming from
that checkpoint (in the simulated ranks, `jobs.run_job`) and stopping at an exit interval."""

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from jobs import run_job
from test_pretrain import LAUNCH, ROOT, TINY
from test_training import job

from mp.checkpointing import read_latest
from mp.config import ConfigError, TrainingConfig, parse_args
from mp.training.exit import ExitConditions
from mp.training.logger import TrainingLogger
from mp.training.training import StepOutput, TrainState, run_iterations


def training(**keys) -> TrainingConfig:
    return TrainingConfig(micro_batch_size=1, global_batch_size=8, lr=1e-3, train_iters=10,
                          **keys)


@pytest.mark.parametrize("keys, message", [
    ({"exit_interval": 0}, "training.exit_interval=0 must be >= 1"),
    ({"exit_duration_in_mins": 0.0}, "training.exit_duration_in_mins=0.0 must be > 0"),
    ({"exit_signal": "SIGKILL"}, "training.exit_signal='SIGKILL' must be one of 'SIGTERM', "
                                 "'SIGINT', 'SIGUSR1', 'SIGUSR2'"),
])
def test_bad_exit_settings_are_named(keys, message):
    with pytest.raises(ConfigError) as error:
        training(**keys)
    assert str(error.value) == message


def test_megatron_flags_set_the_exit_keys():
    cfg = parse_args(["--config", os.path.join(ROOT, "configs", "gpt-tiny.yaml"),
                      "--exit-signal-handler", "--exit-signal", "SIGUSR1", "--exit-interval",
                      "50", "--exit-duration-in-mins", "230.5"], world_size=4)
    tr = cfg.training
    assert (tr.exit_signal_handler, tr.exit_signal, tr.exit_interval,
            tr.exit_duration_in_mins) == (True, "SIGUSR1", 50, 230.5)


def test_the_interval_needs_no_process_group():
    exits = ExitConditions(training(exit_interval=3))
    assert [exits.reason(i) for i in (1, 2, 4, 5)] == [None] * 4
    assert exits.reason(6) == "iteration 6 (training.exit_interval=3)"


def _signal_on_rank_one() -> tuple:
    before = signal.getsignal(signal.SIGUSR1)
    with ExitConditions(training(exit_signal_handler=True, exit_signal="SIGUSR1")) as exits:
        first = exits.reason(1)
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        dist.barrier()  # the handler has run on rank 1
        second = exits.reason(2)
    return first, second, signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_on_one_rank_stops_every_rank():
    for first, second, restored in run_distributed(2, _signal_on_rank_one):
        assert first is None
        assert second == "SIGUSR1 received (training.exit_signal_handler)"
        assert restored, "the previous handler was not put back"


def _time_limit(late_rank: int | None) -> str | None:
    started = time.monotonic() - (90 if dist.get_rank() == late_rank else 0)
    return ExitConditions(training(exit_duration_in_mins=1.0), start=started).reason(1)


def test_the_time_limit_is_agreed_over_ranks():
    assert run_distributed(2, _time_limit, None) == [None, None]
    reasons = run_distributed(2, _time_limit, 1)  # only rank 1's clock has run out
    assert reasons[0] == reasons[1]
    assert re.fullmatch(r"1\.5 minutes since the job started \(training.exit_duration_in_mins=1\)",
                        reasons[0]), reasons[0]


def _loop_with_exit_interval() -> tuple:
    cfg = job(exit_interval=4, save_interval=3, eval_interval=3, eval_iters=1, save="/ckpt")
    saved, evaluated = [], []
    step = lambda batch: StepOutput({"lm loss": 1.0}, {"lm loss": 1.0}, True, 0.5)  # noqa: E731
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        logger = TrainingLogger(cfg, 1, torch.device("cpu"), enabled=True)
        state = run_iterations(step, cfg, logger, lr=lambda: 1e-3, loss_scale=lambda: 1.0,
                               evaluate=lambda: evaluated.append(1) or {"lm loss": 1.0},
                               state=TrainState(),
                               checkpoint_hook=lambda s: saved.append(s.iteration),
                               exit_conditions=ExitConditions(cfg.training))
    return state.iteration, state.consumed_train_samples, saved, len(evaluated), out.getvalue()


def test_the_loop_saves_and_stops_without_the_final_evaluation():
    iteration, consumed, saved, evaluations, out = run_distributed(1, _loop_with_exit_interval)[0]
    assert (iteration, consumed) == (4, 32)
    assert saved == [3, 4]
    assert evaluations == 1  # at iteration 3; none at the exit
    assert out.rstrip().endswith("exiting after iteration 4/20: iteration 4 (training."
                                 "exit_interval=4); checkpoint saved in /ckpt"), out


# --- the job under torchrun ---------------------------------------------------------------

def _start(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", LAUNCH, *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def test_sigterm_saves_and_stops_the_job_and_it_resumes(tmp_path):
    checkpoints, log_path = tmp_path / "checkpoints", tmp_path / "signalled.log"
    common = [*TINY, "--train-iters", "300", "--log-interval", "1", "--eval-interval", "1000",
              "--save", str(checkpoints), "--data-cache-path", str(tmp_path / "cache")]
    with open(log_path, "w") as log:
        proc = _start([*common, "--exit-signal-handler"], log)
        deadline = time.monotonic() + 300
        while "iteration 3/300 " not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
        proc.wait(timeout=120)
    out = log_path.read_text()
    saved_in = re.escape(str(checkpoints))
    stopped = re.search(r"^exiting after iteration (\d+)/300: SIGTERM received \(training."
                        rf"exit_signal_handler\); checkpoint saved in {saved_in}$", out,
                        re.MULTILINE)
    assert stopped, out[-3000:]
    at = int(stopped[1])
    assert 3 <= at < 300 and read_latest(checkpoints) == at
    assert f"iteration {at + 1}/300 " not in out  # no rank went on

    # resumed by the launcher's job in the simulated ranks
    out = run_distributed(2, run_job, [*common, "--load", str(checkpoints), "--exit-interval",
                                       str(at + 2)])[0]
    assert f"iteration {at}, {at * 8} samples consumed" in out, out[-3000:]
    assert f"exiting after iteration {at + 2}/300: iteration {at + 2} (training.exit_interval=" \
           f"{at + 2}); checkpoint saved in {checkpoints}" in out, out[-3000:]
    assert "validation at iteration" not in out
    assert read_latest(checkpoints) == at + 2
