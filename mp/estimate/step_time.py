"""A predicted iteration time from FLOPs, bytes and the GPU's rates.

The model is deliberately simple, and each part is printed so that it can be argued with:

- **compute**: a stage's training FLOPs per micro-batch (`mp.estimate.flops`, with its
  recompute) over ``peak x efficiency``, divided over its TP and CP ranks. ``efficiency`` is the
  achievable fraction of peak for the matrix products (Narayanan et al. 2021 reach 44-52 %
  on A100 with full recompute counted); it is an input, not a prediction.
- **tensor-, context-, expert- and pipeline-parallel communication** sit on the critical
  path of every micro-batch (mp overlaps none of it with compute except the column-parallel
  weight gradient, which is ignored here). Expert parallelism assumes balanced routing: each
  rank computes ``N k`` routed rows, as many as its own tokens chose, and moves as many.
- **pipeline**: with ``m`` micro-batches the busiest stage's micro-batch time ``T`` is paid
  ``m + (p - 1) / v`` times (1F1B; interleaving with ``v`` chunks divides the bubble by ``v``).
- **data-parallel reduction** (the experts' over their expert-data-parallel group too)
  overlaps the backward of the last micro-batch (mp's ``overlap_grad_reduce``); only what
  does not fit there is exposed. The distributed
  optimizer's parameter all-gather after the step is exposed whole, as are the layer-wise
  optimizer's broadcasts.
- **optimizer step**: bound by HBM bandwidth: AdamW reads and writes the fp32 master and
  both moments, reads the fp32 gradient and writes the parameter: ``28 + e`` bytes per
  parameter, ``20 + e`` with bf16 or fp16 moments (the state part divided by DP x CP with
  the distributed optimizer, by the experts' EDP for theirs). SGD's one momentum buffer
  and Muon's, for the matrices it updates (`RankParams.matrices`), count 4 bytes where the
  moments count theirs. Muon's layer-wise distributed optimizer updates the busiest rank's
  own parameters (`mp.estimate.layer_wise`).
- **Newton-Schulz** (Muon): the busiest stage's matrix products of the step
  (`mp.estimate.newton_schulz`) at ``efficiency`` of the peak: the 16-bit one for the bf16
  iteration (``muon_fp32_matmul_prec="medium"``), half of it for fp32 products at ``"high"``
  (TF32, whose dense tensor-core rate is half the 16-bit one on A100 and H100).

The step time is their sum; throughput is ``global batch x s`` tokens over it, and MFU the
model FLOPs (no recompute) over ``step time x GPUs x peak``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mp.estimate.collective import seconds
from mp.estimate.comm import collectives
from mp.estimate.flops import training_flops
from mp.estimate.hardware import GPUSpec
from mp.estimate.layer_wise import busiest
from mp.estimate.newton_schulz import newton_schulz_flops
from mp.estimate.params import rank_params
from mp.estimate.setup import Setup
from mp.estimate.storage import FP32, activation_bytes

DEFAULT_EFFICIENCY = 0.5
# AdamW per parameter: read the gradient (4); master and moments are read and written
# (2 x (4 + the moments' bytes), `Setup.moment_bytes`)
ADAM_GRAD_TRAFFIC = FP32
TF32_FRACTION = 0.5  # of the 16-bit tensor-core peak (A100, H100 data sheets)


@dataclass(frozen=True)
class StepTime:
    """Seconds of one iteration, by part (see the module doc)."""

    compute: float  # m micro-batches of the busiest stage's compute
    tp_comm: float  # m micro-batches of its tensor-parallel communication
    cp_comm: float  # m micro-batches of its context-parallel communication
    ep_comm: float  # m micro-batches of its expert-parallel all-to-alls
    pp_comm: float  # m micro-batches of its point-to-point transfers
    bubble: float  # (p - 1) / v micro-batch times
    grad_sync: float  # gradient reduction and parameter gather not hidden behind backward
    optimizer: float
    newton_schulz: float = 0.0  # Muon's matrix products in the step

    @property
    def total(self) -> float:
        return (self.compute + self.tp_comm + self.cp_comm + self.ep_comm + self.pp_comm
                + self.bubble + self.grad_sync + self.optimizer + self.newton_schulz)


def stage_compute_seconds(setup: Setup, pp_rank: int, gpu: GPUSpec,
                          efficiency: float) -> float:
    """One micro-batch's forward, backward and recompute on one rank of stage ``pp_rank``."""
    cfg = setup.model
    flops = training_flops(cfg, setup.micro_batch_size, layers=cfg.stage_layers(pp_rank),
                           logits=pp_rank == setup.pp - 1)
    return flops / (setup.tp * setup.cp) / (gpu.peak_tflops * 1e12 * efficiency)


@dataclass(frozen=True)
class _Stage:
    compute: float  # per micro-batch
    tp: float  # per micro-batch
    cp: float  # per micro-batch
    ep: float  # per micro-batch
    pp: float  # per micro-batch
    grad_reduce: float  # per iteration, can overlap the last backward
    exposed: float  # per iteration, after the step or outside backward

    @property
    def per_microbatch(self) -> float:
        return self.compute + self.tp + self.cp + self.ep + self.pp


def _stage(setup: Setup, pp_rank: int, gpu: GPUSpec, efficiency: float) -> _Stage:
    m = setup.num_microbatches
    parts = {"tp": 0.0, "cp": 0.0, "ep": 0.0, "pp": 0.0, "grad_reduce": 0.0, "exposed": 0.0}
    for c in collectives(setup, pp_rank):
        t = seconds(setup, c, gpu)
        if c.group in ("cp_a2a", "cp_p2p"):  # a2a+p2p's levels, each at its link's bandwidth
            parts["cp"] += t / m
        elif c.group in ("tp", "cp", "pp") or (c.group == "ep" and c.kind == "all_to_all"):
            parts[c.group] += t / m
        elif c.group in ("dp", "dp_cp", "edp") and c.kind not in ("all_gather", "broadcast"):
            parts["grad_reduce"] += t
        else:  # the distributed optimizer's parameter gather, tied embeddings, the grad norm
            parts["exposed"] += t
    return _Stage(compute=stage_compute_seconds(setup, pp_rank, gpu, efficiency), **parts)


def step_time(setup: Setup, gpu: GPUSpec, efficiency: float = DEFAULT_EFFICIENCY) -> StepTime:
    """The predicted iteration time of ``setup`` on ``gpu`` (see the module doc)."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency={efficiency} must be in (0, 1]")
    m = setup.num_microbatches
    stage = max((_stage(setup, r, gpu, efficiency) for r in range(setup.pp)),
                key=lambda st: st.per_microbatch)
    backward = stage.compute * 2 / 3  # backward is two of the three forward-equivalents
    return StepTime(compute=m * stage.compute, tp_comm=m * stage.tp, cp_comm=m * stage.cp,
                    ep_comm=m * stage.ep, pp_comm=m * stage.pp,
                    bubble=(setup.pp - 1) / setup.vpp * stage.per_microbatch,
                    grad_sync=max(0.0, stage.grad_reduce - backward) + stage.exposed,
                    optimizer=_optimizer_seconds(setup, gpu),
                    newton_schulz=_newton_schulz_seconds(setup, gpu, efficiency))


def _newton_schulz_seconds(setup: Setup, gpu: GPUSpec, efficiency: float) -> float:
    """Muon's Newton-Schulz products on the busiest stage (module doc)."""
    rate = gpu.peak_tflops * 1e12 * efficiency
    if setup.muon.fp32_matmul_prec != "medium":
        rate *= TF32_FRACTION
    return max(newton_schulz_flops(setup, r) for r in range(setup.pp)) / rate


def _optimizer_seconds(setup: Setup, gpu: GPUSpec) -> float:
    def state_traffic(elements: float, momentum_only: float) -> float:
        """Read and write master and moments, Muon's one buffer for ``momentum_only``."""
        return (elements * 2 * (FP32 + setup.moment_bytes)
                - momentum_only * 2 * (setup.moment_bytes - FP32))

    def traffic(params) -> float:
        muon = setup.optimizer == "muon"
        if muon and setup.distributed_optimizer:  # layer-wise: the busiest rank's own
            updated = busiest(setup, params.pp_rank, lambda cards: sum(state_traffic(
                c.elements, c.elements if c.matrices else 0) for c in cards))
        else:
            state = params.total  # parameters whose master and moments this rank updates
            if setup.distributed_optimizer:
                state = ((params.total - params.experts) / setup.optimizer_shard_size
                         + params.experts / setup.expert_optimizer_shard_size)
            updated = state_traffic(state, params.matrices if muon else 0)
        return updated + params.total * (ADAM_GRAD_TRAFFIC + activation_bytes(setup.model))
    return max(traffic(rank_params(setup.model, r)) for r in range(setup.pp)) / (
        gpu.hbm_gbps * 1e9)
