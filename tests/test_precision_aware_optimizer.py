"""Megatron's precision-aware optimizer (`mp.optim.PrecisionAwareAdamW`): AdamW's moments in
bf16 or fp16.

- the step against a float64 AdamW written here, whose moments are rounded to the storage
  dtype after each step (bf16: 8-bit significand; fp16: 11-bit, any exponent, as the
  power-of-two scaling gives), in chunks smaller than the tensors;
- TP2 x DP2 with the distributed optimizer against one process, same weights and batches;
- checkpoints between bf16-moment and fp32-moment runs, both ways (state converted, the
  next step as the other run's);
- the optimizer bytes one rank holds against the estimator's, and the config's rules.
"""

import math

import pytest
import torch
from gpt_runs import assemble, batch, gpt_config, pieces, run, setup, train_step
from harness import run_distributed

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.config import ConfigError, JobConfig, TrainingConfig
from mp.estimate import Setup, rank_params, state_bytes
from mp.optim import PrecisionAwareAdamW
from mp.training.pretrain import setup_model_and_optimizer

BF16, FP16 = torch.bfloat16, torch.float16


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``x`` rounded to ``dtype``'s significand (half to even), exponent unbounded."""
    bits = {BF16: 8, FP16: 11}[dtype]
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.tensor(bits))),
                       exponent - bits)


def _reference(p, grads, lr, wd, betas, eps, scales, dtype):
    """float64 AdamW on ``p`` with ``grads[t] * scales[t]``; moments rounded after each step."""
    p, m, v = p.double(), torch.zeros_like(p, dtype=torch.float64), \
        torch.zeros_like(p, dtype=torch.float64)
    b1, b2 = betas
    for t, (g, s) in enumerate(zip(grads, scales), start=1):
        g = g.double() * s
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd) - lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)
        m, v = _round(m, dtype), _round(v, dtype)
    return p, m, v


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_step_matches_float64_adamw_with_rounded_moments(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes, wds = [(13, 11), (29,)], [0.1, 0.0]
    lr, betas, eps, steps = 1e-2, (0.9, 0.95), 1e-8, 6
    start = [torch.randn(s, generator=gen) for s in shapes]
    # magnitudes away from 0 keep every fp16 moment normal at its chunk's scale
    grads = [[torch.randn(s, generator=gen).sign() * (0.5 + torch.rand(s, generator=gen))
              * 10.0**k for k, s in enumerate(shapes)] for _ in range(steps)]
    scales = [1.0, 0.5, 1.0, 0.25, 1.0, 1.0]  # clipping's factor, some steps
    params = [torch.nn.Parameter(x.clone()) for x in start]
    opt = PrecisionAwareAdamW([{"params": [p], "weight_decay": wd} for p, wd in zip(params, wds)],
                              lr=lr, betas=betas, eps=eps, exp_avg_dtype=dtype,
                              exp_avg_sq_dtype=dtype, chunk_size=16)
    for t in range(steps):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.grad_scale = scales[t]
        opt.step()
    for i, (p, wd) in enumerate(zip(params, wds)):
        want_p, want_m, want_v = _reference(start[i], [g[i] for g in grads], lr, wd, betas,
                                            eps, scales, dtype)
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == dtype
        assert float(state["step"]) == steps
        got = opt.unscaled_state(p)
        for name, want in (("exp_avg", want_m), ("exp_avg_sq", want_v)):
            rel = ((got[name].double() - want).abs() / want.abs()).flatten()
            # fp32 arithmetic may land a value across a rounding boundary now and then
            assert (rel <= 2.0**-12).float().mean() >= 0.98, f"{name}: {rel.max()}"
            assert rel.max() <= 2.0 ** -(7 if dtype == BF16 else 10), f"{name}: {rel.max()}"
        assert (p.detach().double() - want_p).abs().max() <= lr * 2.0**-6


def _train(tp: int, distributed: bool, steps: int) -> dict:
    models, optimizer, scheduler = setup(
        tp, 1, seed=3, distributed_optimizer=distributed, bucket_size=1999, clip_grad=0.5,
        optimizer_args=dict(use_precision_aware_optimizer=True, exp_avg_dtype=BF16,
                            exp_avg_sq_dtype=FP16))
    losses = [train_step(models, optimizer, scheduler, step)[0] for step in range(steps)]
    assert all(optimizer.optimizer.state[s.main]["exp_avg"].dtype == BF16
               for s in optimizer.shards)
    return {"losses": losses, "weights": pieces(models)}


def test_tp2_dp2_distributed_optimizer_matches_one_process():
    one = run_distributed(1, _train, 1, False, 4)
    sharded = run_distributed(4, _train, 2, True, 4)
    for want, have in zip(one[0]["losses"], sharded[0]["losses"]):
        assert abs(have - want) <= 1e-5 * abs(want)
    want, have = assemble([r["weights"] for r in one]), assemble([r["weights"] for r in sharded])
    for name in want:  # a moment rounded the other way moves a weight by ~lr / 2^8
        assert (have[name] - want[name]).abs().max() <= 3e-3 * 2.0**-5, name


def _moments(models, optimizer) -> dict:
    """`pieces` of both moments (fp32), NaN outside this rank's shards."""
    out = {}
    for name in ("exp_avg", "exp_avg_sq"):
        by_param = {}
        for shard in optimizer.shards:
            whole = by_param.setdefault(shard.param, torch.full(shard.param.shape, math.nan))
            whole.view(-1)[shard.start:shard.end] = optimizer.adam_state(shard)[name].view(-1)
        out.update({f"{key}.{name}": value for key, value in pieces(
            models, lambda p: by_param.get(p, torch.full(p.shape, math.nan))).items()})
    return out


def _args(moments):
    return None if moments is None else dict(use_precision_aware_optimizer=True,
                                             exp_avg_dtype=moments, exp_avg_sq_dtype=moments)


CLIP = 0.05


def _save(path: str, moments) -> dict:
    models, optimizer, scheduler = setup(1, 1, seed=4, distributed_optimizer=True,
                                         bucket_size=1999, clip_grad=CLIP,
                                         optimizer_args=_args(moments))
    for step in range(3):
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(path, 3, models, optimizer, scheduler)
    saved = _moments(models, optimizer)
    train_step(models, optimizer, scheduler, 3)
    return {"moments": saved, "next": pieces(models)}


def _load(path: str, moments) -> dict:
    models, optimizer, scheduler = setup(1, 1, seed=9, clip_grad=CLIP,
                                         optimizer_args=_args(moments))
    load_checkpoint(path, models, optimizer, scheduler)
    loaded = _moments(models, optimizer)
    stored = {optimizer.optimizer.state[s.main]["exp_avg"].dtype for s in optimizer.shards}
    norm = train_step(models, optimizer, scheduler, 3)[1]
    assert norm > 2 * CLIP  # the step clips: a factor of the precision-aware step
    return {"moments": loaded, "next": pieces(models), "stored": stored}


@pytest.mark.parametrize("saved,loaded", [(BF16, None), (None, BF16)],
                         ids=["bf16-to-fp32", "fp32-to-bf16"])
def test_checkpoints_convert_between_moment_dtypes(tmp_path, saved, loaded):
    """Saved at DP2 with the distributed optimizer, loaded in one process."""
    path = str(tmp_path / "ckpt")
    before = run_distributed(2, _save, path, saved)
    after = run_distributed(1, _load, path, loaded)[0]
    assert after["stored"] == {torch.float32 if loaded is None else loaded}
    want = assemble([r["moments"] for r in before])
    have = assemble([after["moments"]])
    for name in want:  # fp32 global tensors in the checkpoint; rounded when loaded into bf16
        expected = want[name] if loaded is None else want[name].to(BF16).float()
        assert torch.equal(have[name], expected), name
    want, have = assemble([r["next"] for r in before]), assemble([after["next"]])
    # the next step moves the weights with the unrounded new moments: from bf16 moments
    # loaded exactly the runs agree; from fp32 ones rounded on loading, to ~lr / 2^8
    tolerance = 1e-6 if loaded is None else 3e-3 * 2.0**-5
    for name in want:
        assert (have[name] - want[name]).abs().max() <= tolerance, name


def _bytes(distributed: bool, dtype) -> dict:
    models, optimizer, scheduler = setup(1, 1, seed=1, precision="bf16", bucket_size=2999,
                                         distributed_optimizer=distributed,
                                         grad_dtype=torch.bfloat16,
                                         optimizer_args=_args(dtype))
    train_step(models, optimizer, scheduler, 0)
    held = sum(t.numel() * t.element_size() for s in optimizer.shards
               for t in optimizer.optimizer.state[s.main].values())
    held += sum(s.main.numel() * s.main.element_size() for s in optimizer.shards)
    owned = sum(s.end - s.start for s in optimizer.shards)
    return {"held": held, "owned": owned, "shards": len(optimizer.shards),
            "padding": sum(m.grad_buffer.numel() for m in models)
            - sum(p.numel() for m in models for p in m.module.parameters()),
            "grads": sum(m.grad_buffer.numel() * m.grad_buffer.element_size() for m in models)}


@pytest.mark.parametrize("world,distributed", [(1, False), (2, True)], ids=["plain", "DP2"])
def test_optimizer_bytes_follow_the_moment_dtypes(world, distributed):
    """bf16 model, bf16 main grads, bf16 moments: 4 + 2 + 2 bytes of optimizer state per
    owned element (+ a 4-byte step per shard), as the estimator says (2 + 2 + 8/d)."""
    ranks = run_distributed(world, _bytes, distributed, BF16)
    config = gpt_config(1, 1, "bf16")
    estimate = state_bytes(Setup(model=config, data_parallel_size=world,
                                 distributed_optimizer=distributed, grad_reduce_in_bf16=True,
                                 exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16"),
                           rank_params(config, 0))
    for r in ranks:
        assert r["held"] == 8 * r["owned"] + 4 * r["shards"]
        assert r["grads"] == estimate.grads + 2 * r["padding"]
        slack = 8 * r["padding"] if distributed else 0
        assert abs(r["held"] - 4 * r["shards"] * distributed - estimate.optimizer) <= slack


def _job_losses() -> dict:
    cfg = JobConfig.from_dict({
        "model": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                  "vocab_size": 64, "seq_length": 8, "make_vocab_size_divisible_by": 16,
                  "precision": "bf16"},
        "training": {"micro_batch_size": 1, "global_batch_size": 1, "train_iters": 4,
                     "lr": 1e-3, "use_precision_aware_optimizer": True,
                     "main_grads_dtype": "bf16", "exp_avg_dtype": "bf16",
                     "exp_avg_sq_dtype": "fp16"},
        "data": {"mock_data": True}})
    ps.initialize_model_parallel(1)
    model, optimizer, _ = setup_model_and_optimizer(cfg)
    return {"grad_dtype": model[0].grad_buffer.dtype, "opt": type(optimizer.optimizer).__name__,
            "dtypes": tuple(str(d) for d in optimizer.optimizer.dtypes.values())}


def test_job_flags_build_it_and_training_lowers_the_loss():
    built = run_distributed(1, _job_losses)[0]
    assert built == {"grad_dtype": torch.bfloat16, "opt": "PrecisionAwareAdamW",
                     "dtypes": ("torch.bfloat16", "torch.float16")}
    losses = run_distributed(1, _repeat_batch)[0]
    assert losses[-1] < 0.9 * losses[0], losses


def _repeat_batch() -> list[float]:
    models, optimizer, scheduler = setup(1, 1, seed=2, precision="bf16", clip_grad=1.0,
                                         grad_dtype=torch.bfloat16, optimizer_args=_args(BF16))
    losses = []
    for _ in range(8):
        for model in models:
            model.zero_grad_buffer()
        losses.append(run(models, batch(0), forward_only=False))
        optimizer.step()
        scheduler.step()
    return losses


BASE = dict(micro_batch_size=1, global_batch_size=4, lr=1e-3, train_iters=10)


@pytest.mark.parametrize("overrides,message", [
    (dict(exp_avg_dtype="bf16"), "training.exp_avg_dtype='bf16' needs training."
                                 "use_precision_aware_optimizer=true"),
    (dict(main_grads_dtype="bf16"), "training.main_grads_dtype='bf16' needs"),
    (dict(use_precision_aware_optimizer=True, exp_avg_sq_dtype="fp8"),
     "exp_avg_sq_dtype='fp8' is not supported: Megatron's fp8 states need"),
    (dict(use_precision_aware_optimizer=True, main_params_dtype="fp16"),
     "main_params_dtype='fp16' is not supported: fp16 master weights"),
    (dict(use_precision_aware_optimizer=True, exp_avg_dtype="int8"),
     "exp_avg_dtype='int8' must be one of fp32, bf16, fp16"),
    (dict(use_precision_aware_optimizer=True, optimizer_impl="apex"),
     "optimizer_impl='apex': the precision-aware step replaces apex's FusedAdam"),
])
def test_config_refusals_name_value_and_rule(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainingConfig(**BASE, **overrides)
    assert TrainingConfig(**BASE, use_precision_aware_optimizer=True,
                          main_grads_dtype="bf16").grad_reduce_in_bf16
