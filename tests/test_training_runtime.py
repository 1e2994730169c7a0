"""What the loop does around the iterations (Megatron's runtime flags): manual garbage
collection at the same iterations on every rank, with the collector's state restored; the
CUDA cache emptied after the forward-backward pass and the optimizer step; a PyTorch profiler
trace of the profiled iterations, only on the listed ranks; Weights & Biases runs on the last
rank holding the logged values (read back from the offline run's file), and a notice when
wandb is missing."""

import contextlib
import gc
import glob
import io
import json
import math
import os
import struct
import sys

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from jobs import environment
from test_training import job, micro_batches

from mp import parallel_state as ps
from mp.config import ConfigError, JobConfig, LoggingConfig
from mp.training import gpt_step
from mp.training.evaluation import evaluate
from mp.training.logger import TrainingLogger
from mp.training.pretrain import pretrain, set_random_seed, setup_model_and_optimizer
from mp.training.profiling import IterationProfiler
from mp.training.training import StepOutput, run_iterations, train_step


def _gc_points(manual_gc_eval: bool) -> tuple:
    """The collections the loop makes (finished iterations, generation), and whether the
    collector was on during the steps and after the run."""
    cfg = job(manual_gc=True, manual_gc_interval=3, manual_gc_eval=manual_gc_eval,
              train_iters=8, eval_interval=4, eval_iters=1)
    done, points, enabled = [0], [], []

    def record(phase, info):
        if phase == "start" and not gc.isenabled():  # an automatic collection is not ours
            points.append((done[0], info["generation"]))

    def step(batch):
        enabled.append(gc.isenabled())
        done[0] += 1
        return StepOutput({"lm loss": 1.0}, {"lm loss": 1.0}, True, 0.5)

    logger = TrainingLogger(cfg, dist.get_world_size(), torch.device("cpu"), enabled=False)
    gc.callbacks.append(record)
    try:
        run_iterations(step, cfg, logger, lr=lambda: 1e-3, loss_scale=lambda: 1.0,
                       evaluate=lambda: {"lm loss": 1.0})
    finally:
        gc.callbacks.remove(record)
    return points, set(enabled), gc.isenabled()


def test_manual_gc_collects_at_the_same_iterations_on_every_rank():
    # once at the start, after iterations 3 and 6, fully before and young-only after each
    # evaluation (iterations 4 and 8)
    expected = [(0, 2), (3, 2), (4, 2), (4, 0), (6, 2), (8, 2), (8, 0)]
    for points, enabled, restored in run_distributed(2, _gc_points, True):
        assert points == expected
        assert enabled == {False} and restored
    for points, _, restored in run_distributed(2, _gc_points, False):
        assert points == [(0, 2), (3, 2), (6, 2)] and restored


def _empty_cache_calls(level: int) -> tuple[list, list]:
    """The order of cache emptying and optimizer steps in one training step, and the cache
    emptyings of a two-iteration evaluation, at ``empty_unused_memory_level=level``."""
    cfg = job()
    ps.initialize_model_parallel(1)
    set_random_seed(cfg.training.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    shapes = {"seq_length": 16, "micro_batch_size": 2, "empty_unused_memory_level": level}
    train_step(gpt_step.forward_step, micro_batches(1), model, optimizer, scheduler,
               num_microbatches=4, **shapes)  # the real call: nothing happens on the CPU
    events = []
    real_empty_cache, real_step = torch.cuda.empty_cache, optimizer.step
    torch.cuda.empty_cache = lambda: events.append("empty cache")
    optimizer.step = lambda: events.append("optimizer step") or real_step()
    try:
        train_step(gpt_step.forward_step, micro_batches(1), model, optimizer, scheduler,
                   num_microbatches=4, **shapes)
        in_step = list(events)
        events.clear()
        evaluate(gpt_step.forward_step, micro_batches(2), model, eval_iters=2, num_microbatches=4,
                 **shapes)
    finally:
        torch.cuda.empty_cache = real_empty_cache
    return in_step, events


@pytest.mark.parametrize("level, in_step, in_evaluation", [
    (0, ["optimizer step"], []),
    (1, ["empty cache", "optimizer step"], ["empty cache"] * 2),
    (2, ["empty cache", "optimizer step", "empty cache"], ["empty cache"] * 2),
])
def test_empty_unused_memory_level_follows_megatron(level, in_step, in_evaluation):
    assert run_distributed(1, _empty_cache_calls, level)[0] == (in_step, in_evaluation)


def tiny_job(**logging) -> JobConfig:
    """Four iterations of a one-layer GPT on mock data, at DP 2, logging every 2 iterations and
    evaluating at iterations 2 and 4."""
    cfg = JobConfig.from_dict({
        "model": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                  "vocab_size": 64, "seq_length": 8, "make_vocab_size_divisible_by": 16,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "training": {"micro_batch_size": 1, "global_batch_size": 2, "train_iters": 4,
                     "lr": 1e-3, "lr_warmup_iters": 0, "eval_interval": 2, "eval_iters": 1,
                     "seed": 5, "manual_gc": True, "empty_unused_memory_level": 2},
        "data": {"mock_data": True, "num_workers": 0},
        "logging": {"log_interval": 2, "progress": False, **logging},
    })
    cfg.validate(2)
    return cfg


def _pretrain(cfg: JobConfig, env: dict[str, str]) -> str:
    """What the job prints on this rank, run with ``env`` in the environment (at ``cfg``'s
    TP and PP sizes)."""
    out = io.StringIO()
    with environment(env):
        ps.initialize_model_parallel(cfg.model.tensor_model_parallel_size,
                                     cfg.model.pipeline_model_parallel_size)
        with contextlib.redirect_stdout(out):
            pretrain(cfg)
    return out.getvalue()


def test_pytorch_profiler_traces_the_profiled_iterations_on_the_listed_ranks(tmp_path):
    cfg = tiny_job(profile=True, use_pytorch_profiler=True, profile_step_start=1,
                   profile_step_end=3, profile_ranks=[1], tensorboard_dir=str(tmp_path))
    run_distributed(2, _pretrain, cfg, {})
    traces = glob.glob(str(tmp_path / "*.pt.trace.json"))
    assert [os.path.basename(t).split(".")[0] for t in traces] == ["rank1"]
    with open(traces[0]) as f:
        names = {event.get("name", "") for event in json.load(f)["traceEvents"]}
    # iterations 2 and 3 (after 1 and until 3 are done), by their numbers on the log lines
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == \
        ["ProfilerStep#2", "ProfilerStep#3"]
    assert "aten::mm" in names or "aten::addmm" in names  # the model's work is in it


def test_profiling_config_rules_and_the_cpu_notice(capsys):
    with pytest.raises(ConfigError, match="use_pytorch_profiler=true writes its trace into "
                                          "logging.tensorboard_dir"):
        LoggingConfig(profile=True, use_pytorch_profiler=True)
    cfg = LoggingConfig(profile=True, profile_ranks=[0, 2])
    for rank in (0, 1):
        with IterationProfiler(cfg, rank, torch.device("cpu")) as profiler:
            profiler.before_iteration(10)  # in the range: nothing to start on the CPU
            profiler.after_iteration(11)
    assert capsys.readouterr().out == (
        "rank 0: logging.profile without logging.use_pytorch_profiler marks iterations for the "
        "CUDA profiler (nsys); on the cpu there is nothing to capture\n")


def _read_wandb_file(path: str) -> list:
    """The records of a W&B run file: a LevelDB-style log (a 7-byte header, then 32 KiB blocks
    of records ``crc32 <I, length <H, type <B, data``; a record split over blocks is typed
    first/middle/last) of ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    records, pos, partial, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        partial += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            records.append(record)
            partial = b""
    return records


def test_wandb_run_on_the_last_rank_holds_the_logged_values(tmp_path):
    pytest.importorskip("wandb")
    cfg = tiny_job(wandb_project="mp-test", wandb_exp_name="tiny",
                   wandb_save_dir=str(tmp_path / "wandb"), log_interval=1)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
           **{f"WANDB_{d}_DIR": str(tmp_path / d.lower()) for d in ("CONFIG", "CACHE", "DATA")}}
    printed = run_distributed(2, _pretrain, cfg, env)[0]
    runs = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1  # one run, from one rank
    records = _read_wandb_file(runs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("mp-test", "tiny")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["hidden_size"] == 16 and config["logging"]["wandb_exp_name"] == "tiny"
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    assert sorted(history) == [1, 2, 3, 4]  # logged and written every iteration
    for step in (1, 2, 3, 4):
        values = history[step]
        # rank 0 prints what rank 1 logs (losses, rate and norm are the same on every rank)
        assert (f"iteration {step}/4 | consumed samples {2 * step} | global batch size 2 | "
                f"lm loss {values['lm loss']:.4E} | lr {values['learning-rate']:.3E} | "
                f"grad norm {values['grad-norm']:.3f} |") in printed, (values, printed)
        assert values["batch-size"] == 2
    for step, split in ((2, "validation"), (4, "validation"), (4, "test")):
        values = history[step]
        assert f"{split} at iteration {step} | lm loss {values[f'{split} lm loss']:.4E}" \
            in printed
        assert values[f"{split} lm loss PPL"] == pytest.approx(
            math.exp(values[f"{split} lm loss"]))
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished


def test_without_wandb_the_job_says_so_and_logs_on(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = job()
    cfg.logging.wandb_project, cfg.logging.log_interval = "mp-test", 1
    logger = TrainingLogger(cfg, 1, torch.device("cpu"), enabled=True)
    logger.training_iteration(1, 8, {"lm loss": 3.0}, 1e-3, 0.5, 1.0, True, 8)
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("logging.wandb_project='mp-test' is set but wandb is not usable "
                               "(import of wandb halted; None in sys.modules); pip install wandb")
    assert lines[1].startswith("iteration 1/20 | consumed samples 8 |")


class _FakeWandb:
    """A stand-in ``wandb`` module whose ``init`` fails as W&B does without a login, or
    returns a run."""

    def __init__(self, fails: bool):
        self.fails = fails

    def init(self, **settings):
        if self.fails:
            raise RuntimeError("No API key configured. Use `wandb login` to log in.")
        return "run"


def _open_logger_with_wandb(fails: bool) -> str:
    """What constructing the job's logger gives this rank: its W&B run, or its error."""
    cfg = job()
    cfg.logging.wandb_project = "mp-test"
    saved = sys.modules.get("wandb")
    sys.modules["wandb"] = _FakeWandb(fails)
    try:
        logger = TrainingLogger(cfg, dist.get_world_size(), torch.device("cpu"),
                                enabled=dist.get_rank() == 0)
        return f"run {logger.wandb}"
    except RuntimeError as error:
        return f"error {error}"
    finally:
        sys.modules.pop("wandb")
        if saved is not None:
            sys.modules["wandb"] = saved


def test_a_failing_wandb_init_stops_every_rank_before_training():
    """Only the last rank opens W&B; when that fails, the others must not go on into the first
    step's collectives and die there: every rank raises at the logger's construction."""
    assert run_distributed(2, _open_logger_with_wandb, False) == ["run None", "run run"]
    first, last = run_distributed(2, _open_logger_with_wandb, True)
    assert first == ("error logging.wandb_project='mp-test': wandb.init failed on the last "
                     "rank (1), which logs to W&B; its error says why")
    assert last == ("error logging.wandb_project='mp-test': wandb.init failed on this rank, "
                    "which logs to W&B (RuntimeError: No API key configured. Use `wandb login` "
                    "to log in.); run `wandb login` or set WANDB_API_KEY, or log offline with "
                    "WANDB_MODE=offline, or drop --wandb-project")
