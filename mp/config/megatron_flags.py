"""Megatron-LM's command-line flags as mp reads them: the tables `mp.config.overrides` parses
with.

- `ALIASES`: a flag -> the ``section.key`` it sets (most are the key's name with dashes);
  `MEGATRON_VALUES` translates some of their values.
- `CONSTANT_FLAGS`: value-less flags that set a key to a fixed value (``--bf16``).
- `DEFERRED_FLAGS`: flags resolved after every other override, since they read other keys
  (``--num-layers-per-virtual-pipeline-stage``, ``--ddp-bucket-size``, ...).

The flags mp accepts without effect or refuses, and the reasons the job gives, are
`mp.config.megatron_notices`'.
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
        "cp_comm_type", "hierarchical_context_parallel_sizes",
        "moe_router_topk", "moe_ffn_hidden_size", "moe_aux_loss_coeff",
        "moe_z_loss_coeff", "moe_router_load_balancing_type", "moe_layer_freq",
        "expert_model_parallel_size", "expert_tensor_parallel_size",
        "moe_shared_expert_intermediate_size", "moe_router_dtype", "moe_router_score_function",
        "moe_router_topk_scaling_factor", "moe_router_bias_update_rate", "moe_input_jitter_eps",
        "moe_router_force_load_balancing", "moe_apply_probs_on_input", "moe_per_layer_logging",
        "moe_expert_capacity_factor", "moe_token_drop_policy", "moe_router_num_groups",
        "moe_router_group_topk", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
        "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "mtp_num_layers",
        "mtp_loss_scaling_factor", "window_size", "window_attn_skip_freq", "rotary_interleaved",
        "qk_l2_norm", "no_rope_freq", "activation_func_clamp_value", "glu_linear_offset",
        "softmax_type", "yarn_original_max_position_embeddings", "yarn_beta_fast",
        "yarn_beta_slow", "fp8_recipe", "first_last_layers_bf16", "num_layers_at_start_in_bf16",
        "num_layers_at_end_in_bf16",
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
        "empty_unused_memory_level", "distributed_timeout_minutes", "use_tp_pp_dp_mapping",
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
        "optimizer_cpu_offload", "optimizer_offload_fraction",
    ),
    "data": (
        "data_path", "split", "tokenizer_type", "vocab_file", "merge_file", "tokenizer_model",
        "data_cache_path", "num_workers", "eod_mask_loss", "mock_data", "reset_position_ids",
        "reset_attention_mask", "vocab_size", "train_data_path", "valid_data_path",
        "test_data_path", "dataloader_type", "full_validation", "multiple_validation_sets",
        "data_args_path", "per_split_data_args_path", "sft", "sft_tokenizer_prompt_format",
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
ALIASES["--fp8-format"] = "model.fp8"
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
    "--cp-comm-type": ("mp takes one communication type for every layer (all_gather, a2a, "
                       "p2p or a2a+p2p), not one per layer"),
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
    "--no-fp8-wgrad": ("model.fp8_wgrad", "false"),
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

VIRTUAL_STAGE_FLAG = "--num-layers-per-virtual-pipeline-stage"
GROUP_QUERY_FLAG = "--group-query-attention"
NO_POSITION_EMBEDDING_FLAG = "--no-position-embedding"
BUCKET_SIZE_FLAG = "--ddp-bucket-size"
MOE_LAYER_RECOMPUTE_FLAG = "--moe-layer-recompute"
LIMITED_DEVICES_FLAG = "--moe-router-topk-limited-devices"

#: Flags resolved after every other override -> what they do (for --help).
DEFERRED_FLAGS: dict[str, str] = {
    VIRTUAL_STAGE_FLAG: ("model.virtual_pipeline_model_parallel_size = num_layers / "
                         "pipeline_model_parallel_size / N"),
    GROUP_QUERY_FLAG: "model.num_query_groups=1 unless given",
    NO_POSITION_EMBEDDING_FLAG: ("model.position_embedding_type=none unless it is rope"),
    BUCKET_SIZE_FLAG: ("training.bucket_size_mb = N elements x the gradient's bytes (4, or 2 "
                       "with grad_reduce_in_bf16) / 2^20"),
    MOE_LAYER_RECOMPUTE_FLAG: ("model.recompute_granularity=selective, 'moe' added to "
                               "model.recompute_modules (Megatron's deprecated spelling)"),
    LIMITED_DEVICES_FLAG: ("model.moe_router_num_groups = expert_model_parallel_size, "
                           "moe_router_group_topk = N, unless the group top-k is given "
                           "(Megatron's deprecated spelling)"),
}
