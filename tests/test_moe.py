"""Mixture-of-experts layers against independent references.

- One layer (one process, float64) against a token-by-token reference written from the
  definitions: router logits, top-k (or softmax then top-k), each chosen expert's MLP, the
  probability-weighted sum (or, with probabilities on the input, the experts' outputs for
  the scaled tokens; with forced balancing, the routing of the drawn logits, the gradient
  passing to the real ones); the load-balancing loss of Switch (Fedus et al. 2021, eq. 4) and
  the z-loss of ST-MoE, counted from the routing by loops; outputs and every gradient
  (auxiliary losses included, at the scale the schedules set) to 1e-10.
- Whole training runs (fp32, gradient clipping active, auxiliary losses on, every other layer
  MoE) at EP 2, TP 2 + SP x EP 2, TP 2 x EP 2 (no SP, distributed optimizer), PP 2 x EP 2,
  DP 4 x EP 2 (two ranks hold each expert) with and without the distributed optimizer,
  EP 4, TP 2 + SP x EP 2 with a shared expert, TP 2 + SP x EP 2 with full recompute (the
  token exchange runs again in backward), and with context parallelism CP 2 x EP 2 (the EP
  group spans the CP ranks) and CP 2 x DP 2 x EP 4 (distributed optimizer), from the same
  weights as one process on the same micro-batches: losses, gradient norms and every weight
  after training to 1e-5.
- A checkpoint written at EP 2 loads at EP 1, TP 2 x EP 2 and EP 4 and continues the run.
- The FLOPs formula equals what torch's FLOP counter counts.
- The rank layout of expert groups (Megatron's) and the config's rules.
"""

import math

import pytest
import torch
from checks import assert_rel_close, counted_flops, greedy_tokens
from gpt_runs import (
    GLOBAL_BATCH,
    assemble,
    assert_same_training,
    batch,
    load_whole,
    pieces,
    run,
    setup,
    train_from,
    train_step,
)
from harness import run_distributed

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.model import TransformerConfig
from mp.model.aux_losses import set_aux_loss_scale, take_tracked, tracked_names
from mp.model.moe import MoELayer

MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48, moe_layer_freq=2,
           moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)


def _layer_config(**overrides) -> TransformerConfig:
    args = dict(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=16,
                seq_length=6, hidden_dropout=0.0, attention_dropout=0.0, num_moe_experts=5,
                moe_router_topk=2, moe_ffn_hidden_size=12, moe_aux_loss_coeff=0.3,
                moe_z_loss_coeff=0.05, bias_activation_fusion=False)
    return TransformerConfig(**{**args, **overrides})


def _reference(layer: MoELayer, x: torch.Tensor, cfg: TransformerConfig, drawn=None):
    """``(output [s, b, h], auxiliary losses, their logged values)`` token by token from the
    layer's weights; with a capacity factor, each expert's queue of (token, choice) copies
    sorted by the drop policy and cut at its capacity. Forced load balancing routes by the
    logits ``drawn [N, E]``, the gradient passing to the real ones."""
    ex, weight = layer.experts, layer.router.weight
    tokens = x.reshape(-1, x.size(-1))
    act = {"gelu": torch.nn.functional.gelu, "squared_relu": lambda v: torch.relu(v) ** 2}
    outputs, all_probs, lse, routes = [], [], [], []
    for t, token in enumerate(tokens):
        logits = weight @ token
        if cfg.moe_router_force_load_balancing:
            logits = logits - logits.detach() + drawn[t]
        softmax = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
        lse.append(torch.log(torch.exp(logits).sum()))
        if cfg.moe_router_score_function == "sigmoid":
            sigmoid = 1 / (1 + torch.exp(-logits))
            all_probs.append(sigmoid / sigmoid.sum())
            bias = layer.router.expert_bias
            _, experts = _limited_topk(sigmoid + (0 if bias is None else bias), cfg)
            probs = sigmoid[experts]
            probs = probs / probs.sum() if cfg.moe_router_topk > 1 else probs
        elif cfg.moe_router_pre_softmax:
            all_probs.append(softmax)
            probs, experts = _limited_topk(softmax, cfg)
        else:
            all_probs.append(softmax)
            top, experts = _limited_topk(logits, cfg)
            probs = torch.exp(top) / torch.exp(top).sum()
        routes.append((probs * (cfg.moe_router_topk_scaling_factor or 1.0), experts.tolist()))
    kept = _within_capacity(routes, cfg, len(tokens))
    on_input = cfg.moe_apply_probs_on_input  # the expert takes p x token, its output unweighted
    for t, (token, (probs, experts)) in enumerate(zip(tokens, routes)):
        out = torch.zeros_like(token)
        for p, e in ((p, e) for p, e in zip(probs, experts) if (t, e) in kept):
            v = p * token if on_input else token
            up = ex.fc1_weight[e] @ v + (0 if ex.fc1_bias is None else ex.fc1_bias[e])
            if cfg.activation == "swiglu":
                gate = ex.gate_weight[e] @ v + (0 if ex.gate_bias is None else ex.gate_bias[e])
                hidden = gate * torch.sigmoid(gate) * up
            else:
                hidden = act[cfg.activation](up)
            y = ex.fc2_weight[e] @ hidden + (0 if ex.fc2_bias is None else ex.fc2_bias[e])
            out = out + (y if on_input else p * y)
        if layer.shared_experts is not None:  # the dense MLP every token takes too
            shared = layer.shared_experts
            up = shared.linear_fc1.weight @ token + _bias(shared.linear_fc1)
            if cfg.activation == "swiglu":
                gate = shared.linear_gate.weight @ token + _bias(shared.linear_gate)
                hidden = gate * torch.sigmoid(gate) * up
            else:
                hidden = act[cfg.activation](up)
            y = shared.linear_fc2.weight @ hidden + _bias(shared.linear_fc2)
            if shared.gate_weight is not None:  # Qwen2-MoE's gate on it
                y = y * torch.sigmoid(shared.gate_weight[0] @ token)
            out = out + y
        outputs.append(out)
    n, num, k = len(tokens), cfg.num_moe_experts, cfg.moe_router_topk
    per_sequence = cfg.moe_router_load_balancing_type == "seq_aux_loss"
    # the batch's tokens, or each sequence's (token t = position x b + sequence)
    groups = [range(j, n, x.size(1)) for j in range(x.size(1))] if per_sequence else [range(n)]
    balance = sum(sum(sum(routes[t][1].count(e) for t in group) / (len(group) * k)
                      * sum(all_probs[t][e] for t in group) / len(group) for e in range(num))
                  for group in groups) / len(groups)
    aux = cfg.moe_aux_loss_coeff * num * balance \
        if cfg.moe_router_load_balancing_type != "none" else 0.0
    z = (cfg.moe_z_loss_coeff or 0.0) * sum(v ** 2 for v in lse) / n
    name = "seq_load_balancing_loss" if per_sequence else "load_balancing_loss"
    logged = {name: num * balance, "z_loss": sum(v ** 2 for v in lse) / n}
    return torch.stack(outputs).view_as(x), aux + z, logged


def _limited_topk(scores: torch.Tensor, cfg: TransformerConfig):
    """The top k of one token's ``scores``; with groups, among the experts of the
    ``moe_router_group_topk`` groups whose best ``k / group_topk`` scores sum highest."""
    k, groups = cfg.moe_router_topk, cfg.moe_router_num_groups
    if groups is None:
        return torch.topk(scores, k)
    size, chosen = cfg.num_moe_experts // groups, cfg.moe_router_group_topk
    group_score = [sum(sorted(scores[g * size:(g + 1) * size].tolist(), reverse=True)
                       [:k // chosen]) for g in range(groups)]
    best = sorted(range(groups), key=lambda g: -group_score[g])[:chosen]
    allowed = torch.tensor([e for g in sorted(best) for e in range(g * size, (g + 1) * size)])
    values, picked = torch.topk(scores[allowed], k)
    return values, allowed[picked]


def _within_capacity(routes: list, cfg: TransformerConfig, n: int) -> set[tuple[int, int]]:
    """The (token, expert) copies the experts keep: all of them without a capacity factor;
    else, for each expert, the first ``ceil(n k / E x factor)`` of its copies by probability
    (ties to the earlier token) or by token."""
    copies = [(t, e, float(p)) for t, (probs, experts) in enumerate(routes)
              for p, e in zip(probs, experts)]
    factor = cfg.moe_expert_capacity_factor
    if factor is None:
        return {(t, e) for t, e, _ in copies}
    capacity = math.ceil(n * cfg.moe_router_topk / cfg.num_moe_experts * factor)
    kept = set()
    for expert in range(cfg.num_moe_experts):
        queue = [(t, p) for t, e, p in copies if e == expert]
        if cfg.moe_token_drop_policy == "probs":
            queue.sort(key=lambda item: (-item[1], item[0]))
        kept |= {(t, expert) for t, _ in queue[:capacity]}
    return kept


def _bias(linear) -> torch.Tensor | float:
    return 0.0 if linear.bias is None else linear.bias


def _layer_vs_reference(overrides: dict) -> None:
    ps.initialize_model_parallel(1)
    torch.manual_seed(3)
    cfg = _layer_config(**overrides)
    layer = MoELayer(cfg).double()
    with torch.no_grad():  # biases start at 0; give them values that matter
        for name, param in layer.named_parameters():
            if "bias" in name:
                param.normal_(std=0.3 if name == "router.expert_bias" else 1.0)
    x = torch.randn(cfg.seq_length, 2, cfg.hidden_size, dtype=torch.float64,
                    requires_grad=True)
    probe = torch.randn(cfg.seq_length, 2, cfg.hidden_size, dtype=torch.float64)
    scale = 0.7
    set_aux_loss_scale(scale)
    take_tracked()
    state = torch.get_rng_state()  # forced balancing draws the logits [N, E] from here
    out, bias = layer(x)
    torch.set_rng_state(state)
    drawn = torch.randn(x.numel() // x.size(-1), cfg.num_moe_experts, dtype=torch.float64)
    assert bias is None
    tracked = take_tracked()
    (out * probe).sum().backward()
    trained = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    got = [x.grad.clone()] + [p.grad.clone() for _, p in trained]
    x.grad = None
    layer.zero_grad()
    want, aux, logged = _reference(layer, x, cfg, drawn)
    ((want * probe).sum() + scale * aux).backward()
    expected = [x.grad] + [p.grad for _, p in trained]
    assert_rel_close(out, want, rtol=1e-10, what="output")
    for (name, _), g, e in zip([("input", None)] + trained, got, expected):
        assert_rel_close(g, e, rtol=1e-10, what=f"gradient of {name}")
    losses_on = cfg.moe_router_load_balancing_type == "aux_loss" or cfg.moe_z_loss_coeff
    assert (float(aux) > 0) == bool(losses_on)
    assert sorted(tracked) == sorted(tracked_names(cfg))
    for name, (total, count) in tracked.items():  # what the log line shows, coefficient-free
        assert count == 1 and abs(total - logged[name]) <= 1e-12 * logged[name], name


@pytest.mark.parametrize("overrides", [
    {}, {"activation": "swiglu", "moe_router_topk": 3}, {"moe_router_pre_softmax": True},
    {"activation": "squared_relu", "add_bias_linear": False, "moe_router_topk": 1},
    {"moe_z_loss_coeff": None, "moe_router_load_balancing_type": "none"},
    {"moe_shared_expert_intermediate_size": 20},
    {"moe_shared_expert_intermediate_size": 16, "activation": "swiglu",
     "add_bias_linear": False},
    {"moe_shared_expert_intermediate_size": 16, "moe_shared_expert_gate": True},
    {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
     "moe_router_topk_scaling_factor": 2.5, "moe_router_topk": 3},
    {"moe_router_score_function": "sigmoid", "moe_router_topk": 1},
    {"moe_expert_capacity_factor": 0.5},
    {"moe_expert_capacity_factor": 0.7, "moe_token_drop_policy": "position",
     "moe_shared_expert_intermediate_size": 20},
    {"moe_expert_capacity_factor": 0.6, "moe_router_score_function": "sigmoid",
     "moe_router_enable_expert_bias": True, "moe_router_topk": 3},
    {"moe_router_load_balancing_type": "seq_aux_loss"},
    {"moe_router_load_balancing_type": "seq_aux_loss", "moe_router_score_function": "sigmoid",
     "moe_expert_capacity_factor": 0.5},
    {"num_moe_experts": 6, "moe_router_num_groups": 3, "moe_router_group_topk": 2,
     "moe_router_topk": 3},
    {"num_moe_experts": 8, "moe_router_num_groups": 4, "moe_router_group_topk": 2,
     "moe_router_topk": 4, "moe_router_pre_softmax": True},
    {"num_moe_experts": 6, "moe_router_num_groups": 3, "moe_router_group_topk": 1,
     "moe_router_score_function": "sigmoid"},
    {"moe_router_topk": 1, "moe_apply_probs_on_input": True, "moe_router_pre_softmax": True},
    {"moe_router_topk": 1, "moe_apply_probs_on_input": True, "activation": "swiglu",
     "moe_router_score_function": "sigmoid", "moe_expert_capacity_factor": 0.5},
    {"moe_router_force_load_balancing": True},
    {"moe_router_force_load_balancing": True, "moe_router_score_function": "sigmoid",
     "moe_router_enable_expert_bias": True, "moe_router_topk": 3}],
    ids=["gelu-top2", "swiglu-top3", "pre-softmax", "no-bias-top1", "no-aux-loss",
         "shared-expert", "swiglu-shared-expert-no-bias", "gated-shared-expert",
         "sigmoid-expert-bias-scaled-top3",
         "sigmoid-top1", "capacity-probs", "capacity-position-shared-expert",
         "capacity-sigmoid-expert-bias-top3", "sequence-aux-loss",
         "sequence-aux-loss-sigmoid-capacity", "groups-3-pick-2-top3", "groups-4-pick-2-top4",
         "groups-sigmoid-pick-1", "pre-softmax-probs-on-input",
         "probs-on-input-swiglu-sigmoid-capacity",
         "forced-balance", "forced-balance-sigmoid-expert-bias-top3"])
def test_layer_matches_a_token_by_token_reference(overrides):
    run_distributed(1, _layer_vs_reference, overrides)


def _routed(overrides: dict) -> tuple:
    ps.initialize_model_parallel(1)
    torch.manual_seed(3)
    layer = MoELayer(_layer_config(**overrides)).double()
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.data.normal_(std=0.3)
    tokens = torch.randn(40, 8, dtype=torch.float64)
    probs, experts = layer.router(tokens)
    return probs.detach(), experts, layer.router.tokens_per_expert if \
        layer.router.expert_bias is not None else None


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_experts_drop_the_copies_over_their_capacity(policy):
    """40 tokens, top 2 of 5, factor 0.5: 8 copies an expert; the router marks the dropped
    ones -1 with probability 0, keeps at most 8 an expert, and by the policy: the likeliest
    (none dropped above a kept one) or the earliest; the expert bias counts what was kept."""
    probs, experts, counted = run_distributed(1, _routed, {
        "moe_expert_capacity_factor": 0.5, "moe_token_drop_policy": policy,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True})[0]
    full_probs, full_experts, _ = run_distributed(1, _routed, {  # the same routing, dropless
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True})[0]
    dropped = experts < 0
    assert dropped.any() and torch.all(probs[dropped] == 0)
    assert torch.equal(experts[~dropped], full_experts[~dropped])
    assert torch.equal(probs[~dropped], full_probs[~dropped])
    kept = torch.bincount(experts[~dropped], minlength=5)
    assert kept.max() <= 8 and kept.tolist() == counted.long().tolist()
    token = torch.arange(40).unsqueeze(1).expand(-1, 2)
    for expert in range(5):
        mine = full_experts == expert
        lost, held = mine & dropped, mine & ~dropped
        if not lost.any():
            continue
        assert held.sum() == 8
        if policy == "probs":
            assert full_probs[held].min() >= full_probs[lost].max()
        else:
            assert token[held].max() < token[lost].min()



STEPS = 3


def _initial_weights(tp: int = 1, ep: int = 1, **overrides) -> dict:
    models, _, _ = setup(tp, 1, seed=5, ep=ep, **{**MOE, **overrides})
    return pieces(models)


def test_weights_are_drawn_the_same_at_every_layout(serial_run):
    """Experts (and the rest) start from the same weights at EP 2 and TP 2 x EP 2 as in one
    process: each rank draws every expert in order and keeps its slices."""
    whole, _ = serial_run
    for world, tp, ep in ((2, 1, 2), (4, 2, 2)):
        got = assemble(run_distributed(world, _initial_weights, tp, ep))
        assert got.keys() == whole.keys()
        for name in whole:
            assert torch.equal(got[name], whole[name]), (world, tp, ep, name)


def _train(tp: int, pp: int, ep: int, whole: dict, distributed_optimizer: bool = False,
           **overrides) -> dict:
    return train_from(whole, tp, pp, STEPS, ep=ep, distributed_optimizer=distributed_optimizer,
                      **{**MOE, **overrides})


@pytest.fixture(scope="module")
def serial_run():
    whole = assemble(run_distributed(1, _initial_weights))
    return whole, run_distributed(1, _train, 1, 1, 1, whole)[0]


@pytest.mark.parametrize("world,tp,pp,ep,distributed_optimizer,overrides", [
    (2, 1, 1, 2, False, {}),
    (4, 2, 1, 2, False, {"sequence_parallel": True}),
    (4, 2, 1, 2, True, {}),
    (4, 1, 2, 2, False, {}),
    (4, 1, 1, 2, False, {}),
    (4, 1, 1, 2, True, {}),
    (4, 1, 1, 2, True, {"instances": 2}),
    (4, 1, 1, 4, False, {"activation": "swiglu"}),
    (4, 2, 1, 2, False, {"sequence_parallel": True, "moe_shared_expert_intermediate_size": 32}),
    (4, 2, 1, 2, False, {"sequence_parallel": True, "moe_shared_expert_intermediate_size": 32,
                         "moe_shared_expert_gate": True}),
    (4, 2, 1, 2, True, {"moe_shared_expert_intermediate_size": 32,
                        "moe_shared_expert_gate": True}),
    (4, 1, 2, 2, False, {"moe_router_score_function": "sigmoid",
                         "moe_router_enable_expert_bias": True,
                         "moe_router_bias_update_rate": 0.01,
                         "moe_router_topk_scaling_factor": 2.0}),
    (2, 1, 1, 2, False, {"cp": 2}),
    (4, 2, 1, 2, False, {"sequence_parallel": True, "recompute_granularity": "full",
                         "recompute_method": "uniform", "recompute_num_layers": 1}),
    (4, 1, 1, 4, True, {"cp": 2}),
    (2, 2, 1, 1, False, {"sequence_parallel": True}),
    (4, 2, 1, 2, False, {"sequence_parallel": True, "moe_router_score_function": "sigmoid",
                         "moe_router_enable_expert_bias": True,
                         "moe_router_bias_update_rate": 0.01}),
    (4, 2, 1, 2, False, {"sequence_parallel": True, "cp": 2}),
    (4, 2, 1, 2, False, {"sequence_parallel": True, "moe_grouped_gemm": True}),
    (4, 1, 1, 2, False, {"moe_expert_capacity_factor": 0.5}),
    (4, 1, 2, 2, True, {"moe_expert_capacity_factor": 0.7, "moe_token_drop_policy": "position"}),
    (4, 2, 1, 2, False, {"sequence_parallel": True,
                         "moe_router_load_balancing_type": "seq_aux_loss"}),
    (2, 1, 1, 2, False, {"cp": 2, "moe_router_load_balancing_type": "seq_aux_loss"}),
    (2, 2, 1, 1, False, {"moe_input_jitter_eps": 0.3}),
    (2, 2, 1, 1, False, {"moe_input_jitter_eps": 0.3, "recompute_granularity": "full",
                         "recompute_method": "uniform", "recompute_num_layers": 1}),
], ids=["EP2", "TP2-SPxEP2", "TP2xEP2-distributed-optimizer", "PP2xEP2", "DP4xEP2",
        "DP4xEP2-distributed-optimizer", "DP4xEP2-distopt-2-instances",
        "EP4-swiglu", "TP2-SPxEP2-shared-expert",
        "TP2-SPxEP2-gated-shared-expert", "TP2xEP2-gated-shared-expert-distopt",
        "PP2xEP2-sigmoid-expert-bias", "CP2xEP2",
        "TP2-SPxEP2-full-recompute",
        "CP2xDP2xEP4-distopt", "TP2-SP", "TP2-SPxEP2-sigmoid-expert-bias",
        "TP2-SPxCP2xEP2", "TP2-SPxEP2-grouped-gemm", "DP4xEP2-capacity",
        "PP2xEP2-capacity-position-distopt", "TP2-SPxEP2-sequence-aux-loss",
        "CP2xEP2-sequence-aux-loss", "TP2-jitter", "TP2-jitter-full-recompute"])
def test_training_follows_one_process(serial_run, world, tp, pp, ep, distributed_optimizer,
                                      overrides):
    whole, serial = serial_run
    if set(overrides) & {"activation", "moe_shared_expert_intermediate_size",
                         "moe_router_score_function", "moe_expert_capacity_factor",
                         "moe_router_load_balancing_type", "moe_input_jitter_eps"}:
        # another model (dropping copies: the same model only where every rank routes
        # what one process routes in a micro-batch, as at these layouts)
        model = {key: value for key, value in overrides.items()  # one process: no recompute
                 if key != "cp" and not key.startswith("recompute")}
        whole = assemble(run_distributed(1, _initial_weights, **model))
        serial = run_distributed(1, _train, 1, 1, 1, whole, **model)[0]
    runs = run_distributed(world, _train, tp, pp, ep, whole, distributed_optimizer,
                           **overrides)
    want = assert_same_training(runs, serial)
    moved = sum((want[n] - whole[n]).abs().max().item() for n in want if "router" in n)
    assert moved > 0, "the routers did not train"
    for name in (n for n in want if n.endswith("expert_bias")):
        assert want[name].abs().max() > 0, f"{name} never moved"
        held = [piece for run in runs for _, piece in run["weights"].get(name, ())]
        assert held and all(torch.equal(piece, want[name]) for piece in held), name


def _save_and_continue(path: str, whole: dict, tp: int = 1, **config) -> dict:
    models, optimizer, scheduler = setup(tp, 1, seed=9, ep=2, distributed_optimizer=True,
                                         **MOE, **config)
    load_whole(models, optimizer, whole)
    for step in range(2):
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(path, 2, models, optimizer, scheduler,
                    consumed_train_samples=2 * GLOBAL_BATCH)
    return _continue(models, optimizer, scheduler)


def _continue(models, optimizer, scheduler) -> dict:
    before = run(models, batch(100), forward_only=True)
    step, _ = train_step(models, optimizer, scheduler, 2)
    return {"before": before, "step": step, "weights": pieces(models)}


def _load_and_continue(path: str, tp: int, ep: int, **overrides) -> dict:
    models, optimizer, scheduler = setup(tp, 1, seed=4, ep=ep, **MOE, **overrides)
    load_checkpoint(path, models, optimizer, scheduler)
    return _continue(models, optimizer, scheduler)


@pytest.mark.parametrize("world,tp,ep,overrides", [
    (1, 1, 1, {}), (4, 2, 2, {"sequence_parallel": True}), (4, 1, 4, {})],
    ids=["EP1", "TP2-SPxEP2", "EP4"])
def test_checkpoint_from_ep2_loads_at_other_layouts(serial_run, tmp_path, world, tp, ep,
                                                    overrides):
    """Saved at EP 2 with the distributed optimizer; loaded without it at one rank, at
    TP 2 x EP 2 and at EP 4: a fixed batch's loss, the next step and the weights after it
    are the saving run's."""
    whole, _ = serial_run
    path = str(tmp_path / "save")
    saved = run_distributed(2, _save_and_continue, path, whole)
    loaded = run_distributed(world, _load_and_continue, path, tp, ep, **overrides)
    _assert_same_continuation(saved, loaded)


def _assert_same_continuation(saved: list[dict], loaded: list[dict]) -> None:
    """The loading run's fixed-batch loss, next step and weights after it are the saving
    run's (to 1e-5)."""
    for key in ("before", "step"):
        assert abs(loaded[0][key] - saved[0][key]) <= 1e-5 * abs(saved[0][key]), key
    want = assemble([r["weights"] for r in saved])
    got = assemble([r["weights"] for r in loaded])
    for name in want:
        assert_rel_close(got[name], want[name], rtol=1e-5, what=name)


def test_expert_groups_follow_megatrons_layout():
    """16 ranks, TP 2, PP 2, EP 2 (DP 4): experts' ranks are TP, then EP, then EDP, then PP."""
    layout = ps.rank_layout(16, 2, 2, expert_model_parallel_size=2)
    assert layout.expert[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.expert_data[:4] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.data[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.expert_tensor == layout.tensor  # ETP = TP (ETP 1: test_moe_expert_tp.py)
    with pytest.raises(ValueError, match="expert_model_parallel_size=3 does not divide "
                                         "data_parallel_size x context_parallel_size = 4"):
        ps.rank_layout(8, 2, 1, expert_model_parallel_size=3)


@pytest.mark.parametrize("overrides,message", [
    ({"num_moe_experts": 6, "expert_model_parallel_size": 4},
     "num_moe_experts=6 is not divisible by expert_model_parallel_size=4"),
    ({"num_moe_experts": 4, "moe_router_topk": 5}, "moe_router_topk=5 exceeds num_moe_experts=4"),
    ({"expert_model_parallel_size": 2}, "expert_model_parallel_size=2 needs num_moe_experts"),
    ({"num_moe_experts": 4, "expert_tensor_parallel_size": 2},
     "expert_tensor_parallel_size=2 must be 1 or equal tensor_model_parallel_size=1"),
    ({"num_moe_experts": 4, "moe_router_load_balancing_type": "sinkhorn"},
     "moe_router_load_balancing_type='sinkhorn' must be one of"),
    ({"num_moe_experts": 4, "moe_expert_capacity_factor": 0.0},
     "moe_expert_capacity_factor=0.0 must be > 0"),
    ({"num_moe_experts": 4, "moe_token_drop_policy": "random"},
     "moe_token_drop_policy='random' must be one of"),
    ({"num_moe_experts": 4, "moe_router_num_groups": 2},
     "moe_router_num_groups=2 and moe_router_group_topk=None: set both or neither"),
    ({"num_moe_experts": 6, "moe_router_num_groups": 4, "moe_router_group_topk": 1},
     "num_moe_experts=6 is not divisible by moe_router_num_groups=4"),
    ({"num_moe_experts": 8, "moe_router_num_groups": 4, "moe_router_group_topk": 1,
      "moe_router_topk": 4}, "moe_router_group_topk=1 must be at most moe_router_num_groups=4 "
     "and moe_router_topk=4, its groups of 2 experts must hold 4"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ValueError, match=message):
        _layer_config(**{"num_moe_experts": None, "moe_aux_loss_coeff": 0.0,
                         "moe_z_loss_coeff": None, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"activation": "swiglu", "moe_router_topk": 3},
                                       {"moe_shared_expert_intermediate_size": 40},
                                       {"moe_shared_expert_intermediate_size": 40,
                                        "moe_shared_expert_gate": True}],
                         ids=["gelu-top2", "swiglu-top3", "shared-expert",
                              "gated-shared-expert"])
def test_flops_equal_what_torch_counts(overrides):
    counted, formula = run_distributed(1, counted_flops,
                                       {"num_layers": 3, **MOE, **overrides})[0]
    assert counted == formula


def test_generation_is_the_same_at_tp1_and_tp2_with_and_without_the_cache():
    """Greedy decoding of an MoE GPT (the layers then see one token at a time): TP 2
    without sequence parallelism gives TP 1's tokens, with the key/value cache or not."""
    expected = run_distributed(1, greedy_tokens, 1, False, {**MOE, "moe_layer_freq": 1})[0]
    assert len(set(expected[:, 5:].flatten().tolist())) > 3, "a degenerate reference"
    for tp, kv_cache in ((1, True), (2, True), (2, False)):
        got = run_distributed(tp, greedy_tokens, tp, kv_cache, {**MOE, "moe_layer_freq": 1})
        assert all(torch.equal(g, expected) for g in got), (tp, kv_cache)


def test_a_checkpoint_fits_the_same_experts_however_the_pattern_is_written():
    """``moe_layer_freq=2`` and ``[1, 0, 1, 0]`` are the same model; ``[0, 1, 0, 1]`` is not."""
    import dataclasses

    from mp.checkpointing.fit import architecture_problems
    saved = dataclasses.asdict(_layer_config(num_layers=4, moe_layer_freq=2))
    assert architecture_problems(saved, _layer_config(num_layers=4,
                                                      moe_layer_freq="[1, 0]*2")) == []
    assert architecture_problems(saved, _layer_config(num_layers=4, moe_layer_freq=[0, 1, 0, 1])
                                 ) == ["model.moe_layer_freq=2 in the checkpoint but [0, 1, 0, 1] "
                                       "here (other layers have experts)"]


def _router_in(dtype_name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a bf16 router's probabilities, the same from fp32 logits of its bf16 tokens and
    weight)."""
    ps.initialize_model_parallel(1)
    torch.manual_seed(2)
    layer = MoELayer(_layer_config(precision="bf16", moe_router_dtype=dtype_name)).eval()
    tokens = torch.randn(64, 8).to(torch.bfloat16)
    probs, chosen = layer.router(tokens)
    logits = torch.nn.functional.linear(tokens.float(), layer.router.weight.float())
    top, experts = torch.topk(logits, 2, dim=-1)
    if dtype_name is not None:
        assert torch.equal(chosen, experts)
    return probs.detach(), torch.softmax(top, dim=-1).detach()


def test_the_router_computes_its_logits_in_moe_router_dtype():
    """``moe_router_dtype="fp32"``: a bf16 model's router multiplies in fp32 (Megatron's
    ``--moe-router-dtype fp32``); without it the product is bf16 and differs."""
    fp32, reference = run_distributed(1, _router_in, "fp32")[0]
    assert torch.equal(fp32, reference)
    bf16, reference = run_distributed(1, _router_in, None)[0]
    assert not torch.equal(bf16, reference)


def _jittered_routing() -> dict[str, bool]:
    """A router with input jitter 0.2 against the one without, on tokens the jitter moves."""
    ps.initialize_model_parallel(1)
    torch.manual_seed(2)
    jittered = MoELayer(_layer_config(moe_input_jitter_eps=0.2)).router
    plain = MoELayer(_layer_config()).router
    plain.load_state_dict(jittered.state_dict())
    tokens = torch.randn(256, 8)
    with torch.no_grad():
        torch.manual_seed(7)
        noise = torch.empty_like(tokens).uniform_(0.8, 1.2)  # Megatron's U(1 - eps, 1 + eps)
        torch.manual_seed(7)
        trained = jittered(tokens)
        evaluated_state = torch.get_rng_state()
        eval_out = jittered.eval()(tokens)
        untouched = torch.equal(evaluated_state, torch.get_rng_state())
        reference = plain(tokens * noise)
        unjittered = plain(tokens)
    return {"training jitters": all(torch.equal(a, b) for a, b in zip(trained, reference)),
            "jitter changes a routing": not torch.equal(trained[1], unjittered[1]),
            "evaluation does not": all(torch.equal(a, b) for a, b in zip(eval_out, unjittered)),
            "evaluation draws nothing": untouched}


def test_input_jitter_multiplies_the_tokens_in_training_only():
    """``moe_input_jitter_eps``: in training the router sees its tokens times noise uniform in
    [1 - eps, 1 + eps] from the default generator; in evaluation the tokens as they are."""
    got = run_distributed(1, _jittered_routing)[0]
    assert got == dict.fromkeys(got, True), got
    with pytest.raises(ValueError, match=r"moe_input_jitter_eps=1.5 must be in \(0, 1\)"):
        _layer_config(moe_input_jitter_eps=1.5)
    with pytest.raises(ValueError, match="moe_input_jitter_eps=0.1 needs num_moe_experts"):
        _layer_config(num_moe_experts=None, moe_input_jitter_eps=0.1)


def _bias_update(counts: list[float], rate: float) -> torch.Tensor:
    ps.initialize_model_parallel(1)
    layer = MoELayer(_layer_config(num_moe_experts=len(counts), moe_router_topk=1,
                                   moe_router_score_function="sigmoid",
                                   moe_router_enable_expert_bias=True,
                                   moe_router_bias_update_rate=rate))
    router = layer.router
    router.tokens_per_expert += torch.tensor(counts)
    router.update_expert_bias()  # one rank: its own counts
    assert torch.count_nonzero(router.tokens_per_expert) == 0  # the next iteration starts at 0
    return router.expert_bias.detach().clone()


def test_the_expert_bias_moves_toward_balance():
    """DeepSeek-V3's rule: mean 4 tokens an expert; the busy ones go down by the rate, the
    idle ones up, one at the mean stays."""
    got = run_distributed(1, _bias_update, [9.0, 0.0, 4.0, 3.0, 4.0], 0.01)[0]
    assert torch.equal(got, torch.tensor([-0.01, 0.01, 0.0, 0.01, 0.0]))


SIGMOID = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
               moe_router_bias_update_rate=0.01)


def _biases(models) -> dict[str, torch.Tensor]:
    return {name: pieces[0][1] for name, pieces in pieces(models).items()
            if name.endswith("expert_bias")}


def _save_biased(path: str) -> dict:
    models, optimizer, scheduler = setup(1, 1, seed=9, ep=2, **MOE, **SIGMOID)
    for step in range(3):  # three moves by the rate: back at 0 only through a tie
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(path, 3, models, optimizer, scheduler)
    return _biases(models)


def _load_biased(path: str) -> dict:
    models, optimizer, scheduler = setup(1, 1, seed=4, **MOE, **SIGMOID)
    load_checkpoint(path, models, optimizer, scheduler)
    return _biases(models)


def test_the_expert_bias_is_checkpointed(tmp_path):
    """Not a weight (no gradient, no optimizer state), but the router's state: saved at EP 2,
    it comes back at EP 1."""
    saved = run_distributed(2, _save_biased, str(tmp_path / "save"))[0]
    loaded = run_distributed(1, _load_biased, str(tmp_path / "save"))[0]
    assert saved.keys() == loaded.keys() and len(saved) == 2  # layers 0 and 2
    for name, bias in saved.items():
        assert bias.abs().max() > 0 and torch.equal(loaded[name], bias), name
