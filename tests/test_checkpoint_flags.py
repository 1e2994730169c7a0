"""Megatron-LM's checkpoint and run-control flags in the pretraining job. ``--no-save-optim
--no-save-rng`` checkpoints hold no optimizer, schedule or RNG entries (and are smaller), and
resuming one needs ``--no-load-optim``; ``--no-load-optim`` resumes the iteration with fresh
AdamW moments and schedule, bit for bit a run whose optimizer is reset by hand; ``--no-load-rng``
draws other dropout masks than a full resume, which stays bit-exact; ``--skip-train`` prints
the validation loss the training run printed, at any layout, and trains and writes nothing.
(``--exit-on-missing-checkpoint``: test_pretrain's bad-config cases.)"""

import json
import re

import pytest
import torch
from gpt_runs import GLOBAL_BATCH, assemble, load_whole, pieces, setup, train_step
from harness import run_distributed
from test_config import TINY
from test_exit import training
from test_training import job
from test_training_runtime import _pretrain, tiny_job

from mp import parallel_state as ps
from mp.checkpointing import CheckpointError
from mp.checkpointing import job as checkpoint_job
from mp.checkpointing.files import META_FILE
from mp.checkpointing.storage import read_metadata, tensor_entries
from mp.config import ConfigError, JobConfig, load_config, parse_args
from mp.tensor_parallel import get_cuda_rng_tracker
from mp.training.logger import TrainingLogger
from mp.training.training import TrainState, run_iterations

SAVED_AT = 2  # iterations before the checkpoint, and after it
DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}  # the RNG states matter
LEAN = ("--no-save-optim", "--no-save-rng")


def _job(*flags: str) -> JobConfig:
    return load_config(TINY, list(flags), world_size=4)


def _continue(models, optimizer, scheduler) -> tuple[list, dict]:
    """``SAVED_AT`` more iterations: each one's (loss, grad norm, lr), and the weights."""
    curve = [(*train_step(models, optimizer, scheduler, step), scheduler.get_lr())
             for step in range(SAVED_AT, 2 * SAVED_AT)]
    return curve, pieces(models)


def _train_save_and_continue(path: str) -> dict:
    """TP2 x DP2 with dropout: ``SAVED_AT`` iterations, the job's save hook writing a full
    checkpoint into ``path/full`` and a lean one (`LEAN`) into ``path/lean``, then the rest
    of the run straight on."""
    models, optimizer, scheduler = setup(2, 1, seed=1, **DROPOUT)
    for step in range(SAVED_AT):
        train_step(models, optimizer, scheduler, step)
    state = TrainState(SAVED_AT, SAVED_AT * GLOBAL_BATCH)
    for name, flags in (("full", ()), ("lean", LEAN)):
        cfg = _job("--save", f"{path}/{name}", *flags)
        checkpoint_job.checkpoint_hook(cfg, models, optimizer, scheduler)(state)
    rng = torch.get_rng_state(), get_cuda_rng_tracker().get_states()
    return {"weights": pieces(models), "rng": rng,
            "straight": _continue(models, optimizer, scheduler)}


def _resume_and_continue(path: str, *flags: str) -> tuple:
    """The job's start point and resume from ``path`` with ``flags`` into a model of other
    weights, then the rest of the run."""
    models, optimizer, scheduler = setup(2, 1, seed=2, **DROPOUT)
    start = checkpoint_job.start_point(_job("--load", path, *flags))
    checkpoint_job.resume(start, models, optimizer, scheduler)
    where = (start.resumes, start.iteration, start.consumed_train_samples, scheduler.num_steps)
    return where, _continue(models, optimizer, scheduler)


def _reset_by_hand(weights: dict, rngs: list | None) -> tuple:
    """A fresh optimizer and schedule over the saved ``weights`` (copied in by the test's own
    naming), the generators at this rank's saved states ``rngs`` (None: as `setup` left
    them), then the rest of the run."""
    models, optimizer, scheduler = setup(2, 1, seed=2, **DROPOUT)
    load_whole(models, optimizer, weights)
    if rngs is not None:
        cpu, tracker = rngs[torch.distributed.get_rank()]
        torch.set_rng_state(cpu)
        get_cuda_rng_tracker().set_states(tracker)
    return _continue(models, optimizer, scheduler)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("flags")
    return path, run_distributed(4, _train_save_and_continue, str(path))


def _entries(directory) -> set[str]:
    return set(tensor_entries(read_metadata(directory)))


def test_a_lean_checkpoint_holds_no_optimizer_or_rng_state(saved):
    path, _ = saved
    full, lean = (path / name / f"iter_{SAVED_AT:07d}" for name in ("full", "lean"))
    assert {k.split(".")[0] for k in _entries(full)} == {"model", "optimizer", "rng"}
    assert _entries(lean) == {k for k in _entries(full) if k.startswith("model.")}
    meta = json.loads((lean / META_FILE).read_text())
    assert (meta["has_optimizer"], meta["has_rng"], meta["scheduler"], meta["grad_scaler"],
            meta["iteration"]) == (False, False, None, None, SAVED_AT)
    size = {d: sum(f.stat().st_size for f in d.iterdir()) for d in (full, lean)}
    assert size[lean] < 0.5 * size[full], size  # AdamW's two moments are gone
    with pytest.raises(CheckpointError, match=re.escape(
            f"{lean} holds no optimizer state (saved with --no-save-optim): add "
            "--no-load-optim (training.no_load_optim)")):
        checkpoint_job.start_point(_job("--load", str(path / "lean")))


def _same_runs(got: list, want: list) -> bool:
    """Whether two runs (every rank's `_continue`) logged the same values and ended with the
    same weights, bit for bit."""
    mine, theirs = (assemble([weights for _, weights in run]) for run in (got, want))
    return [curve for curve, _ in got] == [curve for curve, _ in want] and \
        all(torch.equal(mine[name], theirs[name]) for name in theirs)


@pytest.mark.parametrize("checkpoint, flags, reference", [
    ("full", (), "straight"),
    ("full", ("--no-load-optim",), "reset, saved RNG"),
    ("lean", ("--no-load-optim",), "reset, seeded RNG"),
    ("lean", ("--no-load-optim", "--no-load-rng"), "reset, seeded RNG"),
    ("full", ("--no-load-rng",), None),
], ids=["full", "no_load_optim", "lean", "lean_no_load_rng", "no_load_rng"])
def test_resume_flags_follow_megatron(saved, checkpoint, flags, reference):
    """Every resume keeps the iteration and data position. A full one continues bit for bit;
    without the optimizer state (the flag, or a lean checkpoint) the moments and the schedule
    start fresh, as in a run whose optimizer is reset by hand; without the RNG states (the
    flag, or a lean checkpoint) the generators keep their seeded states: other dropout masks."""
    path, ranks = saved
    results = run_distributed(4, _resume_and_continue, str(path / checkpoint), *flags)
    steps = 0 if "--no-load-optim" in flags else SAVED_AT
    assert {where for where, _ in results} == \
        {(True, SAVED_AT, SAVED_AT * GLOBAL_BATCH, steps)}
    got, straight = [run for _, run in results], [rank["straight"] for rank in ranks]
    if reference is None:  # the same weights and optimizer state: other dropout masks
        assert got[0][0][0][0] != straight[0][0][0][0]
        return
    if reference == "straight":
        assert _same_runs(got, straight)
        return
    rngs = [rank["rng"] for rank in ranks] if reference == "reset, saved RNG" else None
    weights = assemble([rank["weights"] for rank in ranks])
    assert _same_runs(got, run_distributed(4, _reset_by_hand, weights, rngs))
    assert not _same_runs(got, straight), "the test wants AdamW's state to matter"


# --- --skip-train -------------------------------------------------------------------------

def _variant(cfg: JobConfig, **sections) -> JobConfig:
    """``cfg`` with some keys of its sections changed (``model={...}``, ...)."""
    config = cfg.to_dict()
    for name, keys in sections.items():
        config[name].update(keys)
    return JobConfig.from_dict(config)


VALIDATION = re.compile(r"^validation at iteration 4 \| lm loss (\S+) \|", re.MULTILINE)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["DP2", "TP2", "PP2"])
def test_skip_train_evaluates_the_checkpoint_and_writes_nothing(tmp_path, tp, pp):
    """Saved at DP2 after 4 iterations and one evaluation (the validation split's first
    batches); ``--skip-train --load`` prints that validation loss (the same line at the
    saving layout; to print precision at TP2 and PP2), no iteration, and saves nothing."""
    trained = _variant(tiny_job(), model={"num_layers": 2}, training={
        "lr": 3e-3, "eval_interval": None, "eval_iters": 2, "save": str(tmp_path / "ckpt")})
    printed = run_distributed(2, _pretrain, trained, {})[0]
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    skipping = _variant(trained, model={"tensor_model_parallel_size": tp,
                                        "pipeline_model_parallel_size": pp},
                        training={"load": str(tmp_path / "ckpt"), "skip_train": True,
                                  "save": str(tmp_path / "again")})
    out = run_distributed(2, _pretrain, skipping, {})[0]
    assert re.search(r"resuming from \S+iter_0000004: iteration 4, 8 samples consumed", out), out
    assert "skipping training (training.skip_train) at iteration 4" in out
    assert "per iteration, no training iterations (training.skip_train)" in out
    assert not re.search(r"^iteration \d", out, re.MULTILINE), out
    want, got = VALIDATION.search(printed), VALIDATION.search(out)
    assert got, out
    if (tp, pp) == (1, 1):
        assert got[0] == want[0]
    else:
        assert float(got[1]) == pytest.approx(float(want[1]), rel=2e-4)
    assert not (tmp_path / "again").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before


def test_a_finished_run_started_again_resumes_and_trains_nothing(tmp_path):
    """The same job launched again after it finished (a requeued batch job): it resumes at its
    last iteration with every sample consumed (mock data holds no more) and ends there."""
    trained = _variant(tiny_job(), model={"num_layers": 2}, training={
        "eval_interval": None, "eval_iters": 2, "save": str(tmp_path / "ckpt"),
        "load": str(tmp_path / "ckpt")})
    run_distributed(2, _pretrain, trained, {})
    again = run_distributed(2, _pretrain, trained, {})[0]
    assert re.search(r"resuming from \S+iter_0000004: iteration 4, 8 samples consumed", again)
    assert not re.search(r"^iteration \d", again, re.MULTILINE), again
    assert VALIDATION.search(again), again


def _loop_skipping_training() -> tuple[list[str], int]:
    """The loop under ``training.skip_train`` from a state that saved nothing (a fine-tuning
    start): what it called, and its iteration after."""
    cfg = job(skip_train=True, eval_iters=1, save="/ckpt")
    calls = []
    state = run_iterations(lambda batch: calls.append("step"), cfg,
                           TrainingLogger(cfg, 1, torch.device("cpu"), enabled=False),
                           lr=lambda: 0.0, loss_scale=lambda: 1.0,
                           evaluate=lambda: calls.append("evaluate") or {"lm loss": 1.0},
                           state=TrainState(3, 24),
                           checkpoint_hook=lambda s: calls.append("save"))
    return calls, state.iteration


def test_the_loop_skipping_training_evaluates_once_and_saves_nothing():
    assert run_distributed(1, _loop_skipping_training) == [(["evaluate"], 3)]


# --- the flags and their rules ------------------------------------------------------------

FLAGS = ("no_load_optim", "no_load_rng", "no_save_optim", "no_save_rng",
         "exit_on_missing_checkpoint", "skip_train")


def test_megatron_flags_set_the_keys():
    cfg = parse_args(["--config", TINY, "--load", "ckpt", *(f"--{f.replace('_', '-')}"
                                                             for f in FLAGS)], world_size=4)
    assert [getattr(cfg.training, f) for f in FLAGS] == [True] * len(FLAGS)


@pytest.mark.parametrize("keys, message", [
    ({"exit_on_missing_checkpoint": True},
     ("training.exit_on_missing_checkpoint=true needs training.load (the directory that must "
      "hold a checkpoint)")),
    *(({"deepspeed": True, flag: True},
       (f"training.deepspeed=true with training.{flag}=True: not supported (a DeepSpeed job "
        "saves and resumes DeepSpeed's checkpoints whole); drop one of them"))
      for flag in FLAGS[:4]),
])
def test_contradictions_are_named(keys, message):
    with pytest.raises(ConfigError) as error:
        training(**keys)
    assert str(error.value) == message


def test_redundant_combinations_are_allowed_as_in_megatron():
    """--no-load-optim with --finetune (which loads no optimizer anyway), and --skip-train
    with nothing to evaluate (the job then only loads)."""
    training(load="ckpt", finetune=True, no_load_optim=True, no_load_rng=True)
    training(skip_train=True, eval_iters=0)


# --- --ckpt-step --------------------------------------------------------------------------

def _save_twice_and_load_step(path: str, step: int | None) -> tuple:
    """Iterations 1 and 2 saved into one save directory, each with its weights; then the
    job's start point and resume with ``--ckpt-step step`` into other weights."""
    models, optimizer, scheduler = setup(1, 1, seed=1)
    weights = {}
    for iteration in (1, 2):
        train_step(models, optimizer, scheduler, iteration)
        weights[iteration] = assemble([pieces(models)])
        checkpoint_job.checkpoint_hook(_job("--save", path), models, optimizer, scheduler)(
            TrainState(iteration, iteration * GLOBAL_BATCH))
    ps.destroy_model_parallel()
    models, optimizer, scheduler = setup(1, 1, seed=2)
    flags = () if step is None else ("--ckpt-step", str(step))
    start = checkpoint_job.start_point(_job("--load", path, *flags))
    checkpoint_job.resume(start, models, optimizer, scheduler)
    loaded = assemble([pieces(models)])
    same = {i: all(torch.equal(loaded[k], w[k]) for k in w) for i, w in weights.items()}
    return start.iteration, scheduler.num_steps, same


@pytest.mark.parametrize("step, iteration", [(None, 2), (1, 1), (2, 2)])
def test_ckpt_step_loads_that_iteration(tmp_path, step, iteration):
    """Megatron's --ckpt-step: that iteration's weights, iteration and schedule, not the
    newest's; without it, the newest."""
    (loaded_at, steps, same), = run_distributed(1, _save_twice_and_load_step, str(tmp_path),
                                                step)
    assert (loaded_at, steps) == (iteration, iteration)
    assert same == {1: iteration == 1, 2: iteration == 2}


def test_ckpt_step_names_the_iterations_there(tmp_path):
    run_distributed(1, _save_twice_and_load_step, str(tmp_path), None)
    with pytest.raises(CheckpointError, match=re.escape(
            f"ckpt_step=3: {tmp_path / 'iter_0000003'} is missing or has no manifest.json; "
            f"{tmp_path} holds iterations 1, 2")):
        checkpoint_job.start_point(_job("--load", str(tmp_path), "--ckpt-step", "3"))
    with pytest.raises(ConfigError, match=re.escape(
            "training.ckpt_step=3 needs training.load (the save directory holding that "
            "iteration)")):
        _job("--ckpt-step", "3")
    # --use-checkpoint-args reads that iteration's arguments (a missing one is named too)
    with pytest.raises(ConfigError, match="training.use_checkpoint_args=true: ckpt_step=5"):
        _job("--load", str(tmp_path), "--use-checkpoint-args", "--ckpt-step", "5")
    assert _job("--load", str(tmp_path), "--use-checkpoint-args", "--ckpt-step",
                "1").training.ckpt_step == 1
