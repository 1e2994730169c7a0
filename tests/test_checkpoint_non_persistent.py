"""Non-persistent checkpoints (Megatron's ``--non-persistent-save-interval`` with
``--non-persistent-ckpt-type global``): the job saves into a scratch directory that keeps only
its newest checkpoint, a ``save_interval`` iteration saving into ``save`` instead; a resume
takes the scratch checkpoint when it is at least as new as ``load``'s and continues from it
bit for bit like the run that was not stopped."""

import shutil

import pytest
import torch
from harness import run_distributed

from mp.checkpointing import job as checkpoint_job
from mp.checkpointing.checkpoint import load_global_model
from mp.checkpointing.files import read_latest, write_text_atomically
from mp.config import ConfigError, JobConfig, TrainingConfig

SCRATCH = ("--non-persistent-save-interval", "2", "--non-persistent-ckpt-type", "global")


def _config(path: str, flags: tuple[str, ...] = SCRATCH) -> JobConfig:
    from mp.config.loader import load_config

    return load_config(None, ["--num-layers", "1", "--hidden-size", "16",
                             "--num-attention-heads", "2", "--tokenizer-type", "NullTokenizer",
                             "--vocab-size", "64",
                             "--seq-length", "8", "--make-vocab-size-divisible-by", "16",
                             "--hidden-dropout", "0", "--attention-dropout", "0",
                             "--micro-batch-size", "1", "--global-batch-size", "2",
                             "--train-iters", "6", "--lr", "1e-3", "--eval-iters", "0",
                             "--seed", "5", "--mock-data", "--num-workers", "0",
                             "--save", path, "--save-interval", "3", *flags],
                       world_size=2)


def _train(path: str, load: str | None = None) -> None:
    from mp import parallel_state as ps
    from mp.training.pretrain import pretrain

    ps.initialize_model_parallel(1)
    pretrain(_config(path, SCRATCH + (("--load", load) if load else ())))


def _chosen(path, *flags: str) -> int:
    """The iteration the job would resume from ``path``."""
    cfg = _config(str(path), ("--load", str(path), *flags))
    return checkpoint_job._checkpoint_to_load(cfg.training)


def test_scratch_saves_keep_the_newest_and_a_resume_takes_them(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_distributed(2, _train, str(straight))
    # iterations 3 and 6 save into save; 2 and 4 into the scratch directory, which keeps 4
    scratch = straight / checkpoint_job.NON_PERSISTENT_DIR
    assert sorted(p.name for p in straight.iterdir()) == [
        "iter_0000003", "iter_0000006", "latest_checkpointed_iteration.txt", "non_persistent"]
    assert sorted(p.name for p in scratch.iterdir()) == [
        "iter_0000004", "latest_checkpointed_iteration.txt"]
    # the scratch checkpoint is older than save's newest: save's is taken
    assert _chosen(straight, *SCRATCH) == straight / "iter_0000006"
    # a job stopped after iteration 5 (its newest: iteration 3, and 4 in the scratch)
    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "iter_0000006")
    write_text_atomically(stopped / "latest_checkpointed_iteration.txt", "3")
    assert _chosen(stopped, *SCRATCH) == stopped / "non_persistent" / "iter_0000004"
    assert _chosen(stopped) == stopped / "iter_0000003"  # no scratch type: not looked at
    assert _chosen(stopped, *SCRATCH, "--ckpt-step", "3") == stopped / "iter_0000003"
    elsewhere = tmp_path / "elsewhere"
    shutil.move(stopped / "non_persistent", elsewhere)
    assert _chosen(stopped, *SCRATCH, "--non-persistent-global-ckpt-dir", str(elsewhere)) \
        == elsewhere / "iter_0000004"
    shutil.move(elsewhere, stopped / "non_persistent")
    # the restart resumes from iteration 4 and ends where the straight run did, bit for bit
    run_distributed(2, _train, str(stopped), str(stopped))
    assert read_latest(stopped) == 6
    mine, _ = load_global_model(stopped / "iter_0000006")
    theirs, _ = load_global_model(straight / "iter_0000006")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)


@pytest.mark.parametrize("flags, message", [
    (("--non-persistent-save-interval", "2"), "needs training.non_persistent_ckpt_type=global"),
    (("--non-persistent-ckpt-type", "local"), "'local' must be 'global'"),
    (("--non-persistent-save-interval", "0", "--non-persistent-ckpt-type", "global"),
     "non_persistent_save_interval=0 must be >= 1"),
    (("--save-retain-interval", "4"), r"save_retain_interval=4 must be a multiple of "
                                      r"training.save_interval=3"),
])
def test_bad_non_persistent_settings_are_refused(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        _config(str(tmp_path), flags)


def test_saving_scratch_checkpoints_needs_save():
    with pytest.raises(ConfigError, match="needs training.save"):
        TrainingConfig(micro_batch_size=1, global_batch_size=1, lr=1e-3, train_iters=1,
                       non_persistent_save_interval=2, non_persistent_ckpt_type="global")
