"""FLOPs, the pipeline's micro-batches in flight and its bubble, against the papers'
closed forms (Narayanan et al. 2021; Korthikanti et al. 2022)."""

import dataclasses

import pytest
from test_estimate_params import NARAYANAN_TABLE_1

from mp.estimate import (
    Setup,
    estimate,
    gpu_spec,
    microbatches_in_flight,
    narayanan_flops,
    training_flops,
)
from mp.model import TransformerConfig


def _config(heads, hidden, layers, **overrides):
    return TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             vocab_size=51200, seq_length=2048, **overrides)


@pytest.mark.parametrize("heads,hidden,layers,printed", NARAYANAN_TABLE_1)
@pytest.mark.parametrize("recompute", [False, True])
def test_training_flops_are_narayanan_eq_3(heads, hidden, layers, printed, recompute):
    """The per-matrix count equals eq. 3 (full recompute) or its 72-form (none) for every
    model of Table 1, at a batch of 512."""
    cfg = _config(heads, hidden, layers)
    got = training_flops(cfg, 512, recompute="full" if recompute else None)
    assert got == pytest.approx(narayanan_flops(512, 2048, layers, hidden, 51200, recompute),
                                rel=1e-12)


def test_selective_recompute_adds_the_attention_scores_once():
    cfg = _config(32, 4096, 36)
    extra = training_flops(cfg, 8, "selective") - training_flops(cfg, 8, None)
    assert extra == 36 * 4 * 8 * 2048 * 2048 * 4096  # QK^T and PV forward, 2 b s^2 h each


def test_swiglu_mlp_costs_three_matrices():
    gelu = _config(32, 4096, 1, ffn_hidden_size=8192)
    swiglu = _config(32, 4096, 1, ffn_hidden_size=8192, activation="swiglu")
    tokens = 2048
    diff = training_flops(swiglu, 1, None, logits=False) - training_flops(gelu, 1, None,
                                                                          logits=False)
    assert diff == 3 * 2 * tokens * 4096 * 8192


@pytest.mark.parametrize("pp,m", [(4, 8), (8, 8), (8, 3), (16, 64)])
def test_1f1b_in_flight(pp, m):
    """Stage r holds min(p - r, m) micro-batches; the first stage p (when m >= p)."""
    assert [microbatches_in_flight(pp, r, m) for r in range(pp)] == \
        [min(pp - r, m) for r in range(pp)]


@pytest.mark.parametrize("pp,v,m", [(4, 2, 16), (8, 3, 32), (16, 6, 192)])
def test_interleaved_first_stage_in_flight_is_korthikanti(pp, v, m):
    """Korthikanti et al. 2022, section 4.2.3: the first stage of an interleaved schedule
    holds ``p (1 + (p - 1) / (p v))`` micro-batches' worth of activations."""
    assert microbatches_in_flight(pp, 0, m, v) == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))
    assert microbatches_in_flight(pp, pp - 1, m, v) < microbatches_in_flight(pp, 0, m, v)


def test_interleaving_needs_micro_batches_divisible_by_stages():
    cfg = _config(32, 4096, 36, pipeline_model_parallel_size=4,
                  virtual_pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match=r"num_microbatches=6 is not divisible by "
                                         r"pipeline_model_parallel_size=4"):
        Setup(cfg, num_microbatches=6)


def test_bubble_and_step_time_parts():
    """The bubble is (p - 1) / (v m) of the ideal time, and the step time's bubble part is
    (p - 1) / v micro-batch times of the busiest stage."""
    cfg = _config(32, 4096, 32, pipeline_model_parallel_size=4,
                  virtual_pipeline_model_parallel_size=2)
    est = estimate(Setup(cfg, data_parallel_size=2, num_microbatches=8), gpu_spec("h100"))
    assert est.bubble_fraction == 3 / 16
    per_microbatch = (est.step.compute + est.step.tp_comm + est.step.pp_comm) / 8
    assert est.step.bubble == pytest.approx(3 / 2 * per_microbatch, rel=1e-12)
    assert est.step.total > est.step.compute > 0


def test_muon_steps_with_one_buffer_per_matrix_element():
    """The optimizer step's HBM traffic: Muon reads and writes one fp32 momentum per matrix
    element where AdamW moves two moments, 8 bytes less each; the vectors move as AdamW's."""
    from mp.estimate import rank_params

    cfg = _config(32, 4096, 32)
    gpu = gpu_spec("h100")
    adam, muon = (estimate(Setup(cfg, num_microbatches=8, optimizer=kind), gpu).step.optimizer
                  for kind in ("adam", "muon"))
    matrices = rank_params(cfg).matrices
    assert 0 < matrices < rank_params(cfg).total
    assert adam - muon == pytest.approx(8 * matrices / (gpu.hbm_gbps * 1e9), rel=1e-12)


def test_context_parallel_ranks_share_the_compute():
    """The same global batch on the same 8 GPUs, as DP 8 or as CP 4 x DP 2 (each micro-batch
    split over 4 ranks, 4 times as many per rank): the same model FLOPs and compute time; CP
    adds its all-gathers to the critical path."""
    cfg = dataclasses.replace(_config(32, 4096, 32), seq_length=8192,
                              max_position_embeddings=8192)
    split = dataclasses.replace(cfg, context_parallel_size=4)
    whole = estimate(Setup(cfg, data_parallel_size=8, num_microbatches=4), gpu_spec("h100"))
    cp = estimate(Setup(split, data_parallel_size=2, num_microbatches=16), gpu_spec("h100"))
    assert cp.step.compute == pytest.approx(whole.step.compute, rel=1e-12)
    assert cp.model_flops == whole.model_flops
    assert whole.step.cp_comm == 0 < cp.step.cp_comm


def _megatron_flops(cfg: TransformerConfig, batch: int) -> float:
    """Megatron-LM's ``num_floating_point_operations`` (no recompute), which counts grouped
    queries and gated MLPs: ``12 B s l h^2 ((1 + g / a + s / h) q / h + f / h m + V / (2 l h))``
    with ``q = a d`` the query width and ``m`` 1.5 for a gated MLP."""
    s, l, h = cfg.seq_length, cfg.num_layers, cfg.hidden_size
    a, g = cfg.num_attention_heads, cfg.num_query_groups
    gated = 1.5 if cfg.activation == "swiglu" else 1.0
    query_ratio = cfg.kv_channels * a / h
    return 12 * batch * s * l * h * h * ((1 + g / a + s / h) * query_ratio
                                         + cfg.ffn_hidden_size / h * gated
                                         + cfg.padded_vocab_size / (2 * l * h))


@pytest.mark.parametrize("kv_channels", [None, 96])  # heads 4096 / 32 = 128 wide, or 96
@pytest.mark.parametrize("groups", [32, 8, 1])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_query_flops_are_megatrons(groups, activation, kv_channels):
    cfg = _config(32, 4096, 8, num_query_groups=groups, activation=activation,
                  kv_channels=kv_channels)
    assert training_flops(cfg, 4, None) == pytest.approx(_megatron_flops(cfg, 4), rel=1e-12)


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_training_flops_agree_with_the_training_loop_count(recompute, activation):
    """The training loop's MFU count (mp.training.flops) and the estimator's are the same."""
    from mp.training.flops import num_floating_point_operations

    cfg = _config(32, 4096, 8, activation=activation, recompute_granularity=recompute,
                  recompute_method="uniform" if recompute == "full" else None)
    assert training_flops(cfg, 16) == pytest.approx(num_floating_point_operations(cfg, 16),
                                                    rel=1e-12)
    assert training_flops(cfg, 16, None) == pytest.approx(
        num_floating_point_operations(cfg, 16, recompute=False), rel=1e-12)


def test_stage_flops_of_a_mixture_of_experts_model():
    """A pipeline stage counts its own layers as dense or MoE: with the experts on the first
    stage's two layers, that stage costs what a two-layer all-MoE model does without its
    logits, the last stage what a two-layer dense model does, and together the whole
    model."""
    moe = dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=1024)
    cfg = _config(32, 4096, 4, pipeline_model_parallel_size=2, moe_layer_freq=[1, 1, 0, 0],
                  **moe)
    stages = [training_flops(cfg, 4, layers=cfg.stage_layers(r), logits=r == 1)
              for r in range(2)]
    assert stages[0] == training_flops(_config(32, 4096, 2, **moe), 4, logits=False)
    assert stages[1] == training_flops(_config(32, 4096, 2), 4)
    assert sum(stages) == training_flops(cfg, 4)
    assert stages[0] != stages[1] - 3 * 2 * 4 * 2048 * 4096 * cfg.padded_vocab_size
