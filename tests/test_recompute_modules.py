"""Selective recompute of Megatron-Core's modules (``--recompute-modules``): the output-dropping
checkpoint (`mp.tensor_parallel.CheckpointWithoutOutput`) against the plain computation, and
training with each module recomputed against one process that recomputes nothing, at tensor,
sequence, pipeline and expert parallel layouts. What each module saves is the estimator's to
count (`tests/test_estimate_recompute.py`)."""

import pytest
import torch
from checks import assert_rel_close
from gpt_runs import (
    GLOBAL_BATCH,
    MBS,
    assemble,
    assert_same_training,
    gpt_config,
    pieces,
    setup,
    train_from,
)
from harness import run_distributed

from mp import parallel_state as ps
from mp.estimate.measure import SavedTensorMeter
from mp.model.aux_losses import take_tracked, tracked_names
from mp.tensor_parallel import CheckpointWithoutOutput


def _norm_then_linear(discard: bool, train: bool = True):
    """``linear(norm(x))`` squared and summed, backpropagated: the gradients of x and of
    every weight, and the norm's output as the linear saw it."""
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(8), torch.nn.Linear(8, 6)
    x = torch.randn(5, 3, 8, requires_grad=True)
    with torch.set_grad_enabled(train):
        if discard:
            ckpt = CheckpointWithoutOutput()
            y = ckpt.checkpoint(norm, x)
            out = linear(y)
            ckpt.discard_output_and_register_recompute(out)
        else:
            y = norm(x)
            out = linear(y)
    if train:
        assert (y.untyped_storage().nbytes() == 0) == discard  # freed until backward
        out.square().sum().backward()
    params = [x, *norm.parameters(), *linear.parameters()]
    return [p.grad for p in params] if train else [], y, out


def test_gradients_are_the_plain_computations():
    """The consumer's saved input is refilled before its backward reads it: every gradient is
    the plain computation's, bit for bit, and the output holds the norm's values again."""
    want, y_plain, _ = _norm_then_linear(discard=False)
    got, y, _ = _norm_then_linear(discard=True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(y, y_plain)


def test_without_gradients_the_output_stays():
    """Under no_grad nothing is discarded (``hook_tensor`` takes no gradient)."""
    _, y, out = _norm_then_linear(discard=True, train=False)
    _, y_plain, out_plain = _norm_then_linear(discard=False, train=False)
    assert torch.equal(y, y_plain) and torch.equal(out, out_plain)


def test_outputs_never_discarded_still_backpropagate():
    torch.manual_seed(0)
    x = torch.randn(4, 3, requires_grad=True)
    ckpt = CheckpointWithoutOutput()
    y, z = ckpt.checkpoint(lambda t: (t.sin(), t.cos() * 2), x)
    (y * z).sum().backward()
    assert_rel_close(x.grad, (2 * x.cos() ** 2 - 2 * x.sin() ** 2).detach(), rtol=1e-6)


def test_a_view_of_an_input_is_refused():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="returned a view of an input"):
        CheckpointWithoutOutput().checkpoint(lambda t: t.view(12), x)


def test_empty_tensors_pass():
    """An expert given no tokens: empty in, empty out, nothing to share or free."""
    x = torch.empty(0, 8, requires_grad=True)
    ckpt = CheckpointWithoutOutput()
    out = torch.nn.functional.linear(ckpt.checkpoint(torch.nn.functional.gelu, x),
                                     torch.ones(3, 8))
    ckpt.discard_output_and_register_recompute(out)
    out.sum().backward()
    assert x.grad.shape == (0, 8)


def test_the_meter_counts_nothing_of_a_discarded_output():
    """What the estimator's tests read: a discarded output leaves the saved bytes."""
    x = torch.randn(16, 8, requires_grad=True)
    norm, linear = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8, bias=False)
    exclude = [*norm.parameters(), *linear.parameters(), x]
    with SavedTensorMeter(exclude=exclude) as plain:
        linear(norm(x))
    with SavedTensorMeter(exclude=exclude) as dropped:
        ckpt = CheckpointWithoutOutput()
        out = linear(ckpt.checkpoint(norm, x))
        ckpt.discard_output_and_register_recompute(out)
    # the plain norm also keeps its mean and rstd (16 rows each), then the linear its input
    assert plain.bytes == 16 * 4 * 2 + 16 * 8 * 4
    assert dropped.bytes == 0


STEPS = 3
MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48, moe_layer_freq=2,
           moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
MLA = dict(multi_latent_attention=True, position_embedding_type="rope", kv_lora_rank=16,
           qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=12)


def _initial_weights(model: dict) -> dict:
    return pieces(setup(1, 1, seed=5, **model)[0])


def _train(tp: int, pp: int, ep: int, whole: dict, model: dict, modules: list | None,
           **layout) -> dict:
    """`train_from`'s result, with how often each auxiliary loss was tracked for the log
    and the data-parallel size."""
    recompute = {} if modules is None else {"recompute_granularity": "selective",
                                            "recompute_modules": modules}
    take_tracked()  # what an earlier test on this process left
    result = train_from(whole, tp, pp, STEPS, ep=ep, **model, **recompute, **layout)
    tracked = {name: int(pair[1]) for name, pair in take_tracked().items()}
    return {**result, "tracked": tracked, "dp": ps.get_data_parallel_world_size()}


@pytest.mark.parametrize("world,tp,pp,ep,model,modules,layout", [
    (4, 2, 1, 1, {}, ["core_attn", "mlp", "layernorm"], {"sequence_parallel": True}),
    (4, 2, 2, 1, {"activation": "swiglu"}, ["layernorm", "mlp"], {}),
    (4, 2, 1, 2, {**MOE, "moe_shared_expert_intermediate_size": 32},
     ["layernorm", "moe_act", "shared_experts", "mlp", "core_attn"], {"sequence_parallel": True}),
    (4, 2, 1, 2, {**MOE, "moe_router_score_function": "sigmoid",
                  "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.01},
     ["moe", "layernorm"], {"sequence_parallel": True}),
    (4, 2, 1, 2, {**MOE, "activation": "swiglu", "moe_grouped_gemm": True}, ["moe_act"],
     {"sequence_parallel": True}),
    (2, 1, 1, 2, MOE, ["moe_act", "layernorm"], {}),
    (4, 2, 1, 1, {**MLA, "q_lora_rank": 24}, ["mla_up_proj", "layernorm", "core_attn"],
     {"sequence_parallel": True}),
    (2, 2, 1, 1, MLA, ["mla_up_proj", "layernorm"], {}),
    (4, 2, 1, 1, MLA, ["mla_up_proj", "layernorm", "core_attn"],
     {"sequence_parallel": True, "cp": 2, "cp_comm_type": "p2p"}),
    (4, 2, 1, 1, {"position_embedding_type": "rope", "mtp_num_layers": 1},
     ["layernorm", "mlp", "core_attn"], {"sequence_parallel": True}),
], ids=["TP2-SPxDP2-dense", "TP2xPP2-swiglu", "TP2-SPxEP2-shared-experts",
        "TP2-SPxEP2-moe-expert-bias", "TP2-SPxEP2-grouped-gemm", "EP2", "TP2-SP-mla-q-latent",
        "TP2-mla", "TP2-SPxCP2-p2p-mla", "TP2-SP-mtp"])
def test_training_follows_one_process_that_recomputes_nothing(world, tp, pp, ep, model,
                                                               modules, layout):
    """A few optimizer steps with ``modules`` recomputed equal one process's without any
    recompute: losses, gradient norms and every weight after them (1e-5). The routers'
    losses (and multi-token prediction's) are taken once per forward, not again in the
    recompute: each rank tracks each once per micro-batch and layer with experts (and once
    per micro-batch and depth)."""
    whole = assemble(run_distributed(1, _initial_weights, model))
    serial = run_distributed(1, _train, 1, 1, 1, whole, model, None)[0]
    runs = run_distributed(world, _train, tp, pp, ep, whole, model, modules, **layout)
    assert_same_training(runs, serial)
    config = gpt_config(1, 1, **model)
    routers = sum(map(config.is_moe_layer, range(config.num_layers)))  # no MTP with experts
    for run in runs:
        micro_batches = GLOBAL_BATCH // MBS // run["dp"]
        assert run["tracked"] == {
            name: STEPS * micro_batches * (1 if name.startswith("mtp") else routers)
            for name in tracked_names(config)}
