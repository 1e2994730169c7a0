"""Four Megatron-LM run flags: ``--pretrained-checkpoint`` (fine-tune from it when ``--load``
holds no checkpoint, which wins when it does: Megatron's ``load_checkpoint``),
``--use-mp-args-from-checkpoint-args`` (the TP/PP sizes of the checkpoint's layout, over the
command line's: Megatron's ``load_args_from_checkpoint``), ``--log-progress`` (progress.txt's
lines and numbers, FLOPs checked against Narayanan et al.'s closed form) and
``--record-memory-history`` (CUDA's calls with the path at Megatron's points, patched; the
CPU's one-line notice). One short TP2 job run writes the checkpoint and the log the checks
share."""

import os
import re
from datetime import datetime

import pytest
import torch
from harness import run_distributed
from test_config import TINY
from test_training_runtime import _pretrain

from mp.checkpointing import job as checkpoint_job
from mp.config import ConfigError, JobConfig, load_config
from mp.training import logger as logger_module
from mp.training.logger import TrainingLogger, record_memory_history
from mp.training.pretrain import check_supported
from mp.training.progress_log import PROGRESS_FILE, start_from_progress_log

SEQ, HIDDEN, VOCAB, BATCH = 8, 16, 64, 2
JOB_ID = "4242"


def _job_config(save: str) -> JobConfig:
    """Four iterations of a one-layer GPT at TP 2 on mock data, saving every 2 iterations with
    the progress log and the memory history asked for."""
    cfg = JobConfig.from_dict({
        "model": {"num_layers": 1, "hidden_size": HIDDEN, "num_attention_heads": 2,
                  "vocab_size": VOCAB, "seq_length": SEQ, "make_vocab_size_divisible_by": 16,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "tensor_model_parallel_size": 2},
        "training": {"micro_batch_size": 1, "global_batch_size": BATCH, "train_iters": 4,
                     "lr": 1e-3, "lr_warmup_iters": 0, "eval_interval": None, "eval_iters": 0,
                     "seed": 5, "save": save, "save_interval": 2},
        "data": {"mock_data": True, "num_workers": 0},
        "logging": {"log_interval": 2, "progress": False, "log_progress": True,
                    "record_memory_history": True},
    })
    cfg.validate(2)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The job's save directory and what each rank printed."""
    save = str(tmp_path_factory.mktemp("run") / "save")
    outputs = run_distributed(2, _pretrain, _job_config(save), {"SLURM_JOB_ID": JOB_ID})
    return save, outputs


def _narayanan_flops(samples: int) -> float:
    """Narayanan et al. 2021, eq. 3 without recompute: 72 B s l h^2 (1 + s/6h + V/12lh)."""
    return 72 * samples * SEQ * 1 * HIDDEN**2 * (1 + SEQ / (6 * HIDDEN)
                                                 + VOCAB / (12 * 1 * HIDDEN))


def test_progress_log_has_megatrons_lines_and_the_runs_numbers(run):
    save, _ = run
    with open(os.path.join(save, PROGRESS_FILE), encoding="utf-8") as file:
        lines = [line.rstrip("\n").split("\t") for line in file]
    assert [line[3] for line in lines] == ["Starting job", "Saved checkpoint", "Saved checkpoint"]
    for line in lines:
        datetime.strptime(line[0], "%Y-%m-%d %H:%M:%S")
        assert line[1:3] == [f"Job ID: {JOB_ID}", "# GPUs: 2"]
    for line, iteration in zip(lines[1:], (2, 4)):
        samples = iteration * BATCH
        assert len(line) == 9
        assert line[4] == f"Iteration: {iteration}"
        for field, name in zip(line[5:7], ("Job", "Cumulative")):
            label, value = field.split(": ")
            assert label == f"{name} throughput" and value.endswith(" TFLOP/s/GPU")
            assert float(value.split()[0]) >= 0.0
        assert line[7] == f"Floating-point operations: {_narayanan_flops(samples):.2e}"
        assert line[8] == f"Tokens (in billions): {samples * SEQ / 1e9:.2f}"


def test_progress_log_start_is_the_first_job_of_the_current_world_size(tmp_path):
    path = tmp_path / PROGRESS_FILE
    rows = [("2026-01-01 00:00:00", 8, "Starting job"),
            ("2026-01-01 01:00:00", 8, "Saved checkpoint\tIteration: 10\tJob throughput: 1.0 "
             "TFLOP/s/GPU\tCumulative throughput: 1.0 TFLOP/s/GPU\tFloating-point operations: "
             "3.00e+15\tTokens (in billions): 0.01"),
            ("2026-01-01 02:00:00", 4, "Starting job"),
            ("2026-01-01 03:00:00", 4, "Saved checkpoint\tIteration: 20\tJob throughput: 1.0 "
             "TFLOP/s/GPU\tCumulative throughput: 1.0 TFLOP/s/GPU\tFloating-point operations: "
             "5.00e+15\tTokens (in billions): 0.02"),
            ("2026-01-01 04:00:00", 4, "Starting job")]
    path.write_text("".join(f"{when}\tJob ID: \t# GPUs: {world}\t{text}\n"
                            for when, world, text in rows))
    assert start_from_progress_log(str(path), 4) == (datetime(2026, 1, 1, 2), 3e15)
    with pytest.raises(ValueError, match="no 'Starting job' line of 8 GPUs"):
        start_from_progress_log(str(path), 8)


def test_memory_history_on_the_cpu_is_a_notice_on_rank_0_only(run):
    _, outputs = run
    notice = "logging.record_memory_history is set but the job runs on cpu"
    assert [out.count(notice) for out in outputs] == [1, 0]


def _cfg(*flags: str) -> JobConfig:
    return load_config(TINY, list(flags), world_size=2)


def test_the_flags_set_megatrons_keys():
    cfg = _cfg("--pretrained-checkpoint", "/pre", "--log-progress", "--record-memory-history",
               "--memory-snapshot-path", "m.pkl", "--finetune", "--ckpt-step", "3")
    assert cfg.training.pretrained_checkpoint == "/pre" and cfg.training.finetune
    assert (cfg.logging.log_progress, cfg.logging.record_memory_history,
            cfg.logging.memory_snapshot_path) == (True, True, "m.pkl")
    assert _cfg().logging.memory_snapshot_path == "snapshot.pickle"  # Megatron's default


@pytest.mark.parametrize("flags, message", [
    (("--use-mp-args-from-checkpoint-args", "--load", "/l"),
     "needs training.use_checkpoint_args=true"),
    (("--pretrained-checkpoint", "/p", "--deepspeed"), "training.pretrained_checkpoint"),
    (("--memory-snapshot-path", ""), "must name a file"),
])
def test_bad_flags_fail_with_the_rule(flags, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*flags)


def test_log_progress_needs_a_save_directory():
    with pytest.raises(ValueError, match="log_progress=true writes progress.txt into "
                                         "training.save, which is not set"):
        check_supported(_cfg("--log-progress"))


def test_mp_args_come_from_the_checkpoints_layout_over_the_command_line(run):
    save, _ = run
    base = ("--load", save, "--use-checkpoint-args", "--tensor-model-parallel-size", "1")
    assert _cfg(*base).model.tensor_model_parallel_size == 1  # the command line's
    taken = _cfg(*base, "--use-mp-args-from-checkpoint-args").model
    assert (taken.tensor_model_parallel_size, taken.pipeline_model_parallel_size) == (2, 1)


def _start(*flags: str) -> checkpoint_job.StartPoint:
    cfg = _cfg(*flags)
    check_supported(cfg)
    return checkpoint_job.start_point(cfg)


def test_pretrained_checkpoint_is_fine_tuned_from_only_when_load_holds_none(run, tmp_path):
    save, _ = run
    empty = str(tmp_path / "empty")
    newest = os.path.join(save, "iter_0000004")
    for flags in ((), ("--load", empty), ("--load", empty, "--exit-on-missing-checkpoint")):
        start = _start("--pretrained-checkpoint", save, *flags)
        assert (os.fspath(start.checkpoint), start.resumes, start.iteration) == (newest, False, 0)
    start = _start("--pretrained-checkpoint", save, "--ckpt-step", "2")
    assert os.fspath(start.checkpoint) == os.path.join(save, "iter_0000002")
    start = _start("--load", save, "--pretrained-checkpoint", empty)  # load wins: a resume
    assert (os.fspath(start.checkpoint), start.resumes, start.iteration) == (newest, True, 4)
    with pytest.raises(ValueError, match=re.escape(
            f"pretrained_checkpoint={empty!r} holds no checkpoint, and training.load="
            f"{empty!r} holds none")):
        _start("--load", empty, "--pretrained-checkpoint", empty)


def _patch_cuda(monkeypatch) -> list:
    """Record the CUDA memory calls instead of making them."""
    calls = []
    memory = torch.cuda.memory
    monkeypatch.setattr(memory, "_record_memory_history",
                        lambda *a, **k: calls.append(("record", a, k)))
    monkeypatch.setattr(memory, "_dump_snapshot", lambda path: calls.append(("dump", path)))
    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer",
                        lambda observer: calls.append(("observer", observer)), raising=False)
    monkeypatch.setattr(logger_module, "peak_tflops", lambda device: None)
    monkeypatch.setattr(logger_module, "peak_memory_bytes", lambda device: 0)
    return calls


def test_memory_history_on_cuda_records_and_dumps_at_megatrons_points(monkeypatch, tmp_path):
    calls = _patch_cuda(monkeypatch)
    path = str(tmp_path / "mem" / "snap.pickle")
    cfg = _cfg("--record-memory-history", "--memory-snapshot-path", path, "--log-interval", "2")
    cuda = torch.device("cuda")
    assert record_memory_history(cfg, cuda)
    assert calls[0] == ("record", (), {"enabled": "all", "max_entries": 100000})
    observer = calls[1][1]
    observer(0, 0, 0, 0)  # out of memory: the rank's snapshot beside the path
    assert calls[2:] == [("dump", str(tmp_path / "mem" / "oom_rank-0_snap.pickle"))]
    del calls[:]
    log = TrainingLogger(cfg, 2, cuda, enabled=False)
    dumped_at = []
    for iteration in range(1, 6):
        log.training_iteration(iteration, iteration * 16, {"lm loss": 1.0}, 1e-3, 1.0, 1.0,
                               True, 16)
        if calls:
            dumped_at.append((iteration, calls.pop()))
    assert dumped_at == [(2, ("dump", path)), (4, ("dump", path))]  # with each log line
    assert not record_memory_history(_cfg(), cuda) and not calls  # not asked: nothing


def test_memory_history_on_the_cpu_calls_nothing(monkeypatch, capsys):
    calls = _patch_cuda(monkeypatch)
    cfg = _cfg("--record-memory-history")
    assert not record_memory_history(cfg, torch.device("cpu"))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "only CUDA records an allocator history" in out[0]
    log = TrainingLogger(cfg, 2, torch.device("cpu"), enabled=False)
    for iteration in range(1, 3):
        log.training_iteration(iteration, iteration, {"lm loss": 1.0}, 1e-3, 1.0, 1.0, True, 1)
    assert calls == []
