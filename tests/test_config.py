"""Job configs: the shipped YAML files against the GPT-3 paper's Table 2.1, overrides, the
rules and their exact messages, and round trips through plain data and YAML."""

import glob
import math
import os

import pytest
import torch

from mp.config import (
    ConfigError,
    JobConfig,
    format_config,
    help_text,
    load_config,
    parse_args,
    resolve_world_size,
)
from mp.config.coerce import coerce

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TINY = os.path.join(CONFIGS, "gpt-tiny.yaml")

# Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1, as printed:
# file -> (n_params, n_layers, d_model, n_heads, d_head, batch size in tokens, learning rate).
TABLE_2_1 = {
    "gpt3-125m": (125e6, 12, 768, 12, 64, "0.5M", 6.0e-4),
    "gpt3-350m": (350e6, 24, 1024, 16, 64, "0.5M", 3.0e-4),
    "gpt3-760m": (760e6, 24, 1536, 16, 96, "0.5M", 2.5e-4),
    "gpt3-1.3b": (1.3e9, 24, 2048, 24, 128, "1M", 2.0e-4),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 80, "1M", 1.6e-4),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 128, "2M", 1.2e-4),
    "gpt3-13b": (13.0e9, 40, 5140, 40, 128, "2M", 1.0e-4),
    "gpt3-175b": (175.0e9, 96, 12288, 96, 128, "3.2M", 0.6e-4),
}
# The batch in sequences of 2048 tokens, as Megatron's GPT-3 recipes read the table.
BATCH_SEQUENCES = {"0.5M": 256, "1M": 512, "2M": 1024, "3.2M": 1536}
# Two rows contradict themselves (d_model != n_heads x d_head); the configs keep d_head and
# fix the other: XL keeps d_model 2048 (16 heads), 13B keeps 40 heads (d_model 5120).
INCONSISTENT_ROWS = {"gpt3-1.3b": {"num_attention_heads": 16}, "gpt3-13b": {"hidden_size": 5120}}
# The world size each shipped config is laid out for (written in each file's header).
INTENDED_WORLD_SIZE = {
    "gpt-tiny": 4,
    "gpt3-125m": 8,
    "gpt3-350m": 8,
    "gpt3-760m": 8,
    "gpt3-1.3b": 8,
    "gpt3-2.7b": 16,
    "gpt3-6.7b": 32,
    "gpt3-13b": 64,
    "gpt3-175b": 1024,
    "llama3-8b": 8,
    "llama3-70b": 64,
    "mixtral-8x7b": 64,
    "deepseek-v3": 2048,
    "gpt-oss-20b": 8,
    "gpt-oss-120b": 64,
}


def shipped(name: str, *overrides: str, world_size: int | None = None) -> JobConfig:
    world_size = INTENDED_WORLD_SIZE[name] if world_size is None else world_size
    return load_config(os.path.join(CONFIGS, f"{name}.yaml"), overrides, world_size)


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- the shipped configs -------------------------------------------------------------------


def test_every_shipped_config_is_listed():
    names = {os.path.basename(p)[: -len(".yaml")] for p in glob.glob(f"{CONFIGS}/*.yaml")}
    assert names == set(INTENDED_WORLD_SIZE)


@pytest.mark.parametrize("name", sorted(INTENDED_WORLD_SIZE))
def test_shipped_config_loads_at_its_world_size(name):
    cfg = shipped(name)
    world = INTENDED_WORLD_SIZE[name]
    m = cfg.model
    dp = world // (m.tensor_model_parallel_size * m.pipeline_model_parallel_size)
    assert cfg.data_parallel_size(world) == dp
    assert cfg.num_microbatches(world) * cfg.training.micro_batch_size * dp == \
        cfg.training.global_batch_size


def test_tiny_config_takes_the_byte_level_vocabulary():
    cfg = shipped("gpt-tiny")
    assert cfg.model.vocab_size == 256 + 1  # the bytes and the end-of-document id
    assert cfg.model.padded_vocab_size == 288  # 257 up to a multiple of 16 x TP 2
    assert (cfg.model.tensor_model_parallel_size, cfg.data_parallel_size(4)) == (2, 2)
    assert cfg.data.data_path == ["builtin"]
    assert cfg.model.precision == "fp32"


@pytest.mark.parametrize("name", sorted(TABLE_2_1))
def test_gpt3_config_matches_table_2_1(name):
    _, layers, d_model, heads, d_head, batch, lr = TABLE_2_1[name]
    expected = {"num_layers": layers, "hidden_size": d_model, "num_attention_heads": heads,
                **INCONSISTENT_ROWS.get(name, {})}
    cfg = shipped(name)
    m, t = cfg.model, cfg.training
    assert {k: getattr(m, k) for k in expected} == expected
    assert m.kv_channels == d_head
    assert (m.seq_length, m.vocab_size, cfg.data.tokenizer_type) == (2048, 50257,
                                                                      "GPT2BPETokenizer")
    assert m.precision == "bf16"
    assert t.global_batch_size == BATCH_SEQUENCES[batch]
    assert t.lr == lr
    assert t.min_lr == pytest.approx(lr / 10)  # cosine decay to 10% (paper, appendix B)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.clip_grad, t.weight_decay) == \
        (0.9, 0.95, 1e-8, 1.0, 0.1)
    tokens_per_iteration = t.global_batch_size * 2048
    assert t.train_iters == math.ceil(300e9 / tokens_per_iteration)
    assert t.lr_warmup_iters == math.ceil(375e6 / tokens_per_iteration)
    assert t.lr_decay_iters == math.ceil(260e9 / tokens_per_iteration)


def test_inconsistent_table_rows_are_really_inconsistent():
    for name in INCONSISTENT_ROWS:
        _, _, d_model, heads, d_head, _, _ = TABLE_2_1[name]
        assert d_model != heads * d_head


@pytest.mark.parametrize("name", sorted(TABLE_2_1))
def test_gpt3_parameter_count_is_within_2_percent_of_its_name(name):
    cfg = shipped(name)
    l, h = cfg.model.num_layers, cfg.model.hidden_size
    v, s = cfg.model.padded_vocab_size, cfg.model.seq_length
    params = 12 * l * h * h + 13 * l * h + (v + s) * h + 2 * h
    assert abs(params - TABLE_2_1[name][0]) <= 0.02 * TABLE_2_1[name][0]


# --- overrides -----------------------------------------------------------------------------


def test_dotted_overrides_set_any_key_with_its_type():
    cfg = shipped("gpt-tiny", "--training.lr", "3e-4", "--model.hidden_size=256",
                  "--training.micro-batch-size", "2", "--logging.tensorboard_dir", "tb",
                  "--training.save", "ckpt", "--training.save", "null",
                  "--model.sequence_parallel", "--data.eod_mask_loss", "false")
    assert cfg.training.lr == 3e-4 and isinstance(cfg.training.lr, float)
    assert cfg.model.hidden_size == 256 and cfg.model.ffn_hidden_size == 4 * 256
    assert cfg.training.micro_batch_size == 2
    assert cfg.logging.tensorboard_dir == "tb"
    assert cfg.training.save is None  # the later override wins
    assert cfg.model.sequence_parallel is True
    assert cfg.data.eod_mask_loss is False


def test_megatron_flags_set_their_keys():
    cfg = shipped(
        "gpt3-125m", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--num-layers", "24", "--num-layers-per-virtual-pipeline-stage", "3",
        "--sequence-parallel", "--micro-batch-size", "2", "--global-batch-size", "64",
        "--lr", "1e-4", "--min-lr=1e-5", "--lr-decay-style", "linear", "--train-iters", "100",
        "--lr-warmup-iters", "10", "--lr-decay-iters", "90", "--seed", "7", "--fp16",
        "--recompute-granularity", "full", "--recompute-method", "uniform",
        "--recompute-num-layers", "1", "--hidden-dropout", "0", "--attention-dropout", "0.05",
        "--use-distributed-optimizer", "--save", "out", "--load", "in", "--save-interval", "50",
        "--eval-interval", "25", "--eval-iters", "3", "--log-interval", "5",
        "--tensorboard-dir", "tb", "--make-vocab-size-divisible-by", "64", "--normalization",
        "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--init-method-std", "0.01",
        "--untie-embeddings-and-output-weights", "--split", "98,2,0", "--tokenizer-type",
        "ByteLevelTokenizer", "--weight-decay", "0.01", "--clip-grad", "0.5",
        world_size=16,
    )
    m, t = cfg.model, cfg.training
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.num_layers) == \
        (2, 2, 24)
    assert m.virtual_pipeline_model_parallel_size == 24 // 2 // 3
    assert m.sequence_parallel and m.untie_embeddings_and_output_weights
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == \
        ("full", "uniform", 1)
    assert (m.hidden_dropout, m.attention_dropout, m.init_method_std) == (0.0, 0.05, 0.01)
    assert (m.precision, m.normalization, m.activation, m.position_embedding_type) == \
        ("fp16", "RMSNorm", "swiglu", "rope")
    assert m.make_vocab_size_divisible_by == 64
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.seed) == (2, 64, 100, 7)
    assert (t.lr, t.min_lr, t.lr_decay_style, t.lr_warmup_iters, t.lr_decay_iters) == \
        (1e-4, 1e-5, "linear", 10, 90)
    assert (t.weight_decay, t.clip_grad, t.use_distributed_optimizer) == (0.01, 0.5, True)
    assert (t.save, t.load, t.save_interval, t.eval_interval, t.eval_iters) == \
        ("out", "in", 50, 25, 3)
    assert (cfg.logging.log_interval, cfg.logging.tensorboard_dir) == (5, "tb")
    assert (cfg.data.split, cfg.data.tokenizer_type) == ("98,2,0", "ByteLevelTokenizer")
    assert cfg.num_microbatches(16) == 64 // (2 * 4)


def test_more_megatron_flags():
    cfg = shipped("gpt3-125m", "--hidden-size", "1024", "--num-attention-heads", "16",
                  "--ffn-hidden-size", "2048", "--seq-length", "1024",
                  "--max-position-embeddings", "4096", "--vocab-file", "v.json",
                  "--merge-file", "m.txt", "--data-cache-path", "cache", "--num-workers", "1",
                  "--eod-mask-loss", "--adam-beta1", "0.8", "--adam-beta2", "0.99",
                  "--adam-eps", "1e-6", "--loss-scale", "1024", "--overlap-grad-reduce", "false")
    m, t, d = cfg.model, cfg.training, cfg.data
    assert (m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (1024, 16, 2048)
    assert (m.seq_length, m.max_position_embeddings) == (1024, 4096)
    assert (d.vocab_file, d.merge_file, d.data_cache_path, d.num_workers, d.eod_mask_loss) == \
        ("v.json", "m.txt", "cache", 1, True)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.loss_scale) == (0.8, 0.99, 1e-6, 1024.0)
    assert t.overlap_grad_reduce is False


def test_grouped_query_attention_flags():
    """As in Megatron, --group-query-attention alone is multi-query attention (one group);
    --num-query-groups gives the count on either side of it, or alone."""
    groups = [shipped("gpt3-125m", *args).model.num_query_groups for args in (
        (), ("--group-query-attention",), ("--group-query-attention", "--num-query-groups", "4"),
        ("--num-query-groups", "4", "--group-query-attention"), ("--num-query-groups", "2"))]
    assert groups == [12, 1, 4, 4, 2]


@pytest.mark.parametrize("flag, precision", [("--bf16", "bf16"), ("--fp16", "fp16")])
def test_precision_flags(flag, precision):
    assert shipped("gpt-tiny").model.precision == "fp32"
    assert shipped("gpt-tiny", flag).model.precision == precision
    assert shipped("gpt-tiny", flag, flag).model.precision == precision


def _fusions(*args) -> tuple[bool, ...]:
    m = shipped("gpt-tiny", *args).model
    return (m.bias_dropout_fusion, m.bias_activation_fusion, m.cross_entropy_loss_fusion,
            m.masked_softmax_fusion, m.compile_layers)


def test_fusion_flags():
    assert _fusions() == (True, True, True, True, False)
    assert _fusions("--no-bias-dropout-fusion", "--no-bias-gelu-fusion",
                    "--no-cross-entropy-loss-fusion", "--no-masked-softmax-fusion",
                    "--model.compile_layers", "true") == (False, False, False, False, True)
    # Megatron has a flag per activation; both turn off mp's one switch, alone or together
    assert _fusions("--no-bias-swiglu-fusion")[1] is False
    assert _fusions("--no-bias-gelu-fusion", "--no-bias-swiglu-fusion")[1] is False


def test_data_path_takes_several_values():
    cfg = shipped("gpt-tiny", "--data-path", "0.3", "a", "0.7", "b", "--lr", "2e-3")
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.training.lr == 2e-3
    assert shipped("gpt-tiny", "--data.data_path=one").data.data_path == ["one"]


def test_world_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resolve_world_size() == 8
    assert resolve_world_size(2) == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError) as error:
        load_config(TINY)
    assert str(error.value) == ("world_size=3 is not divisible by tensor_model_parallel_size x "
                                "pipeline_model_parallel_size = 2 x 1 = 2")


# --- errors, each with its exact message ---------------------------------------------------


def error_of(*args, world_size: int = 4, path: str = TINY) -> str:
    with pytest.raises(ValueError) as error:
        load_config(path, args, world_size)
    return str(error.value)


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "c.yaml", f"base: {TINY}\ntraining:\n  lr_warmup_iter: 5\n")
    assert error_of(path=path) == (f"{path}: unknown key 'training.lr_warmup_iter'; "
                                   "did you mean 'training.lr_warmup_iters'?")
    path = write(tmp_path, "d.yaml", f"base: {TINY}\ntraining:\n  hidden_size: 64\n")
    assert error_of(path=path) == (f"{path}: unknown key 'training.hidden_size'; "
                                   "did you mean 'model.hidden_size'?")
    path = write(tmp_path, "e.yaml", f"base: {TINY}\ntrain:\n  lr: 0.1\n")
    assert error_of(path=path) == f"{path}: unknown section 'train'; did you mean 'training'?"
    path = write(tmp_path, "f.yaml", f"base: {TINY}\nlogging:\n  qxqxqxqx: 1\n")
    assert error_of(path=path) == f"{path}: unknown key 'logging.qxqxqxqx'"


# (overrides of gpt-tiny, world size, the exact message)
COMMAND_LINE_ERRORS = [
    # unknown options and wrong types
    (["--lr-warmup-iter", "5"], 4,
     "unknown option '--lr-warmup-iter'; did you mean '--lr-warmup-iters'?"),
    (["--tensor-parallel-size", "2"], 4,
     "unknown option '--tensor-parallel-size'; did you mean '--tensor-model-parallel-size'?"),
    (["--training.lr_warmup_iter", "5"], 4,
     "unknown option '--training.lr_warmup_iter'; did you mean '--training.lr_warmup_iters'?"),
    (["--training.hidden_size", "5"], 4,
     "unknown option '--training.hidden_size'; did you mean '--model.hidden_size'?"),
    (["lr", "5"], 4, ("unexpected argument 'lr': overrides are --section.key VALUE, "
     "--section.key=VALUE or a Megatron flag such as --lr 3e-4")),
    (["--micro-batch-size", "abc"], 4, "training.micro_batch_size='abc' must be an int"),
    (["--training.micro_batch_size=2.5"], 4, "training.micro_batch_size='2.5' must be an int"),
    (["--lr", "fast"], 4, "training.lr='fast' must be a number"),
    (["--sequence-parallel", "maybe"], 4, "model.sequence_parallel='maybe' must be true or false"),
    (["--lr-decay-iters", "x"], 4, "training.lr_decay_iters='x' must be an int or null"),
    (["--num-layers-per-virtual-pipeline-stage", "two"], 4,
     "--num-layers-per-virtual-pipeline-stage='two' must be an int"),
    (["--lr"], 4, "--lr needs a value"),
    (["--bf16=yes"], 4, "--bf16 takes no value, got 'yes'"),
    (["--bf16", "--fp16"], 4, "--fp16 conflicts with --bf16 (both set model.precision)"),
    (["--cross-entropy-loss-fusion", "--no-cross-entropy-loss-fusion"], 4,
     "--no-cross-entropy-loss-fusion conflicts with --cross-entropy-loss-fusion (both set "
     "model.cross_entropy_loss_fusion)"),
    (["--use-checkpoint-args"], 4,
     "training.use_checkpoint_args=true needs training.load (the checkpoint whose model "
     "arguments the run takes)"),
    (["--use-rope-scaling"], 4,
     "use_rope_scaling=True scales rotary embeddings; position_embedding_type="
     "'learned_absolute'"),
    (["--finetune"], 4,
     "training.finetune=true needs training.load (the checkpoint whose weights the run starts "
     "from)"),
    (["--position-embedding-type", "alibi"], 4,
     "position_embedding_type='alibi' must be one of 'learned_absolute', 'rope', 'none'"),
    (["--lr-warmup-fraction", "0.1"], 4,
     "training.lr_warmup_fraction=0.1 and training.lr_warmup_iters=30 both set the warm-up, as "
     "Megatron-LM forbids: set one (--lr-warmup-iters 0 clears the count)"),
    (["--lr-warmup-iters", "0", "--lr-warmup-fraction", "1.5"], 4,
     "training.lr_warmup_fraction=1.5 must be in [0, 1]"),
    # the parallel layout and the batch
    (["--tensor-model-parallel-size", "8"], 8,
     "num_attention_heads=4 is not divisible by tensor_model_parallel_size=8"),
    (["--num-query-groups", "3"], 4,
     "num_attention_heads=4 is not divisible by num_query_groups=3"),
    (["--group-query-attention"], 4,
     "num_query_groups=1 is not divisible by tensor_model_parallel_size=2"),
    (["--global-batch-size", "20"], 4,
     ("training.global_batch_size=20 is not divisible by training.micro_batch_size x "
     "data_parallel_size = 4 x 2 = 8 (world_size=4)")),
    (["--pipeline-model-parallel-size", "2"], 6,
     ("world_size=6 is not divisible by tensor_model_parallel_size x "
     "pipeline_model_parallel_size = 2 x 2 = 4")),
    ([], 0, "world_size=0 must be a positive integer"),
    (["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "3"], 4,
     ("--num-layers-per-virtual-pipeline-stage=3 does not divide num_layers / "
     "pipeline_model_parallel_size = 4 / 2")),
    # PP 4 x DP 1: 8 / (4 x 1) = 2 micro-batches, not a multiple of PP
    (["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4",
      "--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "8"], 4,
     ("the interleaved pipeline schedule needs the number of micro-batches (2 = global batch "
     "8 (training.global_batch_size) / (training.micro_batch_size x data_parallel_size = 4)) "
     "to be a multiple of pipeline_model_parallel_size=4")),
    # the schedule and the data
    (["--lr-warmup-iters", "400"], 4,
     "training.lr_warmup_iters=400 exceeds training.lr_decay_iters=300"),
    (["--min-lr", "0.01"], 4, "training.min_lr=0.01 exceeds training.lr=0.001"),
    (["--lr-decay-style", "step"], 4,
     "training.lr_decay_style='step' must be one of 'cosine', 'linear', 'constant', "
     "'inverse-square-root', 'WSD'"),
    (["--lr-decay-style", "WSD"], 4,
     "training.lr_decay_style='WSD' needs training.lr_wsd_decay_iters (the length of its final "
     "anneal)"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "400"], 4,
     "training.lr_wsd_decay_iters=400 exceeds training.lr_decay_iters=300"),
    (["--train-iters", "null", "--train-samples", "800", "--lr-warmup-iters", "0",
      "--lr-wsd-decay-iters", "10"], 4,
     "training.lr_wsd_decay_iters=10 is counted in iterations, but the run is counted in samples "
     "(training.train_samples): set it to null and use training.lr_wsd_decay_samples"),
    (["--micro-batch-size", "0"], 4, "training.micro_batch_size=0 must be >= 1"),
    (["--adam-beta2", "1"], 4, "training.adam_beta2=1.0 must be in [0, 1)"),
    (["--split", "90,x"], 4, ("data.split='90,x' must be 1 to 3 non-negative numbers "
     "separated by commas or slashes, e.g. '969,30,1'")),
    (["--data-path", "0.5", "a", "b"], 4, ("data.data_path=['0.5', 'a', 'b'] mixes forms: give "
     "prefixes only, or weight and prefix pairs such as ['0.3', 'a', '0.7', 'b']")),
    (["--tokenizer-type", "Bytes", "--model.vocab_size", "300"], 4,
     ("data.tokenizer_type='Bytes' must be one of 'GPT2BPETokenizer', 'HuggingFaceTokenizer', "
     "'GPTSentencePieceTokenizer', 'Llama2Tokenizer', 'ByteLevelTokenizer', 'NullTokenizer', "
     "'SFTTokenizer'")),
    (["--tokenizer-type", "GPT2BPETokenizer"], 4,
     ("model.vocab_size is not set, so it is read from the tokenizer (GPT2BPETokenizer), which "
     "could not be built: tokenizer_type='GPT2BPETokenizer' needs vocab_file and merge_file "
     "(Megatron's --vocab-file, --merge-file)")),
]


@pytest.mark.parametrize("overrides, world_size, message", COMMAND_LINE_ERRORS)
def test_command_line_errors(overrides, world_size, message):
    assert error_of(*overrides, world_size=world_size) == message


def test_wrong_yaml_types(tmp_path):
    path = write(tmp_path, "c.yaml", f"base: {TINY}\ntraining:\n  micro_batch_size: true\n")
    assert error_of(path=path) == "training.micro_batch_size=True must be an int"
    path = write(tmp_path, "d.yaml", f"base: {TINY}\ndata:\n  data_path: {{a: 1}}\n")
    assert error_of(path=path) == "data.data_path={'a': 1} must be a list of strings or null"
    path = write(tmp_path, "e.yaml", f"base: {TINY}\nmodel: [1, 2]\n")
    assert error_of(path=path) == f"{path}: section 'model' must be a mapping of keys to " \
                                  "values; got list"


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "c.yaml", "model:\n  num_layers: 2\n")
    assert error_of(path=path, world_size=1) == "model.hidden_size is required (it has no default)"


def test_base_files_merge_and_must_not_loop(tmp_path):
    write(tmp_path, "base.yaml", f"base: {TINY}\ntraining:\n  lr: 5.0e-4\n"
                 "data:\n  data_path: [x, y]\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntraining:\n  seed: 9\n"
                  "data:\n  data_path: [z]\n")
    cfg = load_config(child, world_size=4)
    assert (cfg.training.lr, cfg.training.seed, cfg.training.train_iters) == (5e-4, 9, 300)
    assert cfg.data.data_path == ["z"]  # a list is replaced, not extended
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\n")
    a = str(tmp_path / "a.yaml")
    assert error_of(path=b) == f"the base files of {b} form a loop: {b} -> {a} -> {b}"
    c = write(tmp_path, "c.yaml", "base: nowhere.yaml\n")
    assert error_of(path=c) == f"no config file {tmp_path / 'nowhere.yaml'} (the base of {c})"


# --- values --------------------------------------------------------------------------------


@pytest.mark.parametrize("value, annotation, expected", [
    ("3e-4", float, 3e-4),  # PyYAML reads an exponent without a dot as a string
    (3, float, 3.0),
    ("-1", int, -1),
    ("null", str | None, None),
    ("None", int | None, None),
    ("path", str | None, "path"),
    ("Yes", bool, True),
    ("0", bool, False),
    ("auto", bool | str, "auto"),
    ("off", bool | str, False),
    (100, str, "100"),
    ([0.3, "a"], list[str], ["0.3", "a"]),
    ("a", list[str], ["a"]),
])
def test_coerce_accepts(value, annotation, expected):
    result = coerce("k", value, annotation)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value, annotation, message", [
    ("nan", float, "k='nan' must be a number"),
    (True, float, "k=True must be a number"),
    (None, int, "k=None must be an int"),
    (True, str, "k=True must be a string"),
])
def test_coerce_rejects(value, annotation, message):
    with pytest.raises(ConfigError) as error:
        coerce("k", value, annotation)
    assert str(error.value) == message


# --- round trips and the command line ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INTENDED_WORLD_SIZE))
def test_round_trip_through_plain_data_and_yaml(name, tmp_path):
    cfg = shipped(name)
    plain = cfg.to_dict()
    assert JobConfig.from_dict(plain) == cfg
    torch.save(plain, tmp_path / "c.pt")
    assert JobConfig.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)) == cfg
    path = write(tmp_path, "c.yaml", format_config(cfg))
    assert load_config(path, world_size=INTENDED_WORLD_SIZE[name]) == cfg


def test_from_dict_checks_like_a_file():
    plain = shipped("gpt-tiny").to_dict()
    plain["training"]["lrr"] = 1.0
    with pytest.raises(ConfigError) as error:
        JobConfig.from_dict(plain)
    assert str(error.value) == "unknown key 'training.lrr'; did you mean 'training.lr'?"


def test_parse_args(capsys):
    cfg = parse_args(["--lr", "2e-3", "--config", TINY, "--train-iters", "50"], world_size=4)
    assert (cfg.training.lr, cfg.training.train_iters) == (2e-3, 50)
    assert parse_args([f"--config={TINY}"], world_size=4) == shipped("gpt-tiny")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", TINY, "--global-batch-size", "20"], world_size=4, prog="job")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "job: error: training.global_batch_size=20 is not divisible by training.micro_batch_size"
        " x data_parallel_size = 4 x 2 = 8 (world_size=4)\n")
    for argv in (["--lr", "1", "--config"], ["--config", "--lr", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv, prog="job")
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (
            "job: error: --config needs a PATH (a YAML file such as configs/gpt-tiny.yaml)\n")
    with pytest.raises(SystemExit):  # no file: the flags must give the whole model
        parse_args(["--lr", "1"], prog="job")
    assert capsys.readouterr().err == "job: error: model.num_layers is required (it has no " \
                                      "default)\n"


# The model fields `mp.config.loader.CHECKPOINT_ARGS` leaves to the run: how it computes, is
# laid out, trained and regularized, none of which changes the checkpoint's tensors or what
# they compute.
_RUN_ARGS = ("normalization_impl", "mtp_loss_scaling_factor", "hidden_dropout",
             "attention_dropout", "init_method_std", "embedding_init_method_std",
             "init_method_xavier_uniform", "attention_backend", "masked_softmax_fusion",
             "bias_dropout_fusion", "bias_activation_fusion", "cross_entropy_loss_fusion",
             "compile_layers", "tensor_model_parallel_size", "pipeline_model_parallel_size",
             "virtual_pipeline_model_parallel_size", "microbatch_group_size_per_vp_stage",
             "context_parallel_size", "cp_comm_type", "hierarchical_context_parallel_sizes",
             "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
             "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
             "pipeline_model_parallel_layout",
             "sequence_parallel", "moe_router_dtype", "moe_router_bias_update_rate",
             "moe_grouped_gemm", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
             "moe_z_loss_coeff", "moe_expert_capacity_factor", "moe_token_drop_policy",
             "moe_input_jitter_eps", "moe_router_force_load_balancing", "moe_per_layer_logging",
             "expert_model_parallel_size", "expert_tensor_parallel_size", "overlap_p2p_comm",
             "recompute_granularity", "recompute_modules", "recompute_method",
             "recompute_num_layers", "distribute_saved_activations", "precision",
             "fp32_residual_connection", "fp8", "fp8_recipe", "fp8_wgrad",
             "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")


def test_every_model_field_is_a_checkpoint_arg_or_the_runs():
    """A new model field must be classified: one that changes the checkpoint's tensors or
    their math joins `CHECKPOINT_ARGS` (``--use-checkpoint-args`` takes it), others
    `_RUN_ARGS`."""
    import dataclasses

    from mp.config.loader import CHECKPOINT_ARGS
    from mp.model import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert not set(CHECKPOINT_ARGS) & set(_RUN_ARGS)
    assert fields - set(CHECKPOINT_ARGS) - set(_RUN_ARGS) == set(), "classify these"
    assert (set(CHECKPOINT_ARGS) | set(_RUN_ARGS)) - fields == set(), "no such fields"


def test_use_checkpoint_args_takes_the_model_from_the_checkpoint(tmp_path):
    """Over the config file's model, under the command line's (here --seq-length)."""
    from mp.checkpointing import read_checkpoint_info, save_global_model
    from mp.checkpointing.fit import architecture_problems
    from mp.config.loader import CHECKPOINT_ARGS
    from mp.model import TransformerConfig

    saved = TransformerConfig(
        num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=2, vocab_size=300,
        seq_length=96, max_position_embeddings=128, normalization="RMSNorm",
        layernorm_epsilon=1e-6, activation="swiglu", position_embedding_type="rope",
        rotary_base=5e5, add_bias_linear=False, untie_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=32, kv_channels=12, rotary_percent=0.5,
        layernorm_zero_centered_gamma=True)
    save_global_model(tmp_path / "ckpt", saved, {"output_layer.weight": torch.zeros(2, 2)})
    m = shipped("gpt-tiny", "--load", str(tmp_path / "ckpt"), "--use-checkpoint-args",
                "--seq-length", "64").model
    assert {name: getattr(m, name) for name in CHECKPOINT_ARGS} == \
        {**{name: getattr(saved, name) for name in CHECKPOINT_ARGS}, "seq_length": 64}
    assert (m.tensor_model_parallel_size, m.hidden_dropout) == (2, 0.0)  # the file's
    assert shipped("gpt-tiny", "--load", str(tmp_path / "ckpt")).model.hidden_size == 128
    # a converted DeepSeek-style model: latents, experts and how they route, prediction depth
    deepseek = TransformerConfig(
        num_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=300, seq_length=128,
        multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8,
        qk_pos_emb_head_dim=4, v_head_dim=12, position_embedding_type="rope",
        num_moe_experts=8, moe_ffn_hidden_size=32, moe_layer_freq=[0, 1, 1],
        moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True, moe_router_topk=4,
        moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.5,
        moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
        mtp_num_layers=1)
    save_global_model(tmp_path / "moe", deepseek, {"output_layer.weight": torch.zeros(2, 2)})
    m = shipped("gpt-tiny", "--load", str(tmp_path / "moe"), "--use-checkpoint-args").model
    assert architecture_problems(read_checkpoint_info(tmp_path / "moe").model_config, m) == []
    assert (m.moe_router_topk, m.moe_router_enable_expert_bias, m.moe_router_group_topk) == \
        (4, True, 2)
    # a converted gpt-oss-style model: sinks, the clamped gated unit, unrounded YaRN, windows
    oss = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        vocab_size=300, seq_length=128, position_embedding_type="rope", rope_type="yarn",
        yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=32,
        yarn_correction_range_round_to_int=False, softmax_type="learnable",
        activation="quick_geglu", activation_func_clamp_value=7.0, glu_linear_offset=1.0,
        num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_bias=True, window_size=(8, 0),
        window_attn_skip_freq=2, normalization="RMSNorm", add_qkv_bias=True)
    save_global_model(tmp_path / "oss", oss, {"output_layer.weight": torch.zeros(2, 2)})
    m = shipped("gpt-tiny", "--load", str(tmp_path / "oss"), "--use-checkpoint-args").model
    assert architecture_problems(read_checkpoint_info(tmp_path / "oss").model_config, m) == []
    assert {name: getattr(m, name) for name in CHECKPOINT_ARGS} == \
        {name: getattr(oss, name) for name in CHECKPOINT_ARGS}
    assert error_of("--use-checkpoint-args", "--load", str(tmp_path / "none")).startswith(
        "training.use_checkpoint_args=true: ")


def test_lr_warmup_fraction_is_a_fraction_of_the_decay():
    """Megatron's rule: warm-up = fraction x decay, here 0.1 x 25 = 2.5 iterations."""
    from mp.training.pretrain import build_opt_param_scheduler

    t = shipped("gpt-tiny", "--lr-warmup-iters", "0", "--lr-warmup-fraction", "0.1",
                "--lr-decay-iters", "25").training
    assert t.lr_schedule_steps == (pytest.approx(2.5, rel=1e-12), 25, None)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    scheduler = build_opt_param_scheduler(optimizer, t)
    assert [scheduler.get_lr(n) for n in (1, 2)] == pytest.approx([t.lr / 2.5, 2 * t.lr / 2.5])
    samples = shipped("gpt-tiny", "--train-iters", "null", "--lr-warmup-iters", "0",
                      "--train-samples", "1000", "--lr-warmup-fraction", "0.01").training
    assert samples.lr_schedule_steps == (pytest.approx(10.0), 1000, None)


def test_help_lists_the_megatron_flags_and_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"], prog="job")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == help_text("job") + "\n"
    for line in ("  --tensor-model-parallel-size", "  --data-path", "  --bf16",
                 "  --num-layers-per-virtual-pipeline-stage", "  --training.lr: a number",
                 "  --model.num_layers: an int (required)"):
        assert "\n" + line in out
