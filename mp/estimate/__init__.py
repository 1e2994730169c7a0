"""Estimates of a training job before it runs: memory per rank, FLOPs, communication, step
time, and a planner that ranks the layouts that fit.

    from mp.config import load_config
    from mp.estimate import Setup, estimate, gpu_spec, plan, format_estimate
    job = load_config("configs/gpt3-175b.yaml", world_size=1024)
    print(format_estimate(estimate(Setup.from_job(job, 1024), gpu_spec("h100"))))

The pieces, one concept per module: `setup` (what is estimated), `hardware` (GPU types),
`params` (parameters and model-state bytes per rank), `storage` (how kernels store what they
save; bytes and rows), `activations` (bytes saved for backward per layer: Korthikanti et al.
2022 and mp's own layer), `mlp_activations` (its MLP's, dense or mixture of experts), `mla`
(multi-latent attention's saves and TP calls),
`stage_ends` (what the embedding and the output layer and loss save), `mtp` (multi-token
prediction's saves and TP calls), `memory` (peak per pipeline stage),
`flops` (Narayanan et al. 2021), `comm` (bytes per collective; the layers' TP and CP calls in
`model_comm`, the experts' own in `expert_comm`), `collective` (a call's record and its time
on the wire), `step_time` (Muon's Newton-Schulz products in `newton_schulz`), `estimate`,
`planner`, `report`, and `measure` (the meters the tests check all this with). See
docs/estimate.md for what is checked against the code and what is formula only.
"""

from mp.estimate.activations import korthikanti_layer_bytes, layer_terms
from mp.estimate.collective import Collective
from mp.estimate.comm import collectives
from mp.estimate.estimate import Estimate, estimate
from mp.estimate.flops import narayanan_flops, training_flops
from mp.estimate.hardware import GPUS, GPUSpec, gpu_spec
from mp.estimate.measure import CollectiveMeter, SavedTensorMeter
from mp.estimate.memory import StageMemory, microbatches_in_flight, stage_memory
from mp.estimate.params import RankParams, StateBytes, model_params, rank_params, state_bytes
from mp.estimate.planner import PlanResult, candidate_setups, plan
from mp.estimate.report import format_estimate, format_plan, memory_chart
from mp.estimate.setup import Setup
from mp.estimate.step_time import StepTime, step_time
from mp.estimate.storage import CPU, CUDA, Kernels

__all__ = [
    "CPU", "CUDA", "GPUS", "Collective", "CollectiveMeter", "Estimate", "GPUSpec", "Kernels",
    "PlanResult", "RankParams", "SavedTensorMeter", "Setup", "StageMemory", "StateBytes",
    "StepTime", "candidate_setups", "collectives", "estimate", "format_estimate",
    "format_plan", "gpu_spec", "korthikanti_layer_bytes", "layer_terms", "memory_chart",
    "microbatches_in_flight", "model_params", "narayanan_flops", "plan", "rank_params",
    "stage_memory", "state_bytes", "step_time", "training_flops",
]
