"""The ``training`` section of a job config: batch sizes, the learning-rate and weight-decay
schedules, the optimizer, loss scaling, evaluation, checkpointing and run control.

Field names follow Megatron-LM's arguments (``--lr-warmup-iters`` is ``lr_warmup_iters``). The
section checks its own values in ``__post_init__``; rules that join sections, or need the world
size, are `JobConfig.validate`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mp.config.coerce import ConfigError
from mp.config.optimizer_section import OptimizerFields
from mp.optim.lr_scheduler import DECAY_STYLES, WD_INCR_STYLES, WSD_DECAY_STYLES

_WORDS = {"iters": "iterations", "samples": "samples"}

#: Training keys a ``deepspeed`` job refuses -> why.
_NOT_WITH_DEEPSPEED = {
    **dict.fromkeys(("calculate_per_token_loss", "decoupled_lr", "grad_reduce_in_bf16",
                     "use_precision_aware_optimizer"),
                    "mp's own data parallelism and optimizer implement it"),
    **dict.fromkeys(("no_load_optim", "no_load_rng", "no_save_optim", "no_save_rng",
                     "ckpt_step", "async_save", "non_persistent_ckpt_type",
                     "pretrained_checkpoint", "moe_use_upcycling"),
                    "a DeepSpeed job saves and resumes DeepSpeed's checkpoints whole"),
}

#: Training keys that need ``load`` -> what it is to them.
_NEEDS_LOAD = {"finetune": "the checkpoint whose weights the run starts from",
               "exit_on_missing_checkpoint": "the directory that must hold a checkpoint",
               "use_mp_args_from_checkpoint_args": "the checkpoint whose layout the run takes",
               "moe_use_upcycling": "the dense checkpoint the experts start from"}
#: Of those, the keys that ``pretrained_checkpoint`` serves as well as ``load``.
_OR_PRETRAINED = ("finetune",)


@dataclass
class TrainingConfig(OptimizerFields):
    """Batch sizes, the learning-rate schedule, the optimizer (`OptimizerFields`' keys and
    rules), loss scaling, evaluation and checkpointing.

    A run is counted in iterations (``train_iters``, ``lr_warmup_iters``, ``lr_decay_iters``)
    or, as Megatron's ``--train-samples``, in samples (``train_samples``,
    ``lr_warmup_samples``, ``lr_decay_samples``): exactly one of ``train_iters`` and
    ``train_samples`` is set, and the schedule's keys of the other count are left unset.
    ``lr_warmup_fraction`` (Megatron's ``--lr-warmup-fraction``) gives the warm-up instead as
    that fraction of the decay length, which may make it a fractional count. In
    samples, the run takes as many whole iterations as fit in ``train_samples`` and the
    learning rate follows the consumed samples. ``rampup_batch_size = [start, increment,
    samples]`` (sample counts only, as in Megatron) grows the global batch from ``start`` by
    ``increment`` to ``global_batch_size`` over the first ``samples`` samples
    (`mp.config.batch_schedule`). ``lr_decay_iters`` / ``lr_decay_samples`` default to the
    run's length; as in Megatron they count from the start, warm-up included. ``clip_grad=0`` turns
    clipping off. ``loss_scale`` (fp16 only) fixes the loss scale; ``None`` scales dynamically from
    ``initial_loss_scale``, halving after ``hysteresis`` overflows (never below ``min_loss_scale``)
    and doubling after ``loss_scale_window`` clean iterations. ``eval_interval=None`` or
    ``save_interval=None`` turns periodic evaluation or saving off (a run with ``save`` still saves
    at its end); ``finetune`` (Megatron's ``--finetune``) takes only the weights of ``load``'s
    checkpoint and starts at iteration 0 with a fresh optimizer, schedule and data order;
    ``use_checkpoint_args`` (Megatron's ``--use-checkpoint-args``) takes the model's
    architecture from that checkpoint (`mp.config.loader.CHECKPOINT_ARGS`), and with
    ``use_mp_args_from_checkpoint_args`` its parallel sizes too; ``pretrained_checkpoint``
    (Megatron's ``--pretrained-checkpoint``) is fine-tuned from, as ``finetune`` would, when
    ``load`` holds no checkpoint (`mp.checkpointing.job`); ``keep_last=None``
    keeps every checkpoint. ``exit_interval``,
    ``exit_duration_in_mins`` and ``exit_signal_handler`` (with ``exit_signal``) end the run
    early with a checkpoint (`mp.training.exit`). ``no_load_optim``, ``no_load_rng``,
    ``no_save_optim``, ``no_save_rng``, ``exit_on_missing_checkpoint`` and ``skip_train`` are
    Megatron's checkpoint and run-control flags (`mp.checkpointing.job`, docs/checkpoints.md),
    as are ``non_persistent_save_interval`` with ``non_persistent_ckpt_type="global"``
    (frequent saves into ``non_persistent_global_ckpt_dir``, which keeps only the newest; a
    resume takes it when it is at least as new as ``load``'s).
    ``weight_decay_incr_style`` linear or cosine moves the weight decay from
    ``start_weight_decay`` to ``end_weight_decay`` over the whole run; ``constant`` keeps
    ``weight_decay``. A resume refuses schedule values other than the checkpoint's unless
    ``override_opt_param_scheduler`` (this run's win) or ``use_checkpoint_opt_param_scheduler``
    (the checkpoint's win).

    ``deepspeed`` hands data parallelism and the optimizer (ZeRO stage 1 or 2) to DeepSpeed's
    engine configured by the JSON file ``deepspeed_config``. ``use_torch_fsdp2`` (Megatron's
    flag) shards the parameters, gradients and optimizer state over DP x CP with PyTorch's FSDP2
    (`mp.distributed.torch_fsdp2`), ``torch_fsdp2_reshard_after_forward`` false keeping each
    unit's gathered weights from forward to backward.
    """

    section: ClassVar[str] = "training"

    micro_batch_size: int
    global_batch_size: int
    lr: float
    train_iters: int | None = None  # or train_samples
    train_samples: int | None = None
    rampup_batch_size: list[int] | None = None  # [start, increment, samples]
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # cosine | linear | constant | inverse-square-root | WSD
    lr_wsd_decay_style: str = "exponential"  # WSD's anneal: linear|cosine|exponential|minus_sqrt
    lr_wsd_decay_iters: int | None = None  # WSD: the anneal's length, at the end of the decay
    lr_wsd_decay_samples: int | None = None
    lr_warmup_fraction: float | None = None  # or lr_warmup_iters / lr_warmup_samples
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # default train_iters
    lr_warmup_samples: int = 0
    lr_decay_samples: int | None = None  # default train_samples
    lr_warmup_init: float = 0.0  # the warm-up's first rate (Megatron's --lr-warmup-init)
    weight_decay: float = 0.1
    weight_decay_incr_style: str = "constant"  # constant | linear | cosine, over the whole run
    start_weight_decay: float | None = None  # linear / cosine: from this ...
    end_weight_decay: float | None = None  # ... to this (>= start)
    override_opt_param_scheduler: bool = False  # on resume, this run's schedule values win
    use_checkpoint_opt_param_scheduler: bool = False  # ... or the checkpoint's
    clip_grad: float = 1.0
    seed: int = 1234
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    use_torch_fsdp2: bool = False  # ZeRO-3: parameters, gradients and optimizer state
    # sharded over DP x CP by PyTorch's FSDP2 (Megatron's --use-torch-fsdp2)
    torch_fsdp2_reshard_after_forward: bool = True  # FSDP2: free gathered weights after
    # forward, gather again for backward (false: Megatron's --torch-fsdp2-no-reshard-after-forward)
    deepspeed: bool = False
    deepspeed_config: str | None = None
    overlap_grad_reduce: bool = True
    bucket_size_mb: float = 25.0
    eval_interval: int | None = 1000
    eval_iters: int = 100
    save: str | None = None
    load: str | None = None
    finetune: bool = False  # load's weights only: iteration 0, fresh optimizer and schedule
    use_checkpoint_args: bool = False  # the model's architecture from load's checkpoint
    use_mp_args_from_checkpoint_args: bool = False  # with use_checkpoint_args: the TP, PP,
    # virtual PP and EP sizes too, over the command line's (Megatron's; mp.config.loader)
    pretrained_checkpoint: str | None = None  # weights to fine-tune from when load holds no
    # checkpoint (Megatron's --pretrained-checkpoint; mp.checkpointing.job)
    moe_use_upcycling: bool = False  # start the experts from load's dense checkpoint, written
    # upcycled into save first (Megatron's --moe-use-upcycling; mp.checkpointing.upcycling)
    ckpt_step: int | None = None  # load this iteration of load, not its newest (Megatron's
    # --ckpt-step)
    async_save: bool = False  # write checkpoints in the background while training goes on
    # (Megatron's --async-save; mp.checkpointing.async_save)
    no_load_optim: bool = False  # resume without the optimizer state, loss scale and schedule
    no_load_rng: bool = False  # resume without the RNG states
    no_save_optim: bool = False  # checkpoints without the optimizer state, loss scale, schedule
    no_save_rng: bool = False  # checkpoints without the RNG states
    exit_on_missing_checkpoint: bool = False  # stop when load holds no checkpoint
    skip_train: bool = False  # no iterations: evaluate (what load holds) and exit
    save_interval: int | None = None
    keep_last: int | None = None
    save_retain_interval: int | None = None  # also keep the checkpoints of the iterations it
    # divides, the others going once a newer one is saved (Megatron's --save-retain-interval)
    non_persistent_save_interval: int | None = None  # also save every N iterations into a
    # scratch directory that keeps only its newest checkpoint (Megatron's; mp.checkpointing.job)
    non_persistent_ckpt_type: str | None = None  # global: the only type mp has
    non_persistent_global_ckpt_dir: str | None = None  # default: <save or load>/non_persistent
    exit_interval: int | None = None
    check_weight_hash_across_dp_replicas_interval: int | None = None  # every N iterations,
    # stop unless the data-parallel replicas' weights are bitwise equal (mp.distributed.
    # replica_check)
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False
    exit_signal: str = "SIGTERM"  # SIGTERM | SIGINT | SIGUSR1 | SIGUSR2
    calculate_per_token_loss: bool = False  # average over the batch's tokens, not micro-batches
    decoupled_lr: float | None = None  # the embedding's and output layer's own peak rate
    decoupled_min_lr: float | None = None  # ... and final rate (default min_lr)
    grad_reduce_in_bf16: bool = False  # bf16 gradient buffers and reduction (bf16 runs)
    manual_gc: bool = False  # Python's garbage collector only every manual_gc_interval
    manual_gc_interval: int = 0  # iterations between collections (0: never)
    manual_gc_eval: bool = True  # ... and a collection after each evaluation
    empty_unused_memory_level: int = 0  # 1: empty the CUDA cache after each step, 2: also
    # after the forward and backward passes
    distributed_timeout_minutes: float = 10.0  # collectives' timeout
    use_tp_pp_dp_mapping: bool = False  # Megatron's other rank order: TP, then PP, then DP
    # (no CP or EP; mp.rank_layout)
    iterations_to_skip: list[int] = field(default_factory=list)  # Megatron's: the iterations
    # that start with N done read their batch and take no step (mp.training.training)
    deterministic_mode: bool = False  # Megatron's: torch.use_deterministic_algorithms (and
    # cuBLAS's workspace setting), mp.training.determinism

    def __post_init__(self) -> None:
        negative = [n for n in self.iterations_to_skip if n < 0]
        if negative:
            raise ConfigError(f"training.iterations_to_skip={self.iterations_to_skip} holds "
                              f"{negative}: iterations count from 0")
        for name in ("micro_batch_size", "global_batch_size", "loss_scale_window", "hysteresis"):
            self._at_least(name, 1)
        for name in ("train_iters", "train_samples", "eval_interval", "save_interval",
                     "keep_last", "save_retain_interval", "exit_interval",
                     "check_weight_hash_across_dp_replicas_interval"):
            self._at_least(name, 1, optional=True)
        if self.exit_duration_in_mins is not None:
            self._positive("exit_duration_in_mins")
        for name in ("lr_warmup_iters", "lr_warmup_samples", "eval_iters", "seed"):
            self._at_least(name, 0)
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "lr_warmup_init"):
            self._at_least(name, 0.0)
        for name in ("decoupled_lr", "decoupled_min_lr"):
            self._at_least(name, 0.0, optional=True)
        if self.decoupled_min_lr is not None:
            if self.decoupled_lr is None:
                raise ConfigError(f"training.decoupled_min_lr={self.decoupled_min_lr!r} needs "
                                  "training.decoupled_lr (the rate it decays from)")
            self._not_above("decoupled_min_lr", "decoupled_lr")
        self._at_least("manual_gc_interval", 0)
        self._one_of("empty_unused_memory_level", (0, 1, 2))
        self._positive("distributed_timeout_minutes")
        for name in ("initial_loss_scale", "min_loss_scale", "bucket_size_mb"):
            self._positive(name)
        if self.loss_scale is not None:
            self._positive("loss_scale")
        self._one_of("lr_decay_style", DECAY_STYLES)
        self._one_of("lr_wsd_decay_style", tuple(WSD_DECAY_STYLES))
        self._check_param_scheduler()
        self._one_of("exit_signal", ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"))
        self._check_run_length()
        if self.finetune and self.deepspeed:
            raise ConfigError("training.deepspeed=true with training.finetune=true: not "
                              "supported (a DeepSpeed job resumes its own checkpoints whole); "
                              "fine-tune without --deepspeed")
        for name, why in _NOT_WITH_DEEPSPEED.items():
            if self.deepspeed and getattr(self, name) not in (False, None):
                raise ConfigError(f"training.deepspeed=true with training.{name}="
                                  f"{getattr(self, name)!r}: not supported ({why}); drop one "
                                  "of them")
        self._check_optimizer(self.deepspeed, self.use_torch_fsdp2)
        self._check_fsdp()
        if self.main_grads_dtype == "bf16":  # Megatron's spelling (precision-aware only)
            self.grad_reduce_in_bf16 = True
        self._check_kept_checkpoints()
        for name, what in _NEEDS_LOAD.items():
            if getattr(self, name) and self.load is None and (
                    name not in _OR_PRETRAINED or self.pretrained_checkpoint is None):
                raise ConfigError(f"training.{name}=true needs training.load ({what})")
        if self.use_mp_args_from_checkpoint_args and not self.use_checkpoint_args:
            raise ConfigError("training.use_mp_args_from_checkpoint_args=true needs training."
                              "use_checkpoint_args=true (Megatron reads a checkpoint's "
                              "arguments only then): add --use-checkpoint-args")
        if self.ckpt_step is not None and self.load is None and self.pretrained_checkpoint is None:
            raise ConfigError(f"training.ckpt_step={self.ckpt_step} needs training.load (the "
                              "save directory holding that iteration)")
        self._at_least("ckpt_step", 0, optional=True)
        self._not_above("min_lr", "lr")
        self._not_above("min_loss_scale", "initial_loss_scale")

    def _check_kept_checkpoints(self) -> None:
        """Which checkpoints a job keeps: ``save_retain_interval`` a multiple of
        ``save_interval``; non-persistent checkpoints of Megatron's ``global`` type only,
        saving them needs ``save``, and the interval the type."""
        self._at_least("non_persistent_save_interval", 1, optional=True)
        kind = self.non_persistent_ckpt_type
        if kind not in (None, "global"):
            raise ConfigError(f"training.non_persistent_ckpt_type={kind!r} must be 'global' "
                              "(a standard checkpoint in a scratch directory): the 'local' and "
                              "'in_memory' types need NVIDIA's resiliency extension, which mp "
                              "does not have")
        retain = self.save_retain_interval
        if retain is not None and (self.save_interval is None or retain % self.save_interval):
            raise ConfigError(f"training.save_retain_interval={retain} must be a multiple of "
                              f"training.save_interval={self.save_interval} (Megatron's rule)")
        interval = self.non_persistent_save_interval
        if interval is not None and kind is None:
            raise ConfigError(f"training.non_persistent_save_interval={interval} needs "
                              "training.non_persistent_ckpt_type=global "
                              "(--non-persistent-ckpt-type global)")
        if interval is not None and self.save is None:
            raise ConfigError(f"training.non_persistent_save_interval={interval} needs "
                              "training.save (the job that saves)")

    def _check_fsdp(self) -> None:
        """``use_torch_fsdp2`` replaces mp's data parallelism and shards what the distributed
        optimizer and DeepSpeed's ZeRO would; the replicas it leaves are not whole."""
        if not self.use_torch_fsdp2:
            if not self.torch_fsdp2_reshard_after_forward:
                raise ConfigError("training.torch_fsdp2_reshard_after_forward=false needs "
                                  "training.use_torch_fsdp2=true (add --use-torch-fsdp2)")
            return
        refused = {
            "use_distributed_optimizer": "FSDP shards the optimizer state already (Megatron "
                                         "refuses the pair too)",
            "deepspeed": "DeepSpeed's engine would wrap the model a second time",
            "use_precision_aware_optimizer": "mp's precision-aware optimizer is not wired to "
                                             "FSDP's sharded gradients",
            "check_weight_hash_across_dp_replicas_interval": "FSDP's data-parallel ranks hold "
                                                             "different rows, not replicas",
        }
        for name, why in refused.items():
            if getattr(self, name) not in (False, None):
                raise ConfigError(f"training.use_torch_fsdp2=true with training.{name}="
                                  f"{getattr(self, name)!r}: not supported ({why}); drop one "
                                  "of them")

    def _check_param_scheduler(self) -> None:
        """Megatron's rules for the weight decay's schedule (``constant`` takes no start and
        end: it keeps ``weight_decay``; linear and cosine need both, ``0 <= start <= end``) and
        for the resume flags (one at most)."""
        self._one_of("weight_decay_incr_style", WD_INCR_STYLES)
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("training.override_opt_param_scheduler and training.use_checkpoint"
                              "_opt_param_scheduler are both true: on resume either this run's "
                              "schedule values win or the checkpoint's (Megatron-LM allows one)")
        ends = {f"training.{name}_weight_decay": getattr(self, f"{name}_weight_decay")
                for name in ("start", "end")}
        constant = self.weight_decay_incr_style == "constant"
        wrong = [f"{key}={value!r}" for key, value in ends.items()
                 if (value is None) != constant]
        if wrong:
            raise ConfigError(
                f"{' and '.join(wrong)} with training.weight_decay_incr_style="
                f"{self.weight_decay_incr_style!r}: linear and cosine need both start and end "
                "weight decay, constant takes neither (it keeps training.weight_decay)")
        if not constant:
            self._at_least("start_weight_decay", 0.0)
            self._not_above("start_weight_decay", "end_weight_decay")


    def _check_run_length(self) -> None:
        """One of the two counts, with its schedule keys and defaults; the ramp's shape."""
        in_samples = self.train_samples is not None
        if in_samples == (self.train_iters is not None):
            raise ConfigError(
                "set exactly one of training.train_iters and training.train_samples (got "
                f"train_iters={self.train_iters!r}, train_samples={self.train_samples!r}): a run "
                "is counted in iterations or in samples")
        unit, other = ("samples", "iters") if in_samples else ("iters", "samples")
        for name, unset in ((f"lr_warmup_{other}", 0), (f"lr_decay_{other}", None),
                            (f"lr_wsd_decay_{other}", None)):
            if getattr(self, name) != unset:
                raise ConfigError(
                    f"training.{name}={getattr(self, name)!r} is counted in {_WORDS[other]}, but "
                    f"the run is counted in {_WORDS[unit]} (training.train_{unit}): set it to "
                    f"{'null' if unset is None else unset} and use training."
                    f"{name.replace(other, unit)}")
        if self.rampup_batch_size is not None:
            if not in_samples:
                raise ConfigError(
                    f"training.rampup_batch_size={self.rampup_batch_size} needs a run counted in "
                    "samples (training.train_samples, and lr_warmup_samples / lr_decay_samples "
                    "for the schedule), as in Megatron-LM: an iteration no longer has a fixed "
                    "size")
            if len(self.rampup_batch_size) != 3:
                raise ConfigError(
                    f"training.rampup_batch_size={self.rampup_batch_size} must be three ints: "
                    "start batch size, increment, ramp-up samples")
        if getattr(self, f"lr_decay_{unit}") is None:
            setattr(self, f"lr_decay_{unit}", getattr(self, f"train_{unit}"))
        self._at_least(f"lr_decay_{unit}", 1)
        self._not_above(f"lr_warmup_{unit}", f"lr_decay_{unit}")
        wsd = getattr(self, f"lr_wsd_decay_{unit}")
        if self.lr_decay_style == "WSD" and wsd is None:
            raise ConfigError(f"training.lr_decay_style='WSD' needs training.lr_wsd_decay_{unit} "
                              "(the length of its final anneal)")
        if wsd is not None:
            self._at_least(f"lr_wsd_decay_{unit}", 1)
            self._not_above(f"lr_wsd_decay_{unit}", f"lr_decay_{unit}")
        if self.lr_warmup_fraction is not None:
            if not 0.0 <= self.lr_warmup_fraction <= 1.0:
                raise ConfigError(f"training.lr_warmup_fraction={self.lr_warmup_fraction!r} "
                                  "must be in [0, 1]")
            if getattr(self, f"lr_warmup_{unit}"):
                raise ConfigError(
                    f"training.lr_warmup_fraction={self.lr_warmup_fraction!r} and training."
                    f"lr_warmup_{unit}={getattr(self, f'lr_warmup_{unit}')!r} both set the "
                    f"warm-up, as Megatron-LM forbids: set one (--lr-warmup-{unit} 0 clears "
                    "the count)")

    @property
    def lr_schedule_steps(self) -> tuple[float, int, int | None]:
        """(warm-up, decay, WSD anneal) lengths of the learning-rate schedule, in the run's
        unit (iterations, or samples when it `counts_samples`)."""
        unit = "samples" if self.counts_samples else "iters"
        decay, wsd = getattr(self, f"lr_decay_{unit}"), getattr(self, f"lr_wsd_decay_{unit}")
        if self.lr_warmup_fraction is not None:
            return self.lr_warmup_fraction * decay, decay, wsd
        return getattr(self, f"lr_warmup_{unit}"), decay, wsd

    @property
    def weight_decay_schedule(self) -> tuple[float, float, int | None]:
        """(start, end, length) of the weight decay's schedule, the length in the run's unit:
        the whole run, as in Megatron (None for ``constant``, which keeps ``weight_decay``)."""
        if self.weight_decay_incr_style == "constant":
            return self.weight_decay, self.weight_decay, None
        length = self.train_samples if self.counts_samples else self.train_iters
        return self.start_weight_decay, self.end_weight_decay, length

    @property
    def counts_samples(self) -> bool:
        """Whether the run and its learning-rate schedule are counted in samples."""
        return self.train_samples is not None
