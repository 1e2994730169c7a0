"""The training loop on GPTModel: 20 steps at TP2 x DP2 (with and without sequence
parallelism) follow the single-process loss and grad-norm curve of the same global batches;
a non-finite loss stops the run naming the iteration and rank; the FLOPs count equals
Narayanan et al.'s formula; the log line carries every field; the setup hands the per-token
loss, bf16 gradient reduction, decoupled LR and zero-count keys on."""

import io
import math
import re

import pytest
import torch
import torch.distributed as dist
from checks import seeded
from harness import run_distributed

from mp import parallel_state as ps
from mp.config import JobConfig
from mp.model import TransformerConfig
from mp.training import gpt_step
from mp.training.flops import num_floating_point_operations
from mp.training.logger import TrainingLogger
from mp.training.pretrain import set_random_seed, setup_model_and_optimizer
from mp.training.progress import ProgressBar
from mp.training.training import NonFiniteLossError, TrainState, train, train_step

SEQ, VOCAB, MBS, GBS, STEPS = 16, 64, 2, 8, 20


def job(tp: int = 1, sequence_parallel: bool = False, **training) -> JobConfig:
    return JobConfig.from_dict({
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "vocab_size": VOCAB, "seq_length": SEQ, "make_vocab_size_divisible_by": 16,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "tensor_model_parallel_size": tp, "sequence_parallel": sequence_parallel},
        "training": {"micro_batch_size": MBS, "global_batch_size": GBS, "train_iters": STEPS,
                     "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 3, "weight_decay": 0.1,
                     "clip_grad": 1.0, "seed": 7, "eval_interval": None, "eval_iters": 0,
                     "overlap_grad_reduce": True, **training},
        "logging": {"log_interval": 1000, "progress": False},
    })


def global_batch(iteration: int) -> torch.Tensor:
    """``[GBS, SEQ + 1]`` tokens of an iteration: a noisy counting pattern a model can learn."""
    base = torch.arange(SEQ + 1).repeat(GBS, 1) + torch.arange(GBS).unsqueeze(1) * 3
    noise = (seeded((GBS, SEQ + 1), 1000 + iteration) > 1.5).long() * 7
    return (base + noise) % VOCAB


def micro_batches(iterations: int):
    """This rank's micro-batches, dealt as the pretraining sampler deals them: micro-batch
    step ``m`` takes samples ``[m * MBS * DP, (m + 1) * MBS * DP)`` and DP rank ``d`` the
    ``d``-th ``MBS`` of them."""
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for it in range(iterations):
        text = global_batch(it)
        for m in range(GBS // (MBS * dp)):
            rows = text[(m * dp + d) * MBS:(m * dp + d + 1) * MBS]
            yield {"tokens": rows[:, :-1], "labels": rows[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
                   "position_ids": torch.arange(SEQ).repeat(MBS, 1)}


def _train_curve(tp: int, sequence_parallel: bool):
    cfg = job(tp, sequence_parallel)
    ps.initialize_model_parallel(tp)
    set_random_seed(cfg.training.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    data = micro_batches(STEPS)
    curve = []
    for _ in range(STEPS):
        out = train_step(gpt_step.forward_step, data, model, optimizer, scheduler,
                         num_microbatches=cfg.num_microbatches(dist.get_world_size()),
                         seq_length=SEQ, micro_batch_size=MBS)
        assert out.update_successful
        curve.append((out.losses["lm loss"], out.grad_norm, scheduler.get_lr()))
    return curve


@pytest.fixture(scope="module")
def serial_curve():
    return run_distributed(1, _train_curve, 1, False)[0]


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_dp2_follows_the_single_process_curve(serial_curve, sequence_parallel):
    curves = run_distributed(4, _train_curve, 2, sequence_parallel)
    assert all(c == curves[0] for c in curves), "ranks disagree on the reported values"
    losses = [c[0] for c in serial_curve]
    assert losses[-1] < 0.85 * losses[0], f"the loss does not fall: {losses}"
    assert serial_curve[0][1] > 1.0, "the test wants clipping active at the start"
    for step, ((loss, norm, lr), (want_loss, want_norm, want_lr)) in enumerate(
            zip(curves[0], serial_curve)):
        assert loss == pytest.approx(want_loss, rel=1e-5), f"loss at step {step + 1}"
        assert norm == pytest.approx(want_norm, rel=1e-5), f"grad norm at step {step + 1}"
        assert lr == want_lr


def train_until_nan(cfg: JobConfig, bad_rank: int | None, bad_iteration: int,
                    hook=None) -> tuple[str, TrainState]:
    """``train`` at TP 1 with ``cfg`` (6 iterations of 2 micro-batches) whose output turns
    NaN from iteration ``bad_iteration`` on, on ``bad_rank`` (None: every rank); ``hook(model,
    optimizer, scheduler)`` gives its checkpoint hook. The error's message and the state."""
    ps.initialize_model_parallel(1)
    set_random_seed(cfg.training.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    calls = {"n": 0}

    def forward_step(data_iterator, chunk):
        output, loss_func = gpt_step.forward_step(data_iterator, chunk)
        calls["n"] += 1
        if bad_rank in (None, dist.get_rank()) and calls["n"] > 2 * (bad_iteration - 1):
            output = output * float("nan")
        return output, loss_func

    logger = TrainingLogger(cfg, dist.get_world_size(), torch.device("cpu"), enabled=False)
    state = TrainState()
    with pytest.raises(NonFiniteLossError) as error:
        train(forward_step, model, optimizer, scheduler, micro_batches(6), None, cfg, logger,
              state=state, checkpoint_hook=(lambda s: None) if hook is None
              else hook(model, optimizer, scheduler))
    return str(error.value), state


def _nan_at(bad_rank: int, bad_iteration: int):
    message, state = train_until_nan(job(tp=1, train_iters=6), bad_rank, bad_iteration)
    assert state.iteration == bad_iteration
    return message


def test_nan_loss_stops_the_run_naming_iteration_and_rank():
    messages = run_distributed(2, _nan_at, 1, 3)
    assert "iteration 3: the data-parallel mean lm loss is nan on rank 1" in messages[1]
    assert "this rank's own lm loss is nan" in messages[1]
    assert "nan is also the mean over no tokens, when no loss mask" in messages[1]
    assert "another data-parallel rank produced it" in messages[0]
    assert "no checkpoint was saved" in messages[0]  # save_interval unset: only a final save


def _setup_of(training: dict, log_num_zeros_in_grad: bool) -> dict:
    cfg = job(**training)
    cfg.model.precision, cfg.logging.log_num_zeros_in_grad = "bf16", log_num_zeros_in_grad
    cfg.validate(dist.get_world_size())
    ps.initialize_model_parallel(1)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    decoupled = [g["lr"] for g in optimizer.param_groups if g.get("is_decoupled_lr")]
    return {"grads": {m.grad_buffer.dtype for m in model},
            "scaling": {m.gradient_scaling_factor for m in model},
            "decoupled": decoupled, "zeros": optimizer.log_num_zeros_in_grad,
            "schedule": (scheduler.decoupled_lr, scheduler.decoupled_min_lr)}


def test_setup_wires_the_megatron_keys():
    """``setup_model_and_optimizer`` hands the training keys to the pieces that implement them
    (their behaviour: test_per_token_loss, test_grad_reduce_bf16, test_decoupled_lr,
    test_params_norm)."""
    keys = {"calculate_per_token_loss": True, "grad_reduce_in_bf16": True,
            "decoupled_lr": 1e-2, "decoupled_min_lr": 1e-4}
    plain, wired = (run_distributed(2, _setup_of, training, bool(training))[0]
                    for training in ({}, keys))
    assert plain == {"grads": {torch.float32}, "scaling": {0.5}, "decoupled": [],
                     "zeros": False, "schedule": (None, None)}
    assert wired == {"grads": {torch.bfloat16}, "scaling": {1.0}, "decoupled": [0.0],  # warm-up
                     "zeros": True, "schedule": (1e-2, 1e-4)}


@pytest.mark.parametrize("granularity", [None, "full", "selective"])
def test_flops_equal_narayanan_formula(granularity):
    cfg = TransformerConfig(num_layers=24, hidden_size=2048, num_attention_heads=16,
                            vocab_size=50257, seq_length=2048, recompute_granularity=granularity,
                            recompute_method="uniform" if granularity == "full" else None)
    b, s, l, h, v = 512, 2048, 24, 2048, cfg.padded_vocab_size
    none = 72 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))
    full = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    want = {None: none, "full": full, "selective": none + b * s * l * 4 * s * h}[granularity]
    assert num_floating_point_operations(cfg, b) == pytest.approx(want, rel=1e-12)
    assert num_floating_point_operations(cfg, b, recompute=False) == pytest.approx(none,
                                                                                   rel=1e-12)


def test_log_line_has_every_field(capsys):
    cfg = job()
    cfg.logging.log_interval = 2
    logger = TrainingLogger(cfg, 4, torch.device("cpu"), enabled=True)
    for it in (1, 2):
        logger.training_iteration(it, it * GBS, {"lm loss": 4.0 + it}, 1e-3, 0.5, 1.0, True, GBS)
    logger.evaluation("validation", 2, {"lm loss": 2.0})
    logger.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"iteration 2/20 \| consumed samples 16 \| global batch size 8 \| lm loss 5\.5000E\+00 \| "
        r"lr 1\.000E-03 \| "
        r"grad norm 0\.500 \| loss scale 1 \| [\d.]+ ms/iter \| \d+ tokens/s \| "
        r"[\d.]+ TFLOP/s/GPU \| MFU - \| peak mem \d+ MiB", lines[0]), lines[0]
    assert lines[1] == (f"validation at iteration 2 | lm loss 2.0000E+00 | "
                        f"lm loss PPL {math.exp(2.0):.4E}")


def test_progress_bar_draws_one_line():
    out = io.StringIO()
    bar = ProgressBar(total=4, stream=out, min_interval=0.0)
    bar.update(2, "lm loss 3.1")
    bar.clear()
    bar.update(4)
    bar.close()
    text = out.getvalue()
    assert "\n" == text[-1] and text.count("\n") == 1
    assert re.search(r"\r 50%\|#{15} {15}\| 2/4 \[00:00<00:00, [\d.]+ it/s\] lm loss 3\.1", text)
    assert "100%|" + "#" * 30 + "| 4/4" in text
