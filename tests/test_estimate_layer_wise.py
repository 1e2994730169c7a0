"""The estimate of Muon's layer-wise distributed optimizer (`mp.estimate.layer_wise`) against
the built `LayerWiseDistributedOptimizer`, on every rank, after one bf16 training iteration:

- each rank's masters and state tensors (Muon's momentum, AdamW's moments and step) equal its
  dealt cards' bytes, at DP 2 (SwiGLU, grouped-query attention, RMSNorm, untied output, sinks,
  q/k norms, embeddings kept from decaying), DP 4 (LayerNorm and biases, learned positions,
  multi-token prediction), TP 2 x DP 2 (distributed ``muon_tp_mode``), with experts at
  EP 2 x DP 4 (stacked expert biases, a gated shared expert) and with multi-latent attention;
  the deal is uneven there, and the stage's figure is the busiest rank's;
- the collectives of the iteration (the gradients all-reduced as without the optimizer, the
  owners' broadcasts over DP and EDP, the gradient norm over the world) equal the estimate
  per kind and group;
- the Newton-Schulz matrix products of a step (``FlopCounterMode``) equal each rank's own
  units' count.
"""

import dataclasses

import pytest
from gpt_runs import GLOBAL_BATCH, MBS, gpt_config, setup, train_step
from harness import run_distributed
from test_estimate_comm import _group_ranks
from test_layer_wise_optimizer import _muon, _optimizer
from torch.utils.flop_counter import FlopCounterMode

from mp import parallel_state as ps
from mp.estimate import (
    CollectiveMeter,
    Setup,
    collectives,
    estimate,
    format_estimate,
    gpu_spec,
    rank_params,
    state_bytes,
)
from mp.estimate.layer_wise import dealt_cards, owned_state_bytes
from mp.estimate.newton_schulz import MuonMatrix, newton_schulz_flops, tp_mode_bytes
from mp.optim.layer_wise import LayerWiseDistributedOptimizer

MOE = dict(num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2, moe_layer_freq=2,
           activation="swiglu", moe_shared_expert_intermediate_size=32,
           moe_shared_expert_gate=True, moe_router_bias=True,
           moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
CASES = {  # name -> (world, TP, EP, muon_tp_mode, model overrides)
    "DP2": (2, 1, 1, "duplicated", dict(
        activation="swiglu", num_query_groups=2, normalization="RMSNorm", qk_layernorm=True,
        softmax_type="learnable", untie_embeddings_and_output_weights=True,
        embedding_init_method_std=0.02)),
    "DP4_mtp": (4, 1, 1, "duplicated", dict(mtp_num_layers=1)),
    "TP2xDP2": (4, 2, 1, "distributed", dict(activation="swiglu", num_query_groups=2)),
    "EP2xDP4_moe": (4, 1, 2, "duplicated", MOE),
    "DP2_mla": (2, 1, 1, "duplicated", dict(
        multi_latent_attention=True, position_embedding_type="rope", q_lora_rank=8,
        kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8)),
}


def _setup(name: str) -> Setup:
    world, tp, ep, mode, overrides = CASES[name]
    return Setup(gpt_config(tp, 1, "bf16", expert_model_parallel_size=ep, **overrides),
                 data_parallel_size=world // tp, micro_batch_size=MBS,
                 num_microbatches=GLOBAL_BATCH // (world // tp * MBS), optimizer="muon",
                 distributed_optimizer=True, muon=_muon(mode)["muon"])


def _iteration(name: str) -> dict:
    """This rank's held optimizer bytes, its collectives in one iteration, the FLOPs of one
    more step, and the estimates for its DP x CP and expert-DP ranks."""
    world, tp, ep, mode, overrides = CASES[name]
    with _optimizer(True):
        models, optimizer, scheduler = setup(tp, 1, seed=3, precision="bf16", ep=ep,
                                             optimizer_args=_muon(mode), **overrides)
    assert isinstance(optimizer, LayerWiseDistributedOptimizer)
    with CollectiveMeter() as meter:
        train_step(models, optimizer, scheduler, 0)
    with FlopCounterMode(display=False) as counter:
        optimizer.step()
    held = sum(s.main.numel() * s.main.element_size() for s in optimizer.shards) + sum(
        t.numel() * t.element_size() for rule in optimizer.optimizer.optimizers
        for state in rule.state.values() for t in state.values())
    est = _setup(name)
    dense, experts = dealt_cards(est)
    mine = dense[ps.get_data_parallel_rank(with_context_parallel=True)]
    if ep > 1:
        mine = mine + experts[ps.get_expert_data_parallel_rank()]
    settings, matrices = est.muon, [m for c in mine for m in c.matrices]
    flops = sum(m.flops(settings.num_ns_steps, settings.tp_mode) for m in matrices)
    return {"held": held, "estimated": owned_state_bytes(est, mine),
            "flops": (counter.get_total_flops(), flops),
            "comm": (_per_rank(meter.totals()), _expected(est, tp_mode_bytes(est, matrices)))}


def _per_rank(totals: dict) -> dict:
    """``totals`` but the all-to-alls, which depend on the routing (test_estimate_comm
    checks them summed over the world)."""
    return {key: value for key, value in totals.items() if key[0] != "all_to_all"}


def _expected(est: Setup, own_tp_mode: float) -> dict:
    """The estimate per (kind, group ranks) with the loss's logging (not the router and MTP
    losses': `gpt_runs.train_step` does not report them), this rank's own ``muon_tp_mode``
    bytes (``own_tp_mode``) for the busiest rank's, which must be the most of them."""
    ranks, out = _group_ranks(), {}
    for c in collectives(est, logging=True):
        if c.what.startswith("Muon's"):
            assert c.bytes >= own_tp_mode > 0
            c = dataclasses.replace(c, bytes=own_tp_mode)
        if c.what != "router and MTP losses (logging)":
            key = (c.kind, ranks[c.group])
            out[key] = out.get(key, 0) + c.bytes
    return _per_rank(out)


@pytest.fixture(scope="module")
def runs() -> dict:
    return {name: run_distributed(CASES[name][0], _iteration, name) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_state_bytes_of_every_rank_equal_the_built_optimizers(runs, name):
    held = [rank["held"] for rank in runs[name]]
    assert held == [rank["estimated"] for rank in runs[name]]
    assert len(set(held)) > 1, "an even deal checks no order"
    est = _setup(name)
    assert state_bytes(est, rank_params(est.model)).optimizer == max(held) or CASES[name][2] > 1


@pytest.mark.parametrize("name", list(CASES))
def test_collectives_of_one_iteration_equal_the_estimate(runs, name):
    for rank, run in enumerate(runs[name]):
        measured, expected = run["comm"]
        assert any(kind == "broadcast" for kind, _ in measured)
        assert measured == expected, f"rank {rank}"


@pytest.mark.parametrize("name", list(CASES))
def test_newton_schulz_flops_are_the_owned_units(runs, name):
    for rank, run in enumerate(runs[name]):
        counted, estimated = run["flops"]
        assert counted == estimated, f"rank {rank}"
    busiest = max(run["flops"][0] for run in runs[name])
    assert busiest > 0 and (newton_schulz_flops(_setup(name)) == busiest or CASES[name][2] > 1)


def test_a_muon_unit_is_one_card():
    est = _setup("TP2xDP2")
    cards = [c for hand in dealt_cards(est)[0] for c in hand]
    qkv = next(c for c in cards if len(c.matrices) == 3)  # queries, keys and values
    assert qkv.elements == sum(m.rows * m.cols for m in qkv.matrices)
    assert MuonMatrix(128, 32, split=0, ranks=2) in [  # gate with up, column-parallel
        m for c in cards for m in c.matrices]


def test_the_report_shows_the_busiest_rank_and_the_broadcasts():
    est = _setup("TP2xDP2")
    text = format_estimate(estimate(est, gpu_spec("h100")))
    assert "updated parameters (layer-wise optimizer)" in text
    assert "Muon's Newton-Schulz (muon_tp_mode=distributed)" in text
    held = [owned_state_bytes(est, hand) for hand in dealt_cards(est)[0]]
    assert estimate(est, gpu_spec("h100")).peak_stage.state.optimizer == max(held) > min(held)
