"""Sparse upcycling (`mp.checkpointing.upcycling`, Megatron's ``--moe-use-upcycling``):
the upcycled mixture of experts computes the dense model's logits where the rule says it
must (granularity 1 under GeLU; granularity 2 under squared ReLU, which scales exactly), at
expert-parallel size 2; the job writes the upcycled checkpoint and trains from it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close
from gpt_runs import VOCAB, gpt_config
from harness import run_distributed

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, load_global_model
from mp.checkpointing.checkpoint import save_global_model
from mp.checkpointing.upcycling import check_upcycling, upcycle, upcycle_checkpoint, weight_scale
from mp.config import JobConfig, load_config
from mp.model.stages import build_gpt_chunks
from mp.tensor_parallel import model_parallel_cuda_manual_seed
from mp.training.pretrain import pretrain

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "gpt-tiny.yaml")
FFN = 64
MOE = {"num_moe_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.0}


def _logits(model) -> torch.Tensor:
    tokens = torch.arange(32).remainder(VOCAB).view(2, 16)
    with torch.no_grad():
        return model(tokens)


def _dense_then_moe(path: str, activation: str, pieces: int) -> tuple:
    """The dense model's logits, then (after rank 0 upcycles its weights) the MoE model's at
    EP 2, on the same tokens."""
    ps.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(3)
    dense_config = gpt_config(1, 1, ffn_hidden_size=FFN, activation=activation)
    dense = build_gpt_chunks(dense_config)[0]
    want = _logits(dense)
    moe_config = gpt_config(1, 1, ffn_hidden_size=FFN, activation=activation,
                            moe_ffn_hidden_size=FFN // pieces, expert_model_parallel_size=2,
                            **MOE)
    if dist.get_rank() == 0:
        weights = {name: p.detach() for name, p in dense.named_parameters()}
        save_global_model(os.path.join(path, "dense"), dense_config, weights)
        upcycle_checkpoint(os.path.join(path, "dense"), os.path.join(path, "moe"), moe_config,
                           seed=7)
    dist.barrier()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, expert_model_parallel_size=2)
    moe = build_gpt_chunks(moe_config)
    load_checkpoint(os.path.join(path, "moe"), moe)
    got = _logits(moe[0])
    ps.destroy_model_parallel()
    return want, got


@pytest.mark.parametrize("activation,pieces", [("gelu", 1), ("squared_relu", 2)])
def test_upcycled_experts_compute_the_dense_logits(tmp_path, activation, pieces):
    for rank, (want, got) in enumerate(run_distributed(2, _dense_then_moe, str(tmp_path),
                                                       activation, pieces)):
        assert_rel_close(got, want, rtol=1e-5, what=f"rank {rank} logits")


def test_pieces_router_groups_and_scales():
    """Expert ``e`` is piece ``e mod G`` of the dense MLP times the scale; a virtual group's
    ``G`` experts share one router row; Megatron's scales."""
    config = gpt_config(1, 1, ffn_hidden_size=FFN, activation="swiglu",
                        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=FFN // 2)
    dense = {f"decoder.layers.0.mlp.linear_{p}.weight": torch.randn(shape)
             for p, shape in (("gate", (FFN, 32)), ("fc1", (FFN, 32)), ("fc2", (32, FFN)))}
    dense["decoder.layers.0.mlp.linear_fc2.bias"] = torch.randn(32)
    moe = upcycle(dense, config, seed=0)
    scale = 2 ** (1 / 3)  # granularity 2, softmax over the top k, gated
    assert weight_scale(config) == pytest.approx(scale)
    for e in range(8):
        half = slice(0, FFN // 2) if e % 2 == 0 else slice(FFN // 2, FFN)
        for p in ("gate", "fc1"):
            assert torch.equal(moe[f"decoder.layers.0.mlp.experts.{p}_weight"][e],
                               dense[f"decoder.layers.0.mlp.linear_{p}.weight"][half] * scale)
        assert torch.equal(moe["decoder.layers.0.mlp.experts.fc2_weight"][e],
                           dense["decoder.layers.0.mlp.linear_fc2.weight"][:, half] * scale)
        assert torch.equal(moe["decoder.layers.0.mlp.experts.fc2_bias"][e],
                           dense["decoder.layers.0.mlp.linear_fc2.bias"])
    router = moe["decoder.layers.0.mlp.router.weight"]
    assert router.shape == (8, 32) and torch.equal(router[0::2], router[1::2])
    assert len(set(map(tuple, router[0::2].tolist()))) == 4
    pre = gpt_config(1, 1, ffn_hidden_size=FFN, num_moe_experts=8,
                     moe_router_topk=2, moe_ffn_hidden_size=FFN // 2, moe_router_pre_softmax=True)
    assert weight_scale(pre) == pytest.approx((8 * 2 / 2) ** 0.5)  # E G / k, square root


def _job(load: str | None, save: str, moe: bool) -> None:
    """Two iterations of the pretraining job on mock data at DP 2 (EP 2 with experts)."""
    model = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "vocab_size": 64,
             "seq_length": 8, "make_vocab_size_divisible_by": 16, "ffn_hidden_size": 32,
             "hidden_dropout": 0.0, "attention_dropout": 0.0}
    if moe:
        model.update(MOE, expert_model_parallel_size=2)
    cfg = JobConfig.from_dict({
        "model": model,
        "training": {"micro_batch_size": 1, "global_batch_size": 2, "train_iters": 2,
                     "lr": 1e-3, "eval_iters": 0, "seed": 5, "save": save, "load": load,
                     "save_interval": 2, "moe_use_upcycling": moe},
        "data": {"mock_data": True, "num_workers": 0},
        "logging": {"progress": False}})
    cfg.validate(2)
    ps.initialize_model_parallel(1, expert_model_parallel_size=2 if moe else 1)
    pretrain(cfg)
    ps.destroy_model_parallel()
    return cfg


def test_the_job_upcycles_once_then_trains(tmp_path):
    dense_dir, moe_dir = str(tmp_path / "dense"), str(tmp_path / "moe")
    run_distributed(2, _job, None, dense_dir, False)
    cfg = run_distributed(2, _job, dense_dir, moe_dir, True)[0]
    dense, _ = load_global_model(dense_dir)
    start, info = load_global_model(os.path.join(moe_dir, "iter_0000000"))
    assert info.layout is None  # weights only: the run started at iteration 0
    want = upcycle(dense, cfg.model, seed=5)
    assert start.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(start[name], tensor), name
    trained, info = load_global_model(moe_dir)
    assert info.iteration == 2 and not torch.equal(
        trained["decoder.layers.0.mlp.experts.fc1_weight"],
        start["decoder.layers.0.mlp.experts.fc1_weight"])
    # a second run with the flag would overwrite the run's start: refused, as in Megatron
    with pytest.raises(ValueError, match="holds a checkpoint already: upcycling runs once"):
        check_upcycling(cfg)


@pytest.mark.parametrize("flags,message", [
    ([], "model.num_moe_experts is not set"),
    (["--num-experts", "4", "--moe-ffn-hidden-size", "48"],
     "model.ffn_hidden_size=128 .* is not divisible by model.moe_ffn_hidden_size=48"),
    (["--num-experts", "3", "--moe-ffn-hidden-size", "64"],
     "model.num_moe_experts=3 is not divisible by the granularity"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "64"],
     "a shared expert has no dense counterpart"),
])
def test_bad_upcycling_is_refused(tmp_path, flags, message):
    dense = tmp_path / "dense"
    save_global_model(dense, gpt_config(1, 1), {"w": torch.zeros(1)})
    cfg = load_config(TINY, ["--moe-use-upcycling", "--load", str(dense), "--save",
                             str(tmp_path / "moe"), "--ffn-hidden-size", "128", *flags], 4)
    assert cfg.training.moe_use_upcycling
    with pytest.raises(ValueError, match=message):
        check_upcycling(cfg)
