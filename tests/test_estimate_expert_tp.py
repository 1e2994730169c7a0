"""The estimator with whole experts under TP (``expert_tensor_parallel_size=1``, Megatron's
parallel folding), at TP 2 + SP x DP 2 with EP 2 and EP 4 on 4 ranks, against the built model,
the optimizer, saved-tensor hooks and counted collectives, as the estimate tests check ETP = TP:

- parameters per rank (each local expert whole) and the weight, gradient and optimizer bytes,
  with the distributed optimizer sharding the experts' state over EDP = TP x DP / (ETP x EP);
- the bytes a mixture-of-experts layer saves for backward: each rank against the estimate for
  the rows its experts took, each EP group's sum against EP x the balanced estimate (its ranks
  take the ``EP n' k`` copies of their own ``n' = N / t`` tokens, ``moe_ffn_hidden_size`` wide);
- every collective of one `train_step`: the all-to-alls over EP only (no gather over TP), the
  experts' gradients over EDP, their gradient norm over the EP ranks at one TP rank, the fc2
  biases' gradients whole (not partial over TP);
- `Setup`'s rules and sizes.
"""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from test_estimate_comm import assert_moe_collective_bytes
from test_estimate_moe_activations import B, S, _config, _moe_estimate, _saved_bytes
from test_estimate_params import MOE_VARIANTS, _measured_state, _stage_counts
from test_estimate_params import _config as _params_config

from mp import parallel_state as ps
from mp.estimate import Setup, collectives, rank_params, state_bytes
from mp.model.transformer import TransformerLayer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

WORLD, TP = 4, 2
WHOLE = dict(tensor_model_parallel_size=TP, sequence_parallel=True,
             expert_tensor_parallel_size=1)


@pytest.mark.parametrize("ep,variant", [(2, "gelu_every_other_layer"),
                                        (4, "swiglu_nobias_shared_sigmoid_bias")])
def test_rank_params_and_state_bytes_with_whole_experts(ep, variant):
    overrides = dict(MOE_VARIANTS[variant], **WHOLE, expert_model_parallel_size=ep,
                     num_layers=2, vocab_size=1056)
    cfg = _params_config(TP, **overrides)
    params = rank_params(cfg)
    mlp = (3 if cfg.gated_linear_unit else 2) * cfg.moe_ffn_hidden_size * cfg.hidden_size
    assert params.experts >= cfg.num_moe_experts // ep * mlp  # whole experts
    for rank, stages in enumerate(run_distributed(WORLD, _stage_counts, TP, 1, None,
                                                  overrides)):
        assert stages == [(params.total, params.tensors, params.experts, params.expert_bias)], \
            f"rank {rank}"
    for distributed_optimizer in (False, True):
        setup = Setup(_params_config(TP, precision="bf16", **overrides), data_parallel_size=2,
                      distributed_optimizer=distributed_optimizer)
        assert setup.expert_data_parallel_size == WORLD // ep
        expected = state_bytes(setup, params)
        for rank, got in enumerate(run_distributed(WORLD, _measured_state, TP, "bf16",
                                                   overrides, torch.float32,
                                                   distributed_optimizer)):
            assert got == (expected.weights, expected.grads, expected.optimizer), \
                f"rank {rank}, distributed optimizer {distributed_optimizer}"


CASES = {  # test_estimate_moe_activations.MOE_CASES-like overrides
    "gelu_top2_aux_and_z_loss": dict(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01),
    "swiglu_nobias_top1": dict(activation="swiglu", add_bias_linear=False, moe_router_topk=1),
    "shared_expert_sigmoid": dict(moe_shared_expert_intermediate_size=32,
                                  moe_router_score_function="sigmoid"),
}


def _measure_whole_experts(ep: int) -> dict:
    """Per (case, EP): (saved bytes, rows the experts took, this rank's EP group)."""
    ps.initialize_model_parallel(TP, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=1)
    group = tuple(dist.get_process_group_ranks(ps.get_expert_model_parallel_group()))
    results = {}
    for name, overrides in CASES.items():
        model_parallel_cuda_manual_seed(1234)  # the same weights on every rank
        cfg = _config(TP, True, ep, **overrides, expert_tensor_parallel_size=1)
        # every rank its own tokens: the TP ranks route different ones, as under SP
        results[name] = (*_saved_bytes(TransformerLayer(cfg, 1), cfg, dist.get_rank()), group)
    return results


@pytest.mark.parametrize("ep", [2, 4])
def test_saved_bytes_of_an_moe_layer_with_whole_experts(ep):
    failures, unbalanced = [], 0
    measured = run_distributed(WORLD, _measure_whole_experts, ep)
    for name in CASES:
        cfg = _config(TP, True, ep, **CASES[name], expert_tensor_parallel_size=1)
        own = S // TP * B * cfg.moe_router_topk  # the copies of a rank's own tokens
        groups: dict = {}
        for rank, results in enumerate(measured):
            got, rows, group = results[name]
            unbalanced += rows != own
            groups.setdefault(group, []).append((got, rows))
            if got != _moe_estimate(cfg, rows):
                failures.append(f"rank {rank}, {name}, {rows} rows: measured {got} B, "
                                f"estimated {_moe_estimate(cfg, rows):.0f} B")
        for group, members in groups.items():
            assert len(members) == ep and sum(rows for _, rows in members) == ep * own
            if sum(got for got, _ in members) != ep * _moe_estimate(cfg):
                failures.append(f"EP group {group}, {name}: measured "
                                f"{sum(got for got, _ in members)} B, estimated "
                                f"{ep * _moe_estimate(cfg):.0f} B")
    assert unbalanced, "every rank took the balanced rows: the test shows nothing per rank"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("ep,distributed_optimizer,overrides", [
    (2, False, {}),
    (2, True, dict(activation="swiglu", moe_shared_expert_intermediate_size=32)),
    (4, False, dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                    recompute_granularity="selective", recompute_modules=["moe"])),
], ids=["ep2", "ep2_distributed_optimizer_swiglu_shared", "ep4_sigmoid_expert_bias_moe_recompute"])
def test_collective_bytes_with_whole_experts(ep, distributed_optimizer, overrides):
    assert_moe_collective_bytes(TP, 1, 1, ep, dict(overrides, sequence_parallel=True,
                                                   expert_tensor_parallel_size=1),
                                distributed_optimizer)


def test_setup_sizes_and_rules_with_whole_experts():
    cfg = _config(TP, True, 4, expert_tensor_parallel_size=1)
    setup = Setup(cfg, data_parallel_size=4)
    assert (setup.etp, setup.expert_data_parallel_size) == (1, 2)
    assert setup.describe().startswith("TP2 PP1 DP4 EP4 ETP1,")
    assert [c.group for c in _norms(setup)] == ["expert_norm", "mp"]  # EP / TP = 2 ranks
    assert [c.group for c in _norms(Setup(_config(TP, True, 2, expert_tensor_parallel_size=1),
                                          data_parallel_size=2))] == ["mp"]  # one rank
    with pytest.raises(ValueError, match=r"expert_tensor_parallel_size=1 x expert_model_"
                                         r"parallel_size=4 does not divide tensor-parallel x "
                                         r"data-parallel x context-parallel size=2"):
        Setup(cfg, data_parallel_size=1)
    with pytest.raises(ValueError, match=r"distributed_optimizer_instances=2 with expert_"
                                         r"tensor_parallel_size=1 != tensor_model_parallel"):
        Setup(cfg, data_parallel_size=4, distributed_optimizer=True,
              distributed_optimizer_instances=2)


def _norms(setup: Setup) -> list:
    return [c for c in collectives(setup) if c.what.startswith("gradient norm")]

