"""Command-line overrides of a config: ``--section.key VALUE`` for any key, and Megatron-LM's
common flags as aliases.

Syntax, applied left to right (a later override of the same key wins):

- ``--section.key VALUE`` or ``--section.key=VALUE`` sets any key of `known_keys`, e.g.
  ``--training.lr 3e-4``, ``--model.hidden_size=256``; dashes in the key are read as
  underscores (``--training.micro-batch-size 4``). ``VALUE`` is read as the key's type (see
  `mp.config.coerce`): ``null`` for None, ``true``/``false`` for a bool.
- A bool key may stand alone for ``true``: ``--model.sequence_parallel``.
- A list key takes every value up to the next ``--option``:
  ``--data-path 0.3 a 0.7 b``, ``--rampup-batch-size 16 16 5859375`` (or one value with
  ``=``; ``null`` unsets an optional list).
- A Megatron flag, ``--tensor-model-parallel-size 2`` or ``--lr=3e-4``, is its key's alias
  (`ALIASES` maps each to its key). ``--bf16``, ``--fp16`` set ``model.precision`` and
  ``--swiglu`` sets ``model.activation``, ``--apex-fused-adam`` and ``--apex-layer-norm``
  choose apex's optimizer and norms; they take no value.
  ``--num-layers-per-virtual-pipeline-stage N`` sets ``model.virtual_pipeline_model_parallel_size``
  to ``num_layers / pipeline_model_parallel_size / N`` (after every other override); with an
  uneven split (``--decoder-first-pipeline-num-layers`` and the like) give the chunks per stage
  instead, ``--num-virtual-stages-per-pipeline-rank V``, as Megatron asks.
  Other value-less flags (`CONSTANT_FLAGS`) set a key to a fixed value the same way:
  ``--disable-bias-linear``, ``--use-rotary-position-embeddings``, ``--use-flash-attn``,
  ``--recompute-activations`` (selective recompute, as in Megatron), ...
- ``--attention-backend`` also takes Megatron's values (`MEGATRON_VALUES`): ``auto``,
  ``flash`` and ``fused`` are ``sdpa`` (PyTorch picks the flash or cuDNN kernel), ``local``
  (matmul, fused softmax, matmul) is ``unfused``.
- ``--group-query-attention`` turns on grouped-query attention as in Megatron, where
  ``--num-query-groups`` then defaults to 1 (multi-query attention): it sets
  ``model.num_query_groups`` to 1 unless the config or the command line gives a count.
  Unlike Megatron, ``--num-query-groups G`` alone takes effect too.
- ``--no-position-embedding`` (no learned absolute position embedding) changes nothing with
  RoPE, which adds none; otherwise it sets ``model.position_embedding_type`` to ``none`` (no
  position information but the causal mask), as in Megatron.

- Megatron flags that would change nothing in mp (`NO_EFFECT_FLAGS`, such as
  ``--use-mcore-models`` or ``--ckpt-format torch_dist``) are accepted, and the job prints why
  each changes nothing. Flags of features mp does not have (`UNSUPPORTED_FLAGS`,
  `UNSUPPORTED_PREFIXES`: FP8, mixture of experts, FSDP, ...) are errors that say so, and so
  are the values mp lacks of `CHOICE_FLAGS` (``--optimizer sgd``; ``--optimizer adam`` and
  ``--recompute-modules core_attn`` are what mp does).

A value never starts with ``--`` unless it is given with ``=``.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass

from mp.config.coerce import ConfigError, coerce, field_annotations, unknown_key_message
from mp.config.job import SECTIONS, known_keys
from mp.model.pipeline_split import UNEVEN_SPLIT_FIELDS

# Megatron-LM flags that are their key's name with dashes, grouped by section.
_MEGATRON_NAMES = {
    "model": (
        "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
        "ffn_hidden_size", "seq_length",
        "max_position_embeddings", "make_vocab_size_divisible_by", "normalization",
        "position_embedding_type", "untie_embeddings_and_output_weights", "hidden_dropout",
        "attention_dropout", "init_method_std", "tensor_model_parallel_size",
        "pipeline_model_parallel_size", "sequence_parallel", "recompute_granularity",
        "overlap_p2p_comm", "recompute_method", "recompute_num_layers",
        "distribute_saved_activations", "rotary_base", "use_rope_scaling",
        "rope_scaling_factor", "attention_backend", "kv_channels", "rotary_percent",
        "rotary_seq_len_interpolation_factor", "init_method_xavier_uniform",
        "qk_layernorm", "context_parallel_size", "account_for_embedding_in_pipeline_split",
        "account_for_loss_in_pipeline_split", "pipeline_model_parallel_layout",
    ),
    "training": (
        "micro_batch_size", "global_batch_size", "train_iters", "train_samples",
        "rampup_batch_size", "lr", "min_lr", "lr_decay_style", "lr_wsd_decay_style",
        "lr_wsd_decay_iters", "lr_wsd_decay_samples", "lr_warmup_fraction",
        "lr_warmup_iters", "lr_warmup_init",
        "lr_decay_iters", "lr_warmup_samples", "lr_decay_samples", "weight_decay", "adam_beta1",
        "adam_beta2", "adam_eps", "clip_grad", "seed", "loss_scale", "initial_loss_scale",
        "min_loss_scale", "loss_scale_window", "hysteresis", "use_distributed_optimizer",
        "overlap_param_gather", "overlap_grad_reduce", "deepspeed", "deepspeed_config",
        "eval_interval", "eval_iters", "save", "load", "finetune", "use_checkpoint_args",
        "no_load_optim", "no_load_rng", "no_save_optim", "no_save_rng",
        "exit_on_missing_checkpoint", "skip_train",
        "save_interval", "exit_interval", "exit_duration_in_mins", "exit_signal_handler",
        "exit_signal", "calculate_per_token_loss", "decoupled_lr",
        "decoupled_min_lr", "grad_reduce_in_bf16", "manual_gc", "manual_gc_interval",
        "empty_unused_memory_level", "distributed_timeout_minutes",
        "weight_decay_incr_style", "start_weight_decay", "end_weight_decay",
        "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler",
    ),
    "data": (
        "data_path", "split", "tokenizer_type", "vocab_file", "merge_file", "tokenizer_model",
        "data_cache_path", "num_workers", "eod_mask_loss", "mock_data", "reset_position_ids",
        "reset_attention_mask", "vocab_size", "train_data_path", "valid_data_path",
        "test_data_path",
    ),
    "logging": ("log_interval", "tensorboard_dir", "log_params_norm", "log_num_zeros_in_grad",
                "wandb_project", "wandb_exp_name", "wandb_save_dir", "profile",
                "use_pytorch_profiler", "profile_step_start", "profile_step_end",
                "profile_ranks", "tensorboard_log_interval", "tensorboard_queue_size",
                "log_world_size_to_tensorboard"),
}

#: Megatron-LM flag -> the key it sets.
ALIASES: dict[str, str] = {
    "--" + name.replace("_", "-"): f"{section}.{name}"
    for section, names in _MEGATRON_NAMES.items() for name in names
}

ALIASES["--overlap-p2p-communication"] = "model.overlap_p2p_comm"  # Megatron's spellings
ALIASES["--norm-epsilon"] = ALIASES["--layernorm-epsilon"] = "model.layernorm_epsilon"
ALIASES["--num-virtual-stages-per-pipeline-rank"] = "model.virtual_pipeline_model_parallel_size"
ALIASES["--decoder-first-pipeline-num-layers"] = "model.num_layers_in_first_pipeline_stage"
ALIASES["--decoder-last-pipeline-num-layers"] = "model.num_layers_in_last_pipeline_stage"
ALIASES["--override-opt_param-scheduler"] = "training.override_opt_param_scheduler"
ALIASES["--use-checkpoint-opt_param-scheduler"] = "training.use_checkpoint_opt_param_scheduler"

#: Megatron-LM values of a flag -> the value of its key in mp (other values pass as given).
MEGATRON_VALUES: dict[str, dict[str, str]] = {
    "--attention-backend": {"auto": "sdpa", "flash": "sdpa", "fused": "sdpa",
                            "local": "unfused"},
}

#: Megatron-LM flags that take no value -> (key, the value they set).
CONSTANT_FLAGS: dict[str, tuple[str, str]] = {
    "--bf16": ("model.precision", "bf16"),
    "--fp16": ("model.precision", "fp16"),
    "--swiglu": ("model.activation", "swiglu"),
    "--squared-relu": ("model.activation", "squared_relu"),
    "--openai-gelu": ("model.activation", "gelu_tanh"),
    "--disable-bias-linear": ("model.add_bias_linear", "false"),
    "--use-rotary-position-embeddings": ("model.position_embedding_type", "rope"),
    "--use-flash-attn": ("model.attention_backend", "sdpa"),
    "--recompute-activations": ("model.recompute_granularity", "selective"),
    "--apex-fused-adam": ("training.optimizer_impl", "apex"),
    "--apex-layer-norm": ("model.normalization_impl", "apex"),
    "--no-masked-softmax-fusion": ("model.masked_softmax_fusion", "false"),
    "--no-bias-dropout-fusion": ("model.bias_dropout_fusion", "false"),
    "--no-bias-gelu-fusion": ("model.bias_activation_fusion", "false"),
    "--no-bias-swiglu-fusion": ("model.bias_activation_fusion", "false"),
    "--cross-entropy-loss-fusion": ("model.cross_entropy_loss_fusion", "true"),
    "--no-cross-entropy-loss-fusion": ("model.cross_entropy_loss_fusion", "false"),
    "--apply-layernorm-1p": ("model.layernorm_zero_centered_gamma", "true"),
    "--no-manual-gc-eval": ("training.manual_gc_eval", "false"),
    "--no-mmap-bin-files": ("data.mmap_bin_files", "false"),
}

_LOSS_CHECK = ("mp always checks the loss: a non-finite one stops a bf16/fp32 run, and fp16's "
               "loss scaler skips the step")
_DCP = ("mp's checkpoints are torch.distributed.checkpoint directories: every rank writes and "
        "reads its own part")

#: Megatron-LM flags that mp accepts and that change nothing in mp -> (how many values they
#: take, why). A job started with one says so once (`no_effect_notices`).
NO_EFFECT_FLAGS: dict[str, tuple[int, str]] = {
    "--use-mcore-models": (0, "mp has one GPT, laid out as Megatron-Core's"),
    "--log-throughput": (0, "every log line has tokens/s, TFLOP/s per GPU and MFU"),
    "--log-timers-to-tensorboard": (0, ("mp times whole iterations, and TensorBoard always gets "
                                       "that time (iteration-time-ms)")),
    "--no-create-attention-mask-in-dataloader": (0, ("mp's loader never builds a causal mask; "
                                                    "attention applies causality itself")),
    "--attention-softmax-in-fp32": (0, "mp's softmax always computes in fp32"),
    "--log-memory-to-tensorboard": (0, ("TensorBoard always gets the peak memory "
                                       "(peak-memory-bytes)")),
    "--log-batch-size-to-tensorboard": (0, ("TensorBoard always gets the global batch size "
                                           "(batch-size)")),
    "--log-validation-ppl-to-tensorboard": (0, ("TensorBoard always gets the validation "
                                               "perplexity (validation lm loss PPL)")),
    "--data-impl": (1, ("mp reads Megatron's indexed format (.bin/.idx), memory-mapped unless "
                       "--no-mmap-bin-files")),
    "--distributed-backend": (1, "mp uses NCCL with CUDA and gloo on the CPU"),
    "--tiktoken-pattern": (1, "it configures Megatron's TikTokenizer, which mp does not have"),
    "--ckpt-format": (1, ("mp writes one format, which loads at any parallel layout as "
                         "torch_dist does (docs/checkpoints.md)")),
    "--transformer-impl": (1, ("mp always runs its own layers (Megatron's local ones), not "
                              "Transformer Engine's")),
    "--cp-comm-type": (1, ("mp's context parallelism always all-gathers the keys and values "
                          "(Megatron's all_gather)")),
    "--no-gradient-accumulation-fusion": (0, ("mp accumulates weight gradients into the fp32 "
                                              "main_grad buffer with a hook; it has no fused "
                                              "kernel to turn off")),
    "--accumulate-allreduce-grads-in-fp32": (0, ("mp accumulates and reduces gradients in fp32 "
                                                 "unless --grad-reduce-in-bf16")),
    "--no-persist-layer-norm": (0, "mp has no persistent layer-norm kernel to turn off"),
    "--fp16-lm-cross-entropy": (0, "mp's cross-entropy always computes in fp32"),
    "--tp-comm-overlap": (0, ("mp does not overlap tensor-parallel communication with the "
                              "matrix products (Transformer Engine's userbuffers)")),
    "--use-cpu-initialization": (0, "mp draws each weight on the device it lives on"),
    "--check-for-nan-in-loss-and-grad": (0, _LOSS_CHECK),
    "--no-check-for-nan-in-loss-and-grad": (0, _LOSS_CHECK),
    "--async-save": (0, "mp writes each checkpoint before training goes on (atomically)"),
    "--ckpt-fully-parallel-save": (0, _DCP),
    "--ckpt-fully-parallel-load": (0, _DCP),
    "--num-dataset-builder-threads": (1, "mp builds the dataset indices without a thread pool"),
    "--timing-log-level": (1, ("mp times whole iterations only (the log line's ms/iter)")),
}

#: Megatron-LM flags of features mp does not have -> what to say when one is given
#: (`UNSUPPORTED_PREFIXES` covers whole families of them).
UNSUPPORTED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("--num-experts", "--expert-model-parallel-size",
                     "--expert-tensor-parallel-size"), "mp has no mixture-of-experts layers"),
    **dict.fromkeys(("--use-torch-fsdp2", "--use-custom-fsdp"),
                    "mp has no FSDP; --use-distributed-optimizer shards the optimizer state "
                    "over data parallel"),
    "--fp32-residual-connection": "mp keeps the residual stream in the model's precision",
    "--apply-residual-connection-post-layernorm": ("mp's layers add the residual from before "
                                                   "the norm (pre-norm, Megatron's default)"),
    "--use-legacy-models": "mp has one GPT, laid out as Megatron-Core's; drop the flag",
}
#: Flag-name prefixes of Megatron-LM feature families mp does not have -> what to say.
UNSUPPORTED_PREFIXES: dict[str, str] = {
    "--fp8": "mp has no FP8 training (Transformer Engine); use --bf16",
    "--moe-": "mp has no mixture-of-experts layers",
}
#: Megatron-LM flags that take values of which mp has some -> (the values mp has, why).
CHOICE_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "--recompute-modules": (("core_attn",), ("mp's selective recompute (--recompute-activations) "
                                             "recomputes the attention core only")),
    "--optimizer": (("adam",), "mp trains with AdamW (Megatron's adam)"),
}

VIRTUAL_STAGE_FLAG = "--num-layers-per-virtual-pipeline-stage"
GROUP_QUERY_FLAG = "--group-query-attention"
NO_POSITION_EMBEDDING_FLAG = "--no-position-embedding"
BUCKET_SIZE_FLAG = "--ddp-bucket-size"

#: Flags resolved after every other override -> what they do (for --help).
DEFERRED_FLAGS: dict[str, str] = {
    VIRTUAL_STAGE_FLAG: ("model.virtual_pipeline_model_parallel_size = num_layers / "
                         "pipeline_model_parallel_size / N"),
    GROUP_QUERY_FLAG: "model.num_query_groups=1 unless given",
    NO_POSITION_EMBEDDING_FLAG: ("model.position_embedding_type=none unless it is rope"),
    BUCKET_SIZE_FLAG: ("training.bucket_size_mb = N elements x the gradient's bytes (4, or 2 "
                       "with grad_reduce_in_bf16) / 2^20"),
}


@dataclass(frozen=True)
class _Option:
    """What one ``--option`` sets and how many values it takes."""

    key: str | None  # None: a flag of DEFERRED_FLAGS (resolved after the others), of
    # CHOICE_FLAGS (checked after them) or of NO_EFFECT_FLAGS
    min_values: int
    max_values: int | None  # None: any number
    constant: str | None = None


def apply_overrides(sections: dict, args: Sequence[str]) -> None:
    """Apply command-line overrides (module doc) to ``{section: {key: value}}`` in place.

    Values are stored as given (text); `JobConfig.from_dict` converts them to their types.
    """
    deferred: dict[str, list[str]] = {}
    constants_given: dict[str, str] = {}
    for name, option, values in _split_options(args):
        if option.key is None:
            deferred[name] = values
        elif option.constant is not None:
            earlier = constants_given.setdefault(option.key, name)
            if CONSTANT_FLAGS[earlier][1] != option.constant:
                raise ConfigError(f"{name} conflicts with {earlier} (both set {option.key})")
            _set(sections, option.key, option.constant)
        elif option.max_values is None:  # one value is read as one item, or as null
            _set(sections, option.key, values[0] if len(values) == 1 else values)
        elif values:
            _set(sections, option.key, MEGATRON_VALUES.get(name, {}).get(values[0], values[0]))
        else:
            _set(sections, option.key, "true")
    for name, (accepted, why) in CHOICE_FLAGS.items():
        others = [value for value in deferred.get(name, ()) if value not in accepted]
        if others:
            raise ConfigError(f"{name} {' '.join(others)}: {why}; only "
                              f"{', '.join(accepted)} is accepted")
    model = sections.get("model") or {}
    if GROUP_QUERY_FLAG in deferred and "num_query_groups" not in model:
        _set(sections, "model.num_query_groups", 1)
    if NO_POSITION_EMBEDDING_FLAG in deferred and model.get("position_embedding_type") != "rope":
        _set(sections, "model.position_embedding_type", "none")
    if BUCKET_SIZE_FLAG in deferred:
        _set(sections, "training.bucket_size_mb",
             _bucket_megabytes(sections.get("training") or {}, deferred[BUCKET_SIZE_FLAG][0]))
    if VIRTUAL_STAGE_FLAG in deferred:
        layers_per_stage = coerce(VIRTUAL_STAGE_FLAG, deferred[VIRTUAL_STAGE_FLAG][0], int)
        vpp = _virtual_stages(model, layers_per_stage)
        _set(sections, "model.virtual_pipeline_model_parallel_size", vpp)


def _set(sections: dict, key: str, value) -> None:
    section, name = key.split(".")
    sections[section] = {**(sections.get(section) or {}), name: value}


def _split_options(args: Sequence[str]):
    """``(option name, its _Option, [values])`` for each ``--option`` of ``args``, in order."""
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ConfigError(
                f"unexpected argument {token!r}: overrides are --section.key VALUE, "
                "--section.key=VALUE or a Megatron flag such as --lr 3e-4"
            )
        name, equals, inline = token.partition("=")
        option = _option(name)
        i += 1
        if equals:
            values = [inline]
        else:
            values = []
            while (i < len(args) and not args[i].startswith("--")
                   and (option.max_values is None or len(values) < option.max_values)):
                values.append(args[i])
                i += 1
        if len(values) < option.min_values:
            raise ConfigError(f"{name} needs a value")
        if option.max_values is not None and len(values) > option.max_values:
            raise ConfigError(f"{name} takes no value, got {inline!r}")
        yield name, option, values


def _option(name: str) -> _Option:
    """The `_Option` for ``--name``; an unknown option is an error naming the closest one."""
    if name in UNSUPPORTED_FLAGS:
        raise ConfigError(f"{name}: {UNSUPPORTED_FLAGS[name]}")
    for prefix, why in UNSUPPORTED_PREFIXES.items():
        if name.startswith(prefix):
            raise ConfigError(f"{name}: {why}")
    if name in CHOICE_FLAGS:
        return _Option(None, 1, None)
    if name in DEFERRED_FLAGS:
        takes = int(name in (VIRTUAL_STAGE_FLAG, BUCKET_SIZE_FLAG))
        return _Option(None, takes, takes)
    if name in NO_EFFECT_FLAGS:
        takes = NO_EFFECT_FLAGS[name][0]
        return _Option(None, takes, takes)
    if name in CONSTANT_FLAGS:
        key, constant = CONSTANT_FLAGS[name]
        return _Option(key, 0, 0, constant)
    key = ALIASES.get(name) or name[2:].replace("-", "_")
    if "." not in key or key not in known_keys():
        raise ConfigError(unknown_key_message("option", name, option_names()))
    section, field_name = key.split(".")
    annotation = field_annotations(SECTIONS[section])[field_name]
    if any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation))):
        return _Option(key, 1, None)
    if annotation is bool:
        return _Option(key, 0, 1)
    return _Option(key, 1, 1)


def option_names() -> list[str]:
    """Every option `apply_overrides` knows: the Megatron flags, then ``--section.key``."""
    return [*ALIASES, *CONSTANT_FLAGS, *DEFERRED_FLAGS, *NO_EFFECT_FLAGS, *CHOICE_FLAGS,
            *(f"--{k}" for k in known_keys())]


def no_effect_notices(args: Sequence[str]) -> list[str]:
    """One line for each `NO_EFFECT_FLAGS` flag in ``args`` (a valid command line), saying
    why it changes nothing."""
    return [f"notice: {' '.join([name, *values])} has no effect in mp: "
            f"{NO_EFFECT_FLAGS[name][1]}"
            for name, _, values in _split_options(args) if name in NO_EFFECT_FLAGS]


def _bucket_megabytes(training: dict, elements: str) -> float:
    """Megatron's ``--ddp-bucket-size`` (gradient elements per bucket) as mp's
    ``bucket_size_mb`` (exact: a whole number of elements times 2 or 4 bytes over 2^20)."""
    count = coerce(BUCKET_SIZE_FLAG, elements, int)
    if count < 1:
        raise ConfigError(f"{BUCKET_SIZE_FLAG}={count} must be >= 1 (elements per bucket)")
    bf16 = coerce("training.grad_reduce_in_bf16", training.get("grad_reduce_in_bf16", False),
                  bool)
    return count * (2 if bf16 else 4) / 2**20


def _virtual_stages(model: dict, layers_per_stage: int) -> int:
    """``num_layers / pipeline_model_parallel_size / layers_per_stage``, which must divide."""
    if layers_per_stage < 1:
        raise ConfigError(f"{VIRTUAL_STAGE_FLAG}={layers_per_stage} must be >= 1")
    if "num_layers" not in model:
        raise ConfigError(f"{VIRTUAL_STAGE_FLAG} needs model.num_layers")
    num_layers = coerce("model.num_layers", model["num_layers"], int)
    pp = coerce("model.pipeline_model_parallel_size",
                model.get("pipeline_model_parallel_size", 1), int)
    fields = field_annotations(SECTIONS["model"])
    for name in UNEVEN_SPLIT_FIELDS:
        value = coerce(f"model.{name}", model.get(name), fields[name]) if name in model else None
        if value is not None and value is not False:  # a count of 0 is set
            raise ConfigError(f"{VIRTUAL_STAGE_FLAG} assumes an even split and model.{name}="
                              f"{value!r} is set: give the chunks per stage with "
                              "--num-virtual-stages-per-pipeline-rank instead")
    if pp < 1 or num_layers % (pp * layers_per_stage):
        raise ConfigError(
            f"{VIRTUAL_STAGE_FLAG}={layers_per_stage} does not divide num_layers / "
            f"pipeline_model_parallel_size = {num_layers} / {pp}"
        )
    return num_layers // (pp * layers_per_stage)
