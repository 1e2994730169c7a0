"""`estimate`: memory per stage, FLOPs, communication and step time of one setup on one GPU type."""

from __future__ import annotations

from dataclasses import dataclass

from mp.estimate.collective import Collective
from mp.estimate.comm import collectives
from mp.estimate.flops import training_flops
from mp.estimate.hardware import GPUSpec
from mp.estimate.memory import StageMemory, stage_memory
from mp.estimate.params import model_params
from mp.estimate.setup import Setup
from mp.estimate.step_time import DEFAULT_EFFICIENCY, StepTime, step_time
from mp.estimate.storage import CUDA, Kernels


def fits(stages: list[StageMemory], gpu: GPUSpec, memory_fraction: float) -> bool:
    """Whether the peak of every stage's rank is within ``memory_fraction`` of ``gpu``'s
    memory."""
    return max(stage.peak for stage in stages) <= memory_fraction * gpu.memory_bytes


@dataclass(frozen=True)
class Estimate:
    """Everything predicted for ``setup`` on ``gpu``. Per-rank figures are for one rank of
    each pipeline stage (``stages[r]``, ``collectives[r]``); all TP and DP ranks of a stage
    hold and move as much."""

    setup: Setup
    gpu: GPUSpec
    efficiency: float
    parameters: int  # the whole model, each parameter once
    stages: list[StageMemory]
    collectives: list[list[Collective]]
    flops: float  # one iteration on all GPUs, recompute included
    model_flops: float  # the same without recompute (what MFU counts)
    step: StepTime

    @property
    def peak_stage(self) -> StageMemory:
        """The stage whose rank needs the most memory."""
        return max(self.stages, key=lambda stage: stage.peak)

    @property
    def peak_bytes(self) -> float:
        return self.peak_stage.peak

    def fits(self, memory_fraction: float) -> bool:
        """Whether every rank's peak is within ``memory_fraction`` of the GPU's memory."""
        return fits(self.stages, self.gpu, memory_fraction)

    @property
    def tokens_per_second(self) -> float:
        return self.setup.global_batch_size * self.setup.model.seq_length / self.step.total

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: model FLOPs over the GPUs' peak for the step time."""
        peak = self.setup.world_size * self.gpu.peak_tflops * 1e12
        return self.model_flops / (self.step.total * peak)

    @property
    def bubble_fraction(self) -> float:
        """The pipeline bubble as a fraction of the ideal time: ``(p - 1) / (v m)``."""
        return (self.setup.pp - 1) / (self.setup.vpp * self.setup.num_microbatches)


def stages_memory(setup: Setup, kernels: Kernels = CUDA) -> list[StageMemory]:
    """`stage_memory` of each pipeline stage of ``setup``."""
    return [stage_memory(setup, r, kernels) for r in range(setup.pp)]


def estimate(setup: Setup, gpu: GPUSpec, efficiency: float = DEFAULT_EFFICIENCY,
             kernels: Kernels = CUDA, *, stages: list[StageMemory] | None = None) -> Estimate:
    """Predict memory, FLOPs, communication and step time of ``setup`` on ``gpu``.

    ``efficiency`` is the achievable fraction of the GPU's peak for the matrix products;
    ``kernels`` says how the layers' kernels store what they save (`mp.estimate.CUDA` for a
    GPU job, `mp.estimate.CPU` for what the CPU tests measure); ``stages``: the setup's
    `stages_memory` when already computed (the planner's, which drops a layout that does not
    fit before it counts the rest)."""
    cfg = setup.model
    return Estimate(
        setup=setup, gpu=gpu, efficiency=efficiency, parameters=model_params(cfg),
        stages=stages_memory(setup, kernels) if stages is None else stages,
        collectives=[collectives(setup, r) for r in range(setup.pp)],
        flops=training_flops(cfg, setup.global_batch_size),
        model_flops=training_flops(cfg, setup.global_batch_size, recompute=None),
        step=step_time(setup, gpu, efficiency))
