"""Training with DeepSpeed's engine: DeepSpeed does data parallelism and ZeRO stage 1 or 2,
mp does tensor parallelism (the split of Megatron-DeepSpeed)::

    torchrun --nproc-per-node 4 launch/pretrain_gpt.py --config configs/gpt-tiny.yaml \\
        --tensor-model-parallel-size 2 --deepspeed --deepspeed-config configs/deepspeed/zero1.json

How the two meet (more in ``docs/training.md``, "DeepSpeed"):

- mp starts ``torch.distributed`` and its groups; DeepSpeed adopts the default group and takes
  `mp.parallel_state` as its ``mpu``. Without CUDA, ``DS_ACCELERATOR=cpu`` is set before the
  import and DeepSpeed's shared-memory op (a 30+ s C++ build, for inference only) is not built.
- `mp.training.deepspeed_config.deepspeed_config` joins ``ds.json`` to the mp config: batch
  sizes and ``gradient_clipping`` are filled in from mp or must agree; ``bf16``/``fp16`` follow
  ``model.precision``; ZeRO stage 1 or 2. `check_deepspeed_supported` there refuses the rest
  before any process group.
- The optimizer is mp's AdamW over `get_param_groups` (or the JSON's ``optimizer`` section),
  wrapped by ZeRO; the learning rate is mp's `OptimizerParamScheduler`, stepped by the engine.
- ZeRO counts a gradient in the norm when its parameter is ``tensor_model_parallel`` or on TP
  rank 0, as mp does (`mp.optim.counts_in_grad_norm`), so norms and clipping agree.
- Parameters whose gradients are partial over TP (sequence-parallel ones, ``qk_layernorm``'s
  norms) get a hook summing each micro-batch's gradient over TP before DeepSpeed sees it (what
  `mp.distributed.finalize_model_grads` does once per iteration).
- An iteration is ``gradient_accumulation_steps`` rounds of forward, ``engine.backward`` and
  ``engine.step``; loss averaging, the NaN stop, evaluation and the log line are mp's
  (``data.full_validation`` and ``data.multiple_validation_sets`` included:
  `mp.training.evaluation.validation_evaluator`).
- ``training.save``/``load`` hold DeepSpeed checkpoints with the iteration, consumed samples
  and RNG states as client state (not interchangeable with mp's own format).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.checkpointing.job import DEEPSPEED_LATEST
from mp.checkpointing.rng import get_rng_state, set_rng_state
from mp.config import JobConfig
from mp.device import get_device
from mp.distributed.replica_check import check_param_hashes_across_dp_replicas
from mp.model.stages import build_gpt_chunks
from mp.optim import get_param_groups
from mp.optim.update_rules import build_adamw
from mp.pipeline_parallel.schedules import forward_step
from mp.training import gpt_step
from mp.training.data import build_data_iterators
from mp.training.deepspeed_config import deepspeed_config, import_deepspeed
from mp.training.evaluation import average_losses, evaluate, validation_evaluator
from mp.training.exit import ExitConditions
from mp.training.logger import TrainingLogger
from mp.training.pretrain import (
    batches_text,
    build_opt_param_scheduler,
    count_parameters,
    set_random_seed,
)
from mp.training.training import StepOutput, TrainState, run_iterations, skip_batches

_TAG = "iter_{:07d}"


# --- DeepSpeed itself ----------------------------------------------------------------------

def _skip_shared_memory_op(deepspeed) -> None:
    """On the CPU accelerator, mark DeepSpeed's shared-memory comm op unbuildable: its
    ``TorchBackend`` would otherwise compile it (30+ s) the first time, for a kernel only
    DeepSpeed inference uses; training collectives go through ``torch.distributed``."""
    from deepspeed.accelerator import get_accelerator

    try:
        from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    except ImportError:  # a DeepSpeed without the op: nothing to skip
        return
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


# --- the engine -------------------------------------------------------------------------------

def sum_sequence_parallel_grads_over_tp(module: nn.Module, group=None) -> list:
    """Hook every ``sequence_parallel`` parameter of ``module`` (a gradient partial over TP:
    sequence-parallel norms and biases, ``qk_layernorm``'s norms at any TP size) so that each
    gradient reaching it (one per micro-batch) is first summed over the TP group; returns the
    hook handles (none without such parameters)."""
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    if dist.get_world_size(group) == 1:
        return []

    def summed(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad
    return [p.register_hook(summed) for p in module.parameters()
            if p.requires_grad and getattr(p, "sequence_parallel", False)]


def setup_deepspeed_engine(cfg: JobConfig, ds_config: dict):
    """This rank's GPT in a DeepSpeed engine with ZeRO over mp's data-parallel group and mp's
    LR schedule (``engine.lr_scheduler``). Needs ``initialize_model_parallel`` done."""
    deepspeed = import_deepspeed()
    _skip_shared_memory_op(deepspeed)
    # DeepSpeed insists on LOCAL_RANK (torchrun and mp's mpirun path set it; a world of one
    # or a test harness may not): the local device's index, as mp chose it
    os.environ.setdefault("LOCAL_RANK", str(get_device().index or 0))
    tr = cfg.training
    (model,) = build_gpt_chunks(cfg.model)
    sum_sequence_parallel_grads_over_tp(model)  # SP norms and biases, qk_layernorm's norms
    groups = get_param_groups([model], tr.weight_decay)
    optimizer = None if "optimizer" in ds_config else \
        build_adamw(groups, tr.lr, (tr.adam_beta1, tr.adam_beta2), tr.adam_eps, tr.optimizer_impl)

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=groups,
                                      lr_scheduler=lambda opt: build_opt_param_scheduler(opt, tr),
                                      config=ds_config,
                                      mpu=parallel_state, dist_init_required=False)
    return engine


def loss_scale(engine) -> float:
    """The engine's current loss scale (1 without fp16)."""
    return float(getattr(engine.optimizer, "loss_scale", 1.0))


def train_step_deepspeed(forward_step_func: Callable, data_iterator: Iterator, engine, *,
                         num_microbatches: int, lr_increment: int = 1) -> StepOutput:
    """One iteration: ``num_microbatches`` (the engine's gradient accumulation steps) rounds of
    forward, ``engine.backward`` and ``engine.step``; the update happens on the last, and then
    advances mp's learning-rate schedule by ``lr_increment``."""
    if engine.gradient_accumulation_steps() != num_microbatches:
        raise ValueError(f"the engine's gradient_accumulation_steps="
                         f"{engine.gradient_accumulation_steps()} is not the iteration's "
                         f"{num_microbatches} micro-batches")
    reported: list[dict] = []
    for _ in range(num_microbatches):
        loss, _ = forward_step(forward_step_func, data_iterator, engine, 1, reported)
        engine.backward(loss)  # divides by the accumulation steps
        engine.step(lr_kwargs={"increment": lr_increment})
    reduced, local = average_losses(reported)
    norm = engine.get_global_grad_norm()
    norm = math.nan if norm is None else float(norm)
    return StepOutput(reduced, local, engine.was_step_applied(), norm)


# --- checkpoints ------------------------------------------------------------------------------

def save_deepspeed_checkpoint(engine, cfg: JobConfig, state: TrainState) -> None:
    """``engine.save_checkpoint`` into ``training.save`` under ``iter_NNNNNNN`` (then only
    the newest ``training.keep_last`` are kept). Collective."""
    tr = cfg.training
    engine.save_checkpoint(tr.save, tag=_TAG.format(state.iteration), client_state={
        "iteration": state.iteration, "consumed_train_samples": state.consumed_train_samples,
        "rng_state": get_rng_state(), "mp_config": cfg.to_dict()})
    if tr.keep_last is not None and dist.get_rank() == 0:
        tags = sorted(name for name in os.listdir(tr.save)
                      if name.startswith("iter_") and name[5:].isdigit())
        for name in tags[:-tr.keep_last]:
            shutil.rmtree(os.path.join(tr.save, name), ignore_errors=True)
    dist.barrier()


def load_deepspeed_checkpoint(engine, cfg: JobConfig) -> dict | None:
    """Load ``training.load``'s newest DeepSpeed checkpoint (its ``latest`` file) into
    ``engine``; return its client state (iteration, consumed samples, RNG states), or None
    when the folder holds no checkpoint yet. Collective."""
    directory = cfg.training.load
    if directory is None:
        return None
    if not os.path.isfile(os.path.join(directory, DEEPSPEED_LATEST)):
        if dist.get_rank() == 0:
            print(f"no checkpoint in {directory} yet: starting from iteration 0", flush=True)
        return None
    path, client = engine.load_checkpoint(directory)
    if path is None:
        raise ValueError(f"training.load={directory!r}: DeepSpeed could not load its "
                         "checkpoint")
    if "iteration" not in client:
        raise ValueError(f"{path} holds no iteration in its client state: not a checkpoint "
                         "of mp's --deepspeed job")
    return client


# --- the job ------------------------------------------------------------------------------------

def train_deepspeed(forward_step_func: Callable, engine, train_data_iterator: Iterator,
                    valid_data_iterator: Iterator | None, cfg: JobConfig,
                    logger: TrainingLogger, *, state: TrainState | None = None,
                    checkpoint_hook: Callable[[TrainState], None] | None = None,
                    exit_conditions: ExitConditions | None = None,
                    test_data_iterator: Iterator | None = None) -> TrainState:
    """`mp.training.training.train` with `train_step_deepspeed` as the step."""
    num_microbatches = cfg.num_microbatches(dist.get_world_size())
    shapes = {"num_microbatches": num_microbatches, "seq_length": cfg.model.seq_length,
              "micro_batch_size": cfg.training.micro_batch_size}

    def evaluate_iterator(iterator: Iterator, **extra) -> dict[str, float]:
        return evaluate(forward_step_func, iterator, [engine], eval_iters=cfg.training.eval_iters,
                        **shapes, **extra)

    def evaluator(iterator: Iterator | None) -> Callable[[], dict[str, float]] | None:
        return None if iterator is None else lambda: evaluate_iterator(iterator)

    engine.train()
    lr_increment = cfg.training.global_batch_size if cfg.training.counts_samples else 1
    return run_iterations(
        lambda batch: train_step_deepspeed(forward_step_func, train_data_iterator, engine,
                                           num_microbatches=num_microbatches,
                                           lr_increment=lr_increment),
        cfg, logger, lr=engine.lr_scheduler.get_lr, loss_scale=lambda: loss_scale(engine),
        evaluate=validation_evaluator(evaluate_iterator, valid_data_iterator, cfg),
        test=evaluator(test_data_iterator),
        state=state, checkpoint_hook=checkpoint_hook, exit_conditions=exit_conditions,
        check_replicas=functools.partial(check_param_hashes_across_dp_replicas, [engine.module]),
        skip=lambda batch: skip_batches(train_data_iterator, num_microbatches))


def pretrain_deepspeed(cfg: JobConfig, forward_step_func: Callable = gpt_step.forward_step,
                       exit_conditions: ExitConditions | None = None) -> TrainState:
    """`mp.training.pretrain.pretrain` with DeepSpeed's engine (``training.deepspeed``)."""
    world = dist.get_world_size()
    ds_config = deepspeed_config(cfg, world)
    set_random_seed(cfg.training.seed)
    engine = setup_deepspeed_engine(cfg, ds_config)
    client = load_deepspeed_checkpoint(engine, cfg)
    state = TrainState() if client is None else TrainState(
        client["iteration"], client["consumed_train_samples"], client["iteration"])
    train_iterator, valid_iterator, test_iterator = build_data_iterators(
        cfg, state.consumed_train_samples)
    n_params = count_parameters([engine.module])
    reporting = dist.get_rank() == 0
    if reporting:
        m = cfg.model
        print(f"world {world} = TP {m.tensor_model_parallel_size} x PP 1 x DP "
              f"{parallel_state.get_data_parallel_world_size()} | DeepSpeed ZeRO-"
              f"{engine.zero_optimization_stage()} | {dist.get_backend()} on {get_device()} | "
              f"{n_params / 1e6:.2f}M parameters | {batches_text(cfg, world)}", flush=True)
        if client is not None:
            print(f"resuming from {cfg.training.load}: iteration {state.iteration}, "
                  f"{state.consumed_train_samples} samples consumed", flush=True)
    if client is not None:  # last: the data iterators drew from the generators above
        set_rng_state(client["rng_state"])
    logger = TrainingLogger(cfg, world, get_device(), enabled=reporting,
                            start_iteration=state.iteration)
    hook = None if cfg.training.save is None else \
        (lambda s: save_deepspeed_checkpoint(engine, cfg, s))
    try:
        return train_deepspeed(forward_step_func, engine, train_iterator, valid_iterator, cfg,
                               logger, state=state, checkpoint_hook=hook,
                               exit_conditions=exit_conditions,
                               test_data_iterator=test_iterator)
    finally:
        logger.close()
