"""A pretraining job once the process groups exist: seeds, model, optimizer, data, the loop
(Megatron's ``pretrain``; ``launch/pretrain_gpt.py`` calls it)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from mp import parallel_state
from mp.checkpointing import job as checkpoint_job
from mp.checkpointing.upcycling import check_upcycling, upcycled_start
from mp.config import JobConfig, TrainingConfig, resolve_world_size
from mp.device import get_device
from mp.distributed import DistributedDataParallel
from mp.distributed.torch_fsdp2 import TorchFullyShardedDataParallel
from mp.model.pipeline_split import uneven_stages_text
from mp.model.stages import build_gpt_chunks
from mp.optim import (
    MixedPrecisionOptimizer,
    OptimizerParamScheduler,
    counts_in_grad_norm,
    get_megatron_optimizer,
)
from mp.optim.precision_aware import STATE_DTYPES
from mp.tensor_parallel import model_parallel_cuda_manual_seed
from mp.training import gpt_step
from mp.training.data import build_data_iterators
from mp.training.determinism import check_deterministic, deterministic_algorithms
from mp.training.exit import ExitConditions
from mp.training.logger import TrainingLogger, record_memory_history
from mp.training.progress_log import ProgressLog
from mp.training.training import TrainState, train


def set_random_seed(seed: int) -> None:
    """Megatron's ``_set_random_seed``: ``seed + 100 * pp_rank`` (pipeline stages differ) for
    Python, NumPy and torch, then the tensor-parallel RNG tracker from the same value
    (`model_parallel_cuda_manual_seed`). Tensor- and data-parallel ranks share the seed, so
    replicated weights start equal everywhere."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def setup_model_and_optimizer(cfg: JobConfig) -> tuple[list[DistributedDataParallel],
                                                       MixedPrecisionOptimizer,
                                                       OptimizerParamScheduler]:
    """This rank's GPT chunks (one per virtual stage) wrapped for data parallelism (FSDP2
    with ``training.use_torch_fsdp2``), their optimizer and LR schedule."""
    tr = cfg.training
    grad_dtype = torch.bfloat16 if tr.grad_reduce_in_bf16 else torch.float32
    if tr.use_torch_fsdp2:  # ZeRO-3 (mp.distributed.torch_fsdp2) instead of DDP
        model = [TorchFullyShardedDataParallel(
            chunk, reshard_after_forward=tr.torch_fsdp2_reshard_after_forward,
            calculate_per_token_loss=tr.calculate_per_token_loss, grad_dtype=grad_dtype)
            for chunk in build_gpt_chunks(cfg.model)]
    else:
        model = [DistributedDataParallel(
            chunk, overlap_grad_reduce=tr.overlap_grad_reduce,
            bucket_size=max(1, int(tr.bucket_size_mb * 2**20 / grad_dtype.itemsize)),
            use_distributed_optimizer=(tr.use_distributed_optimizer
                                       and not tr.use_layer_wise_distributed_optimizer),
            overlap_param_gather=tr.overlap_param_gather,
            calculate_per_token_loss=tr.calculate_per_token_loss, grad_dtype=grad_dtype,
            num_distributed_optimizer_instances=tr.num_distributed_optimizer_instances)
            for chunk in build_gpt_chunks(cfg.model)]
    optimizer = get_megatron_optimizer(
        model, lr=tr.lr, weight_decay=tr.weight_decay, adam_beta1=tr.adam_beta1,
        adam_beta2=tr.adam_beta2, adam_eps=tr.adam_eps, clip_grad=tr.clip_grad,
        loss_scale=tr.loss_scale, initial_loss_scale=tr.initial_loss_scale,
        min_loss_scale=tr.min_loss_scale, loss_scale_window=tr.loss_scale_window,
        hysteresis=tr.hysteresis, use_distributed_optimizer=tr.use_distributed_optimizer,
        optimizer_impl=tr.optimizer_impl, decoupled_lr=tr.decoupled_lr,
        log_num_zeros_in_grad=cfg.logging.log_num_zeros_in_grad,
        use_precision_aware_optimizer=tr.use_precision_aware_optimizer,
        exp_avg_dtype=STATE_DTYPES[tr.exp_avg_dtype],
        exp_avg_sq_dtype=STATE_DTYPES[tr.exp_avg_sq_dtype], optimizer=tr.optimizer,
        sgd_momentum=tr.sgd_momentum, muon=tr.muon_settings,
        optimizer_cpu_offload=tr.optimizer_cpu_offload,
        optimizer_offload_fraction=tr.optimizer_offload_fraction)
    return model, optimizer, build_opt_param_scheduler(optimizer, tr)


def build_opt_param_scheduler(optimizer, tr: TrainingConfig) -> OptimizerParamScheduler:
    """``tr``'s learning-rate and weight-decay schedule for ``optimizer``, counted in
    iterations or, when the run counts samples, in samples (the training loop then steps it by
    each iteration's global batch, as Megatron does)."""
    warmup, decay, wsd = tr.lr_schedule_steps
    start_wd, end_wd, wd_steps = tr.weight_decay_schedule
    return OptimizerParamScheduler(optimizer, max_lr=tr.lr, min_lr=tr.min_lr,
                                   lr_warmup_steps=warmup, lr_decay_steps=decay,
                                   init_lr=tr.lr_warmup_init,
                                   lr_decay_style=tr.lr_decay_style, wsd_decay_steps=wsd,
                                   lr_wsd_decay_style=tr.lr_wsd_decay_style,
                                   decoupled_lr=tr.decoupled_lr,
                                   decoupled_min_lr=tr.decoupled_min_lr, start_wd=start_wd,
                                   end_wd=end_wd, wd_incr_steps=wd_steps,
                                   wd_incr_style=tr.weight_decay_incr_style,
                                   override_opt_param_scheduler=tr.override_opt_param_scheduler,
                                   use_checkpoint_opt_param_scheduler=(
                                       tr.use_checkpoint_opt_param_scheduler))


def count_parameters(model: list[torch.nn.Module]) -> int:
    """Parameters of the whole model, each counted once over the model-parallel ranks (the
    grad norm's rule: TP-replicated ones on TP rank 0, a stage's ``shared`` copy never), and
    experts over the expert-parallel ranks too; the trained ones only."""
    counted = [p for chunk in model for p in chunk.parameters()
               if p.requires_grad and counts_in_grad_norm(p)]  # not a router's expert bias
    dense, experts = (torch.tensor([sum(p.numel() for p in counted
                                        if getattr(p, "allreduce", True) is kind)],
                                   dtype=torch.float64, device=get_device())
                      for kind in (True, False))
    expert_group = parallel_state.get_expert_grad_norm_group()  # each expert element once
    if expert_group is not None:
        dist.all_reduce(experts, group=expert_group)
    total = dense + experts
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def batches_text(cfg: JobConfig, world_size: int) -> str:
    """The start-up line's account of the batches: ``8 micro-batches of 4 per data-parallel
    rank per iteration, 1234 iterations`` (the ramp's first and last counts when it ramps;
    ``no training iterations (training.skip_train)`` when it only evaluates)."""
    schedule, tr = cfg.batch_schedule(world_size), cfg.training
    counts = [schedule.num_microbatches_at(0), cfg.num_microbatches(world_size)]
    ramp = "" if tr.rampup_batch_size is None else \
        f" (ramping from {counts[0]} over the first {schedule.ramp_samples} samples)"
    iterations = "no training iterations (training.skip_train)" if tr.skip_train else \
        f"{cfg.train_iterations(world_size)} iterations"
    return (f"{counts[-1]} micro-batches of {tr.micro_batch_size} per data-parallel rank per "
            f"iteration{ramp}, {iterations}")


def check_supported(cfg: JobConfig, world_size: int | None = None) -> None:
    """Refuse what this version cannot do and a ``training.load`` that holds no checkpoint under
    ``training.exit_on_missing_checkpoint``, or a ``training.pretrained_checkpoint`` to
    fine-tune from that holds none, and ``logging.log_progress`` without ``training.save`` or
    with ``training.deepspeed`` (ValueError); needs no process group. The
    world size defaults to the job's (`mp.config.resolve_world_size` before
    ``torch.distributed`` starts: torchrun's or the MPI launcher's)."""
    tr = cfg.training
    checkpoint_job.check_checkpoint_exists(cfg)
    check_upcycling(cfg)
    if cfg.logging.log_progress and tr.save is None:
        raise ValueError("logging.log_progress=true writes progress.txt into training.save, "
                         "which is not set: add --save DIR (Megatron logs nothing then)")
    if cfg.logging.log_progress and tr.deepspeed:
        raise ValueError("logging.log_progress=true with training.deepspeed=true: not "
                         "supported (the progress log follows mp's own saves); drop one")
    check_deterministic(tr.deterministic_mode)
    if tr.deepspeed:
        from mp.training.deepspeed_config import check_deepspeed_supported
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else \
                resolve_world_size()
        check_deepspeed_supported(cfg, world_size)
    elif tr.deepspeed_config is not None:
        raise ValueError(f"training.deepspeed_config={tr.deepspeed_config!r} is set but "
                         "training.deepspeed is false: add --deepspeed, or drop the config")


def pretrain(cfg: JobConfig, forward_step_func: Callable = gpt_step.forward_step) -> TrainState:
    """Build everything from ``cfg``, resume from ``training.load`` when set, and train,
    saving into ``training.save`` (`mp.checkpointing.job`), until the last iteration or an
    early exit (`mp.training.exit`, whose clock and signal handler start here), then evaluate
    the test split; with ``training.skip_train`` only evaluate, saving nothing
    (`mp.training.training.train`). Needs
    ``initialize_model_parallel`` done with ``cfg``'s sizes; rank 0 reports. With
    ``logging.record_memory_history`` CUDA's allocator history starts here
    (`mp.training.logger.record_memory_history`); with ``logging.log_progress`` rank 0
    appends to ``progress.txt`` in ``training.save`` (`mp.training.progress_log`)."""
    start_time = time.time()  # the progress log's job throughput counts from here
    check_supported(cfg)
    record_memory_history(cfg, get_device())
    with (deterministic_algorithms(cfg.training.deterministic_mode),
          ExitConditions(cfg.training) as exit_conditions):
        if cfg.training.deepspeed:  # DeepSpeed's engine does data parallelism and the optimizer
            from mp.training.deepspeed import pretrain_deepspeed
            return pretrain_deepspeed(cfg, forward_step_func, exit_conditions)
        return _pretrain(cfg, forward_step_func, exit_conditions, start_time)


def _pretrain(cfg: JobConfig, forward_step_func: Callable,
              exit_conditions: ExitConditions, start_time: float) -> TrainState:
    progress = None if not cfg.logging.log_progress else ProgressLog(
        cfg, dist.get_world_size(), start_time, enabled=dist.get_rank() == 0)
    # first: a checkpoint the flags refuse stops here
    start = upcycled_start(cfg) if cfg.training.moe_use_upcycling else \
        checkpoint_job.start_point(cfg)
    if progress is not None:
        progress.started_from(start.consumed_train_samples)
    set_random_seed(cfg.training.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    state = TrainState(start.iteration, start.consumed_train_samples,
                       start.iteration if start.resumes else None)
    world = dist.get_world_size()
    n_params = count_parameters(model)
    # one set of iterators per model chunk: interleaved chunks each read every micro-batch
    chunks = cfg.model.virtual_pipeline_model_parallel_size or 1
    train_iterator, valid_iterator, test_iterator = (
        None if split[0] is None else list(split)
        for split in zip(*(build_data_iterators(cfg, state.consumed_train_samples)
                           for _ in range(chunks))))
    reporting = dist.get_rank() == 0
    if reporting:
        m, dp = cfg.model, parallel_state.get_data_parallel_world_size()
        split = uneven_stages_text(m.chunk_layer_counts)
        levels = m.hierarchical_context_parallel_sizes
        comm = m.cp_comm_type + ("" if levels is None else f" {levels[0]} x {levels[1]}")
        cp = "" if m.context_parallel_size == 1 else f" x CP {m.context_parallel_size}" + (
            f" ({comm})" if m.cp_comm_type != "all_gather" else "")
        moe = "" if m.num_moe_experts is None else \
            f" | {m.num_moe_experts} experts, top {m.moe_router_topk}, EP " \
            f"{m.expert_model_parallel_size}" + (
                "" if m.expert_tensor_parallel_size in (None, m.tensor_model_parallel_size)
                else f" x ETP {m.expert_tensor_parallel_size}")
        order = " (TP-PP-DP order)" if cfg.training.use_tp_pp_dp_mapping else ""
        print(f"world {world} = TP {m.tensor_model_parallel_size}{cp} x PP "
              f"{m.pipeline_model_parallel_size}{f' ({split})' if split else ''} x DP {dp}"
              f"{order}{moe} | {dist.get_backend()} on {get_device()} | {n_params / 1e6:.2f}M "
              f"parameters | {batches_text(cfg, world)}", flush=True)
    checkpoint_job.resume(start, model, optimizer, scheduler)  # last: restores the RNG states
    if reporting and cfg.training.skip_train:
        print(f"skipping training (training.skip_train) at iteration {state.iteration}",
              flush=True)
    logger = TrainingLogger(cfg, world, get_device(), enabled=reporting,
                            start_iteration=state.iteration)
    try:
        return train(forward_step_func, model, optimizer, scheduler, train_iterator,
                     valid_iterator, cfg, logger, state=state,
                     checkpoint_hook=checkpoint_job.checkpoint_hook(
                         cfg, model, optimizer, scheduler,
                         on_save=None if progress is None else progress.saved),
                     exit_conditions=exit_conditions, test_data_iterator=test_iterator)
    finally:
        logger.close()

