"""Megatron's ``--optimizer sgd`` and ``--optimizer muon`` against independent references:
SGD against ``torch.optim.SGD`` on the same weights and schedule, and at TP 2 x DP 2 (plain and
distributed optimizer) against one process; Muon's matrix update against ``torch.optim.Muon``
and a float64 formula, a GPT at TP 2 against TP 1 (duplicated and distributed modes) and, in
blockwise mode, against a float64 update of each rank's shards; bit-exact resumes; refusals;
the estimator's SGD and Muon state against the bytes the built optimizer holds."""

import pytest
import torch
from checks import assert_rel_close, seeded
from gpt_runs import assemble, batch, gpt_config, pieces, run, setup, train_from, train_step
from harness import run_distributed
from test_config import TINY, error_of
from torch import nn

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.checkpointing.errors import CheckpointError
from mp.config import TrainingConfig, parse_args
from mp.config.coerce import ConfigError
from mp.estimate import Setup, rank_params, state_bytes
from mp.optim import (
    MixedPrecisionOptimizer,
    MuonSettings,
    OptimizerParamScheduler,
    TensorParallelMuon,
    get_param_groups,
)
from mp.optim.muon import MuonUnit, newton_schulz, scale_factor

STEPS = 3


# --- SGD ------------------------------------------------------------------------------------


def _sgd_against_torch() -> list[float]:
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8))
    ref_model = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8))
    ref_model.load_state_dict(model.state_dict())
    opt = MixedPrecisionOptimizer(get_param_groups([model], 0.1), lr=0.1, clip_grad=0.0,
                                  optimizer="sgd", sgd_momentum=0.8)
    ref = torch.optim.SGD(get_param_groups([ref_model], 0.1), lr=0.1, momentum=0.8)
    schedule = OptimizerParamScheduler(opt, max_lr=0.1, min_lr=0.01, lr_warmup_steps=1,
                                       lr_decay_steps=5)
    rates = []
    for step in range(5):
        for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
            p.grad = seeded(p.shape, 10 * step + i)
            q.grad = p.grad.clone()
        for mine, theirs in zip(opt.param_groups, ref.param_groups):
            theirs.update(lr=mine["lr"], weight_decay=mine["weight_decay"])
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
        schedule.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert_rel_close(p, q, rtol=1e-6, what="SGD weights")
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1], decays  # LayerNorm and biases do not decay
    return rates


def test_sgd_matches_torch_sgd_with_the_schedule():
    rates = run_distributed(1, _sgd_against_torch)[0]
    assert len(set(rates)) > 2, "the schedule never moved the rate"


def _initial_weights(**overrides) -> dict:
    models, _, _ = setup(1, 1, seed=5, **overrides)
    return pieces(models)


def _train(tp: int, whole: dict, distributed_optimizer: bool = False, **args) -> dict:
    return train_from(whole, tp, 1, STEPS, distributed_optimizer=distributed_optimizer, **args)


def _assert_follows(runs: list[dict], serial: dict, rtol: float) -> dict:
    """Losses, gradient norms and weights of a parallel run against one process's."""
    assert_rel_close(torch.tensor(runs[0]["losses"]), torch.tensor(serial["losses"]), rtol=rtol,
                     what="losses")
    assert_rel_close(torch.tensor(runs[0]["norms"]), torch.tensor(serial["norms"]), rtol=rtol,
                     what="gradient norms")
    got, want = assemble([r["weights"] for r in runs]), assemble([serial["weights"]])
    for name in want:
        assert_rel_close(got[name], want[name], rtol=rtol, what=name)
    return got


def test_sgd_at_tp2_dp2_follows_one_process():
    """Plain and distributed optimizer (its momentum buffers sharded over DP) at TP 2 x DP 2,
    with clipping, against TP 1 on one process."""
    sgd = {"optimizer_args": {"optimizer": "sgd"}}
    whole = assemble(run_distributed(1, _initial_weights))
    serial = run_distributed(1, _train, 1, whole, **sgd)[0]
    assert max(serial["norms"]) > 0.5, "clipping never acted"
    moved = max((w - whole[n]).abs().max().item()
                for n, w in assemble([serial["weights"]]).items())
    assert moved > 1e-4, "SGD did not move the weights"
    for distributed in (False, True):
        _assert_follows(run_distributed(4, _train, 2, whole, distributed, **sgd), serial, 1e-6)


# --- Muon: one matrix -----------------------------------------------------------------------


def _ns64(x: torch.Tensor, coefficients, steps: int) -> torch.Tensor:
    """Newton-Schulz from the paper's formula, in float64."""
    x = x.double()
    tall = x.shape[0] > x.shape[1]
    X = (x.T if tall else x) / x.norm()
    for a, b, c in (coefficients * steps)[:steps]:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


QUINTIC = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]


def _muon_matrix(settings: MuonSettings, shape=(12, 20), steps: int = 3, lr: float = 0.05,
                 wd: float = 0.1) -> tuple[nn.Parameter, TensorParallelMuon]:
    weight = nn.Parameter(seeded(shape, 1))
    return weight, TensorParallelMuon([{"params": [weight], "lr": lr, "weight_decay": wd}],
                                      [MuonUnit((weight,), None, None)], settings, lr)


@pytest.mark.parametrize("shape,nesterov,scale_mode", [
    ((12, 20), True, "spectral"), ((20, 12), False, "unit_rms_norm"),
    ((20, 12), True, "shape_scaling")])
def test_muon_matrix_update_matches_the_float64_formula(shape, nesterov, scale_mode):
    settings = MuonSettings(momentum=0.9, use_nesterov=nesterov, scale_mode=scale_mode,
                            extra_scale_factor=0.7, fp32_matmul_prec="high")
    weight, opt = _muon_matrix(settings, shape)
    w, m = weight.detach().double().clone(), torch.zeros(shape, dtype=torch.float64)
    for step in range(3):
        g = seeded(shape, 100 + step)
        weight.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g.double()
        update = 0.1 * g.double() + 0.9 * m if nesterov else m
        w = w * (1 - 0.05 * 0.1) - 0.05 * 0.7 * scale_factor(*shape, scale_mode) \
            * _ns64(update, QUINTIC, 5)
        assert_rel_close(weight.detach().double(), w, rtol=1e-5, what=f"step {step}")
    assert_rel_close(opt.state[weight]["momentum_buffer"].double(), m, rtol=1e-6,
                     what="momentum")


def test_muon_matrix_update_matches_torch_muon():
    """``torch.optim.Muon`` iterates in bf16 with Keller Jordan's coefficients and scales by
    ``sqrt(max(1, rows / cols))``: the same as ``simple``, ``shape_scaling``, ``medium``, up to
    where the bf16 rounding of the normalization falls."""
    for shape in ((24, 16), (16, 24)):
        settings = MuonSettings(momentum=0.95, use_nesterov=True, coefficient_type="simple",
                                scale_mode="shape_scaling", fp32_matmul_prec="medium")
        weight, opt = _muon_matrix(settings, shape)
        theirs = nn.Parameter(weight.detach().clone())
        ref = torch.optim.Muon([theirs], lr=0.05, weight_decay=0.1, momentum=0.95,
                               nesterov=True)
        start = weight.detach().clone()
        for step in range(3):
            weight.grad = seeded(shape, 200 + step)
            theirs.grad = weight.grad.clone()
            opt.step()
            ref.step()
        moved = (theirs - start).abs().max()
        assert (weight - theirs).abs().max() < 0.05 * moved, f"{shape}: off torch's Muon"


def test_newton_schulz_orthogonalizes():
    x = seeded((16, 48), 3, dtype=torch.float32)
    out = newton_schulz(x, 10, "quintic", bf16=False)
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.5 and singular.max() < 1.3, singular


# --- Muon: a GPT under tensor parallelism ---------------------------------------------------

MUON_MODEL = {"activation": "swiglu", "num_query_groups": 2}


def _muon(mode: str) -> dict:
    return {"optimizer_args": {"optimizer": "muon", "muon": MuonSettings(
        tp_mode=mode, fp32_matmul_prec="high", use_nesterov=True)}, **MUON_MODEL}


def test_muon_at_tp2_follows_tp1_in_duplicated_and_distributed_modes():
    """Swiglu's gate and up fused, QKV split per query group (grouped-query attention): the
    whole-matrix modes give TP 1's training; blockwise does not."""
    whole = assemble(run_distributed(1, _initial_weights, **MUON_MODEL))
    serial = run_distributed(1, _train, 1, whole, **_muon("duplicated"))[0]
    want = assemble([serial["weights"]])
    for mode in ("duplicated", "distributed"):
        _assert_follows(run_distributed(2, _train, 2, whole, **_muon(mode)), serial, 1e-5)
    blockwise = assemble([r["weights"] for r in run_distributed(2, _train, 2, whole,
                                                                **_muon("blockwise"))])
    name = "decoder.layers.0.self_attention.dense.weight"
    assert (blockwise[name] - want[name]).abs().max() > 1e-3, "blockwise equals TP 1"


def _blockwise_step() -> list[str]:
    """Two steps at TP 2 in blockwise mode, without clipping; the second checked against a
    float64 update of each of this rank's shards: its QKV parts per local query group, its
    gate and up rows together, each scaled by its local shape."""
    models, optimizer, scheduler = setup(2, 1, seed=3, clip_grad=0.0, **_muon("blockwise"))
    train_step(models, optimizer, scheduler, 0)
    named = dict(models[0].module.named_parameters())
    before = {n: p.detach().double().clone() for n, p in named.items()}
    state = optimizer.optimizer.state
    buffers = {n: state[p]["momentum_buffer"].double().clone() for n, p in named.items()
               if "momentum_buffer" in state.get(p, {})}
    lr = optimizer.param_groups[0]["lr"]
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    run(models, batch(1), forward_only=False)
    grads = {n: p.main_grad.double().clone() for n, p in named.items()}
    optimizer.step()

    def update(name):
        m = 0.1 * grads[name] + 0.9 * buffers[name]
        return 0.1 * grads[name] + 0.9 * m  # Nesterov

    checked = []
    for name, param in named.items():
        if name not in buffers:
            continue
        if name.endswith("linear_fc1.weight"):
            continue  # checked with its gate
        if name.endswith("linear_gate.weight"):
            up = name.replace("linear_gate", "linear_fc1")
            fused = torch.cat([update(name), update(up)])
            out = _ns64(fused, QUINTIC, 5) * scale_factor(*fused.shape, "spectral")
            parts = {name: out[:len(out) // 2], up: out[len(out) // 2:]}
        elif name.endswith("query_key_value.weight"):
            u = update(name).unflatten(0, (1, -1))  # one local query group of [q q k v]
            outs = [_ns64(p.flatten(0, 1), QUINTIC, 5) * scale_factor(
                p.shape[1], p.shape[2], "spectral") for p in u.split([16, 8, 8], dim=1)]
            parts = {name: torch.cat([o.unflatten(0, (1, -1)) for o in outs], 1).flatten(0, 1)}
        else:
            u = update(name)
            parts = {name: _ns64(u, QUINTIC, 5) * scale_factor(*u.shape, "spectral")}
        for key, value in parts.items():
            expected = before[key] * (1 - lr * 0.1) - lr * value
            assert_rel_close(named[key].detach().double(), expected, rtol=1e-5, what=key)
            checked.append(key)
    return checked


def test_muon_blockwise_orthogonalizes_each_shard():
    checked = run_distributed(2, _blockwise_step)[0]
    assert any("query_key_value" in n for n in checked) and any("dense" in n for n in checked)
    assert any("linear_fc1" in n for n in checked) and len(checked) == 20, checked


# --- checkpoints ----------------------------------------------------------------------------


def _resume(directory: str, optimizer_args: dict, then: dict | None = None) -> dict:
    """Two steps, a checkpoint, two more; then a fresh model loads the checkpoint and takes the
    same two steps (``then``: another optimizer to load it into, expected to refuse)."""
    args = dict(clip_grad=0.5, optimizer_args=optimizer_args, **MUON_MODEL)
    models, optimizer, scheduler = setup(2, 1, seed=4, **args)
    for step in range(2):
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(directory, 2, models, optimizer, scheduler)
    straight = [train_step(models, optimizer, scheduler, step) for step in (2, 3)]
    straight_weights = pieces(models)
    ps.destroy_model_parallel()
    if then is not None:
        models, optimizer, scheduler = setup(2, 1, seed=8, **{**args, "optimizer_args": then})
        try:
            load_checkpoint(directory, models, optimizer, scheduler)
        except CheckpointError as error:
            return {"error": str(error)}
        return {"error": None}
    models, optimizer, scheduler = setup(2, 1, seed=8, **args)
    load_checkpoint(directory, models, optimizer, scheduler)
    resumed = [train_step(models, optimizer, scheduler, step) for step in (2, 3)]
    return {"straight": (straight, straight_weights), "resumed": (resumed, pieces(models))}


@pytest.mark.parametrize("optimizer_args", [
    {"optimizer": "sgd"},
    {"optimizer": "muon", "muon": MuonSettings(tp_mode="duplicated")}], ids=["sgd", "muon"])
def test_resume_is_bit_exact(tmp_path, optimizer_args):
    ranks = run_distributed(2, _resume, str(tmp_path), optimizer_args)
    for rank in ranks:
        (losses, weights), (resumed, resumed_weights) = rank["straight"], rank["resumed"]
        assert losses == resumed
        for name, items in weights.items():
            for (_, want), (_, got) in zip(items, resumed_weights[name]):
                assert torch.equal(want, got), name


def test_checkpoint_of_another_optimizer_is_refused(tmp_path):
    error = run_distributed(2, _resume, str(tmp_path), {"optimizer": "sgd"},
                            {"optimizer": "muon"})[0]["error"]
    assert error is not None and "--optimizer sgd" in error and "muon" in error, error


# --- configuration --------------------------------------------------------------------------

BASE = dict(micro_batch_size=1, global_batch_size=8, lr=1e-3, train_iters=10)


@pytest.mark.parametrize("keys,message", [
    ({"optimizer": "muon", "use_torch_fsdp2": True}, "with training.use_torch_fsdp2=True"),
    ({"optimizer": "sgd", "use_precision_aware_optimizer": True}, "the precision-aware "
     "optimizer is AdamW's"),
    ({"optimizer": "sgd", "deepspeed": True, "deepspeed_config": "x.json"},
     "DeepSpeed's engine builds AdamW only"),
    ({"optimizer": "lion"}, "training.optimizer='lion' must be one of 'adam', 'sgd', 'muon'"),
    ({"optimizer": "muon", "muon_num_ns_steps": 3}, "num_ns_steps=3 must be a positive "
     "multiple of the 5 coefficient sets of coefficient_type='quintic'"),
    ({"optimizer": "muon", "muon_tp_mode": "sharded"}, "tp_mode='sharded' must be one of"),
    ({"sgd_momentum": -0.1}, "training.sgd_momentum=-0.1 must be >= 0.0"),
])
def test_config_refusals(keys, message):
    with pytest.raises(ConfigError) as error:
        TrainingConfig(**BASE, **keys)
    assert message in str(error.value)


def test_megatron_flags_set_the_keys():
    tr = parse_args(["--config", TINY, "--optimizer", "muon", "--muon-momentum", "0.95",
                     "--muon-use-nesterov", "--muon-no-split-qkv", "--muon-tp-mode",
                     "duplicated", "--muon-num-ns-steps", "10", "--muon-scale-mode",
                     "unit_rms_norm", "--muon-extra-scale-factor", "0.2",
                     "--muon-fp32-matmul-prec", "high", "--muon-coefficient-type", "simple"],
                    world_size=4).training
    assert tr.muon_settings == MuonSettings(0.95, True, 10, "simple", "unit_rms_norm", 0.2,
                                            "high", "duplicated", False)
    tr = parse_args(["--config", TINY, "--optimizer", "sgd", "--sgd-momentum", "0.5"],
                    world_size=4).training
    assert (tr.optimizer, tr.sgd_momentum) == ("sgd", 0.5)
    assert "muon' with model.precision='fp16': not supported" in error_of(
        "--optimizer", "muon", "--fp16")


# --- the estimator ----------------------------------------------------------------------------


def _sgd_state_bytes() -> tuple[float, float]:
    """The bf16 masters and momentum buffers a rank holds after an SGD step, and the
    estimate for its model."""
    models, optimizer, scheduler = setup(1, 1, seed=2, precision="bf16",
                                         optimizer_args={"optimizer": "sgd"})
    train_step(models, optimizer, scheduler, 0)
    held = sum(m.numel() * m.element_size() for m in optimizer.main_params) + sum(
        t.numel() * t.element_size() for state in optimizer.optimizer.state.values()
        for t in state.values())
    cfg = models[0].module.config
    return held, state_bytes(Setup(cfg, optimizer="sgd"), rank_params(cfg)).optimizer


def test_estimated_sgd_state_is_a_master_and_one_buffer():
    held, estimated = run_distributed(1, _sgd_state_bytes)[0]
    assert held == estimated


def _muon_state_bytes(tp: int, pp: int, overrides: dict) -> dict:
    """This rank's bf16 masters, Muon buffers and AdamW state after one step, by kind, and
    the estimate for its stage."""
    models, optimizer, scheduler = setup(tp, pp, seed=2, precision="bf16",
                                         optimizer_args={"optimizer": "muon"}, **overrides)
    train_step(models, optimizer, scheduler, 0)
    held = {"masters": sum(m.numel() * m.element_size() for m in optimizer.main_params)}
    for rule in optimizer.optimizer.optimizers:  # Muon's, then AdamW's
        held[type(rule).__name__] = sum(t.numel() * t.element_size()
                                        for state in rule.state.values() for t in state.values())
    cfg = models[0].module.config
    params = rank_params(cfg, ps.get_pipeline_model_parallel_rank())
    return {"held": held, "estimated": state_bytes(Setup(cfg, optimizer="muon"), params).optimizer}


@pytest.mark.parametrize("tp,pp,overrides", [
    (2, 2, {}),  # LayerNorm and biases; TP 2, first and last stages
    (1, 2, dict(activation="swiglu", normalization="RMSNorm", add_bias_linear=False,
                untie_embeddings_and_output_weights=True)),
    (2, 1, dict(num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2,
                moe_router_bias=True, moe_router_score_function="sigmoid",
                moe_router_enable_expert_bias=True)),  # stacked expert biases too
], ids=["gpt_tp2_pp2", "swiglu_rms_nobias_pp2", "moe_tp2"])
def test_estimated_muon_state_is_a_master_one_buffer_per_matrix_and_adamw_for_the_rest(
        tp, pp, overrides):
    for rank in run_distributed(tp * pp, _muon_state_bytes, tp, pp, overrides):
        held = rank["held"]
        assert held["TensorParallelMuon"] > 0 and held["AdamW"] > 0, held
        assert sum(held.values()) == rank["estimated"], rank


def test_estimator_refuses_muon_with_fsdp():
    with pytest.raises(ValueError, match="optimizer='muon' needs fully_sharded=False"):
        Setup(gpt_config(1, 1), optimizer="muon", fully_sharded=True)
    with pytest.raises(ValueError, match="optimizer='lion' must be one of adam, sgd, muon"):
        Setup(gpt_config(1, 1), optimizer="lion")
