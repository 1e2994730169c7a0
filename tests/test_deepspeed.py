"""DeepSpeed's engine for data parallelism and ZeRO, mp for tensor parallelism
(`mp.training.deepspeed`): at TP2 x DP2 ZeRO-1 and ZeRO-2 (the latter with sequence
parallelism) follow mp's own optimizer path step by step; a resumed run continues the
uninterrupted one; ``launch/pretrain_gpt.py --deepspeed``'s job trains (in the simulated
ranks, `jobs.run_job`); and every refusal names its rule before any process group exists."""

import contextlib
import io
import json
import math
import os
import re
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what mp.training.deepspeed does
pytest.importorskip("deepspeed", reason='DeepSpeed is an optional extra: pip install -e '
                                        '".[deepspeed]"')

import torch.distributed as dist
from deepspeed.utils import groups as deepspeed_groups
from harness import run_distributed
from jobs import ROOT, refusal, run_job
from test_pretrain import TINY
from test_training import MBS, SEQ, job, micro_batches

from mp import parallel_state as ps
from mp.config import JobConfig
from mp.training import gpt_step
from mp.training.deepspeed import setup_deepspeed_engine, train_step_deepspeed
from mp.training.deepspeed_config import deepspeed_config
from mp.training.pretrain import (
    check_supported,
    pretrain,
    set_random_seed,
    setup_model_and_optimizer,
)
from mp.training.training import train_step

ITERS = 6
ZERO1 = os.path.join(ROOT, "configs", "deepspeed", "zero1.json")
ZERO2 = os.path.join(ROOT, "configs", "deepspeed", "zero2.json")


def ds_job(model: dict | None = None, **training) -> JobConfig:
    """test_training's job at TP2 with DeepSpeed switched on and ``model`` keys changed."""
    config = job(2, **{"deepspeed": True, "deepspeed_config": ZERO1, **training}).to_dict()
    config["model"].update(model or {})
    return JobConfig.from_dict(config)


# --- the same curve as mp's own optimizer ---------------------------------------------------

def _curves(model: dict, ds_path: str):
    """Per iteration (loss, grad norm, lr) of mp's DDP + MixedPrecisionOptimizer and of the
    DeepSpeed engine from the same seed and data, for the model keys ``model``, and the
    relative difference of this rank's parameters at the end."""
    cfg = ds_job(model, deepspeed_config=ds_path)
    ps.initialize_model_parallel(2)
    num_microbatches = cfg.num_microbatches(dist.get_world_size())
    set_random_seed(cfg.training.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    data, mp_curve = micro_batches(ITERS), []
    for _ in range(ITERS):
        out = train_step(gpt_step.forward_step, data, model, optimizer, scheduler,
                         num_microbatches=num_microbatches, seq_length=SEQ,
                         micro_batch_size=MBS)
        mp_curve.append((out.losses["lm loss"], out.grad_norm, scheduler.get_lr()))

    set_random_seed(cfg.training.seed)
    engine = setup_deepspeed_engine(cfg, deepspeed_config(cfg, dist.get_world_size()))
    data, ds_curve = micro_batches(ITERS), []
    for _ in range(ITERS):
        out = train_step_deepspeed(gpt_step.forward_step, data, engine,
                                   num_microbatches=num_microbatches)
        assert out.update_successful
        ds_curve.append((out.losses["lm loss"], out.grad_norm, engine.lr_scheduler.get_lr()))
    # all of this rank's parameters as one vector: the key bias of attention gets only
    # round-off gradients (softmax ignores it), which Adam turns into steps of any sign
    theirs = dict(engine.module.named_parameters())
    mine = list(model[0].module.named_parameters())
    want = torch.cat([p.detach().double().flatten() for _, p in mine])
    got = torch.cat([theirs[name].detach().double().flatten() for name, _ in mine])
    difference = ((got - want).norm() / want.norm()).item()
    return (mp_curve, ds_curve, difference, num_microbatches, engine.zero_optimization_stage(),
            list(deepspeed_groups._get_data_parallel_group_ranks()))


# fp32: the same numbers up to the order of floating-point sums; bf16 (DeepSpeed accumulates
# gradients in bf16, mp in fp32): agreement at bf16's resolution
# (qk_layernorm's norms get gradients partial over TP without sequence parallelism too)
FP32, BF16 = {"precision": "fp32"}, {"precision": "bf16"}
CASES = {"zero1-fp32": (1, FP32, ZERO1, 1e-5, 1e-5),
         "zero2-sp-fp32": (2, {**FP32, "sequence_parallel": True}, ZERO2, 1e-5, 1e-5),
         "zero1-qk-layernorm-fp32": (1, {**FP32, "qk_layernorm": True}, ZERO1, 1e-5, 1e-5),
         "zero2-bf16": (2, BF16, ZERO2, 1e-4, 3e-3)}


@pytest.mark.parametrize("stage,model,ds_path,loss_rtol,norm_rtol", CASES.values(),
                         ids=CASES.keys())
def test_zero_follows_mp_optimizer_at_tp2_dp2(stage, model, ds_path, loss_rtol, norm_rtol):
    results = run_distributed(4, _curves, model, ds_path)
    mp_curve, ds_curve, _, num_microbatches, zero_stage, _ = results[0]
    assert zero_stage == stage and num_microbatches == 2  # gradient accumulation over 2
    # DeepSpeed sees mp's data-parallel groups: TP neighbours are adjacent ranks
    assert [r[5] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r[:2] == results[0][:2] for r in results), "ranks disagree on reported values"
    assert max(norm for _, norm, _ in mp_curve) > 1.0, "the test wants clipping (clip_grad=1)"
    for step, ((loss, norm, lr), (want_loss, want_norm, want_lr)) in enumerate(
            zip(ds_curve, mp_curve), 1):
        assert loss == pytest.approx(want_loss, rel=loss_rtol), f"loss at iteration {step}"
        assert norm == pytest.approx(want_norm, rel=norm_rtol), f"grad norm at iteration {step}"
        assert lr == pytest.approx(want_lr, rel=1e-12), f"lr at iteration {step}"
    for rank, result in enumerate(results):
        assert result[2] <= norm_rtol, f"rank {rank}: parameters differ by {result[2]:.2e}"


# --- checkpoints -------------------------------------------------------------------------------

def _pretrain_losses(ds_path: str, cache: str, **training) -> tuple[list[float], str]:
    """``pretrain`` on the embedded corpus (TP2 x DP2, 4 iterations in all); the exact loss of
    every micro-batch this rank computed, and what rank 0 printed."""
    cfg = ds_job({"vocab_size": 257},
                 **{"deepspeed_config": ds_path, "train_iters": 4, "lr_decay_iters": 4,
                    "lr_warmup_iters": 1, **training})
    config = cfg.to_dict()
    config["data"].update(data_path=["builtin"], tokenizer_type="ByteLevelTokenizer",
                          data_cache_path=cache, num_workers=0)
    config["logging"]["log_interval"] = 1
    ps.initialize_model_parallel(2)
    losses = []

    def forward_step(data_iterator, model):
        output, loss_func = gpt_step.forward_step(data_iterator, model)

        def recorded(output_tensor):
            outputs = loss_func(output_tensor)  # (loss sum, token count, reported)
            losses.append(outputs[0].item())
            return outputs
        return output, recorded

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pretrain(JobConfig.from_dict(config), forward_step)
    return losses, printed.getvalue()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mp-cache"))


def test_resumed_run_continues_the_uninterrupted_one(cache_dir, tmp_path):
    save = str(tmp_path / "ckpt")
    full = run_distributed(4, _pretrain_losses, ZERO2, cache_dir)
    first = run_distributed(4, _pretrain_losses, ZERO2, cache_dir, train_iters=2, save=save,
                            save_interval=1, keep_last=1)
    resumed = run_distributed(4, _pretrain_losses, ZERO2, cache_dir, load=save)
    assert [n for n in os.listdir(save) if n.startswith("iter_")] == ["iter_0000002"]
    assert os.path.isfile(os.path.join(save, "latest"))
    assert "resuming from" in resumed[0][1] and "iteration 2, 16 samples consumed" in resumed[0][1]
    for rank in range(4):
        want, before, after = full[rank][0], first[rank][0], resumed[rank][0]
        assert len(want) == 8 and len(before) == len(after) == 4  # 2 micro-batches/iteration
        assert before == want[:4]
        assert after == pytest.approx(want[4:], rel=1e-6), f"rank {rank} after resuming"
    # the log lines up to the grad norm (the lr shows the schedule was restored too)
    logged = [re.findall(r"^(iteration \d/4 \| consumed samples .*? \| grad norm \S+) \|",
                         run[0][1], re.MULTILINE) for run in (full, resumed)]
    assert len(logged[0]) == 4 and logged[1] == logged[0][2:], logged
    # --skip-train: the engine loads the checkpoint and the loop runs no iteration
    losses, printed = run_distributed(4, _pretrain_losses, ZERO2, cache_dir, load=save,
                                      skip_train=True)[0]
    assert losses == [] and "iteration 2, 16 samples consumed" in printed
    assert not re.search(r"^iteration \d", printed, re.MULTILINE), printed


# --- the launcher's job ----------------------------------------------------------------------

def test_launch_with_deepspeed_trains_at_tp2_dp2(cache_dir):
    out = run_distributed(4, run_job, [
        *TINY, "--train-iters", "4", "--lr-warmup-iters", "2", "--log-interval", "2",
        "--eval-interval", "4", "--deepspeed", "--deepspeed-config", ZERO2,
        "--data-cache-path", cache_dir])[0]
    assert out.count("world 4 = TP 2 x PP 1 x DP 2 | DeepSpeed ZeRO-2 | gloo") == 1, out
    losses = [float(x) for x in re.findall(r"^iteration [24]/4 \| consumed samples \d+ \| "
                                           r"global batch size 8 \| lm loss (\S+) \| lr \S+ \| "
                                           r"grad norm \S+ \| loss scale 1 \|", out, re.MULTILINE)]
    assert len(losses) == 2, out
    # a freshly initialised GPT predicts about uniformly over the 257 byte tokens
    assert abs(losses[0] - math.log(257)) < 0.5, losses
    assert re.search(r"^validation at iteration 4 \| lm loss \S+ \| lm loss PPL", out,
                     re.MULTILINE), out


# --- refusals, before any process group ---------------------------------------------------

def _write(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


ZERO = {"zero_optimization": {"stage": 1}}
CONTRADICTS = "contradicts the mp config, "
REFUSALS = {
    "no-json": ({"deepspeed_config": None}, None,
                "training.deepspeed=true needs training.deepspeed_config"),
    "missing-json": ({"deepspeed_config": "/nonexistent/ds.json"}, None,
                     "training.deepspeed_config='/nonexistent/ds.json' cannot be read"),
    "bad-json": ({}, "{not json", "is not valid JSON"),
    "pipeline": ({"pipeline_model_parallel_size": 2, "num_layers": 2}, ZERO,
                 "pipeline_model_parallel_size=2: not supported"),
    "context-parallel": ({"context_parallel_size": 2}, ZERO,
                         "model.context_parallel_size=2: not supported"),
    "distributed-optimizer": ({"use_distributed_optimizer": True}, ZERO,
                              "training.use_distributed_optimizer=true: choose one"),
    "zero3": ({}, {"zero_optimization": {"stage": 3}},
              "zero_optimization.stage=3 is not supported with mp's tensor parallelism"),
    "zero0": ({}, {"zero_optimization": {"stage": 0}},
              "zero_optimization.stage=0: mp runs DeepSpeed with ZeRO stage 1 or 2"),
    "no-zero": ({}, {}, "zero_optimization.stage is not set (DeepSpeed's default is 0)"),
    "micro-batch": ({}, {**ZERO, "train_micro_batch_size_per_gpu": 4},
                    f"train_micro_batch_size_per_gpu=4 {CONTRADICTS}training.micro_batch_size = 2"),
    "accumulation": ({}, {**ZERO, "gradient_accumulation_steps": 1},
                     (f"gradient_accumulation_steps=1 {CONTRADICTS}training.global_batch_size / "
                      "(micro_batch_size x data-parallel size) = 8 / (2 x 2) = 2")),
    "global-batch": ({}, {**ZERO, "train_batch_size": 16},
                     f"train_batch_size=16 {CONTRADICTS}training.global_batch_size = 8"),
    "clipping": ({}, {**ZERO, "gradient_clipping": 0.5},
                 f"gradient_clipping=0.5 {CONTRADICTS}training.clip_grad = 1.0"),
    "bf16-on": ({}, {**ZERO, "bf16": {"enabled": True}},
                "bf16.enabled=true contradicts model.precision='fp32'"),
    "bf16-off": ({"precision": "bf16"}, {**ZERO, "bf16": {"enabled": False}},
                 "bf16.enabled=false contradicts model.precision='bf16'"),
    "scheduler": ({}, {**ZERO, "scheduler": {"type": "WarmupLR"}},
                  "a scheduler section is not supported"),
    "finetune": ({"finetune": True, "load": "pretrained"}, ZERO,
                 "training.finetune=true: not supported"),
    "per-token-loss": ({"calculate_per_token_loss": True}, ZERO,
                       "training.calculate_per_token_loss=True: not supported"),
    "decoupled-lr": ({"decoupled_lr": 1e-2}, ZERO, "training.decoupled_lr=0.01: not supported"),
    "bf16-grad-reduce": ({"precision": "bf16", "grad_reduce_in_bf16": True}, ZERO,
                         "training.grad_reduce_in_bf16=True: not supported"),
}
MODEL_KEYS = {"pipeline_model_parallel_size", "num_layers", "precision", "context_parallel_size"}


@pytest.mark.parametrize("overrides,content,message", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusal_names_the_rule(tmp_path, overrides, content, message):
    model = {k: v for k, v in overrides.items() if k in MODEL_KEYS}
    training = {k: v for k, v in overrides.items() if k not in MODEL_KEYS}
    if content is not None:
        training["deepspeed_config"] = _write(tmp_path, content)
    with pytest.raises(ValueError) as error:
        check_supported(ds_job(model, **training), world_size=4)
    assert message in str(error.value)


@pytest.mark.parametrize("key", ["log_params_norm", "log_num_zeros_in_grad"])
def test_norms_and_counts_of_mp_optimizer_are_refused(key):
    cfg = ds_job()
    setattr(cfg.logging, key, True)
    with pytest.raises(ValueError, match=f"logging.{key}=true is not supported with "
                                         "training.deepspeed=true"):
        cfg.validate(4)


def test_refusals_without_deepspeed_or_its_fp16(tmp_path, monkeypatch):
    path = _write(tmp_path, ZERO)
    with pytest.raises(ValueError, match="training.deepspeed is false: add --deepspeed"):
        check_supported(ds_job(deepspeed=False, deepspeed_config=path), world_size=4)
    # Whether an accelerator takes fp16 depends on the machine (DeepSpeed's CPU accelerator
    # does where oneDNN has fp16 kernels): say it does not, and the job must refuse fp16.
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)
    monkeypatch.setattr(accelerator, "is_bf16_supported", lambda: True)
    with pytest.raises(ValueError, match=f"'fp16': DeepSpeed's {accelerator.device_name()} "
                                         "accelerator does not support it; use fp32 or bf16"):
        check_supported(ds_job({"precision": "fp16"}, deepspeed_config=path), world_size=4)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed now fails
    with pytest.raises(ValueError, match=re.escape('install it with pip install -e '
                                                   '".[deepspeed]"')):
        check_supported(ds_job(deepspeed_config=path), world_size=4)


def test_mp_checkpoint_is_not_loaded_as_deepspeed_one(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")  # what marks an mp-format checkpoint
    with pytest.raises(ValueError, match="holds an mp-format checkpoint, which does not load "
                                         "into a --deepspeed job"):
        check_supported(ds_job(load=str(tmp_path)), world_size=4)


def test_config_is_filled_in_from_mp(tmp_path):
    cfg = ds_job({"precision": "bf16"}, deepspeed_config=_write(
        tmp_path, {**ZERO, "train_batch_size": "auto", "gradient_clipping": 1.0}))
    ds = deepspeed_config(cfg, world_size=4)
    assert ds == {**ZERO, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                  "train_batch_size": 8, "gradient_clipping": 1.0, "bf16": {"enabled": True}}
    fp16 = deepspeed_config(ds_job({"precision": "fp16"}, deepspeed_config=cfg.training
                                   .deepspeed_config, initial_loss_scale=2.0**16), 2)
    assert fp16["gradient_accumulation_steps"] == 4
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                            "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1.0}


def test_launch_refuses_before_any_process_group(monkeypatch, capsys):
    assert "training.deepspeed=true needs training.deepspeed_config" in refusal(
        [*TINY, "--deepspeed"], monkeypatch, capsys)
