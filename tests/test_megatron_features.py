"""Megatron-LM features behind its flags: ``--embedding-init-method-std`` (the embeddings'
own init std, and then no weight decay on them), ``--iterations-to-skip`` (the batch is read,
no step is taken) and ``--deterministic-mode`` (torch's deterministic switch, with Megatron's
refusals), each against an independent reference."""

import io
import os
import sys
import types
from contextlib import redirect_stdout

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from test_config import shipped
from test_training import GBS, job, micro_batches
from test_training_runtime import tiny_job
from torch import nn

from mp import parallel_state as ps
from mp.config import JobConfig
from mp.optim import get_param_groups
from mp.training import gpt_step
from mp.training.determinism import check_deterministic
from mp.training.logger import TrainingLogger, _open_wandb
from mp.training.pretrain import pretrain, set_random_seed, setup_model_and_optimizer
from mp.training.training import train


def _megatron_no_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's ``_get_param_groups`` rule with ``default_skip_embedding_weight_decay``."""
    return name.endswith(".bias") or len(param.shape) == 1 or "embedding" in name


def _embedding_init(embedding_std: float | None):
    cfg = JobConfig.from_dict({
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "vocab_size": 250, "seq_length": 16, "max_position_embeddings": 128,
                  "make_vocab_size_divisible_by": 128, "init_method_std": 0.02,
                  "embedding_init_method_std": embedding_std,
                  "untie_embeddings_and_output_weights": True},
        "training": {"micro_batch_size": 1, "global_batch_size": 1, "train_iters": 1,
                     "lr": 1e-3},
    })
    ps.initialize_model_parallel(1)
    set_random_seed(1)
    (chunk,), _, _ = setup_model_and_optimizer(cfg)
    params = dict(chunk.module.named_parameters())
    stds = {key: params[name].std().item() for key, name in (
        ("word", "embedding.word_embeddings.weight"),
        ("position", "embedding.position_embeddings.weight"),
        ("output", "output_layer.weight"),
        ("qkv", "decoder.layers.0.self_attention.query_key_value.weight"))}
    _, no_decay = (group["params"] for group in get_param_groups([chunk], 0.1))
    names = {id(p): n for n, p in params.items()}
    return stds, sorted(names[id(p)] for p in no_decay), sorted(
        n for n, p in params.items() if _megatron_no_decay(n, p))


@pytest.mark.parametrize("embedding_std", [None, 1.0])
def test_embedding_init_std_and_no_weight_decay(embedding_std):
    stds, no_decay, megatron = run_distributed(1, _embedding_init, embedding_std)[0]
    want = embedding_std or 0.02
    # sample stds of 256 x 64 and 128 x 64 normal draws: within a few percent
    assert stds["word"] == pytest.approx(want, rel=0.05)
    assert stds["position"] == pytest.approx(want, rel=0.05)
    assert stds["output"] == pytest.approx(0.02, rel=0.05)  # untied: init_method_std's
    assert stds["qkv"] == pytest.approx(0.02, rel=0.05)
    if embedding_std is None:
        assert not any("embedding" in name for name in no_decay)  # they decay
    else:
        assert no_decay == megatron  # Megatron's rule: biases, norms and the embeddings


def test_a_last_stage_copy_of_the_tied_embedding_does_not_decay_either():
    """The last pipeline stage's copy of a tied word embedding (``shared``) follows the first
    stage's table, so the two stay equal; an untied output layer decays."""
    def stage(std, shared):
        module = nn.Module()
        module.config = types.SimpleNamespace(embedding_init_method_std=std)
        module.output_layer = nn.Linear(4, 8, bias=False)
        module.output_layer.weight.shared = shared
        return module

    def decays(chunk):
        return [len(g["params"]) for g in get_param_groups([chunk], 0.1)
                if g["wd_mult"] == 1.0]

    assert decays(stage(1.0, True)) == []
    assert decays(stage(1.0, False)) == [1]
    assert decays(stage(None, True)) == [1]
    assert [g["wd_mult"] for g in get_param_groups(
        [stage(None, True)], 0.1, skip_embedding_weight_decay=True)] == [0.0]


def test_embedding_init_method_std_flag_and_rule():
    assert shipped("gpt-tiny", "--embedding-init-method-std", "1.0"
                   ).model.embedding_init_method_std == 1.0
    with pytest.raises(ValueError, match=r"embedding_init_method_std=0.0 must be > 0"):
        shipped("gpt-tiny", "--embedding-init-method-std", "0")


def _final_weights(skip: list[int], kept: list[int], train_iters: int):
    """``train`` at TP 1 over the micro-batches of iterations ``kept`` (of ``micro_batches``'
    stream), skipping ``skip``; the weights, the state and the learning rate after."""
    cfg = job(tp=1, train_iters=train_iters, lr_decay_iters=10, iterations_to_skip=skip)
    ps.initialize_model_parallel(1)
    set_random_seed(cfg.training.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    per_iteration = GBS // 2  # micro-batches of an iteration at DP 1 (MBS 2)
    stream = list(micro_batches(max(kept) + 1))
    data = iter([mb for it in kept for mb in stream[it * per_iteration:(it + 1) * per_iteration]])
    logger = TrainingLogger(cfg, dist.get_world_size(), torch.device("cpu"), enabled=False)
    state = train(gpt_step.forward_step, model, optimizer, scheduler, data, None, cfg, logger)
    left = sum(1 for _ in data)
    weights = torch.cat([p.detach().flatten() for p in model[0].module.parameters()])
    return weights, state.iteration, state.consumed_train_samples, scheduler.get_lr(), left


def test_iterations_to_skip_read_their_batch_and_take_no_step():
    """Megatron's loop: the iteration that starts with 1 done reads its batch and counts, but
    takes no step (the schedule does not advance). Reference: the same run on the other
    batches alone, one iteration fewer."""
    skipped = run_distributed(1, _final_weights, [1], [0, 1, 2, 3], 4)[0]
    reference = run_distributed(1, _final_weights, [], [0, 2, 3], 3)[0]
    assert torch.equal(skipped[0], reference[0])
    assert skipped[1:] == (4, 4 * GBS, reference[3], 0)  # every batch read, lr of 3 steps
    assert reference[1:3] == (3, 3 * GBS)
    with pytest.raises(ValueError, match=r"iterations_to_skip=\[-1\] holds \[-1\]"):
        shipped("gpt-tiny", "--iterations-to-skip", "-1")
    assert shipped("gpt-tiny", "--iterations-to-skip", "3", "7"
                   ).training.iterations_to_skip == [3, 7]


def _deterministic_run(enabled: bool):
    """A 4-iteration job's losses, whether torch's deterministic switch was on in its steps,
    and after."""
    cfg = tiny_job()
    cfg.training.deterministic_mode = enabled
    cfg.training.train_iters = 4
    seen = []

    def forward_step(data_iterator, model):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return gpt_step.forward_step(data_iterator, model)

    ps.initialize_model_parallel(1)
    with redirect_stdout(io.StringIO()):
        state = pretrain(cfg, forward_step)
    return set(seen), torch.are_deterministic_algorithms_enabled(), \
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"), state.iteration


def test_deterministic_mode_reaches_torchs_switch_for_the_job():
    on, after, cublas, iterations = run_distributed(1, _deterministic_run, True)[0]
    assert (on, after, cublas, iterations) == ({True}, False, None, 4)  # restored after
    off = run_distributed(1, _deterministic_run, False)[0]
    assert off[0] == {False}


def test_deterministic_mode_refusals_on_cuda():
    """Megatron's: NCCL's algorithm pinned; and cuBLAS's workspace one of the deterministic
    two. Nothing to pin on the CPU (gloo) or without the mode."""
    with pytest.raises(ValueError, match=r"needs NCCL_ALGO set to one of Tree, Ring, "
                                         r"CollnetDirect, CollnetChain, \^NVLS \(the "
                                         r"environment has none\)"):
        check_deterministic(True, {}, cuda=True)
    with pytest.raises(ValueError, match="the environment has 'NVLS'"):
        check_deterministic(True, {"NCCL_ALGO": "NVLS"}, cuda=True)
    with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG unset or one of :4096:8, "
                                         ":16:8, not ':0:0'"):
        check_deterministic(True, {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":0:0"},
                            cuda=True)
    check_deterministic(True, {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":16:8"},
                        cuda=True)
    check_deterministic(True, {}, cuda=False)
    check_deterministic(False, {}, cuda=True)


def test_wandb_entity_reaches_the_run(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kwargs: calls.append(kwargs) or "run"))
    cfg = shipped("gpt-tiny", "--wandb-project", "p", "--wandb-entity", "team",
                  "--wandb-exp-name", "x")
    assert _open_wandb(cfg) == "run"
    assert (calls[0]["entity"], calls[0]["project"], calls[0]["name"]) == ("team", "p", "x")
