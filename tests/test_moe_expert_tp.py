"""Expert tensor parallelism of 1 under TP > 1 (Megatron's ``--expert-tensor-parallel-size 1``,
"parallel folding"): each expert whole on one rank, the TP ranks serving as EP ranks too.

- The experts' groups equal those of Megatron-Core's ``RankGenerator`` (order
  ``tp-ep-dp-pp`` over a stage's ranks, run once in Megatron-Core 0.14 to write them here).
- Training at TP 2 + SP x EP 2 x ETP 1 (DP 2) and TP 2 + SP x EP 4 x ETP 1, with and without
  the distributed optimizer, follows one process from the same weights on the same
  micro-batches (`tests/test_moe.py`'s model and run): losses, gradient norms (clipping
  acting) and every weight to 1e-5.
- A checkpoint written at ETP 1 loads at ETP = TP = 2 and at one rank and continues the same,
  and one written at EP 2 (one process per expert pair) loads at ETP 1.
- The config's refusals, and a layer whose config's ETP is not the groups' (the estimator's
  counts at ETP 1: tests/test_estimate_expert_tp.py).
"""

import pytest
from gpt_runs import (
    assemble,
    assert_same_training,
    train_from,
)
from harness import run_distributed
from test_moe import (
    MOE,
    _assert_same_continuation,
    _initial_weights,
    _layer_config,
    _load_and_continue,
    _save_and_continue,
)

from mp import parallel_state as ps
from mp.model.moe import MoELayer

STEPS = 3


def test_expert_groups_follow_megatrons_layout_at_etp1():
    """Megatron-Core's ``RankGenerator(tp=ETP, ep=EP, dp=EDP, pp=PP, order="tp-ep-dp-pp")``
    gave these groups (ETP 1); the dense groups are unchanged."""
    layout = ps.rank_layout(8, 2, 1, expert_model_parallel_size=4,
                            expert_tensor_parallel_size=1)
    assert layout.expert == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.expert_data == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.expert_tensor == [[r] for r in range(8)]
    assert layout.expert_tensor_and_model == layout.expert
    assert layout.tensor == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.expert_norm == [[0, 2], [1, 3], [4, 6], [5, 7]]  # the EP ranks at one TP rank
    layout = ps.rank_layout(16, 2, 2, context_parallel_size=2, expert_model_parallel_size=4,
                            expert_tensor_parallel_size=1)
    assert layout.expert == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert layout.expert_data == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13],
                                  [10, 14], [11, 15]]
    layout = ps.rank_layout(16, 2, 2, expert_model_parallel_size=2,
                            expert_tensor_parallel_size=1)
    assert layout.expert == [[2 * i, 2 * i + 1] for i in range(8)]
    assert layout.expert_data == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=1 x "
                                         "expert_model_parallel_size=3 does not divide"):
        ps.rank_layout(8, 2, 1, expert_model_parallel_size=3, expert_tensor_parallel_size=1)


def _train(tp: int, ep: int, whole: dict, distributed_optimizer: bool, **overrides) -> dict:
    return train_from(whole, tp, 1, STEPS, ep=ep, distributed_optimizer=distributed_optimizer,
                      **MOE, **overrides)


@pytest.fixture(scope="module")
def serial_run():
    """The initial weights (one process) and one process's run from them."""
    whole = assemble(run_distributed(1, _initial_weights))
    return whole, run_distributed(1, _train, 1, 1, whole, False)[0]


@pytest.mark.parametrize("ep,distributed_optimizer", [(2, False), (2, True), (4, False),
                                                      (4, True)],
                         ids=["EP2", "EP2-distopt", "EP4", "EP4-distopt"])
def test_training_follows_one_process(serial_run, ep, distributed_optimizer):
    whole, serial = serial_run
    runs = run_distributed(4, _train, 2, ep, whole, distributed_optimizer,
                           sequence_parallel=True, expert_tensor_parallel_size=1)
    assert_same_training(runs, serial)
    fc1 = [piece for run in runs for _, piece in
           next(v for n, v in run["weights"].items() if n.endswith("experts.fc1_weight"))]
    assert all(piece.shape[0] == 4 // ep and piece.shape[1] == MOE["moe_ffn_hidden_size"]
               for piece in fc1), "experts are not whole"


@pytest.mark.parametrize("world,tp,ep,overrides", [
    (1, 1, 1, {}), (4, 2, 2, {"sequence_parallel": True})], ids=["one-rank", "ETP=TP=2xEP2"])
def test_checkpoint_from_etp1_loads_at_other_layouts(serial_run, tmp_path, world, tp, ep,
                                                     overrides):
    """Saved at TP 2 + SP x EP 2 x ETP 1 with the distributed optimizer; loaded without it at
    one rank and at ETP = TP = 2: a fixed batch's loss, the next step and the weights after it
    are the saving run's."""
    whole, _ = serial_run
    path = str(tmp_path / "save")
    saved = run_distributed(4, _save_and_continue, path, whole, 2,
                            sequence_parallel=True, expert_tensor_parallel_size=1)
    loaded = run_distributed(world, _load_and_continue, path, tp, ep, **overrides)
    _assert_same_continuation(saved, loaded)


def test_checkpoint_from_ep2_loads_at_etp1(serial_run, tmp_path):
    """Saved at EP 2 (`tests/test_moe.py`'s run); loaded at TP 2 + SP x EP 2 x ETP 1."""
    whole, _ = serial_run
    path = str(tmp_path / "save")
    saved = run_distributed(2, _save_and_continue, path, whole)
    loaded = run_distributed(4, _load_and_continue, path, 2, 2,
                             sequence_parallel=True, expert_tensor_parallel_size=1)
    _assert_same_continuation(saved, loaded)


@pytest.mark.parametrize("overrides,message", [
    ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2,
      "expert_tensor_parallel_size": 1},
     "expert_tensor_parallel_size=1 with tensor_model_parallel_size=2 needs "
     "sequence_parallel=True"),
    ({"tensor_model_parallel_size": 4, "num_attention_heads": 4, "sequence_parallel": True,
      "expert_tensor_parallel_size": 2},
     "expert_tensor_parallel_size=2 must be 1 or equal tensor_model_parallel_size=4"),
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True,
      "expert_tensor_parallel_size": 1},
     "expert_tensor_parallel_size=1 needs expert_model_parallel_size=1 to be a multiple of "
     "tensor_model_parallel_size=2"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ValueError, match=message):
        _layer_config(**{"num_moe_experts": 4, **overrides})


def _layer_at_etp_tp() -> None:
    """A layer at ETP = TP = 2 (the config's default) over groups made at ETP 1."""
    ps.initialize_model_parallel(2, expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    MoELayer(_layer_config(num_moe_experts=4, tensor_model_parallel_size=2,
                           sequence_parallel=True, expert_model_parallel_size=2))


def test_a_layer_refuses_groups_of_another_etp():
    with pytest.raises(Exception, match="the expert groups were made with "
                                        "expert_tensor_parallel_size=1 but the config has None"):
        run_distributed(2, _layer_at_etp_tp)


def test_a_job_config_lays_whole_experts_over_tp_x_dp():
    """The job's rule counts the TP ranks at ETP 1: EP 4 fits TP 2 x DP 2, EP 8 does not, and
    several distributed-optimizer instances are refused, all before any process group."""
    from test_config import TINY

    from mp.config import ConfigError, load_config

    moe = ["--num-experts", "4", "--sequence-parallel", "--expert-tensor-parallel-size", "1"]
    cfg = load_config(TINY, [*moe, "--expert-model-parallel-size", "4"], world_size=4)
    assert (cfg.model.expert_model_parallel_size, cfg.data_parallel_size(4)) == (4, 2)
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size=8 x expert_tensor_"
                                          r"parallel_size=1 does not divide"):
        load_config(TINY, [*moe, "--num-experts", "8", "--expert-model-parallel-size", "8"],
                    world_size=4)
    with pytest.raises(ConfigError, match=r"instances=2 with model.expert_tensor_parallel_"
                                          r"size=1 != tensor_model_parallel_size=2"):
        load_config(TINY, [*moe, "--expert-model-parallel-size", "2",
                           "--use-distributed-optimizer",
                           "--num-distributed-optimizer-instances", "2"], world_size=4)
