"""Megatron-LM command lines: its example scripts' flags as written, the flags that change
nothing in mp (accepted, with a notice) and those of features mp does not have (refused)."""

import os

import pytest
from test_config import CONFIGS, TINY, error_of, shipped

from mp.config import flag_notices, parse_args


def _gpt2_files(tmp_path) -> list[str]:
    """``--vocab-file``, ``--merge-file`` and ``--tokenizer-type`` for a two-token GPT-2 BPE
    vocabulary (the model's vocab_size comes from it)."""
    (tmp_path / "vocab.json").write_text('{"a": 0, "<|endoftext|>": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return ["--vocab-file", str(tmp_path / "vocab.json"), "--merge-file",
            str(tmp_path / "merges.txt"), "--tokenizer-type", "GPT2BPETokenizer"]


# Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh, its flags as written, without
# --rampup-batch-size, which Megatron itself refuses beside --train-iters.
MEGATRON_GPT3_175B = (
    "--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 "
    "--max-position-embeddings 2048 --attention-backend auto --micro-batch-size 1 "
    "--global-batch-size 1536 --train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9 "
    "--adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5 "
    "--lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000 "
    "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 "
    "--data-path corpus_text_document --split 949,50,1 --log-interval 100 "
    "--save-interval 10000 --eval-interval 1000 --save ckpt --load ckpt --eval-iters 10 "
    "--tensorboard-dir tb").split()


def test_megatron_gpt3_example_runs_without_a_config_file(tmp_path):
    cfg = parse_args(MEGATRON_GPT3_175B + _gpt2_files(tmp_path), world_size=256)
    m, t = cfg.model, cfg.training
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == \
        (96, 12288, 96, 96)
    assert (m.seq_length, m.max_position_embeddings, m.vocab_size) == (2048, 2048, 2)
    assert (m.attention_backend, m.precision, m.init_method_std) == ("sdpa", "fp16", 0.006)
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size) == (8, 16)
    assert cfg.num_microbatches(256) == 1536 // 2
    assert (t.lr, t.min_lr, t.train_iters, t.weight_decay) == (6e-5, 6e-6, 500000, 0.1)
    assert t.lr_schedule_steps == (pytest.approx(430.0, rel=1e-12), 430000, None)
    assert (t.save, t.load, t.save_interval, t.eval_interval, t.eval_iters) == \
        ("ckpt", "ckpt", 10000, 1000, 10)
    assert (cfg.data.data_path, cfg.data.split) == (["corpus_text_document"], "949,50,1")
    assert (cfg.logging.log_interval, cfg.logging.tensorboard_dir) == (100, "tb")


def test_llama_style_megatron_flags():
    """The flags of Megatron-LM's Llama recipes, on a shipped GPT-3 config."""
    m = shipped("gpt3-125m", "--disable-bias-linear", "--swiglu", "--normalization", "RMSNorm",
                "--norm-epsilon", "1e-6", "--use-rotary-position-embeddings",
                "--no-position-embedding", "--rotary-base", "500000", "--use-rope-scaling",
                "--rope-scaling-factor", "32",
                "--untie-embeddings-and-output-weights", "--group-query-attention",
                "--num-query-groups", "4", "--use-flash-attn", "--recompute-activations",
                "--distribute-saved-activations").model
    assert (m.add_bias_linear, m.activation, m.normalization, m.layernorm_epsilon) == \
        (False, "swiglu", "RMSNorm", 1e-6)
    assert (m.position_embedding_type, m.rotary_base) == ("rope", 500000.0)
    assert (m.use_rope_scaling, m.rope_scaling_factor) == (True, 32.0)
    assert (m.untie_embeddings_and_output_weights, m.num_query_groups) == (True, 4)
    assert (m.attention_backend, m.recompute_granularity) == ("sdpa", "selective")
    assert m.distribute_saved_activations is True
    assert shipped("gpt3-125m", "--layernorm-epsilon", "1e-6").model.layernorm_epsilon == 1e-6


@pytest.mark.parametrize("megatron, mp", [("auto", "sdpa"), ("flash", "sdpa"), ("fused", "sdpa"),
                                          ("local", "unfused"), ("unfused", "unfused"),
                                          ("sdpa", "sdpa")])
def test_attention_backend_takes_megatrons_names(megatron, mp):
    assert shipped("gpt-tiny", "--attention-backend", megatron).model.attention_backend == mp


# Megatron-LM's examples/llama/train_llama3_8b_h200_bf16.sh on mock data, its flags in its
# order as bash passes them (so --split keeps its quotes). Not here: its --save/--load/
# --tensorboard-dir/--data-cache-path paths (see LLAMA3_PATHS) and torchrun's arguments.
MEGATRON_LLAMA3_8B = (
    "--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 "
    "--num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128 "
    "--seq-length 8192 --max-position-embeddings 8192 --position-embedding-type rope "
    "--rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 "
    "--swiglu --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p "
    "--untie-embeddings-and-output-weights --disable-bias-linear "
    "--micro-batch-size 1 --global-batch-size 128 --train-samples 1953125000 "
    "--lr-decay-samples 1949218748 --lr-warmup-samples 3906252 --lr 0.00015 --min-lr 0.00001 "
    "--decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine --clip-grad 1.0 "
    "--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16 "
    "--cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc "
    "--empty-unused-memory-level 1 --exit-duration-in-mins 235 "
    "--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather "
    "--tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128256 --tiktoken-pattern v2 "
    "--split '99,1,0' --no-create-attention-mask-in-dataloader --no-mmap-bin-files "
    "--num-workers 1 --log-interval 1 --save-interval 1000 --log-throughput --profile "
    "--profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist "
    "--distributed-timeout-minutes 60 --wandb-project megatron-lm-training "
    "--wandb-exp-name llama3x-8b-bf16-tp1 --log-params-norm --log-num-zeros-in-grad "
    "--log-timers-to-tensorboard").split()
LLAMA3_PATHS = ["--save", "ckpt", "--load", "ckpt", "--tensorboard-dir", "tb",
                "--data-cache-path", "cache", "--wandb-save-dir", "ckpt/wandb"]


def test_megatron_llama3_example_runs_as_written():
    cfg = parse_args(MEGATRON_LLAMA3_8B + LLAMA3_PATHS, world_size=8)
    m, t, d, log = cfg.model, cfg.training, cfg.data, cfg.logging
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == \
        (32, 4096, 14336, 32)
    assert (m.num_query_groups, m.kv_channels, m.qkv_size) == (8, 128, 6144)
    assert (m.position_embedding_type, m.rotary_base, m.rotary_percent, m.rotary_dim) == \
        ("rope", 1e6, 1.0, 128)
    assert (m.normalization, m.layernorm_zero_centered_gamma) == ("LayerNorm", True)
    assert (m.activation, m.add_bias_linear, m.untie_embeddings_and_output_weights) == \
        ("swiglu", False, True)
    assert (m.precision, m.attention_backend, m.init_method_std) == ("bf16", "sdpa", 0.0134)
    assert m.vocab_size == 128257  # NullTokenizer: the ids below 128256, and its EOD
    assert (t.lr, t.min_lr, t.decoupled_lr, t.decoupled_min_lr) == (1.5e-4, 1e-5, 5e-4, 4.5e-5)
    assert t.lr_schedule_steps == (3906252, 1949218748, None)
    assert (t.calculate_per_token_loss, t.grad_reduce_in_bf16, t.manual_gc) == (True,) * 3
    assert (t.empty_unused_memory_level, t.distributed_timeout_minutes) == (1, 60.0)
    assert (t.use_distributed_optimizer, t.overlap_grad_reduce, t.overlap_param_gather) == \
        (True,) * 3
    assert cfg.num_microbatches(8) == 16
    assert (d.mock_data, d.tokenizer_type, d.vocab_size, d.mmap_bin_files, d.num_workers) == \
        (True, "NullTokenizer", 128256, False, 1)
    assert (log.profile, log.profile_step_start, log.profile_step_end) == (True, 4, 6)
    assert (log.log_params_norm, log.log_num_zeros_in_grad, log.wandb_project) == \
        (True, True, "megatron-lm-training")
    assert [line.split(" has no effect")[0] for line in flag_notices(MEGATRON_LLAMA3_8B)] == [
        "notice: --use-mcore-models", "notice: --tiktoken-pattern v2",
        "notice: --no-create-attention-mask-in-dataloader", "notice: --log-throughput",
        "notice: --ckpt-format torch_dist", "notice: --log-timers-to-tensorboard"]


def notices_of(argv: list[str]) -> list[str]:
    """The flags (and values) of the notices of ``argv``, a command line that parses."""
    parse_args(argv, world_size=4)
    return [line.split(" has no effect")[0] for line in flag_notices(argv)]


def test_flags_without_effect_say_why():
    argv = ["--config", TINY, "--transformer-impl", "local",
            "--attention-softmax-in-fp32", "--lr", "1e-3"]
    assert parse_args(argv, world_size=4).training.lr == 1e-3
    assert flag_notices(argv) == [
        ("notice: --transformer-impl local has no effect in mp: mp always runs its own layers "
        "(Megatron's local ones), not Transformer Engine's"),
        ("notice: --attention-softmax-in-fp32 has no effect in mp: mp's softmax always computes "
        "in fp32")]
    assert error_of("--ckpt-format") == "--ckpt-format needs a value"
    more = ["--config", TINY, "--use-dist-ckpt", "--auto-detect-ckpt-format",
            "--no-async-strategy", "--dist-ckpt-strictness", "assume_ok_unexpected",
            "--no-rope-fusion", "--apply-query-key-layer-scaling",
            "--cross-entropy-fusion-impl", "te", "--log-loss-scale-to-tensorboard"]
    assert notices_of(more) == [
        "notice: --use-dist-ckpt", "notice: --auto-detect-ckpt-format",
        "notice: --no-async-strategy", "notice: --dist-ckpt-strictness assume_ok_unexpected",
        "notice: --no-rope-fusion", "notice: --apply-query-key-layer-scaling",
        "notice: --cross-entropy-fusion-impl te", "notice: --log-loss-scale-to-tensorboard"]


@pytest.mark.parametrize("flags, message", [
    (["--fp8-param-gather"], ("--fp8-param-gather: mp's FP8 is --fp8-format e4m3|hybrid with "
     "--fp8-recipe tensorwise (the transformer layers' linears, each operand scaled by its own "
     "amax); it keeps no FP8 parameters and gathers none")),
    (["--moe-router-padding-for-fp8"],  # any --moe-* flag mp does not read
     "--moe-router-padding-for-fp8: mp's mixture of experts has no such option: it has "
     "--num-experts, --moe-router-topk, --moe-ffn-hidden-size, --moe-layer-freq, "
     "--moe-router-pre-softmax, "
     "--moe-router-load-balancing-type aux_loss|seq_aux_loss|global_aux_loss|none, "
     "--moe-aux-loss-coeff, --moe-z-loss-coeff, --moe-shared-expert-intermediate-size, "
     "--moe-shared-expert-gate, --moe-router-dtype, --moe-router-score-function softmax|sigmoid, "
     "--moe-router-topk-scaling-factor, --moe-router-enable-expert-bias, "
     "--moe-router-bias-update-rate, --moe-expert-capacity-factor, "
     "--moe-token-drop-policy probs|position, --moe-router-num-groups, "
     "--moe-router-group-topk, --moe-router-topk-limited-devices, --moe-input-jitter-eps, "
     "--moe-router-force-load-balancing, "
     "--moe-apply-probs-on-input, --moe-layer-recompute, --moe-per-layer-logging, "
     "--moe-grouped-gemm, "
     "--expert-model-parallel-size (top-k routing, docs/training.md)"),
    (["--use-megatron-fsdp"], ("--use-megatron-fsdp: mp has no Megatron FSDP "
                               "(--use-megatron-fsdp); --use-torch-fsdp2 shards parameters, "
                               "gradients and optimizer state with PyTorch's FSDP2, "
                               "--use-distributed-optimizer the optimizer state")),
    (["--data-parallel-sharding-strategy", "optim_grads"], (
        "--data-parallel-sharding-strategy optim_grads: mp has no Megatron FSDP "
        "(--use-megatron-fsdp); --use-torch-fsdp2 shards parameters, gradients and optimizer "
        "state with PyTorch's FSDP2, --use-distributed-optimizer the optimizer state; only "
        "no_shard is accepted")),
    (["--batch-size", "4"], ("--batch-size: Megatron-LM refuses this old flag too: use "
                             "--micro-batch-size")),
    (["--rerun-mode", "validate_results"], (
        "--rerun-mode validate_results: mp has no re-run engine: it never re-runs an iteration "
        "to check its result (a non-finite loss stops a bf16/fp32 run); only disabled is "
        "accepted")),
    (["--fp4-format", "e2m1"], "--fp4-format: mp has no FP4 training (Transformer Engine); use "
     "--bf16"),
    (["--spec", "my.specs", "layer_spec"], (
        "--spec my.specs layer_spec: mp builds Megatron's local layers (--spec local); it takes "
        "no spec module; only local is accepted")),
    (["--mid-level-dataset-surplus", "0.01"], (
        "--mid-level-dataset-surplus 0.01: mp builds each blend member with Megatron's default "
        "surplus of 0.005 (mp.data.dataset_builder); only 0.005 is accepted")),
    (["--cp-comm-type", "p2p", "a2a"], (
        "--cp-comm-type p2p a2a: mp takes one communication type for every layer (all_gather, "
        "a2a, p2p or a2a+p2p), not one per layer")),
    (["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff",
      "1e-2", "1e-3"], (
        "--moe-router-load-balancing-type aux_loss seq_aux_loss: mp takes one load-balancing "
        "type (aux_loss, seq_aux_loss, global_aux_loss or none), not several whose losses add "
        "up")),
    (["--moe-aux-loss-coeff", "1e-2", "1e-3"], (
        "--moe-aux-loss-coeff 1e-2 1e-3: mp takes one coefficient, that of its one "
        "--moe-router-load-balancing-type")),
    (["--apply-residual-connection-post-layernorm"], (
        "--apply-residual-connection-post-layernorm: mp's layers add the residual from before "
        "the norm (pre-norm, Megatron's default)")),
    (["--inprocess-restart"], ("--inprocess-restart: mp has no in-process restart "
                               "(nvidia-resiliency-ext): a failed job stops, and --save / "
                               "--load resume it")),
    (["--hybrid-override-pattern", "M-M*"], (
        "--hybrid-override-pattern: mp has no Mamba layers (Megatron's hybrid models): its "
        "layers are attention with an MLP or experts")),
    (["--is-hybrid-model"], ("--is-hybrid-model: mp has no Mamba layers (Megatron's hybrid "
                             "models): its layers are attention with an MLP or experts")),
    (["--muon-scalar-optimizer", "lion"], (
        "--muon-scalar-optimizer: mp's Muon has no such option: it has --muon-momentum, "
        "--muon-use-nesterov, --muon-num-ns-steps, --muon-coefficient-type, --muon-scale-mode, "
        "--muon-extra-scale-factor, --muon-fp32-matmul-prec, --muon-tp-mode, "
        "--muon-no-split-qkv (docs/training.md)")),
])
def test_flags_of_missing_features_are_refused(flags, message):
    assert error_of(*flags) == message


def test_context_parallel_size_joins_the_world_size_rule():
    """``--context-parallel-size`` sets the model's CP size; DP = world / (TP x PP x CP)."""
    cfg = shipped("gpt-tiny", "--context-parallel-size", "2", world_size=8)
    assert cfg.model.context_parallel_size == 2 and cfg.data_parallel_size(8) == 2
    assert error_of("--context-parallel-size", "2", world_size=6) == (
        "world_size=6 is not divisible by tensor_model_parallel_size x "
        "pipeline_model_parallel_size x context_parallel_size = 2 x 1 x 2 = 4")
    assert error_of("--context-parallel-size", "3", world_size=6) == (
        "seq_length=128 is not divisible by 2 x context_parallel_size=6")
    for kind in ("p2p", "a2a", "all_gather"):
        assert shipped("gpt-tiny", "--cp-comm-type", kind).model.cp_comm_type == kind
    assert error_of("--cp-comm-type", "ring") == (
        "cp_comm_type='ring' must be one of 'all_gather', 'a2a', 'p2p', 'a2a+p2p'")
    assert error_of("--context-parallel-size", "2", "--cp-comm-type", "p2p",
                    "--attention-dropout", "0.1") == (
        "cp_comm_type='p2p' needs attention_dropout=0, not 0.1: mp's ring attention has no "
        "dropout (all_gather and a2a have it)")
    # a2a hands each CP rank 1 / CP of the heads of its TP rank: gpt-tiny has 4 heads, TP 2
    assert error_of("--context-parallel-size", "4", "--cp-comm-type", "a2a",
                    world_size=8) == ("num_attention_heads=4 is not divisible by "
                                      "tensor_model_parallel_size x context_parallel_size "
                                      "(cp_comm_type='a2a')=8")


def test_profile_ranks_must_exist():
    assert error_of("--profile", "--profile-ranks", "0", "5", world_size=4) == (
        "logging.profile_ranks=[0, 5] names ranks [5] outside the world of 4 ranks")
    assert shipped("gpt-tiny", "--profile-ranks", "7").logging.profile_ranks == [7]  # not used


def test_model_flags_beyond_gpt3():
    m = shipped("gpt-tiny", "--qk-layernorm", "--squared-relu", "--kv-channels", "24",
                "--rotary-percent", "0.5", "--position-embedding-type", "rope",
                "--apply-layernorm-1p").model
    assert (m.qk_layernorm, m.activation, m.kv_channels, m.rotary_dim) == \
        (True, "squared_relu", 24, 12)
    assert m.layernorm_zero_centered_gamma is True
    assert shipped("gpt-tiny", "--openai-gelu").model.activation == "gelu_tanh"
    m = shipped("gpt-tiny", "--add-qkv-bias", "--disable-bias-linear").model
    assert (m.add_qkv_bias, m.add_bias_linear) == (True, False)
    assert error_of("--openai-gelu", "--swiglu") == \
        "--swiglu conflicts with --openai-gelu (both set model.activation)"


def test_recompute_modules_flag():
    """``--recompute-modules`` (Megatron-Core's) lists what selective recompute covers;
    ``core_attn`` alone by default; a module the model lacks, or one without selective
    recompute, is refused naming it."""
    model = shipped("gpt-tiny", "--recompute-activations", "--recompute-modules", "core_attn",
                    "mlp", "layernorm").model
    assert model.recompute_modules == ["core_attn", "mlp", "layernorm"]
    assert model.recomputes("layernorm") and not model.recomputes("moe_act")
    assert shipped("gpt-tiny", "--recompute-granularity", "selective"
                   ).model.recompute_modules == ["core_attn"]
    assert shipped("gpt-tiny").model.recompute_modules is None
    assert error_of("--recompute-modules", "mlp") == (
        "recompute_modules=['mlp'] needs recompute_granularity='selective', not None")
    assert error_of("--recompute-activations", "--recompute-modules", "attn") == (
        "recompute_modules entry='attn' must be one of 'core_attn', 'mlp', 'moe', "
        "'shared_experts', 'layernorm', 'moe_act', 'mla_up_proj'")
    assert error_of("--recompute-activations", "--recompute-modules", "mla_up_proj") == (
        "recompute_modules names 'mla_up_proj', which needs multi_latent_attention")
    assert error_of("--recompute-activations", "--recompute-modules", "moe_act") == (
        "recompute_modules names 'moe_act', which needs num_moe_experts (a mixture of experts)")
    assert error_of("--recompute-activations", "--recompute-modules", "mlp", "mlp") == (
        "recompute_modules=['mlp', 'mlp'] names a module twice")
    experts = ("--recompute-activations", "--num-experts", "4", "--sequence-parallel")
    assert error_of(*experts, "--recompute-modules", "moe", "moe_act") == (
        "recompute_modules=['moe', 'moe_act']: 'moe' recomputes the whole mixture-of-experts "
        "layer, 'moe_act' included; name one of them")
    assert error_of(*experts, "--recompute-modules", "mlp") == (
        "recompute_modules names 'mlp', which needs a layer without experts (every layer has "
        "them: 'moe' recomputes those)")
    # over a config file with full recompute: its method and layer count give way, unless the
    # command line gives them too
    model = shipped("deepseek-v3", "--recompute-activations", "--recompute-modules",
                    "layernorm", "moe_act", "mla_up_proj").model
    assert (model.recompute_granularity, model.recompute_method,
            model.recompute_num_layers) == ("selective", None, None)
    assert model.recompute_modules == ["layernorm", "moe_act", "mla_up_proj"]
    assert error_of("--recompute-activations", "--recompute-method", "block",
                    world_size=2048, path=os.path.join(CONFIGS, "deepseek-v3.yaml")) == (
        "recompute_method='block' needs recompute_granularity='full'")
    assert error_of("--recompute-activations", "--recompute-modules", "layernorm",
                    "--model.compile_layers", "true") == (
        "recompute_modules ['layernorm'] free their outputs' storage, which torch.compile "
        "cannot trace: they need compile_layers=False")


def test_what_mp_does_anyway_is_accepted():
    """``--optimizer adam`` is mp's own behaviour; flags that change nothing here are
    accepted with a notice each."""
    argv = ["--config", TINY, "--optimizer", "adam", "--recompute-activations",
            "--recompute-modules", "core_attn", "--tp-comm-overlap",
            "--no-gradient-accumulation-fusion", "--timing-log-level", "2"]
    cfg = parse_args(argv, world_size=4)
    assert cfg.model.recompute_granularity == "selective"
    assert [line.split(" has no effect")[0] for line in flag_notices(argv)] == [
        "notice: --tp-comm-overlap", "notice: --no-gradient-accumulation-fusion",
        "notice: --timing-log-level 2"]


def test_xavier_init_interpolated_rope_and_warmup_init_flags():
    cfg = parse_args(["--config", TINY, "--init-method-xavier-uniform",
                      "--position-embedding-type", "rope",
                      "--rotary-seq-len-interpolation-factor", "4", "--lr-warmup-init", "1e-5"],
                     world_size=4)
    assert cfg.model.init_method_xavier_uniform
    assert cfg.model.rotary_seq_len_interpolation_factor == 4.0
    assert cfg.training.lr_warmup_init == 1e-5


@pytest.mark.parametrize("flags, expected", [
    (["--no-position-embedding"], "none"),  # Megatron's NoPE: no table, no rotation
    (["--use-rotary-position-embeddings", "--no-position-embedding"], "rope"),
    (["--position-embedding-type", "none"], "none")])
def test_no_position_embedding(flags, expected):
    assert parse_args(["--config", TINY, *flags], world_size=4).model.position_embedding_type \
        == expected


def test_position_embedding_type_yarn_is_rope_with_yarn_frequencies():
    """Megatron-Core's GPTModel takes ``position_embedding_type='yarn'`` (YaRN's rotary
    embedding), which mp spells ``rope`` + ``rope_type yarn``."""
    model = parse_args(["--config", TINY, "--position-embedding-type", "yarn",
                        "--rotary-scaling-factor", "4",
                        "--yarn-original-max-position-embeddings", "64"], world_size=4).model
    assert (model.position_embedding_type, model.rope_type) == ("rope", "yarn")
    assert model.yarn_arguments["factor"] == 4.0
    model = parse_args(["--config", TINY, "--position-embedding-type", "rope"],
                       world_size=4).model
    assert (model.position_embedding_type, model.rope_type) == ("rope", "rope")


@pytest.mark.parametrize("bf16", [False, True])
def test_ddp_bucket_size_counts_elements(bf16):
    """Megatron's ``--ddp-bucket-size`` is gradient elements per bucket; the job's buckets hold
    ``bucket_size_mb x 2^20 / (gradient bytes)`` elements: the same count."""
    flags = ["--config", TINY, "--ddp-bucket-size", "1000003"]
    flags += ["--bf16", "--grad-reduce-in-bf16"] if bf16 else []
    tr = parse_args(flags, world_size=4).training
    assert int(tr.bucket_size_mb * 2**20 / (2 if bf16 else 4)) == 1000003
    assert error_of("--ddp-bucket-size", "0") == "--ddp-bucket-size=0 must be >= 1 (elements " \
        "per bucket)"


def test_dataloader_type_and_data_sharding():
    """Megatron's ``--dataloader-type`` (``single`` or ``cyclic``) and ``--no-data-sharding``;
    ``external`` (a user's own iterator) has no place in mp's job."""
    data = parse_args(["--config", TINY], world_size=4).data
    assert (data.dataloader_type, data.data_sharding) == ("single", True)
    data = parse_args(["--config", TINY, "--dataloader-type", "cyclic", "--no-data-sharding"],
                      world_size=4).data
    assert (data.dataloader_type, data.data_sharding) == ("cyclic", False)
    assert error_of("--dataloader-type", "external").startswith(
        "data.dataloader_type='external' hands Megatron a data iterator of the user's own")
    assert error_of("--dataloader-type", "random") == (
        "data.dataloader_type='random' must be one of 'single', 'cyclic'")


# The MoE part of a Megatron-LM script for Qwen3-30B-A3B (slime's scripts/models), as
# written: the layer pattern quoted twice, as bash hands it over.
QWEN3_30B_A3B_MOE = [
    "--moe-ffn-hidden-size", "768", "--moe-router-score-function", "softmax",
    "--moe-token-dispatcher-type", "alltoall", "--moe-router-topk", "8",
    "--moe-layer-freq", "'([1]*48)'", "--num-experts", "128", "--moe-grouped-gemm",
    "--moe-token-drop-policy", "probs", "--moe-router-dtype", "fp32", "--moe-permute-fusion",
    "--moe-aux-loss-coeff", "0"]


def test_a_qwen3_moe_script_parses_as_written():
    argv = ["--config", TINY, "--num-layers", "48", *QWEN3_30B_A3B_MOE]
    m = parse_args(argv, world_size=4).model
    assert (m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size, m.moe_router_dtype,
            m.moe_layer_freq, m.moe_grouped_gemm, m.moe_token_drop_policy,
            m.moe_expert_capacity_factor) == (128, 8, 768, "fp32", [1] * 48, True, "probs",
                                               None)
    assert [line.split(" has no effect")[0] for line in flag_notices(argv)] == [
        "notice: --moe-token-dispatcher-type alltoall", "notice: --moe-permute-fusion"]


def test_mixture_of_experts_flags():
    """The MoE flags of Megatron-LM's examples/mixtral script (and the rest of mp's): the
    model's fields (the grouped GEMM too); the dispatcher choice changes nothing, with a
    notice."""
    argv = ["--config", TINY, "--tensor-model-parallel-size", "1", "--num-experts", "8",
            "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
            "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm",
            "--moe-token-dispatcher-type", "alltoall", "--expert-model-parallel-size", "4",
            "--moe-ffn-hidden-size", "96", "--moe-layer-freq", "2", "--moe-z-loss-coeff",
            "1e-3", "--moe-router-pre-softmax", "--expert-tensor-parallel-size", "1",
            "--moe-expert-capacity-factor", "1.25", "--moe-token-drop-policy", "position",
            "--moe-pad-expert-input-to-capacity", "--moe-router-num-groups", "2",
            "--moe-router-group-topk", "1"]
    m = parse_args(argv, world_size=4).model
    assert (m.moe_expert_capacity_factor, m.moe_token_drop_policy) == (1.25, "position")
    assert (m.moe_router_num_groups, m.moe_router_group_topk) == (2, 1)
    assert (m.num_moe_experts, m.moe_router_topk, m.moe_router_load_balancing_type,
            m.moe_aux_loss_coeff, m.expert_model_parallel_size, m.moe_ffn_hidden_size,
            m.moe_layer_freq, m.moe_z_loss_coeff, m.moe_router_pre_softmax,
            m.expert_tensor_parallel_size, m.moe_grouped_gemm) == (
        8, 2, "aux_loss", 1e-2, 4, 96, 2, 1e-3, True, 1, True)
    assert [line.split(" has no effect")[0] for line in flag_notices(argv)] == [
        "notice: --moe-token-dispatcher-type alltoall",
        "notice: --moe-pad-expert-input-to-capacity"]
    patterned = parse_args(["--config", TINY, "--num-layers", "4", "--num-experts", "4",
                            "--moe-layer-freq", "([0]*1+[1]*3)"], world_size=4).model
    assert patterned.moe_layer_freq == [0, 1, 1, 1]  # Megatron's expression, read without eval
    assert [patterned.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    windowed = parse_args(["--config", TINY, "--num-layers", "4", "--window-size", "(4, 0)",
                           "--window-attn-skip-freq", "([1]*3+[0])"], world_size=4).model
    assert (windowed.window_size, windowed.window_attn_skip_freq) == ([4, 0], [1, 1, 1, 0])
    assert parse_args(["--config", TINY, "--window-size", "4,0", "--window-attn-skip-freq",
                       "2"], world_size=4).model.attention_window(2) is None
    assert error_of("--num-layers", "4", "--num-experts", "4", "--moe-layer-freq",
                    "[1,0]") == ("moe_layer_freq=[1, 0] must hold a 0 (dense) or 1 (MoE) "
                                 "for each of the num_layers=4 layers")
    deepseek = parse_args(["--config", TINY, "--num-experts", "8", "--moe-router-topk", "4",
                           "--moe-router-score-function", "sigmoid",
                           "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
                           "1e-3", "--moe-router-topk-scaling-factor", "2.5"],
                          world_size=4).model  # DeepSeek-V3's routing flags
    assert (deepseek.moe_router_score_function, deepseek.moe_router_enable_expert_bias,
            deepseek.moe_router_bias_update_rate, deepseek.moe_router_topk_scaling_factor) \
        == ("sigmoid", True, 1e-3, 2.5)
    assert error_of("--num-experts", "8", "--moe-router-enable-expert-bias") == (
        "moe_router_enable_expert_bias=True needs moe_router_score_function='sigmoid' (mp's "
        "expert bias)")
    assert error_of("--tensor-model-parallel-size", "1", "--num-experts", "8",
                    "--expert-model-parallel-size", "8", world_size=4) == (
        "model.expert_model_parallel_size=8 x expert_tensor_parallel_size=1 does not divide "
        "tensor_model_parallel_size=1 x data_parallel_size=4 x context_parallel_size=1 "
        "(world_size=4): the experts are laid out over a stage's TP x DP x CP ranks")


def test_megatron_spellings_and_aliases():
    """Megatron's current spellings: the encoder aliases of GPT's layers and sequence (Megatron
    copies them), ``--persistent-save-interval``, ``--no-overlap-p2p-communication`` and
    ``--cp-comm-type allgather``; a list flag with one value is that value."""
    cfg = shipped("gpt-tiny", "--encoder-num-layers", "3", "--encoder-seq-length", "64",
                  "--persistent-save-interval", "7", "--overlap-p2p-communication",
                  "--no-overlap-p2p-communication", "--cp-comm-type", "allgather",
                  "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff",
                  "1e-3")
    m = cfg.model
    assert (m.num_layers, m.seq_length, cfg.training.save_interval) == (3, 64, 7)
    assert (m.overlap_p2p_comm, m.cp_comm_type) == (False, "all_gather")
    assert (m.moe_router_load_balancing_type, m.moe_aux_loss_coeff) == ("seq_aux_loss", 1e-3)
    assert shipped("gpt-tiny", "--overlap-p2p-communication").model.overlap_p2p_comm is True


def test_more_flags_without_effect():
    """Flags that change nothing in mp, and values that are what mp does anyway (accepted
    silently, as ``--optimizer adam``)."""
    argv = ["--config", TINY, "--local-rank", "3", "--no-log-loss-scale-to-tensorboard",
            "--high-priority-stream-groups", "dp", "ep", "--no-ckpt-fully-parallel-save",
            "--disable-tp-comm-split-ag", "--timing-log-option", "max", "--rerun-mode",
            "disabled", "--data-parallel-sharding-strategy", "no_shard",
            "--pipeline-model-parallel-comm-backend", "nccl", "--spec", "local",
            "--mid-level-dataset-surplus", "5e-3", "--high-priority-stream-groups"]
    assert notices_of(argv) == [
        "notice: --local-rank 3", "notice: --no-log-loss-scale-to-tensorboard",
        "notice: --high-priority-stream-groups dp ep", "notice: --no-ckpt-fully-parallel-save",
        "notice: --disable-tp-comm-split-ag", "notice: --timing-log-option max",
        "notice: --high-priority-stream-groups"]
    assert flag_notices(["--no-log-loss-scale-to-tensorboard"]) == [
        "notice: --no-log-loss-scale-to-tensorboard has no effect in mp: TensorBoard always "
        "gets the loss scale (loss-scale); mp has no switch to leave it out"]


def test_monitoring_and_scheduling_flags_are_accepted_with_a_reason():
    """Megatron's straggler detector, job telemetry, fault-tolerance package, energy and logger
    level, and flags that change when work happens but not its result."""
    argv = ["--config", TINY, "--log-straggler", "--straggler-minmax-count", "2",
            "--one-logger-project", "p", "--app-tag-run-version", "1.0", "--enable-ft-package",
            "--log-energy", "--logging-level", "20", "--ddp-average-in-collective",
            "--defer-embedding-wgrad-compute", "--wgrad-deferral-limit", "2", "--lr", "2e-3"]
    assert parse_args(argv, world_size=4).training.lr == 2e-3
    assert notices_of(argv) == [
        "notice: --log-straggler", "notice: --straggler-minmax-count 2",
        "notice: --one-logger-project p", "notice: --app-tag-run-version 1.0",
        "notice: --enable-ft-package", "notice: --log-energy", "notice: --logging-level 20",
        "notice: --ddp-average-in-collective", "notice: --defer-embedding-wgrad-compute",
        "notice: --wgrad-deferral-limit 2"]
    assert flag_notices(["--ddp-average-in-collective"]) == [
        "notice: --ddp-average-in-collective has no effect in mp: mp scales the gradients by "
        "1/DP before it sums them over the data-parallel ranks: the same mean as averaging in "
        "the collective"]
    assert error_of("--logging-level") == "--logging-level needs a value"


def test_a_bad_flag_value_is_one_error_line(tmp_path, capsys):
    """A Hugging Face tokenizer without its file names the missing flag; a file its library
    cannot read is named too; neither shows a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tokenizer-type", "HuggingFaceTokenizer"], world_size=1, prog="p")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "p: error: model.vocab_size is not set, so it is read from the tokenizer "
        "(HuggingFaceTokenizer), which could not be built: tokenizer_type="
        "'HuggingFaceTokenizer' needs tokenizer_model (Megatron's --tokenizer-model)\n")
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                    str(tmp_path)], world_size=1, prog="p")
    err = capsys.readouterr().err
    assert err.startswith(f"p: error: model.vocab_size is not set, so it is read from the "
                          f"tokenizer (HuggingFaceTokenizer), which could not be built: "
                          f"tokenizer_model='{tmp_path / 'tokenizer.json'}' could not be read: ")
    assert "Traceback" not in err and err.count("\n") == 1


def test_any_config_exception_is_one_error_line(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("a library's own error")

    monkeypatch.setattr("mp.config.cli.load_config", broken)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--lr", "1"], world_size=1, prog="p")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "p: error: RuntimeError: a library's own error\n"
