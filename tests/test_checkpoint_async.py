"""Asynchronous saves (Megatron's ``--async-save``, `mp.checkpointing.async_save`) at TP 2 x
DP 2: training goes on (its collectives included) while the checkpoint is written; nothing is
committed until every rank has written; the committed checkpoint is the state at the save,
not after (a resume from it continues bit for bit like one from a synchronous save of that
moment); a failed write stops every rank and leaves the previous checkpoint the latest; the
job saves asynchronously at its interval and at its end."""

import threading

import pytest
import torch.distributed as dist
from gpt_runs import GLOBAL_BATCH, setup, train_step
from harness import run_distributed
from test_checkpoint_flags import _job, _resume_and_continue, _same_runs

from mp.checkpointing import CheckpointError, async_save
from mp.checkpointing import job as checkpoint_job
from mp.checkpointing.files import read_latest
from mp.training.training import TrainState


def _save_while_training(path: str) -> dict:
    """Two iterations, a synchronous save into ``path/sync`` and an asynchronous one into
    ``path/async`` whose writer waits until two more iterations have run; the checkpoint is
    committed only after that."""
    models, optimizer, scheduler = setup(2, 1, seed=1)
    for step in range(2):
        train_step(models, optimizer, scheduler, step)
    state = TrainState(2, 2 * GLOBAL_BATCH)
    checkpoint_job.checkpoint_hook(_job("--save", f"{path}/sync"), models, optimizer,
                                   scheduler)(state)
    released = threading.Event()
    write = async_save.write_tensors

    def held_back(*args, **kwargs):
        assert released.wait(timeout=120), "the training thread never released the writer"
        write(*args, **kwargs)

    async_save.write_tensors = held_back
    try:
        saver = checkpoint_job.checkpoint_hook(_job("--save", f"{path}/async", "--async-save"),
                                               models, optimizer, scheduler)
        saver(state)
        polls = []
        for step in range(2, 4):  # training (and its collectives) while the writer waits
            train_step(models, optimizer, scheduler, step)
            saver.poll()
            polls.append(saver.pending is not None)
        committed_early = read_latest(f"{path}/async")
        released.set()
        while saver.pending is not None:
            saver.poll()
    finally:
        async_save.write_tensors = write
    return {"polls": polls, "committed_early": committed_early,
            "latest": read_latest(f"{path}/async")}


def test_training_goes_on_while_the_checkpoint_is_written(tmp_path):
    results = run_distributed(4, _save_while_training, str(tmp_path), timeout=300)
    assert all(r == {"polls": [True, True], "committed_early": None, "latest": 2}
               for r in results), results
    # the asynchronous checkpoint holds the state at iteration 2, as the synchronous one
    sync, asynchronous = (run_distributed(4, _resume_and_continue, str(tmp_path / name))
                          for name in ("sync", "async"))
    assert {where for where, _ in asynchronous} == {where for where, _ in sync}
    assert _same_runs([run for _, run in asynchronous], [run for _, run in sync])


def _failing_write(path: str) -> str:
    """A synchronous save at iteration 1, then an asynchronous one at 2 whose rank 1 fails to
    hash its files: every rank's `finish` raises, and iteration 1 stays the latest."""
    models, optimizer, scheduler = setup(2, 1, seed=1)
    train_step(models, optimizer, scheduler, 0)
    checkpoint_job.checkpoint_hook(_job("--save", path), models, optimizer, scheduler)(
        TrainState(1, GLOBAL_BATCH))
    describe = async_save.describe_share

    def broken(ranks, staging):
        if dist.get_rank() == 1:
            raise OSError("No space left on device")
        return describe(ranks, staging)

    async_save.describe_share = broken
    try:
        saver = checkpoint_job.checkpoint_hook(_job("--save", path, "--async-save"), models,
                                               optimizer, scheduler)
        saver(TrainState(2, 2 * GLOBAL_BATCH))
        with pytest.raises(CheckpointError) as error:
            saver.finish()
    finally:
        async_save.describe_share = describe
    assert read_latest(path) == 1
    return str(error.value)


def test_a_failed_write_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    for message in run_distributed(4, _failing_write, str(tmp_path)):
        assert message.startswith("the asynchronous save of iteration 2 failed; the previous "
                                  "checkpoint stands:\n  rank 1: OSError('No space left on "
                                  "device')")


def _job_run(path: str) -> list[int]:
    """The training loop for 5 iterations, saving asynchronously every 2 (and at the end)."""
    from mp import parallel_state as ps
    from mp.config import JobConfig
    from mp.training.pretrain import pretrain

    cfg = JobConfig.from_dict({
        "model": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                  "vocab_size": 64, "seq_length": 8, "make_vocab_size_divisible_by": 16,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "training": {"micro_batch_size": 1, "global_batch_size": 2, "train_iters": 5,
                     "lr": 1e-3, "eval_iters": 0, "seed": 5, "save": path,
                     "save_interval": 2, "async_save": True},
        "data": {"mock_data": True, "num_workers": 0},
        "logging": {"progress": False}})
    cfg.validate(2)
    ps.initialize_model_parallel(1)
    pretrain(cfg)
    return read_latest(path)


def test_the_job_saves_asynchronously_at_its_interval_and_end(tmp_path):
    assert run_distributed(2, _job_run, str(tmp_path)) == [5, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002", "iter_0000004", "iter_0000005", "latest_checkpointed_iteration.txt"]


def _nan_after_an_asynchronous_save(path: str) -> tuple[str, int | None]:
    """Saves every 2 iterations, asynchronously; the loss turns NaN in iteration 3 while the
    save of iteration 2 may still be in flight: the stop commits it first."""
    from test_training import job, train_until_nan

    cfg = job(train_iters=6, save=path, save_interval=2, async_save=True)
    message, _ = train_until_nan(cfg, None, 3, lambda *state: checkpoint_job.checkpoint_hook(
        cfg, *state))
    return message, read_latest(path)


def test_a_non_finite_loss_commits_the_save_in_flight_first(tmp_path):
    for message, latest in run_distributed(2, _nan_after_an_asynchronous_save, str(tmp_path)):
        assert "resume from the checkpoint of iteration 2" in message and latest == 2
