"""FSDP2 (``training.use_torch_fsdp2``, `mp.distributed.torch_fsdp2`) against mp's DDP.

The same GPT from the same seed on the same batches, trained with DDP and with FSDP in one
process group, must give the same losses, gradient norms (clipping active) and weights: fp32
to 1e-6 at DP 2 (tied embeddings inside one chunk), TP 2 x DP 2 with sequence parallelism
(the norms' partial gradients summed over TP on the shards), PP 2 x DP 2 (two
micro-batches per rank, the tied embedding's copies summed over the embedding group on the
shards), CP 2 x DP 2 (sharded over the 4 ranks) with the per-token loss on batches of unequal
token counts, a mixture of experts at EP 1 (experts sharded like the rest, the routers' expert
biases whole and moved as DDP moves them) and full recompute under 1F1B; bf16 FSDP (fp32
shards, bf16 compute, fp32 reduction) stays close to DDP-bf16's losses and fp32 masters. The
weights are gathered over DP (x CP) by the test itself, not by mp's checkpoint code. Each rank
holds its ``torch.chunk`` rows of every trained tensor: about 1/(DP x CP) of the model's
elements. The model state per rank equals the estimator's `state_bytes`. A checkpoint saved
under FSDP resumes without FSDP and the other way round, the next step equal to the
uninterrupted run's. The estimator's bytes per collective equal the measured ones in one
iteration without pipelining, with 1F1B and interleaved, with and without resharding after
forward, and with full recompute. Bad combinations are refused when the config is validated.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close
from gpt_runs import EPS, LR, batch, gpt_config, setup, train_step
from harness import run_distributed
from test_estimate_comm import _expected

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, load_global_model, save_checkpoint
from mp.config import JobConfig, load_config
from mp.distributed.torch_fsdp2 import TorchFullyShardedDataParallel, local_tensor
from mp.estimate import CollectiveMeter, Setup, rank_params, state_bytes
from mp.model.stages import build_gpt_chunks
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer
from mp.tensor_parallel import model_parallel_cuda_manual_seed
from mp.training.pretrain import pretrain

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "gpt-tiny.yaml")
STEPS = 3


def fsdp_setup(tp: int, pp: int, precision: str = "fp32", *, reshard: bool = True,
               clip_grad: float = 0.5, vpp: int | None = None, cp: int = 1,
               calculate_per_token_loss: bool = False, optimizer_args: dict | None = None,
               **overrides):
    """`gpt_runs.setup`'s model, optimizer and schedule (same arguments), the chunks wrapped
    in FSDP2."""
    ps.initialize_model_parallel(tp, pp, vpp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1)
    config = gpt_config(tp, pp, precision, virtual_pipeline_model_parallel_size=vpp,
                        context_parallel_size=cp, **overrides)
    models = [TorchFullyShardedDataParallel(chunk, reshard_after_forward=reshard,
                                            calculate_per_token_loss=calculate_per_token_loss)
              for chunk in build_gpt_chunks(config)]
    optimizer = get_megatron_optimizer(models, lr=LR, weight_decay=0.1, clip_grad=clip_grad,
                                       adam_eps=EPS, **(optimizer_args or {}))
    scheduler = OptimizerParamScheduler(optimizer, max_lr=LR, min_lr=LR / 10,
                                        lr_warmup_steps=2, lr_decay_steps=20)
    return models, optimizer, scheduler


def _gathered(param) -> torch.Tensor:
    """An FSDP parameter's rows from every DP rank, put together by hand (``torch.chunk``'s
    split; not ``full_tensor()``, whose caches outlive the process groups of the test pool)."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    size, local = dist.get_world_size(group), local_tensor(param)
    padded = torch.zeros(math.ceil(param.shape[0] / size), *param.shape[1:])
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:param.shape[0]]


def _whole(models, optimizer=None) -> dict[str, torch.Tensor]:
    """This rank's (TP-local) parameters by chunk and name: FSDP's gathered over DP, DDP's
    fp32 masters when ``optimizer`` is given."""
    masters = {} if optimizer is None else {id(s.param): s.main for s in optimizer.shards}
    return {f"{c}.{name}": (_gathered(p) if p is not local_tensor(p)
                            else masters.get(id(p), p)).detach().clone().view(p.shape)
            for c, model in enumerate(models) for name, p in model.module.named_parameters()}


def _config(tp: int, pp: int, precision: str, args: dict):
    """The model `fsdp_setup` (and `gpt_runs.setup`) builds from ``args``."""
    fields = {k: v for k, v in args.items()
              if k not in ("cp", "vpp", "calculate_per_token_loss", "optimizer_args")}
    return gpt_config(tp, pp, precision, context_parallel_size=args.get("cp", 1),
                      virtual_pipeline_model_parallel_size=args.get("vpp"), **fields)


def _train_both(tp: int, pp: int, precision: str, overrides: dict) -> dict:
    """DDP then FSDP from the same seed: their losses, norms and weights (DDP's fp32
    masters), and FSDP's element counts and model state per rank."""
    runs = {}
    for kind in ("ddp", "fsdp"):
        if kind == "ddp":
            models, optimizer, scheduler = setup(tp, pp, seed=1, precision=precision,
                                                 clip_grad=0.5, **overrides)
        else:
            models, optimizer, scheduler = fsdp_setup(tp, pp, precision, **overrides)
        per_token = overrides.get("calculate_per_token_loss", False)
        steps = [train_step(models, optimizer, scheduler, step, per_token=per_token,
                            masked=per_token) for step in range(STEPS)]
        runs[kind] = {"steps": steps,
                      "weights": _whole(models, optimizer if kind == "ddp" else None)}
        if kind == "fsdp":
            trained = [p for m in models for p in m.parameters() if p.requires_grad]
            runs["held"] = sum(local_tensor(p).numel() for p in trained)
            runs["unsharded"] = sum(p.numel() for p in trained)
            runs["untrained"] = [local_tensor(p) is p for m in models for p in m.parameters()
                                 if not p.requires_grad]
            runs["state"] = _state_bytes(models, optimizer)
            runs["pp_rank"] = ps.get_pipeline_model_parallel_rank()
        ps.destroy_model_parallel()
    return runs


def _state_bytes(models, optimizer) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes this rank holds, tensor by tensor."""
    params = [local_tensor(p) for m in models for p in m.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(local_tensor(p.grad).numel() * 4 for m in models for p in m.parameters()
                if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in optimizer.optimizer.state.values()
                for t in s.values())
    return weights, grads, state


MOE = {"num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32,
       "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
       "moe_aux_loss_coeff": 0.1}
RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1}
SELECTIVE = {"sequence_parallel": True, "recompute_granularity": "selective",
             "recompute_modules": ["core_attn", "mlp", "layernorm"]}
SGD = {"optimizer_args": {"optimizer": "sgd", "sgd_momentum": 0.8}}


# TP2 adds sequence parallelism; PP2 splits the tied embedding over the stages; CP2 shards
# over DP x CP (4 ranks), with the per-token loss on masked batches; the mixture of experts
# keeps its router's expert bias whole on every rank; full recompute reruns each layer's
# forward (and its gathers) in backward, under 1F1B; selective recompute reruns modules
# inside the sharded layer; SGD keeps one momentum per element of the shards
@pytest.mark.parametrize("tp,pp,precision,args", [
    (1, 1, "fp32", {}), (1, 1, "bf16", {}), (2, 1, "fp32", {"sequence_parallel": True}),
    (1, 2, "fp32", {}), (1, 1, "fp32", {"cp": 2, "calculate_per_token_loss": True}),
    (1, 1, "fp32", MOE), (1, 2, "fp32", RECOMPUTE), (2, 1, "fp32", SELECTIVE),
    (1, 1, "fp32", SGD)],
    ids=["DP2", "DP2-bf16", "TP2xDP2-SP", "PP2xDP2-tied", "CP2xDP2-per-token", "DP2-MoE",
         "PP2xDP2-recompute", "TP2xDP2-selective", "DP2-SGD"])
def test_matches_ddp(tp, pp, precision, args):
    cp = args.get("cp", 1)
    runs = run_distributed(2 * tp * pp * cp, _train_both, tp, pp, precision, args)
    rtol = 1e-6 if precision == "fp32" else 1e-4
    ddp, fsdp = runs[0]["ddp"]["steps"], runs[0]["fsdp"]["steps"]
    assert max(norm for _, norm in ddp) > 0.5, "clipping never acted"
    for what, index in (("losses", 0), ("gradient norms", 1)):
        assert_rel_close(torch.tensor([s[index] for s in fsdp]),
                         torch.tensor([s[index] for s in ddp]), rtol=rtol, what=what)
    for rank, run in enumerate(runs):
        assert run["ddp"]["weights"].keys() == run["fsdp"]["weights"].keys()
        for name, want in run["ddp"]["weights"].items():
            got = run["fsdp"]["weights"][name]
            # bf16: the weights each step used were rounded to bf16 in both runs, but at
            # different points (DDP's parameters, FSDP's gathered copies)
            assert_rel_close(got, want, rtol=rtol if precision == "fp32" else 2e-2,
                             what=f"rank {rank} {name}")
        # each rank holds its rows of every tensor, 1/(DP x CP) of them when that divides
        # the rows (as it does every tensor here: no padding)
        assert 2 * cp * run["held"] == run["unsharded"], (run["held"], run["unsharded"])
        # untrained parameters (the expert biases) stay whole, not DTensors
        assert all(run["untrained"]) and len(run["untrained"]) == (4 if args is MOE else 0)
        cfg = _config(tp, pp, precision, args)
        optimizer = args.get("optimizer_args", {}).get("optimizer", "adam")
        estimate = state_bytes(Setup(cfg, data_parallel_size=2, fully_sharded=True,
                                     optimizer=optimizer),
                               rank_params(cfg, run["pp_rank"]))
        assert run["state"] == (estimate.weights, estimate.grads, estimate.optimizer)


def _resume_across(path: str) -> dict:
    """FSDP trains 2 steps, saves, trains a 3rd; DDP loads the save and takes the 3rd step,
    saves that; FSDP loads it back. Returns the weights each run ends with."""
    out = {}
    models, optimizer, scheduler = fsdp_setup(1, 1)
    for step in range(2):
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(f"{path}/fsdp", 2, models, optimizer, scheduler)
    out["fsdp_loss"] = train_step(models, optimizer, scheduler, 2)[0]
    out["fsdp"] = _whole(models)
    ps.destroy_model_parallel()
    models, optimizer, scheduler = setup(1, 1, seed=7, clip_grad=0.5)  # other weights
    load_checkpoint(f"{path}/fsdp", models, optimizer, scheduler)
    out["ddp_loss"] = train_step(models, optimizer, scheduler, 2)[0]
    out["ddp"] = _whole(models)
    save_checkpoint(f"{path}/ddp", 3, models, optimizer, scheduler)
    ps.destroy_model_parallel()
    models, optimizer, scheduler = fsdp_setup(1, 1)
    load_checkpoint(f"{path}/ddp", models, optimizer, scheduler)
    out["reloaded"] = _whole(models)
    ps.destroy_model_parallel()
    return out


def test_checkpoint_resumes_with_and_without_fsdp(tmp_path):
    runs = run_distributed(2, _resume_across, str(tmp_path))
    run = runs[0]
    assert abs(run["ddp_loss"] - run["fsdp_loss"]) <= 1e-6 * abs(run["fsdp_loss"])
    for name, want in run["fsdp"].items():
        assert_rel_close(run["ddp"][name], want, rtol=1e-6, what=f"DDP resumed: {name}")
        assert torch.equal(run["reloaded"][name], run["ddp"][name]), name


def _measured_iteration(tp: int, pp: int, reshard: bool, overrides: dict):
    models, optimizer, scheduler = fsdp_setup(tp, pp, reshard=reshard, **overrides)
    with CollectiveMeter() as meter:
        train_step(models, optimizer, scheduler, 0)
    micro = len(batch(0))
    cfg = _config(tp, pp, "fp32", overrides)
    estimate = Setup(cfg, data_parallel_size=2, micro_batch_size=2, num_microbatches=micro,
                     fully_sharded=True, reshard_after_forward=reshard)
    expected = _expected(estimate, ps.get_pipeline_model_parallel_rank(), logging=True)
    ps.destroy_model_parallel()
    return meter.totals(), expected


# PP2: 1F1B, the first stage's two forwards before its first backward (FSDP2's default
# backward prefetch gathered a layer once more there); VPP2: interleaved, every forward before
# any backward; full recompute gathers for the rerun instead of for the backward
@pytest.mark.parametrize("tp,pp,reshard,overrides", [
    (1, 1, True, {}), (1, 1, False, {}), (2, 1, True, {"sequence_parallel": True}),
    (1, 2, True, {}), (1, 2, False, {}), (1, 2, True, {"vpp": 2}), (1, 2, True, RECOMPUTE)],
    ids=["DP2", "DP2-no-reshard", "TP2xDP2-SP", "PP2xDP2", "PP2xDP2-no-reshard",
         "VPP2xPP2xDP2", "PP2xDP2-recompute"])
def test_collective_bytes_match_the_estimate(tp, pp, reshard, overrides):
    for rank, (measured, expected) in enumerate(
            run_distributed(2 * tp * pp, _measured_iteration, tp, pp, reshard, overrides)):
        assert measured == expected, f"rank {rank}"


def _pretrain_job(path: str, fsdp: bool) -> int:
    """The pretraining job: 3 iterations of two micro-batches of mock data at DP 2, saved.
    Returns how many chunks it wrapped in FSDP."""
    cfg = JobConfig.from_dict({
        "model": {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
                  "vocab_size": 64, "seq_length": 8, "make_vocab_size_divisible_by": 16,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0},
        # adam_eps as gpt_runs': the key bias's gradient is zero up to rounding, which a
        # smaller eps would turn into full steps that differ between any two layouts
        "training": {"micro_batch_size": 1, "global_batch_size": 4, "train_iters": 3,
                     "lr": 1e-3, "adam_eps": EPS, "eval_iters": 0, "seed": 5, "save": path,
                     "save_interval": 3, "use_torch_fsdp2": fsdp},
        "data": {"mock_data": True, "num_workers": 0},
        "logging": {"progress": False}})
    cfg.validate(2)
    ps.initialize_model_parallel(1)
    wrapped, init = [], TorchFullyShardedDataParallel.__init__

    def counted(self, *args, **kwargs):
        wrapped.append(self)
        init(self, *args, **kwargs)
    TorchFullyShardedDataParallel.__init__ = counted
    try:
        pretrain(cfg)
    finally:
        TorchFullyShardedDataParallel.__init__ = init
    ps.destroy_model_parallel()
    return len(wrapped)


def test_pretraining_job_saves_what_ddp_saves(tmp_path):
    for fsdp in (False, True):
        assert run_distributed(2, _pretrain_job, str(tmp_path / str(fsdp)), fsdp) == [fsdp] * 2
    ddp, _ = load_global_model(tmp_path / "False")
    fsdp, _ = load_global_model(tmp_path / "True")
    assert ddp.keys() == fsdp.keys()
    for name, want in ddp.items():
        assert_rel_close(fsdp[name], want, rtol=1e-6, what=name)


@pytest.mark.parametrize("overrides,message", [
    (["--use-torch-fsdp2", "--use-distributed-optimizer"],
     "training.use_torch_fsdp2=true with training.use_distributed_optimizer=True: not "
     "supported (FSDP shards the optimizer state already"),
    (["--use-torch-fsdp2", "--fp16"],
     "training.use_torch_fsdp2=true with model.precision='fp16': not supported"),
    (["--use-torch-fsdp2", "--num-experts", "4", "--expert-model-parallel-size", "2"],
     "training.use_torch_fsdp2=true with model.expert_model_parallel_size=2: not supported"),
    (["--use-torch-fsdp2", "--check-weight-hash-across-dp-replicas-interval", "5"],
     "FSDP's data-parallel ranks hold different rows, not replicas"),
    (["--torch-fsdp2-no-reshard-after-forward"],
     "training.torch_fsdp2_reshard_after_forward=false needs training.use_torch_fsdp2=true"),
])
def test_bad_combinations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, overrides, 4)


def test_megatron_flags_set_fsdp():
    cfg = load_config(TINY, ["--use-torch-fsdp2", "--torch-fsdp2-no-reshard-after-forward",
                             "--bf16"], 4)
    assert cfg.training.use_torch_fsdp2 and not cfg.training.torch_fsdp2_reshard_after_forward
    setup_ = Setup.from_job(cfg, 4)
    assert setup_.fully_sharded and not setup_.reshard_after_forward
    assert "FSDP (no reshard)" in setup_.describe()

