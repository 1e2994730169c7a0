"""Megatron's end of ``pretrain`` and its TensorBoard flags. After the last iteration (and the
final save) the job evaluates the test split's first ``eval_iters`` global batches: the printed
``test`` loss equals the final checkpoint's loss on those samples computed here by hand, at DP2
and PP2 (per-token loss); an empty test split, ``eval_iters`` 0 and an early exit evaluate no
test, and ``--skip-train`` evaluates validation and test without writing scalars.
``--tensorboard-log-interval N`` writes the iteration's own values every N iterations while the
line keeps its averages; ``--log-world-size-to-tensorboard`` adds ``world-size`` and
``--tensorboard-queue-size`` sizes the writer's queue."""

import re

import pytest
import torch
from harness import run_distributed
from test_checkpoint_flags import _variant
from test_config import TINY
from test_training import job
from test_training_runtime import _pretrain, tiny_job

from mp import parallel_state as ps
from mp.checkpointing import job as checkpoint_job
from mp.config import parse_args
from mp.data.mock import MockGPTDataset
from mp.training.logger import TrainingLogger
from mp.training.pretrain import setup_model_and_optimizer
from mp.training.training import StepOutput, TrainState, run_iterations

EVAL_ITERS = 2
LINE = r"^{} at iteration 4 \| lm loss (\S+) \| lm loss PPL (\S+)$"


def _direct_test_loss(cfg, directory: str) -> float:
    """One process: the checkpoint in ``directory`` at TP1 PP1, its mean per-token loss over
    the mock test split's first ``EVAL_ITERS`` global batches (every token counts: mock data
    masks none, so the mean of micro-batch means and the per-token loss agree)."""
    ps.initialize_model_parallel(1)
    serial = _variant(cfg, model={"tensor_model_parallel_size": 1,
                                  "pipeline_model_parallel_size": 1},
                      training={"load": directory, "save": None})
    model, optimizer, scheduler = setup_model_and_optimizer(serial)
    checkpoint_job.resume(checkpoint_job.start_point(serial), model, optimizer, scheduler)
    m, tr = serial.model, serial.training
    test = MockGPTDataset(EVAL_ITERS * tr.global_batch_size, m.seq_length, m.vocab_size,
                          tr.seed + 2)  # the job's train, valid, test seeds: seed + 0, 1, 2
    samples = [test[i] for i in range(len(test))]
    model[0].eval()
    with torch.no_grad():
        losses = model[0](torch.stack([s["tokens"] for s in samples]),
                          torch.stack([s["position_ids"] for s in samples]),
                          labels=torch.stack([s["labels"] for s in samples]))
    return losses.double().mean().item()


@pytest.mark.parametrize("pp, per_token", [(1, False), (2, True)], ids=["DP2", "PP2"])
def test_the_test_loss_is_the_final_models_loss_on_the_first_test_batches(tmp_path, pp,
                                                                          per_token):
    cfg = _variant(tiny_job(), model={"num_layers": 2, "pipeline_model_parallel_size": pp},
                   training={"lr": 3e-3, "eval_iters": EVAL_ITERS, "save": str(tmp_path),
                             "calculate_per_token_loss": per_token})
    out = run_distributed(2, _pretrain, cfg, {})[0]
    test = re.findall(LINE.format("test"), out, re.MULTILINE)
    assert len(test) == 1, out
    assert out.rstrip().endswith(f"test at iteration 4 | lm loss {test[0][0]} | lm loss PPL "
                                 f"{test[0][1]}"), out  # after the last save, last
    want = run_distributed(1, _direct_test_loss, cfg, str(tmp_path))[0]
    assert float(test[0][0]) == pytest.approx(want, rel=2e-5)
    validation = re.search(LINE.format("validation"), out, re.MULTILINE)
    assert validation[1] != test[0][0]  # another split


def test_an_empty_test_split_is_not_evaluated():
    cfg = _variant(tiny_job(), data={"split": "98,2,0"})
    out = run_distributed(2, _pretrain, cfg, {})[0]
    assert re.search(LINE.format("validation"), out, re.MULTILINE), out
    assert not re.search("^test ", out, re.MULTILINE), out


def _loop_calls(stop_at: int | None = None, **training) -> list[str]:
    """What the loop does, in order, over 4 iterations evaluated at 2 and at the end."""
    cfg = job(**{"train_iters": 4, "eval_interval": 2, "eval_iters": 1, **training})
    calls = []

    def step(batch):
        calls.append("step")
        return StepOutput({"lm loss": 1.0}, {"lm loss": 1.0}, True, 0.5)

    class StopAt:
        def reason(self, iteration):
            return "stop" if iteration == stop_at else None

    run_iterations(step, cfg, TrainingLogger(cfg, 1, torch.device("cpu"), enabled=False),
                   lr=lambda: 1e-3, loss_scale=lambda: 1.0,
                   evaluate=lambda: calls.append("validation") or {"lm loss": 1.0},
                   test=lambda: calls.append("test") or {"lm loss": 1.0},
                   state=TrainState(4, 32) if training.get("skip_train") else None,
                   checkpoint_hook=lambda s: calls.append("save"),
                   exit_conditions=StopAt())
    return calls


def test_the_loop_tests_last_and_only_at_a_normal_end():
    two = ["step"] * 2
    assert run_distributed(1, _loop_calls) == [[*two, "validation", *two, "validation",
                                                "save", "test"]]
    assert run_distributed(1, _loop_calls, eval_iters=0) == [[*two, *two, "save"]]
    assert run_distributed(1, _loop_calls, stop_at=3) == [[*two, "validation", "step",
                                                           "save"]]
    assert run_distributed(1, _loop_calls, skip_train=True) == [["validation", "test"]]


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_each_nth_iterations_values_and_the_line_keeps_its_means(
        tmp_path, capsys):
    pytest.importorskip("tensorboard")
    cfg = job()
    lg = cfg.logging
    lg.log_interval, lg.tensorboard_log_interval, lg.tensorboard_dir = 4, 3, str(tmp_path)
    lg.log_world_size_to_tensorboard, lg.tensorboard_queue_size = True, 7
    logger = TrainingLogger(cfg, 4, torch.device("cpu"), enabled=True)
    # the writer's pending-event queue (tensorboard's EventFileWriter) holds queue_size events
    assert logger.writer._get_file_writer().event_writer._async_writer._byte_queue.maxsize == 7
    loss, lr, norm = (lambda it: 4.0 + it), (lambda it: 1e-4 * it), (lambda it: 0.1 * it)
    decoupled = lambda it: 3e-4 * it  # noqa: E731
    for it in range(1, 9):
        logger.training_iteration(it, 8 * it, {"lm loss": loss(it), "moe/z_loss_layer_1": it},
                                  lr(it), norm(it), 1.0, True, 8, decoupled_lr=decoupled(it))
    logger.evaluation("test", 8, {"lm loss": 2.0})
    logger.evaluation("validation", 8, {"lm loss": 3.0}, write=False)  # --skip-train
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    means = [re.search(r"\| lm loss (\S+) \|", line)[1] for line in lines[:2]]
    assert means == ["6.5000E+00", "1.0500E+01"]  # iterations 1-4 and 5-8
    assert "| lr 8.000E-04 | decoupled lr 2.400E-03 | grad norm 0.800 |" in lines[1]
    assert not any("moe/" in line for line in lines)  # a layer's loss: TensorBoard's only
    scalars = _scalars(tmp_path)
    for tag, value in (("lm loss", loss), ("learning-rate", lr), ("grad-norm", norm),
                       ("decoupled-learning-rate", decoupled),
                       ("world-size", lambda it: 4), ("batch-size", lambda it: 8),
                       ("moe/z_loss_layer_1", lambda it: it)):
        assert scalars[tag] == [(it, pytest.approx(value(it))) for it in (3, 6)], tag
    assert [step for step, _ in scalars["iteration-time-ms"]] == [4, 8]
    assert scalars["test lm loss"] == [(8, 2.0)]
    assert scalars["test lm loss PPL"] == [(8, pytest.approx(torch.e ** 2))]
    assert not any(tag.startswith("validation") for tag in scalars)


def test_megatron_tensorboard_flags_set_the_keys():
    lg = parse_args(["--config", TINY, "--tensorboard-log-interval", "5",
                     "--tensorboard-queue-size", "7", "--log-world-size-to-tensorboard"],
                    world_size=4).logging
    assert (lg.tensorboard_log_interval, lg.tensorboard_queue_size,
            lg.log_world_size_to_tensorboard) == (5, 7, True)
    default = parse_args(["--config", TINY], world_size=4).logging
    assert (default.tensorboard_log_interval, default.tensorboard_queue_size,
            default.log_world_size_to_tensorboard) == (1, 1000, False)
