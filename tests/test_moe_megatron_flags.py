"""Megatron-LM's remaining mixture-of-experts flags: ``--moe-router-force-load-balancing``
(random routing for benchmarks), ``--moe-apply-probs-on-input`` (Llama 4's top-1 layer),
``--moe-layer-recompute`` (selective recompute of the MoE layer, Megatron's old spelling),
``--moe-per-layer-logging`` (each layer's auxiliary losses in the log, reduced over PP and DP
as one process logs them), and the flags that change nothing in mp or that it refuses.

The layers themselves are checked against the token-by-token reference of `test_moe`
(``forced-balance*``, ``*probs-on-input*``); here: the flags, how evenly forced balancing
spreads the tokens of a router that prefers one expert, and training runs against one
process (forced balancing where every TP rank routes every token, as one process does, with
and without full recompute; probabilities on the input at TP 2 + SP x EP 2), and forced
balancing under the ``moe`` recompute module against the same layout without recompute
(the draw replayed)."""

import pytest
import torch
from gpt_runs import assemble, assert_same_training, load_whole, setup, train_step
from harness import run_distributed
from test_config import TINY, error_of, shipped
from test_config_megatron import notices_of
from test_moe import MOE, _initial_weights, _layer_config, _train

from mp import parallel_state as ps
from mp.generation_setup import generation_config
from mp.model.aux_losses import take_tracked
from mp.model.moe import MoELayer
from mp.training.training import auxiliary_losses

EXPERTS = ("--num-experts", "4", "--sequence-parallel")


def test_flags():
    m = shipped("gpt-tiny", *EXPERTS, "--moe-router-force-load-balancing",
                "--moe-apply-probs-on-input", "--moe-router-topk", "1",
                "--moe-per-layer-logging").model
    assert (m.moe_router_force_load_balancing, m.moe_apply_probs_on_input,
            m.moe_per_layer_logging) == (True, True, True)
    for given, modules in (((), ["moe"]), (("--recompute-activations",), ["moe"]),
                           (("--recompute-activations", "--recompute-modules", "core_attn"),
                            ["core_attn", "moe"]),
                           (("--recompute-activations", "--recompute-modules", "moe",
                             "layernorm"), ["moe", "layernorm"])):
        m = shipped("gpt-tiny", *EXPERTS, *given, "--moe-layer-recompute").model
        assert (m.recompute_granularity, m.recompute_modules) == ("selective", modules), given
    for given, groups in (((), (2, 1)), (("--moe-router-num-groups", "4",
                                          "--moe-router-group-topk", "2"), (4, 2))):
        m = shipped("gpt-tiny", "--num-experts", "8", "--expert-model-parallel-size", "2",
                    "--moe-router-topk-limited-devices", "1", *given).model
        assert (m.moe_router_num_groups, m.moe_router_group_topk) == groups, given
    assert error_of(*EXPERTS, "--recompute-granularity", "full", "--recompute-method",
                    "uniform", "--recompute-num-layers", "1", "--moe-layer-recompute") == (
        "--moe-layer-recompute conflicts with model.recompute_granularity=full (Megatron's "
        "rule): it makes the recompute selective, with 'moe' among model.recompute_modules")
    assert error_of(*EXPERTS, "--moe-apply-probs-on-input") == (
        "moe_apply_probs_on_input=True needs moe_router_topk=1, not 2 (a token's copies would "
        "each carry one probability, and their outputs add up unweighted)")
    for flag in ("--moe-router-force-load-balancing", "--moe-apply-probs-on-input"):
        name = flag[2:].replace("-", "_")
        assert error_of(flag) == (f"{name}=True needs num_moe_experts (a mixture-of-experts "
                                  "model)")
    assert error_of("--moe-extended-tp").startswith(
        "--moe-extended-tp: Megatron-LM deprecated it for --expert-tensor-parallel-size")
    quiet = ("--moe-router-fusion", "--moe-use-legacy-grouped-gemm",
             "--moe-shared-expert-overlap", "--overlap-moe-expert-parallel-comm",
             "--delay-wgrad-compute")
    assert notices_of(["--config", TINY, *EXPERTS, *quiet]) == [
        f"notice: {flag}" for flag in quiet]


def _counts(forced: bool) -> list[int]:
    """The tokens each of 4 experts takes (top 2 of 4000 tokens) from a router whose weights
    send every token to experts 0 and 1."""
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    layer = MoELayer(_layer_config(num_moe_experts=4, moe_router_force_load_balancing=forced))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:2, 0] = 10.0
    tokens = torch.randn(4000, 8)
    tokens[:, 0] = tokens[:, 0].abs() + 1
    _, experts = layer.router(tokens)
    return torch.bincount(experts.flatten(), minlength=4).tolist()


def test_forced_balancing_spreads_the_tokens_evenly():
    """Random logits give each expert k / E of the copies (2000 of 8000, binomial standard
    deviation ~ 39: within 200), whatever the router's weights prefer."""
    assert run_distributed(1, _counts, False)[0] == [4000, 4000, 0, 0]
    counts = run_distributed(1, _counts, True)[0]
    assert sum(counts) == 8000 and all(abs(c - 2000) < 200 for c in counts), counts


def test_generation_routes_by_the_router():
    saved = _layer_config(moe_router_force_load_balancing=True).__dict__
    assert not generation_config(saved, 1).moe_router_force_load_balancing


def _one_process(**overrides) -> tuple[dict, dict]:
    whole = assemble(run_distributed(1, _initial_weights, **overrides))
    return whole, run_distributed(1, _train, 1, 1, 1, whole, **overrides)[0]


FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform",
                  "recompute_num_layers": 1}


@pytest.mark.parametrize("world,tp,ep,model,layout", [
    (2, 2, 1, {"moe_router_force_load_balancing": True}, {}),
    (2, 2, 1, {"moe_router_force_load_balancing": True}, FULL_RECOMPUTE),
    (4, 2, 2, {"moe_router_topk": 1, "moe_apply_probs_on_input": True,
               "moe_router_score_function": "sigmoid"}, {"sequence_parallel": True}),
], ids=["TP2-forced-balance", "TP2-forced-balance-full-recompute",
        "TP2-SPxEP2-probs-on-input"])
def test_training_follows_one_process(world, tp, ep, model, layout):
    whole, serial = _one_process(**model)
    runs = run_distributed(world, _train, tp, 1, ep, whole, False, **model, **layout)
    want = assert_same_training(runs, serial)
    assert any((want[n] - whole[n]).abs().max() > 0 for n in want if "router" in n)


def _logged(tp: int, pp: int, ep: int, whole: dict) -> dict[str, float]:
    """One iteration's auxiliary losses as the job logs them (`auxiliary_losses`)."""
    models, optimizer, scheduler = setup(tp, pp, seed=9, ep=ep, moe_per_layer_logging=True,
                                         **{**MOE, "moe_layer_freq": [1, 1, 0, 1]})
    load_whole(models, optimizer, whole)
    take_tracked()
    train_step(models, optimizer, scheduler, 0)
    return auxiliary_losses(models)


def test_each_moe_layers_losses_are_logged():
    """With ``moe_per_layer_logging`` the log also gets each MoE layer's losses (layers 0, 1
    and 3 of 4), averaged over the micro-batches and data-parallel ranks: at PP 2 x DP 2 x
    EP 2 (each layer on one stage) as in one process; the totals are their means."""
    whole = assemble(run_distributed(1, _initial_weights, moe_layer_freq=[1, 1, 0, 1]))
    serial = run_distributed(1, _logged, 1, 1, 1, whole)[0]
    names = ["load_balancing_loss", "z_loss"]
    assert list(serial) == names + [f"moe/{name}_layer_{i}" for i in (0, 1, 3) for name in names]
    for name in names:
        layers = [serial[f"moe/{name}_layer_{i}"] for i in (0, 1, 3)]
        assert serial[name] == pytest.approx(sum(layers) / 3, rel=1e-12)
        assert max(layers) - min(layers) > 1e-4 * serial[name]  # three different values
    for got in run_distributed(4, _logged, 1, 2, 2, whole):
        assert got.keys() == serial.keys()
        for name, value in serial.items():
            assert got[name] == pytest.approx(value, rel=1e-6), name


def test_forced_balancing_replays_its_draw_in_recompute():
    """TP 2 + SP x EP 2, each TP rank drawing for its own tokens: recomputing the MoE layers
    (``moe``) trains exactly as keeping their activations."""
    model = {"moe_router_force_load_balancing": True, "sequence_parallel": True}
    whole = assemble(run_distributed(1, _initial_weights, moe_router_force_load_balancing=True))
    kept = run_distributed(4, _train, 2, 1, 2, whole, False, **model)
    recomputed = run_distributed(4, _train, 2, 1, 2, whole, False, **model,
                                 recompute_granularity="selective", recompute_modules=["moe"])
    weights = assemble([run["weights"] for run in kept])
    assert_same_training(recomputed, {**kept[0], "weights": {
        name: [((0,) * tensor.dim(), tensor)] for name, tensor in weights.items()}})
