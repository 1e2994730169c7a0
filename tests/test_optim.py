"""The optimizer pieces against independent references: the LR schedule against its closed
form, parameter groups, the loss scaler's rule, the global grad norm and clipped AdamW step of
a tensor-parallel model against a float64 dense model, skipping on inf across ranks, and fp32
master weights against ``torch.optim.AdamW`` run on the masters."""

import contextlib
import math
import sys
import types

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close, seeded
from harness import run_distributed
from test_grad_sync import B, H, S, ToyModel, dense_loss, full_weights, local_loss, local_shard
from torch import nn

from mp import parallel_state as ps
from mp.device import get_device
from mp.distributed import DistributedDataParallel, finalize_model_grads
from mp.optim import (
    DynamicGradScaler,
    MixedPrecisionOptimizer,
    OptimizerParamScheduler,
    get_megatron_optimizer,
    get_param_groups,
)

# --- learning-rate schedule -----------------------------------------------------------------


def closed_form_lr(n, style, max_lr, min_lr, warmup, decay, anneal=None, anneal_style=None):
    """Megatron-LM's schedules, written out; WSD anneals over the last ``anneal`` steps."""
    if warmup > 0 and n <= warmup:
        return max_lr * n / warmup
    if style == "constant":
        return max_lr
    if n > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1)))
    if style == "WSD":
        q = max(0, n - (decay - anneal)) / anneal
        shape = {"linear": 1 - q, "cosine": (1 + math.cos(math.pi * q)) / 2,
                 "exponential": 2 * 0.5**q - 1, "minus_sqrt": 1 - math.sqrt(q)}[anneal_style]
        return min_lr + (max_lr - min_lr) * shape
    progress = (n - warmup) / (decay - warmup)
    shape = {"linear": 1 - progress, "cosine": (1 + math.cos(math.pi * progress)) / 2}[style]
    return min_lr + (max_lr - min_lr) * shape


def _sgd(lr_mult=None):
    group = {"params": [nn.Parameter(torch.zeros(1))]}
    if lr_mult is not None:
        group["lr_mult"] = lr_mult
    return torch.optim.SGD([group], lr=123.0)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "inverse-square-root"])
@pytest.mark.parametrize("warmup,decay", [(0, 50), (10, 50), (10, 10)])
def test_lr_schedule_matches_closed_form(style, warmup, decay):
    opt = _sgd()
    sched = OptimizerParamScheduler(opt, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=warmup,
                                    lr_decay_steps=decay, lr_decay_style=style)
    for n in range(60):
        want = closed_form_lr(n, style, 3e-3, 3e-4, warmup, decay)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), n
        sched.step()


@pytest.mark.parametrize("decoupled_min_lr", [None, 1e-4])
@pytest.mark.parametrize("style", ["cosine", "linear", "inverse-square-root"])
def test_decoupled_group_follows_its_own_peak_and_final_rate(style, decoupled_min_lr):
    """Megatron's ``--decoupled-lr``: the group marked ``is_decoupled_lr`` runs the same
    warm-up and decay from ``decoupled_lr`` to ``decoupled_min_lr`` (default ``min_lr``)."""
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]},
                           {"params": [nn.Parameter(torch.zeros(1))], "is_decoupled_lr": True}],
                          lr=123.0)
    kw = {"max_lr": 3e-3, "min_lr": 3e-4, "lr_warmup_steps": 10, "lr_decay_steps": 50,
          "lr_decay_style": style}
    sched = OptimizerParamScheduler(opt, **kw, decoupled_lr=1e-2,
                                    decoupled_min_lr=decoupled_min_lr)
    final = 3e-4 if decoupled_min_lr is None else decoupled_min_lr
    for n in range(60):
        base, decoupled = (group["lr"] for group in opt.param_groups)
        assert base == pytest.approx(closed_form_lr(n, style, 3e-3, 3e-4, 10, 50), rel=1e-12)
        assert decoupled == pytest.approx(closed_form_lr(n, style, 1e-2, final, 10, 50),
                                          rel=1e-12), n
        sched.step()
    assert decoupled == pytest.approx(final)
    plain = OptimizerParamScheduler(_sgd(), **kw)
    with pytest.raises(ValueError, match="decoupled_lr=0.01 here but None in the checkpoint"):
        sched.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="marked is_decoupled_lr .* but decoupled_lr=None"):
        OptimizerParamScheduler(opt, max_lr=3e-3, lr_decay_steps=50)
    with pytest.raises(ValueError, match=r"decoupled_min_lr=0.5 must lie in \[0, "
                                         r"decoupled_lr=0.01\]"):
        OptimizerParamScheduler(opt, max_lr=3e-3, lr_decay_steps=50, decoupled_lr=1e-2,
                                decoupled_min_lr=0.5)


@pytest.mark.parametrize("anneal_style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_schedule_matches_closed_form(anneal_style):
    """Warm-up 10, stable to step 30, then the anneal over the last 20 steps of 50."""
    opt = _sgd()
    sched = OptimizerParamScheduler(opt, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=10,
                                    lr_decay_steps=50, lr_decay_style="WSD", wsd_decay_steps=20,
                                    lr_wsd_decay_style=anneal_style)
    lrs = []
    for n in range(60):
        want = closed_form_lr(n, "WSD", 3e-3, 3e-4, 10, 50, 20, anneal_style)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), n
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[10:31] == [3e-3] * 21 and lrs[31] < 3e-3 and lrs[50] == pytest.approx(3e-4)
    with pytest.raises(ValueError, match=r"lr_decay_style='WSD' needs wsd_decay_steps in \[1, "
                                         r"lr_decay_steps=50\], got None"):
        OptimizerParamScheduler(_sgd(), max_lr=1.0, lr_decay_steps=50, lr_decay_style="WSD")


def test_lr_schedule_resumes_and_checks_hyperparameters():
    opt = _sgd(lr_mult=0.5)
    kw = {"max_lr": 1.0, "min_lr": 0.1, "lr_warmup_steps": 5, "lr_decay_steps": 40}
    sched = OptimizerParamScheduler(opt, **kw)
    for _ in range(17):
        sched.step()
    resumed = OptimizerParamScheduler(_sgd(), **kw)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.num_steps == 17 and resumed.get_lr() == sched.get_lr()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * sched.get_lr())  # lr_mult
    other = OptimizerParamScheduler(_sgd(), **{**kw, "max_lr": 2.0})
    with pytest.raises(ValueError, match="max_lr=2.0 here but 1.0 in the checkpoint"):
        other.load_state_dict(sched.state_dict())
    taking = OptimizerParamScheduler(_sgd(), **{**kw, "max_lr": 2.0},
                                     use_checkpoint_opt_param_scheduler=True)
    taking.load_state_dict(sched.state_dict())
    assert taking.max_lr == 1.0 and taking.get_lr() == sched.get_lr()
    before_wsd = {k: v for k, v in sched.state_dict().items()  # a checkpoint from before WSD
                  if k not in ("wsd_decay_steps", "lr_wsd_decay_style", "decoupled_lr",
                               "decoupled_min_lr")}
    assert resumed.saved_differences(before_wsd) == {}
    with pytest.raises(ValueError, match="lr_decay_steps=4 must be >= 1 and >= lr_warmup_steps=5"):
        OptimizerParamScheduler(_sgd(), max_lr=1.0, lr_warmup_steps=5, lr_decay_steps=4)
    with pytest.raises(ValueError, match="lr_decay_style='step' must be one of"):
        OptimizerParamScheduler(_sgd(), max_lr=1.0, lr_decay_steps=5, lr_decay_style="step")


# --- parameter groups and the loss scaler ---------------------------------------------------


def test_no_weight_decay_on_biases_and_norm_weights():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8))
    shared = nn.Sequential(model[1])  # a second chunk sharing a parameter: counted once
    decay, no_decay = get_param_groups([model, shared], weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].bias), id(model[2].weight),
                                                   id(model[2].bias)}


def test_dynamic_loss_scaler_rule():
    scaler = DynamicGradScaler(initial_scale=2.0**10, min_scale=2.0**8, growth_interval=3,
                               hysteresis=2)
    history = []
    for found_inf in [True, True, True, False, False, False, True, True, True, True, True]:
        scaler.update(found_inf)
        history.append(scaler.scale)
    # first inf: hysteresis 2 -> 1, no backoff; then each inf halves; 3 good steps double
    # and refill the hysteresis; the scale never goes below min_scale
    assert history == [2**10, 2**9, 2**8, 2**8, 2**8, 2**9, 2**9, 2**8, 2**8, 2**8, 2**8]
    resumed = DynamicGradScaler(initial_scale=1.0, min_scale=1.0)
    resumed.load_state_dict(scaler.state_dict())
    assert resumed.state_dict() == scaler.state_dict()
    with pytest.raises(ValueError, match="min_scale=4.0 must lie in"):
        DynamicGradScaler(initial_scale=2.0, min_scale=4.0)


# --- grad norm and clipping over tensor-parallel ranks --------------------------------------


def _dense_clipped_adamw(x, steps: int, clip: float, **adam):
    """The serial model's float64 AdamW trajectory with torch's clipping; returns the norms
    and the final weights."""
    weights = {n: w.double().requires_grad_(True) for n, w in full_weights().items()}
    groups = [{"params": [w for w in weights.values() if w.dim() > 1], "weight_decay": 0.1},
              {"params": [w for w in weights.values() if w.dim() == 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, foreach=False, **adam)
    norms = []
    for step in range(steps):
        opt.zero_grad()
        dense_loss(weights, x[step].double()).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(list(weights.values()), clip).item())
        opt.step()
    return norms, weights


def _check_clipped_steps(tp: int, sequence_parallel: bool):
    ps.initialize_model_parallel(tp)
    model = DistributedDataParallel(ToyModel(sequence_parallel))
    adam = {"lr": 0.05, "betas": (0.9, 0.95), "eps": 1e-3}
    opt = get_megatron_optimizer([model], weight_decay=0.1, clip_grad=0.05, adam_beta1=0.9,
                                 adam_beta2=0.95, adam_eps=1e-3, lr=0.05)
    x = seeded((3, S, B, H), 5)
    norms = []
    for step in range(3):
        model.zero_grad_buffer()
        opt.zero_grad()
        xs = x[step]
        if sequence_parallel:
            xs = xs.chunk(tp, 0)[ps.get_tensor_model_parallel_rank()]
        local_loss(model(xs)).backward()
        finalize_model_grads([model])
        result = opt.step()
        assert result.update_successful
        norms.append(result.grad_norm)
    want_norms, want = _dense_clipped_adamw(x, 3, 0.05, **adam)
    assert min(want_norms) > 0.05, "the test needs clipping to be active"
    for got, expected in zip(norms, want_norms):
        assert got == pytest.approx(expected, rel=1e-6)
    for name, param in model.module.named_parameters():
        if name in want:
            assert_rel_close(param, local_shard(param, want[name].detach()), what=name)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (4, True)])
def test_grad_norm_counts_replicated_params_once(tp, sp):
    run_distributed(tp, _check_clipped_steps, tp, sp)


def _check_inf_skips_every_rank(poisoned: str, bad_rank: int):
    ps.initialize_model_parallel(2)
    model = ToyModel().half()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = get_megatron_optimizer([model], lr=0.1, initial_loss_scale=2.0**12, hysteresis=1)
    if dist.get_rank() == bad_rank:
        getattr(model, poisoned).weight.grad[0, ...] = float("inf")
    result = opt.step()
    assert not result.update_successful and not math.isfinite(result.grad_norm)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "params moved"
    assert opt.get_loss_scale() == 2.0**11  # backed off (hysteresis 1)
    for p in model.parameters():  # a clean step afterwards goes through on every rank
        p.grad = torch.full_like(p, 0.5 * 2.0**11)
    result = opt.step()
    assert result.update_successful and math.isfinite(result.grad_norm)
    assert not torch.equal(model.fc1.weight, before["fc1.weight"])


@pytest.mark.parametrize("poisoned,bad_rank", [("fc1", 0), ("fc1", 1), ("ln1", 1)])
def test_inf_on_one_rank_skips_the_step_on_all(poisoned, bad_rank):
    """``ln1`` is replicated over TP: on rank 1 it is not counted in the norm, yet its inf must
    still make every rank skip."""
    run_distributed(2, _check_inf_skips_every_rank, poisoned, bad_rank)


# --- fp32 master weights ----------------------------------------------------------------------


def _check_master_weights(dtype: torch.dtype, via_main_grad: bool):
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8)).to(get_device(), dtype)
    scale = 2.0**10 if dtype == torch.float16 else 1.0
    adam = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    scaler = DynamicGradScaler(initial_scale=scale) if dtype == torch.float16 else None
    opt = MixedPrecisionOptimizer(get_param_groups([model], 0.1), clip_grad=0.0,
                                  grad_scaler=scaler, **adam)
    masters = [nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
    ref = torch.optim.AdamW(get_param_groups([nn.ParameterList(masters)], 0.1), foreach=False,
                            **adam)
    for step in range(4):
        grads = [seeded(p.shape, 10 * step + i, scale=1e-2).to(p.device)
                 for i, p in enumerate(masters)]
        for param, grad in zip(model.parameters(), grads):
            if via_main_grad:
                param.main_grad = grad * scale
            else:
                param.grad = (grad * scale).to(dtype)
        for master, grad in zip(masters, grads):
            master.grad = grad if via_main_grad else (grad * scale).to(dtype).float() / scale
        assert opt.step().update_successful
        ref.step()
        for param, master, kept in zip(model.parameters(), masters, opt.main_params):
            assert_rel_close(kept, master, what="fp32 master")
            assert torch.equal(param, kept.to(dtype)), "model param is not the rounded master"
    assert all(p.grad is None for p in opt.main_params), "a borrowed grad left on a master"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("via_main_grad", [True, False])
def test_master_weights_follow_fp32_adamw(dtype, via_main_grad):
    run_distributed(1, _check_master_weights, dtype, via_main_grad)


# --- apex's FusedAdam -----------------------------------------------------------------------

class _GroupStepAdam(torch.optim.Optimizer):
    """apex's ``FusedAdam`` as mp calls it, from the AdamW formulas: ``adam_w_mode`` and, like
    apex, one ``step`` count per parameter group instead of per parameter."""

    def __init__(self, params, lr, betas, eps, adam_w_mode, weight_decay=0.0):
        assert adam_w_mode
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] = t = group.get("step", 0) + 1
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), \
                        torch.zeros_like(p)
                p.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


@contextlib.contextmanager
def fake_apex_fused_adam():
    """Within it (in this rank), ``apex.optimizers.FusedAdam`` is `_GroupStepAdam`."""
    from mp import apex as mp_apex

    module = types.ModuleType("apex.optimizers")
    module.FusedAdam = _GroupStepAdam
    sys.modules.update({"apex": types.ModuleType("apex"), "apex.optimizers": module})
    mp_apex.fused_adam_class.cache_clear()
    try:
        yield
    finally:
        for name in ("apex", "apex.optimizers"):
            sys.modules.pop(name, None)
        mp_apex.fused_adam_class.cache_clear()


def _with_fake_apex_adam(path: str) -> dict:
    """Train 3 steps with optimizer_impl="apex" (a fake apex) and with torch's AdamW, save the
    apex run, and load it into a fresh apex optimizer and into a torch one."""
    from gpt_runs import EPS, LR, assemble, pieces, setup, train_step

    from mp.checkpointing import load_checkpoint, save_checkpoint

    with fake_apex_fused_adam():
        runs, loaded = {}, {}
        for impl in ("apex", "torch"):
            models, _, scheduler = setup(1, 1, seed=1)
            optimizer = get_megatron_optimizer(models, lr=LR, weight_decay=0.1, adam_eps=EPS,
                                               optimizer_impl=impl)
            scheduler.optimizer = optimizer
            for step in range(3):
                train_step(models, optimizer, scheduler, step)
            runs[impl] = (type(optimizer.optimizer), assemble([pieces(models)]))
            if impl == "apex":
                save_checkpoint(path, 3, models, optimizer, scheduler)
            ps.destroy_model_parallel()
        for impl in ("apex", "torch"):
            models, _, scheduler = setup(1, 1, seed=2)
            optimizer = get_megatron_optimizer(models, lr=LR, optimizer_impl=impl)
            load_checkpoint(path, models, optimizer)
            loaded[impl] = [optimizer.adam_state(s)["step"].item() for s in optimizer.shards]
            ps.destroy_model_parallel()
        return {"runs": runs, "loaded": loaded}


def test_apex_fused_adam_trains_like_adamw_and_checkpoints_its_group_step(tmp_path):
    result = run_distributed(1, _with_fake_apex_adam, str(tmp_path / "ckpt"))[0]
    (apex_type, apex_weights), (torch_type, torch_weights) = (result["runs"]["apex"],
                                                              result["runs"]["torch"])
    assert apex_type is _GroupStepAdam and torch_type is torch.optim.AdamW
    for name in torch_weights:
        assert_rel_close(apex_weights[name], torch_weights[name], rtol=1e-5, what=name)
    assert set(result["loaded"]["apex"]) == {3.0}  # the group's count came back
    assert set(result["loaded"]["torch"]) == {3.0}  # and became each parameter's
