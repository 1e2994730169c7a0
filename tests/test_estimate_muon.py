"""Muon's Newton-Schulz iterations in the step-time estimate (`mp.estimate.newton_schulz`):

- the matrix-product FLOPs of one Muon step, counted by ``torch.utils.flop_counter`` on each
  rank of a tiny GPT at TP 2 (grouped-query attention, SwiGLU, a mixture-of-experts layer with
  a gated shared expert, multi-token prediction), in each ``muon_tp_mode`` (blockwise
  without ``muon_split_qkv``), with whole experts (ETP 1, EP 2) and with multi-latent
  attention, equal the estimate exactly;
- the matrices' elements equal `RankParams.matrices` (the optimizer-state count);
- the step time prices them at the 16-bit peak (bf16 iteration) or half of it (fp32 at
  ``"high"``), on its own line of the report.
"""

import dataclasses

import pytest
import torch
from gpt_runs import gpt_config, setup
from harness import run_distributed
from torch.utils.flop_counter import FlopCounterMode

from mp import parallel_state as ps
from mp.estimate import Setup, estimate, format_estimate, gpu_spec, rank_params
from mp.estimate.newton_schulz import muon_matrices, newton_schulz_flops
from mp.estimate.step_time import TF32_FRACTION
from mp.optim.muon import MuonSettings

TP = 2
MODEL = dict(activation="swiglu", num_query_groups=2, num_moe_experts=4,
             moe_ffn_hidden_size=16, moe_layer_freq=2, moe_shared_expert_intermediate_size=32,
             moe_shared_expert_gate=True, mtp_num_layers=1, position_embedding_type="rope")
MLA = dict(multi_latent_attention=True, position_embedding_type="rope",
           q_lora_rank=8, kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8)
CASES = {  # name -> (model overrides, expert-parallel size, Muon settings)
    "blockwise_no_split_qkv": (MODEL, 1, MuonSettings(split_qkv=False)),
    "duplicated": (MODEL, 1, MuonSettings(tp_mode="duplicated")),
    "distributed": (MODEL, 1, MuonSettings(tp_mode="distributed", fp32_matmul_prec="high")),
    "duplicated_whole_experts": (dict(MODEL, sequence_parallel=True,
                                      expert_tensor_parallel_size=1), 2,
                                 MuonSettings(tp_mode="duplicated")),
    "distributed_mla": (MLA, 1, MuonSettings(tp_mode="distributed")),
}


def _step_flops() -> dict[str, int]:
    """Per case: the matrix-product FLOPs of this rank's Muon step (random gradients)."""
    flops = {}
    for name, (overrides, ep, settings) in CASES.items():
        models, optimizer, _ = setup(TP, 1, seed=3, ep=ep, optimizer_args={
            "optimizer": "muon", "muon": settings}, **overrides)
        for buffer in (b for model in models for b in model.buffers):  # any gradients
            buffer.grads.normal_(generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter:
            assert optimizer.step().update_successful
        flops[name] = counter.get_total_flops()
        ps.destroy_model_parallel()  # the next case's groups
    return flops


def _setup(name: str) -> Setup:
    overrides, ep, settings = CASES[name]
    return Setup(gpt_config(TP, 1, expert_model_parallel_size=ep, **overrides),
                 optimizer="muon", muon=settings)


def test_newton_schulz_flops_equal_the_counted_matrix_products():
    measured = run_distributed(TP, _step_flops)
    for name in CASES:
        expected = newton_schulz_flops(_setup(name))
        assert expected > 0
        for rank, flops in enumerate(measured):
            assert flops[name] == expected, f"{name}, rank {rank}"
    assert len({flops[name] for flops in measured[:1] for name in CASES}) == len(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_the_matrices_are_the_optimizer_states(name):
    cfg = _setup(name).model
    for pp in (1, 2):  # MTP's depth on the last stage
        stage_cfg = dataclasses.replace(cfg, pipeline_model_parallel_size=pp)
        for stage in range(pp):
            assert sum(m.rows * m.cols * m.count for m in muon_matrices(stage_cfg, stage)) \
                == rank_params(stage_cfg, stage).matrices


def test_step_time_prices_newton_schulz_by_matmul_precision():
    gpu = gpu_spec("h100")
    high = _setup("distributed")
    medium = dataclasses.replace(high, muon=MuonSettings(tp_mode="distributed"))
    for s, rate in ((medium, 1.0), (high, TF32_FRACTION)):
        step = estimate(s, gpu, efficiency=0.4).step
        assert step.newton_schulz == newton_schulz_flops(s) / (gpu.peak_tflops * 1e12 * 0.4
                                                               * rate)
    assert "Newton-Schulz" in format_estimate(estimate(medium, gpu))
    assert estimate(dataclasses.replace(medium, optimizer="adam"), gpu).step.newton_schulz == 0
