"""Megatron-LM's command-line flags as mp reads them: the tables `mp.config.overrides` parses
with.

- `ALIASES`: a flag -> the ``section.key`` it sets (most are the key's name with dashes);
  `MEGATRON_VALUES` translates some of their values.
- `CONSTANT_FLAGS`: value-less flags that set a key to a fixed value (``--bf16``).
- `DEFERRED_FLAGS`: flags resolved after every other override, since they read other keys
  (``--num-layers-per-virtual-pipeline-stage``, ``--ddp-bucket-size``, ...).
- `NO_EFFECT_FLAGS`: flags that change nothing in mp, each with the reason the job prints.
- `UNSUPPORTED_FLAGS`, `UNSUPPORTED_PREFIXES`: flags of features mp does not have, with what
  to say; `CHOICE_FLAGS`: flags of which mp has some values only.
"""

from __future__ import annotations

# Megatron-LM flags that are their key's name with dashes, grouped by section.
_MEGATRON_NAMES = {
    "model": (
        "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
        "ffn_hidden_size", "seq_length",
        "max_position_embeddings", "make_vocab_size_divisible_by", "normalization",
        "position_embedding_type", "untie_embeddings_and_output_weights", "hidden_dropout",
        "attention_dropout", "init_method_std", "embedding_init_method_std",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size", "sequence_parallel", "recompute_granularity",
        "recompute_modules", "add_qkv_bias", "moe_shared_expert_gate",
        "overlap_p2p_comm", "recompute_method", "recompute_num_layers",
        "distribute_saved_activations", "rotary_base", "use_rope_scaling",
        "rope_scaling_factor", "attention_backend", "kv_channels", "rotary_percent",
        "rotary_seq_len_interpolation_factor", "init_method_xavier_uniform",
        "qk_layernorm", "context_parallel_size", "account_for_embedding_in_pipeline_split",
        "account_for_loss_in_pipeline_split", "pipeline_model_parallel_layout",
        "cp_comm_type", "moe_router_topk", "moe_ffn_hidden_size", "moe_aux_loss_coeff",
        "moe_z_loss_coeff", "moe_router_load_balancing_type", "moe_layer_freq",
        "expert_model_parallel_size", "expert_tensor_parallel_size",
        "moe_shared_expert_intermediate_size", "moe_router_dtype", "moe_router_score_function",
        "moe_router_topk_scaling_factor", "moe_router_bias_update_rate",
        "moe_expert_capacity_factor", "moe_token_drop_policy", "moe_router_num_groups",
        "moe_router_group_topk", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
        "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "mtp_num_layers",
        "mtp_loss_scaling_factor", "window_size", "window_attn_skip_freq", "rotary_interleaved",
        "qk_l2_norm", "no_rope_freq", "activation_func_clamp_value", "glu_linear_offset",
        "softmax_type", "yarn_original_max_position_embeddings", "yarn_beta_fast",
        "yarn_beta_slow",
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
        "use_torch_fsdp2",
        "eval_interval", "eval_iters", "save", "load", "finetune", "use_checkpoint_args",
        "use_mp_args_from_checkpoint_args", "pretrained_checkpoint", "moe_use_upcycling",
        "no_load_optim", "no_load_rng", "no_save_optim", "no_save_rng",
        "exit_on_missing_checkpoint", "skip_train", "ckpt_step", "async_save",
        "save_interval", "exit_interval", "exit_duration_in_mins", "exit_signal_handler",
        "exit_signal", "calculate_per_token_loss", "decoupled_lr",
        "decoupled_min_lr", "grad_reduce_in_bf16", "manual_gc", "manual_gc_interval",
        "empty_unused_memory_level", "distributed_timeout_minutes",
        "weight_decay_incr_style", "start_weight_decay", "end_weight_decay",
        "check_weight_hash_across_dp_replicas_interval",
        "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler",
        "iterations_to_skip", "deterministic_mode",
        "num_distributed_optimizer_instances", "non_persistent_save_interval",
        "save_retain_interval",
        "non_persistent_ckpt_type", "non_persistent_global_ckpt_dir",
        "use_precision_aware_optimizer", "main_params_dtype", "main_grads_dtype",
        "exp_avg_dtype", "exp_avg_sq_dtype", "optimizer", "sgd_momentum", "muon_momentum",
        "muon_use_nesterov", "muon_num_ns_steps", "muon_coefficient_type", "muon_scale_mode",
        "muon_extra_scale_factor", "muon_fp32_matmul_prec", "muon_tp_mode",
    ),
    "data": (
        "data_path", "split", "tokenizer_type", "vocab_file", "merge_file", "tokenizer_model",
        "data_cache_path", "num_workers", "eod_mask_loss", "mock_data", "reset_position_ids",
        "reset_attention_mask", "vocab_size", "train_data_path", "valid_data_path",
        "test_data_path", "dataloader_type", "full_validation", "multiple_validation_sets",
        "data_args_path", "per_split_data_args_path",
    ),
    "logging": ("log_interval", "tensorboard_dir", "log_params_norm", "log_num_zeros_in_grad",
                "wandb_project", "wandb_entity", "wandb_exp_name", "wandb_save_dir", "profile",
                "use_pytorch_profiler", "profile_step_start", "profile_step_end",
                "profile_ranks", "tensorboard_log_interval", "tensorboard_queue_size",
                "log_world_size_to_tensorboard", "log_progress", "record_memory_history",
                "memory_snapshot_path"),
}

#: Megatron-LM flag -> the key it sets.
ALIASES: dict[str, str] = {
    "--" + name.replace("_", "-"): f"{section}.{name}"
    for section, names in _MEGATRON_NAMES.items() for name in names
}

ALIASES["--overlap-p2p-communication"] = "model.overlap_p2p_comm"  # Megatron's spellings
ALIASES["--num-experts"] = "model.num_moe_experts"
ALIASES["--rotary-scaling-factor"] = "model.yarn_rotary_scaling_factor"
ALIASES["--mscale"] = "model.yarn_mscale"
ALIASES["--mscale-all-dim"] = "model.yarn_mscale_all_dim"
ALIASES["--norm-epsilon"] = ALIASES["--layernorm-epsilon"] = "model.layernorm_epsilon"
ALIASES["--num-virtual-stages-per-pipeline-rank"] = "model.virtual_pipeline_model_parallel_size"
ALIASES["--microbatch-group-size-per-virtual-pipeline-stage"] = \
    "model.microbatch_group_size_per_vp_stage"
ALIASES["--decoder-first-pipeline-num-layers"] = "model.num_layers_in_first_pipeline_stage"
ALIASES["--decoder-last-pipeline-num-layers"] = "model.num_layers_in_last_pipeline_stage"
ALIASES["--encoder-num-layers"] = "model.num_layers"  # Megatron copies both to GPT's keys
ALIASES["--encoder-seq-length"] = "model.seq_length"
ALIASES["--persistent-save-interval"] = "training.save_interval"
ALIASES["--override-opt_param-scheduler"] = "training.override_opt_param_scheduler"
ALIASES["--use-checkpoint-opt_param-scheduler"] = "training.use_checkpoint_opt_param_scheduler"

#: Megatron-LM values of a flag -> the value of its key in mp (other values pass as given).
MEGATRON_VALUES: dict[str, dict[str, str]] = {
    "--attention-backend": {"auto": "sdpa", "flash": "sdpa", "fused": "sdpa",
                            "local": "unfused"},
    "--cp-comm-type": {"allgather": "all_gather"},
    "--position-embedding-type": {"yarn": "rope"},
}

#: Megatron-LM flag values that set a second key too -> (key, value): the position embedding
#: ``yarn`` of Megatron-Core's GPTModel is mp's RoPE with YaRN's frequencies.
IMPLIED_VALUES: dict[tuple[str, str], tuple[str, str]] = {
    ("--position-embedding-type", "yarn"): ("model.rope_type", "yarn"),
}

#: Megatron-LM flags that take a list where mp's key takes one value -> what mp takes (more
#: than one value is an error saying so).
ONE_VALUE_FLAGS: dict[str, str] = {
    "--cp-comm-type": ("mp takes one communication type for every layer (all_gather, a2a or "
                       "p2p), not one per layer"),
    "--moe-router-load-balancing-type": ("mp takes one load-balancing type (aux_loss, "
                                         "seq_aux_loss, global_aux_loss or none), not several "
                                         "whose losses add up"),
    "--moe-aux-loss-coeff": ("mp takes one coefficient, that of its one "
                             "--moe-router-load-balancing-type"),
}

#: Megatron-LM flags that take no value -> (key, the value they set).
CONSTANT_FLAGS: dict[str, tuple[str, str]] = {
    "--bf16": ("model.precision", "bf16"),
    "--fp16": ("model.precision", "fp16"),
    "--swiglu": ("model.activation", "swiglu"),
    "--squared-relu": ("model.activation", "squared_relu"),
    "--quick-geglu": ("model.activation", "quick_geglu"),
    "--openai-gelu": ("model.activation", "gelu_tanh"),
    "--disable-bias-linear": ("model.add_bias_linear", "false"),
    "--use-rotary-position-embeddings": ("model.position_embedding_type", "rope"),
    "--use-flash-attn": ("model.attention_backend", "sdpa"),
    "--recompute-activations": ("model.recompute_granularity", "selective"),
    "--apex-fused-adam": ("training.optimizer_impl", "apex"),
    "--muon-no-split-qkv": ("training.muon_split_qkv", "false"),
    "--torch-fsdp2-no-reshard-after-forward": ("training.torch_fsdp2_reshard_after_forward",
                                               "false"),
    "--apex-layer-norm": ("model.normalization_impl", "apex"),
    "--no-masked-softmax-fusion": ("model.masked_softmax_fusion", "false"),
    "--no-bias-dropout-fusion": ("model.bias_dropout_fusion", "false"),
    "--no-bias-gelu-fusion": ("model.bias_activation_fusion", "false"),
    "--no-bias-swiglu-fusion": ("model.bias_activation_fusion", "false"),
    "--cross-entropy-loss-fusion": ("model.cross_entropy_loss_fusion", "true"),
    "--no-cross-entropy-loss-fusion": ("model.cross_entropy_loss_fusion", "false"),
    "--apply-layernorm-1p": ("model.layernorm_zero_centered_gamma", "true"),
    "--fp32-residual-connection": ("model.fp32_residual_connection", "true"),
    "--no-manual-gc-eval": ("training.manual_gc_eval", "false"),
    "--no-mmap-bin-files": ("data.mmap_bin_files", "false"),
    "--no-data-sharding": ("data.data_sharding", "false"),
    "--moe-router-pre-softmax": ("model.moe_router_pre_softmax", "true"),
    "--moe-grouped-gemm": ("model.moe_grouped_gemm", "true"),
    "--moe-router-enable-expert-bias": ("model.moe_router_enable_expert_bias", "true"),
    "--no-overlap-p2p-communication": ("model.overlap_p2p_comm", "false"),
    "--yarn-correction-range-round-to-int": ("model.yarn_correction_range_round_to_int",
                                             "true"),
    "--no-yarn-correction-range-round-to-int": ("model.yarn_correction_range_round_to_int",
                                                "false"),
}

_LOSS_CHECK = ("mp always checks the loss: a non-finite one stops a bf16/fp32 run, and fp16's "
               "loss scaler skips the step")
_DCP = ("mp's checkpoints are torch.distributed.checkpoint directories: every rank writes and "
        "reads its own part")
_TIMING = "mp times whole iterations only (the log line's ms/iter)"
_TP_OVERLAP = ("it tunes --tp-comm-overlap (Transformer Engine's userbuffers), which mp does "
               "not do")
_ANY_LAYOUT = ("mp's checkpoints, optimizer state included, load at any parallel layout "
               "(docs/checkpoints.md)")
_DEPRECATED = "Megatron-LM ignores it too (deprecated)"

#: Megatron-LM flags that mp accepts and that change nothing in mp -> (how many values they
#: take, None for any number; why). A job started with one says so once (`no_effect_notices`).
NO_EFFECT_FLAGS: dict[str, tuple[int | None, str]] = {
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
    "--ckpt-fully-parallel-save": (0, _DCP),
    "--ckpt-fully-parallel-load": (0, _DCP),
    "--use-dist-ckpt": (0, _DCP),
    "--auto-detect-ckpt-format": (0, _DCP),
    "--no-async-strategy": (0, ("mp's --async-save writes with torch.distributed.checkpoint "
                                "from a background thread; it has no other strategy")),
    "--dist-ckpt-strictness": (1, ("mp always checks every tensor of a checkpoint by name and "
                                   "shape, and names what is missing or unexpected")),
    "--no-rope-fusion": (0, "mp has no fused RoPE kernel to turn off"),
    "--apply-query-key-layer-scaling": (0, ("its division of the scores by the layer number, "
                                            "undone in the softmax, guards fp16 scores; mp's "
                                            "SDPA core scales inside the kernel and every "
                                            "softmax computes in fp32")),
    "--cross-entropy-fusion-impl": (1, ("mp's fused cross-entropy is its own compiled one "
                                        "(--cross-entropy-loss-fusion)")),
    "--log-loss-scale-to-tensorboard": (0, ("TensorBoard always gets the loss scale "
                                           "(loss-scale)")),
    "--num-dataset-builder-threads": (1, "mp builds the dataset indices without a thread pool"),
    "--timing-log-level": (1, _TIMING),
    "--moe-token-dispatcher-type": (1, ("mp's experts trade tokens by all-to-all over the "
                                       "expert-parallel ranks (Megatron's alltoall); the "
                                       "others give the same results")),
    "--moe-permute-fusion": (0, "mp sorts the tokens by expert with torch's own kernels"),
    "--moe-pad-expert-input-to-capacity": (0, ("mp sizes each layer's exchanges by the counts "
                                              "it routed; padding with unrouted copies changes "
                                              "no result")),
    "--local-rank": (1, ("mp reads the local rank from LOCAL_RANK, which torchrun (and "
                         "torch.distributed.launch) sets")),
    "--no-async-tensor-model-parallel-allreduce": (0, _DEPRECATED),
    "--dist-ckpt-format": (1, _DEPRECATED + " for --ckpt-format; mp writes one format"),
    "--no-ckpt-fully-parallel-save": (0, _DCP),
    "--ckpt-assume-constant-structure": (0, ("it lets Megatron reuse a save plan between "
                                             "saves; mp plans each save anew and writes the "
                                             "same files")),
    "--use-persistent-ckpt-worker": (0, ("mp's --async-save writes from a background thread; "
                                         "it has no worker process to keep")),
    "--dist-ckpt-save-pre-mcore-014": (0, ("mp writes its own checkpoint format, not "
                                           "Megatron-Core's, so there is no older layout to "
                                           "keep")),
    "--dist-ckpt-optim-fully-reshardable": (0, _ANY_LAYOUT),
    "--distrib-optim-fully-reshardable-mem-efficient": (0, _ANY_LAYOUT),
    "--tp-comm-overlap-cfg": (1, _TP_OVERLAP),
    "--tp-comm-overlap-rs-dgrad": (0, _TP_OVERLAP),
    "--tp-comm-bootstrap-backend": (1, _TP_OVERLAP),
    **dict.fromkeys(("--disable-tp-comm-overlap-ag", "--disable-tp-comm-overlap-rs",
                     "--disable-tp-comm-bulk-dgrad", "--disable-tp-comm-bulk-wgrad",
                     "--disable-tp-comm-split-ag", "--disable-tp-comm-split-rs"),
                    (0, _TP_OVERLAP)),
    "--timing-log-option": (1, _TIMING),
    "--no-barrier-with-level-1-timing": (0, _TIMING),
    "--no-log-loss-scale-to-tensorboard": (0, ("TensorBoard always gets the loss scale "
                                              "(loss-scale); mp has no switch to leave it out")),
    "--use-te-activation-func": (0, ("it picks Transformer Engine's activation kernels; mp "
                                     "computes its activations with torch's ops")),
    "--no-gradient-reduce-div-fusion": (0, ("mp scales the gradients by 1/DP before it reduces "
                                            "them, as Megatron does with this flag")),
    "--use-fused-weighted-squared-relu": (0, ("it picks a fused kernel for the experts' "
                                              "squared ReLU times their routing weights; mp "
                                              "has no such kernel")),
    "--no-clone-scatter-output-in-embedding": (0, ("it saves Megatron a copy of the "
                                                   "sequence-parallel embedding output; mp "
                                                   "makes no such copy")),
    "--no-scatter-gather-tensors-in-pipeline": (0, ("mp's pipeline sends each activation "
                                                    "whole")),
    "--no-align-grad-reduce": (0, ("it changes when each pipeline stage starts its gradient "
                                   "reductions, not what they compute")),
    "--no-align-param-gather": (0, ("it changes when each pipeline stage starts its parameter "
                                    "all-gathers, not what they gather")),
    "--high-priority-stream-groups": (None, ("mp runs each collective on its group's default "
                                             "stream; stream priorities change timing only")),
    "--enable-experimental": (0, "mp has no experimental features behind a switch"),
    "--legacy-tokenizer": (0, ("mp's tokenizers are its own (mp.data.tokenizer), not "
                               "Megatron's legacy or new ones")),
    "--no-use-tokenizer-model-from-checkpoint-args": (0, ("mp's --use-checkpoint-args takes "
                                                          "the model's arguments only, never "
                                                          "the tokenizer")),
    "--no-initialization": (0, ("mp always initializes the weights (a --load then overwrites "
                                "them); Megatron skips it to start faster")),
}

#: Megatron-LM flags of features mp does not have -> what to say when one is given
#: (`UNSUPPORTED_PREFIXES` covers whole families of them).
_FSDP = ("mp has no Megatron FSDP (--use-megatron-fsdp); --use-torch-fsdp2 shards parameters, "
         "gradients and optimizer state with PyTorch's FSDP2, --use-distributed-optimizer the "
         "optimizer state")
_FP8 = "mp has no FP8 training (Transformer Engine); use --bf16"
_RERUN = ("mp has no re-run engine: it never re-runs an iteration to check its result (a "
          "non-finite loss stops a bf16/fp32 run)")
_NVRX = ("mp has no local (NVRx) checkpoints; --save writes torch.distributed.checkpoint "
         "directories")
_FABRIC = ("mp's collectives are plain torch.distributed ones (NCCL with CUDA, gloo on the "
           "CPU), with no fabric-specific options")
_CONVERT = ("mp writes one checkpoint format; tools/convert_checkpoint.py converts Megatron-Core "
            "and Hugging Face checkpoints")


def _renamed(new: str) -> str:
    return f"Megatron-LM refuses this old flag too: use {new}"


UNSUPPORTED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("--use-megatron-fsdp", "--use-custom-fsdp",
                     "--fsdp-double-buffer", "--suggested-communication-unit-size",
                     "--enable-full-sharding-in-hsdp",
                     "--init-model-with-meta-device", "--no-strict-fsdp-dtensor-load"), _FSDP),
    **dict.fromkeys(("--no-fp8-wgrad", "--first-last-layers-bf16", "--num-layers-at-start-in-bf16",
                     "--num-layers-at-end-in-bf16", "--reuse-grad-buf-for-mxfp8-param-ag",
                     "--keep-fp8-transpose-cache"), _FP8),
    "--batch-size": _renamed("--micro-batch-size"),
    "--warmup": _renamed("--lr-warmup-iters, --lr-warmup-samples or --lr-warmup-fraction"),
    "--model-parallel-size": _renamed("--tensor-model-parallel-size"),
    "--checkpoint-activations": _renamed("--recompute-activations (selective), or "
                                         "--recompute-granularity full with --recompute-method"),
    "--yaml-cfg": "mp reads a YAML config with --config PATH (mp's own keys: see --help)",
    **dict.fromkeys(("--ckpt-convert-format", "--ckpt-convert-save",
                     "--ckpt-convert-update-legacy-dist-opt-format"), _CONVERT),
    **dict.fromkeys(("--non-persistent-local-ckpt-dir", "--non-persistent-local-ckpt-algo",
                     "--replication", "--replication-jump", "--replication-factor"), _NVRX),
    **dict.fromkeys(("--use-nccl-ub", "--disable-symmetric-registration", "--use-sharp",
                     "--sharp-enabled-group", "--use-ring-exchange-p2p"), _FABRIC),
    "--lazy-mpu-init": ("mp's job makes its process groups itself; it has no deferred start "
                        "for an outside DDP manager"),
    **dict.fromkeys(("--enable-cuda-graph", "--external-cuda-graph", "--te-rng-tracker"),
                    "mp has no CUDA graphs for training; --model.compile_layers compiles each "
                    "layer with torch.compile instead"),
    **dict.fromkeys(("--check-for-spiky-loss", "--check-for-large-grads",
                     "--error-injection-rate", "--error-injection-type",
                     "--result-rejected-tracker-filename"), _RERUN),
    "--dump-param-to-param-group-map": ("mp builds its optimizer's parameter groups itself "
                                        "(decay, no decay, --decoupled-lr)"),
    "--test-mode": "mp has no tests that run alongside training",
    "--config-logger-dir": ("mp prints the whole resolved config at the start of a job instead "
                            "(read back with --config)"),
    "--tokenizer-metadata": ("mp's tokenizers take --tokenizer-type and their files only "
                             "(docs/training.md)"),
    "--apply-residual-connection-post-layernorm": ("mp's layers add the residual from before "
                                                   "the norm (pre-norm, Megatron's default)"),
    "--use-legacy-models": "mp has one GPT, laid out as Megatron-Core's; drop the flag",
    "--use-tp-pp-dp-mapping": ("mp lays ranks out in Megatron's default order (TP fastest, then "
                               "CP, DP, PP); the TP-PP-DP order is not available"),
}
#: Flag-name prefixes of Megatron-LM feature families mp does not have -> what to say.
UNSUPPORTED_PREFIXES: dict[str, str] = {
    "--fp8": _FP8,
    "--fp4": "mp has no FP4 training (Transformer Engine); use --bf16",
    "--cuda-graph-": ("mp has no CUDA graphs for training; --model.compile_layers compiles each "
                      "layer with torch.compile instead"),
    "--muon-": ("mp's Muon has no such option: it has --muon-momentum, --muon-use-nesterov, "
                "--muon-num-ns-steps, --muon-coefficient-type, --muon-scale-mode, "
                "--muon-extra-scale-factor, --muon-fp32-matmul-prec, --muon-tp-mode, "
                "--muon-no-split-qkv (docs/training.md)"),
    "--heterogeneous-layers-": "mp's layers all have the same shape (one per model config)",
    "--moe-": ("mp's mixture of experts has no such option: it has --num-experts, "
               "--moe-router-topk, --moe-ffn-hidden-size, --moe-layer-freq, "
               "--moe-router-pre-softmax, "
               "--moe-router-load-balancing-type aux_loss|seq_aux_loss|global_aux_loss|none, "
               "--moe-aux-loss-coeff, --moe-z-loss-coeff, "
               "--moe-shared-expert-intermediate-size, --moe-shared-expert-gate, "
               "--moe-router-dtype, "
               "--moe-router-score-function softmax|sigmoid, --moe-router-topk-scaling-factor, "
               "--moe-router-enable-expert-bias, --moe-router-bias-update-rate, "
               "--moe-expert-capacity-factor, --moe-token-drop-policy probs|position, "
               "--moe-router-num-groups, --moe-router-group-topk, "
               "--moe-grouped-gemm, --expert-model-parallel-size (top-k routing, "
               "docs/training.md)"),
}
#: Megatron-LM flags that take values of which mp has some -> (the values mp has, why).
CHOICE_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "--rerun-mode": (("disabled",), _RERUN),
    "--data-parallel-sharding-strategy": (("no_shard",), _FSDP),
    "--pipeline-model-parallel-comm-backend": (("nccl",), _FABRIC),
    "--spec": (("local",), ("mp builds Megatron's local layers (--spec local); it takes no "
                            "spec module")),
    "--mid-level-dataset-surplus": (("0.005",), ("mp builds each blend member with Megatron's "
                                                 "default surplus of 0.005 "
                                                 "(mp.data.dataset_builder)")),
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
