"""The optimizer-parameter schedule beyond the learning rate, as the job builds it from its
config (`build_opt_param_scheduler`): Megatron's weight-decay schedule against its closed form
(runs counted in iterations and in samples), AdamW steps under it against ``torch.optim.AdamW``
given the decay by hand, and a resume whose ``--lr`` changed: refused by default naming the
values, this run's rate under ``--override-opt_param-scheduler``, the checkpoint's under
``--use-checkpoint-opt_param-scheduler``. (The exact resume of a job under a weight-decay
schedule is ``tests/test_checkpoint_resume.py``'s.)"""

import math
import os

import gpt_runs
import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from torch import nn

from mp import parallel_state as ps
from mp.checkpointing import CheckpointError, save_checkpoint
from mp.checkpointing import job as checkpoint_job
from mp.config import ConfigError, TrainingConfig, load_config
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer, get_param_groups
from mp.training.pretrain import build_opt_param_scheduler

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "gpt-tiny.yaml")
START_WD, END_WD = 0.02, 0.2


def closed_form_wd(n: int, style: str, length: int) -> float:
    """Megatron's weight decay after ``n`` steps of ``length``, written out: constant 0.1, else
    from START_WD to END_WD along ``r`` (linear) or ``(1 - cos(pi r)) / 2`` (cosine)."""
    if style == "constant":
        return 0.1
    r = min(n / length, 1.0)
    shape = r if style == "linear" else (1.0 - math.cos(math.pi * r)) / 2.0
    return START_WD + (END_WD - START_WD) * shape


def _training(style: str, **run) -> TrainingConfig:
    ends = {} if style == "constant" else {"start_weight_decay": START_WD,
                                           "end_weight_decay": END_WD}
    return TrainingConfig(micro_batch_size=1, global_batch_size=8, weight_decay=0.1,
                          weight_decay_incr_style=style, **ends, **{"lr": 1e-3, **run})


def _groups() -> torch.optim.Optimizer:
    """mp's groups of a linear layer and a norm: the weight decays, the biases and norm don't."""
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    return torch.optim.SGD(get_param_groups([model], weight_decay=0.1), lr=0.0)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("unit", ["iterations", "samples"])
def test_weight_decay_follows_megatron_closed_form(style, unit):
    """40 iterations, or 200 samples in iterations of 8 (the schedule then counts samples);
    stepped past the end, the decay stays at its last value."""
    run = {"train_iters": 40} if unit == "iterations" else {"train_samples": 200}
    length, step = (40, 1) if unit == "iterations" else (200, 8)
    opt = _groups()
    scheduler = build_opt_param_scheduler(opt, _training(style, **run))
    for n in range(0, length + 3 * step, step):
        decay, no_decay = (group["weight_decay"] for group in opt.param_groups)
        assert decay == pytest.approx(closed_form_wd(n, style, length), rel=1e-12, abs=0), n
        assert no_decay == 0.0
        scheduler.step(step)
    assert decay == pytest.approx(END_WD if style != "constant" else 0.1, rel=1e-12)


def test_weight_decay_schedule_rules_name_the_values():
    with pytest.raises(ConfigError, match="training.start_weight_decay=None and training."
                                          "end_weight_decay=None with training.weight_decay_"
                                          "incr_style='linear'"):
        TrainingConfig(micro_batch_size=1, global_batch_size=8, lr=1e-3, train_iters=10,
                       weight_decay_incr_style="linear")
    with pytest.raises(ConfigError, match="training.start_weight_decay=0.05 with training."
                                          "weight_decay_incr_style='constant'"):
        load_config(TINY, ["--start-weight-decay", "0.05"], world_size=4)
    with pytest.raises(ConfigError, match="training.start_weight_decay=0.3 exceeds training."
                                          "end_weight_decay=0.1"):
        load_config(TINY, ["--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.3",
                           "--end-weight-decay", "0.1"], world_size=4)
    with pytest.raises(ConfigError, match="training.override_opt_param_scheduler and training."
                                          "use_checkpoint_opt_param_scheduler are both true"):
        load_config(TINY, ["--override-opt_param-scheduler",
                           "--use-checkpoint-opt_param-scheduler"], world_size=4)
    with pytest.raises(ValueError, match="wd_incr_style='linear' needs wd_incr_steps >= 1"):
        OptimizerParamScheduler(_groups(), max_lr=1.0, lr_decay_steps=5, start_wd=0.0,
                                end_wd=0.1, wd_incr_style="linear")


def _adamw_under_schedule(steps: int):
    """mp's optimizer (fused AdamW on CPU) under a linear weight-decay schedule, and
    ``torch.optim.AdamW`` (unfused) on a copy given each step's decay by hand."""
    ps.initialize_model_parallel(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    reference = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    optimizer = get_megatron_optimizer([model], lr=0.1, weight_decay=0.1, clip_grad=0.0)
    tr = _training("linear", train_iters=steps, lr=0.1, lr_decay_style="constant")
    scheduler = build_opt_param_scheduler(optimizer, tr)
    by_hand = torch.optim.AdamW([{"params": [p for p in reference if p.dim() > 1]},
                                 {"params": [p for p in reference if p.dim() == 1],
                                  "weight_decay": 0.0}], lr=0.1, betas=(0.9, 0.999),
                                eps=1e-8, foreach=False)
    for n in range(steps):
        x = seeded((3, 6), seed=n)
        model.zero_grad()
        model(x).square().sum().backward()
        assert optimizer.step().update_successful
        scheduler.step()
        by_hand.param_groups[0]["weight_decay"] = closed_form_wd(n, "linear", steps)
        by_hand.zero_grad()
        torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), reference)),
                                   (x,)).square().sum().backward()
        by_hand.step()
    return [p.detach() for p in model.parameters()], [p.detach() for p in reference]


def test_adamw_steps_with_the_scheduled_decay():
    """The decay rises from 0.02 to 0.2 over 6 steps at lr 0.1, so a missed update of it (or a
    decayed bias) moves the weights by about 1e-3 of their size, far above the tolerance."""
    ((mine, theirs),) = run_distributed(1, _adamw_under_schedule, 6)
    for i, (got, want) in enumerate(zip(mine, theirs)):
        assert_rel_close(got, want, what=f"parameter {i}")


def _save_after_three_steps(path: str) -> None:
    """Three iterations of gpt_runs' model under gpt-tiny's schedule (lr 1e-3), then a save."""
    models, optimizer, _ = gpt_runs.setup(1, 1, seed=1)
    scheduler = build_opt_param_scheduler(optimizer, load_config(TINY, world_size=2).training)
    for seed in range(3):
        gpt_runs.train_step(models, optimizer, scheduler, seed)
    save_checkpoint(path, 3, models, optimizer, scheduler)


def _resume_with(path: str, args: list[str]):
    """The job's resume (`mp.checkpointing.job`) with ``args`` on the command line: the error
    if it refuses, else the schedule's peak rate and the rate of the next step."""
    cfg = load_config(TINY, ["--load", path, *args], world_size=2)
    models, optimizer, _ = gpt_runs.setup(1, 1, seed=2)
    scheduler = build_opt_param_scheduler(optimizer, cfg.training)
    try:
        checkpoint_job.resume(checkpoint_job.start_point(cfg), models, optimizer, scheduler)
    except CheckpointError as error:
        return str(error)
    gpt_runs.train_step(models, optimizer, scheduler, seed=3)  # it trains on
    return scheduler.max_lr, [group["lr"] for group in optimizer.param_groups], \
        scheduler.num_steps


@pytest.mark.parametrize("flag, peak", [(None, None), ("--override-opt_param-scheduler", 2e-3),
                                        ("--use-checkpoint-opt_param-scheduler", 1e-3)],
                         ids=["refused", "override", "use_checkpoint"])
def test_a_changed_lr_on_resume(tmp_path, flag, peak):
    """gpt-tiny warms up linearly over 30 iterations, so after the 3 saved and 1 resumed
    iterations the rate is ``peak * 4 / 30``."""
    run_distributed(2, _save_after_three_steps, str(tmp_path))
    args = ["--lr", "2e-3", *([flag] if flag else [])]
    for outcome in run_distributed(2, _resume_with, str(tmp_path), args):
        if flag is None:
            assert "learning-rate schedule: max_lr=0.002 here but 0.001 in the checkpoint " \
                   "(--override-opt_param-scheduler keeps this run's values" in outcome
            continue
        max_lr, rates, num_steps = outcome
        assert (max_lr, num_steps) == (peak, 4)
        assert rates == [pytest.approx(peak * 4 / 30, rel=1e-12)] * len(rates)


def test_warmup_starts_at_lr_warmup_init():
    """Megatron's ``--lr-warmup-init``: the warm-up runs linearly from it to ``lr``."""
    cfg = load_config(TINY, ["--lr", "1e-3", "--lr-warmup-init", "1e-4", "--lr-warmup-iters",
                             "10", "--train-iters", "100"], world_size=2)
    assert cfg.training.lr_warmup_init == 1e-4
    scheduler = build_opt_param_scheduler(_groups(), cfg.training)
    rates = [scheduler.get_lr(n) for n in (0, 5, 10)]
    assert rates == pytest.approx([1e-4, 1e-4 + (1e-3 - 1e-4) * 5 / 10, 1e-3], rel=1e-12)
    with pytest.raises(ConfigError, match="training.lr_warmup_init=-1.0 must be >= 0"):
        load_config(TINY, ["--lr-warmup-init", "-1"], world_size=2)
