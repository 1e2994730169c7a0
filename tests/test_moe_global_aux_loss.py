"""The global load-balancing loss (``--moe-router-load-balancing-type global_aux_loss``,
Megatron's): one router against Switch's formula with the expert fractions averaged over the
iteration's micro-batches so far, and training at data-parallel layouts against one process
whose micro-batches hold every data-parallel rank's together (the statistics the global loss
counts)."""

import functools

import pytest
import torch
from checks import assert_rel_close
from gpt_runs import (
    MBS,
    assemble,
    assert_same_training,
    global_batch,
    pieces,
    setup,
    train_from,
)
from harness import run_distributed

from mp.model import TransformerConfig
from mp.model.aux_losses import set_aux_loss_scale, take_tracked
from mp.model.moe.router import TopKRouter

E, K, H, COEFF = 4, 2, 8, 0.1


def _router() -> TopKRouter:
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, vocab_size=16,
                            seq_length=6, num_moe_experts=E, moe_router_topk=K,
                            moe_aux_loss_coeff=COEFF,
                            moe_router_load_balancing_type="global_aux_loss")
    return TopKRouter(cfg).train()


def _switch_loss(tokens: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor):
    """Switch's loss of ``tokens [N, h]`` with the expert fractions of ``counts [E]``."""
    probs = torch.softmax(tokens @ weight.T, dim=-1)
    fraction = counts / counts.sum()
    return COEFF * E * (fraction * probs.mean(0)).sum()


def _routed(router: TopKRouter, tokens: torch.Tensor) -> torch.Tensor:
    """Route ``tokens`` (training, so the loss counts them): each expert's routed copies."""
    _, experts = router(tokens)
    return torch.bincount(experts.flatten(), minlength=E).double()


def test_the_expert_fractions_are_the_iterations_mean_so_far():
    """Micro-batch 2's loss takes the mean of both micro-batches' counts and its own
    probabilities; `end_iteration` starts the counts again."""
    router = _router()
    set_aux_loss_scale(1.0)
    take_tracked()
    g = torch.Generator().manual_seed(1)
    first, second = (torch.randn(12, H, generator=g) for _ in range(2))
    counts = [_routed(router, first), _routed(router, second)]
    tracked = take_tracked()["global_load_balancing_loss"]
    expected = (_switch_loss(first, router.weight, counts[0])
                + _switch_loss(second, router.weight, (counts[0] + counts[1]) / 2))
    assert_rel_close(tracked[0], expected.double() / COEFF, rtol=1e-6)
    router.end_iteration()
    assert router.global_micro_batches == 0 and not router.global_tokens_per_expert.any()
    _routed(router, second)  # a new iteration: its own counts only
    assert_rel_close(take_tracked()["global_load_balancing_loss"][0],
                     _switch_loss(second, router.weight, counts[1]).double() / COEFF,
                     rtol=1e-6)


def test_the_gradient_is_the_formulas_with_the_counts_held():
    """The attached loss's gradient on the router weight: the formula's, the averaged counts
    constant (only the probabilities carry a gradient)."""
    router = _router()
    set_aux_loss_scale(1.0)
    g = torch.Generator().manual_seed(2)
    first, second = (torch.randn(12, H, generator=g) for _ in range(2))
    before = _routed(router, first)
    router.weight.grad = None
    probs, experts = router(second)
    probs.sum().backward()  # the probabilities' own gradient and the attached loss's
    attached = router.weight.grad.clone()
    router.config.moe_aux_loss_coeff = 0.0  # now the probabilities' alone
    router.weight.grad = None
    router(second)[0].sum().backward()
    attached -= router.weight.grad
    weight = router.weight.detach().clone().requires_grad_()
    counts = (before + torch.bincount(experts.flatten(), minlength=E).double()) / 2
    _switch_loss(second, weight, counts).backward()
    assert_rel_close(attached, weight.grad, rtol=1e-5)


STEPS = 3
MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48, moe_layer_freq=2,
           moe_aux_loss_coeff=0.1, moe_router_load_balancing_type="global_aux_loss")


def _initial_weights() -> dict:
    return pieces(setup(1, 1, seed=5, **MOE)[0])


def _together(seed: int, masked: bool, dp: int) -> list[dict]:
    """One process's micro-batches of `global_batch` ``seed``: micro-batch ``i`` holds the
    ``i``-th micro-batch of each of ``dp`` data-parallel ranks (`gpt_runs.batch`'s split)."""
    ranks = [{k: v.chunk(dp)[r] for k, v in global_batch(seed, masked).items()}
             for r in range(dp)]
    count = len(ranks[0]["tokens"]) // MBS
    return [{k: torch.cat([rank[k][i * MBS:(i + 1) * MBS] for rank in ranks])
             for k in ranks[0]} for i in range(count)]


def _train(tp: int, ep: int, whole: dict, micro_batches=None, **layout) -> dict:
    take_tracked()
    extra = {} if micro_batches is None else {"micro_batches": micro_batches}
    result = train_from(whole, tp, 1, STEPS, ep=ep, **MOE, **extra, **layout)
    tracked = take_tracked()["global_load_balancing_loss"]
    return {**result, "tracked": (tracked[0] / tracked[1]).item()}


@pytest.mark.parametrize("world,tp,ep,dp,layout", [
    (2, 1, 2, 2, {}),
    (4, 2, 2, 2, {"sequence_parallel": True}),
    (4, 1, 2, 2, {"cp": 2, "distributed_optimizer": True}),
], ids=["DP2xEP2", "TP2-SPxDP2xEP2", "CP2xDP2xEP2-distopt"])
def test_training_follows_one_process_holding_every_dp_ranks_micro_batch(world, tp, ep, dp,
                                                                         layout):
    """Losses, gradient norms and weights (1e-5), and the logged global loss's mean: the
    statistics summed over DP (x CP, and TP under SP) are one process's over the DP ranks'
    micro-batches together, and the DP x CP weight makes the DP-averaged gradient its
    gradient."""
    whole = assemble(run_distributed(1, _initial_weights))
    serial = run_distributed(1, _train, 1, 1, whole,
                             functools.partial(_together, dp=dp))[0]
    runs = run_distributed(world, _train, tp, ep, whole, **layout)
    assert_same_training(runs, serial)
    for run in runs:
        assert run["tracked"] == pytest.approx(serial["tracked"], rel=1e-6)
