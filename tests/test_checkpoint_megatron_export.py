"""mp checkpoints to Megatron-Core ``torch_dist`` (``tools/convert_checkpoint.py
mp-to-megatron``, `mp.checkpointing.megatron_export`):

- round trip: small mp models (dense and MoE, the features the mapping covers) exported and
  imported back (``megatron-to-mp``) give bitwise the same weights and the same logits;
- independent reference: the fixtures real Megatron-Core 0.14 saved
  (``tests/fixtures/megatron/``), imported and exported again, give Megatron's own tensor
  keys, global shapes, dtypes, values and extra-state objects, and the ``args`` the importer
  needs; Megatron-Core loading an export was checked once with
  ``tools/verify_megatron_export.py`` (not here: it needs megatron-core);
- refusals name the feature or value and the rule.
"""

import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch
from checks import assert_rel_close
from harness import run_distributed
from test_checkpoint_megatron import FIXTURES, convert  # the import's fixtures and tool

from mp import parallel_state as ps
from mp.checkpointing import (
    load_checkpoint,
    load_global_model,
    megatron,
    megatron_export,
    megatron_files,
    read_checkpoint_info,
    save_global_model,
)
from mp.model import GPTModel, TransformerConfig

SMALL = dict(num_layers=2, hidden_size=16, num_attention_heads=4, vocab_size=50,
             make_vocab_size_divisible_by=8, seq_length=8, hidden_dropout=0.0,
             attention_dropout=0.0)
CONFIGS = {  # the round trip's models
    "gpt": dict(normalization="LayerNorm", activation="gelu", add_bias_linear=True,
                layernorm_zero_centered_gamma=True, embedding_init_method_std=0.01),
    "llama": dict(normalization="RMSNorm", activation="swiglu", ffn_hidden_size=24,
                  position_embedding_type="rope", rotary_interleaved=True, num_query_groups=2,
                  add_bias_linear=False, add_qkv_bias=True, qk_layernorm=True,
                  untie_embeddings_and_output_weights=True, window_size=[3, 0],
                  window_attn_skip_freq=2, rotary_percent=0.5, kv_channels=8),
    "nope": dict(position_embedding_type="none", activation="squared_relu",
                 add_bias_linear=False),
    "moe": dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
                add_bias_linear=False, num_moe_experts=4, moe_ffn_hidden_size=8,
                moe_layer_freq=[0, 1], moe_shared_expert_intermediate_size=12,
                moe_shared_expert_gate=True, moe_router_score_function="sigmoid",
                moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.0,
                qk_l2_norm=True, no_rope_freq="[1, 0]"),  # Llama 4's knobs
}
FIXTURE_NAMES = ("gpt", "llama", "qwen", "llama_interleaved", "moe", "moe_grouped")


def _export(mp_dir: Path, out: Path, *options: str) -> Path:
    convert.main(["mp-to-megatron", "--load", str(mp_dir), "--save", str(out), *options])
    return out


def _import(megatron_dir: Path, out: Path, *options: str) -> Path:
    convert.main(["megatron-to-mp", "--input", str(megatron_dir), "--output", str(out),
                  *options])
    return out


def _round_trip(fields: dict, directory: str) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """On one rank: an mp model of ``fields`` with random weights (norms around 1, biases and
    expert biases non-zero), saved, exported, imported back; both checkpoints' weights and
    logits ``[b, s, padded vocab]`` on random tokens."""
    config = TransformerConfig(**SMALL, **fields)
    ps.initialize_model_parallel(1)
    generator = torch.Generator().manual_seed(5)
    weights = {k: torch.randn(v.shape, generator=generator) * 0.3 + ("norm" in k)
               for k, v in GPTModel(config).state_dict().items()
               if "_extra_state" not in k and "rotary" not in k}
    root = Path(directory)
    original = save_global_model(root / "mp", config, weights, iteration=3)
    _import(_export(root / "mp", root / "megatron"), root / "back",  # the tokenizer's size
            "--vocab-size", str(config.vocab_size))
    tokens = torch.randint(0, config.vocab_size, (2, 8), generator=generator)
    logits = []
    for path in (original, root / "back"):
        model = GPTModel(config).eval()
        load_checkpoint(str(path), model)
        with torch.no_grad():
            logits.append(model(tokens))
    return weights, load_global_model(root / "back")[0], *logits


def test_round_trip_is_bitwise(tmp_path):
    for name, fields in CONFIGS.items():
        [(weights, back, logits, back_logits)] = run_distributed(
            1, _round_trip, fields, str(tmp_path / name))
        assert back.keys() == weights.keys(), name
        assert all(torch.equal(back[k], weights[k]) for k in weights), name
        assert logits.abs().max() > 0.1
        assert_rel_close(back_logits, logits, 1e-6, name)
        config = read_checkpoint_info(tmp_path / name / "back").model_config
        want = dataclasses.asdict(TransformerConfig(**SMALL, **fields))
        assert {k: config[k] for k in fields} == {k: want[k] for k in fields}, name


def _metadata(directory: Path) -> dict:
    """``{key: (global shape, dtype)}`` of a DCP directory's tensors, ``{key: None}`` of its
    byte objects."""
    index = megatron_files._Reader(directory).read_metadata().state_dict_metadata
    return {k: (tuple(v.size), v.properties.dtype) if hasattr(v, "size") else None
            for k, v in index.items()}


def _args_needed(args) -> dict:
    """The args fields `megatron.config_from_args` reads of ``args``, as it reads them."""
    return dataclasses.asdict(megatron.config_from_args(args))


@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_export_matches_megatron_core_save(tmp_path, fixture):
    """Megatron-Core's own save of a model, imported and exported again (its local spec, as
    the fixtures were built), has the same tensor keys, shapes, dtypes and values, the same
    extra-state objects, and args the importer reads as the same model."""
    mp_dir = _import(FIXTURES / fixture, tmp_path / "mp", "--vocab-size", "60")  # NullTokenizer's
    out = _export(mp_dir, tmp_path / "out", "--transformer-impl", "local")
    theirs = megatron_files.resolve(FIXTURES / fixture)
    assert _metadata(out / "iter_0000000") == _metadata(theirs)
    args, weights = megatron_files.read_checkpoint(out)
    their_args, their_weights = megatron_files.read_checkpoint(theirs)
    assert weights.keys() == their_weights.keys()
    assert all(torch.equal(weights[k], their_weights[k]) for k in weights)
    assert _args_needed(args) == _args_needed(their_args)
    mine = vars(args)
    shared = {k: v for k, v in vars(their_args).items() if k in mine and k not in (
        "iteration", "transformer_impl", "expert_model_parallel_size")}  # mp's import: EP 1
    assert {k: mine[k] for k in shared} == shared
    common = megatron_files.safe_load(out / "iter_0000000" / "common.pt")
    assert (common["checkpoint_version"], common["iteration"]) == (3.0, 0)
    assert common["content_metadata"] == {"singleton_local_shards": False}
    extra = megatron_files._Reader(out / "iter_0000000").read_metadata().storage_data
    blob = next(info for index, info in extra.items() if "_extra_state" in index.fqn)
    data = (out / "iter_0000000" / blob.relative_path).read_bytes()
    assert torch.load(io.BytesIO(data[blob.offset:blob.offset + blob.length]),
                      weights_only=True) == [None]


@pytest.mark.parametrize("fixture", ["llama", "moe"])
def test_transformer_engine_names(tmp_path, fixture):
    """The TE spec (Megatron-LM's default): the same tensors, a MoE layer's norm as
    ``pre_mlp_layernorm``, and extra states of its attention cores and norms besides."""
    out = _export(_import(FIXTURES / fixture, tmp_path / "mp"), tmp_path / "out")
    ours, theirs = _metadata(out / "iter_0000000"), _metadata(megatron_files.resolve(
        FIXTURES / fixture))
    renamed = {k.replace("1.mlp.linear_fc1.layer_norm_", "1.pre_mlp_layernorm.")
               if fixture == "moe" else k: v for k, v in theirs.items()}
    assert {k: v for k, v in ours.items() if v} == {k: v for k, v in renamed.items() if v}
    extra = {k for k, v in ours.items() if v is None}
    assert extra > {k for k, v in theirs.items() if v is None}
    layer = "decoder.layers.1." if fixture == "moe" else "decoder.layers."
    assert {f"{layer}self_attention.core_attention._extra_state/shard_"
            f"{'0_1' if fixture == 'moe' else '1_2'}",
            "decoder.final_layernorm._extra_state/shard_0_1"} < extra
    _, weights = megatron_files.read_checkpoint(out)  # the importer reads the TE name
    _, their_weights = megatron_files.read_checkpoint(FIXTURES / fixture)
    assert all(torch.equal(weights[k], their_weights[k]) for k in their_weights)


def test_release_and_iteration(tmp_path):
    mp_dir = _import(FIXTURES / "llama", tmp_path / "mp")
    release = _export(mp_dir, tmp_path / "release", "--release")
    assert (release / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (release / "release" / ".metadata").is_file()
    numbered = _export(mp_dir, tmp_path / "numbered", "--iteration", "42")
    assert (numbered / "latest_checkpointed_iteration.txt").read_text() == "42"
    args, _ = megatron_files.read_checkpoint(numbered)
    assert args.iteration == 42 and args.transformer_impl == "transformer_engine"
    with pytest.raises(SystemExit, match=r"iter_0000042 exists and is not empty"):
        _export(mp_dir, numbered, "--iteration", "42")


def test_args_from_config():
    config = TransformerConfig(**SMALL, precision="bf16", **CONFIGS["llama"])
    args = megatron_export.args_from_config(config, iteration=9)
    assert (args.bf16, args.fp16, args.params_dtype) == (True, False, torch.bfloat16)
    assert (args.group_query_attention, args.num_query_groups) == (True, 2)
    assert (args.add_position_embedding, args.use_rotary_position_embeddings) == (False, True)
    assert args.window_size == (3, 0) and args.padded_vocab_size == 56
    assert args.iteration == 9 and args.num_experts is None
    moe = TransformerConfig(**SMALL, **{**CONFIGS["moe"], "moe_layer_freq": "([0]+[1])"})
    assert megatron_export.args_from_config(moe).moe_layer_freq == [0, 1]
    assert megatron_export.keyed_per_layer(moe)
    assert not megatron_export.keyed_per_layer(dataclasses.replace(moe, moe_layer_freq=1))
    assert megatron_export.keyed_per_layer(dataclasses.replace(moe, moe_layer_freq=2))
    top1 = dataclasses.replace(moe, moe_router_topk=1, moe_apply_probs_on_input=True,
                               moe_router_force_load_balancing=True)
    megatron_export.check_exportable(top1)  # the benchmark switch is the run's
    assert megatron_export.args_from_config(top1).moe_apply_probs_on_input
    dense = TransformerConfig(**SMALL, moe_layer_freq=[1, 1])
    assert not megatron_export.keyed_per_layer(dense)  # a dense model's layers stack


def _named_weights(config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A zero for each of mp's weight names of ``config`` (the gates SwiGLU splits off too)."""
    names = list(megatron.megatron_names(config).values())
    names += [gate[0] for gate in map(lambda n: megatron.fused_gate(config, n), names) if gate]
    return {name: torch.zeros(1) for name in names}


@pytest.mark.parametrize("fields, message", [
    (dict(multi_latent_attention=True, position_embedding_type="rope"),
     "multi_latent_attention=True: Megatron-Core's GPT checkpoint (as mp maps it) holds "
     "multi_latent_attention in (False,)"),
    (dict(activation="gelu_tanh"), "activation='gelu_tanh': Megatron-Core's GPT checkpoint"),
    (dict(mtp_num_layers=1), "mtp_num_layers=1"),
    (dict(position_embedding_type="rope", rope_type="yarn"), "rope_type='yarn'"),
])
def test_refuses_what_megatron_cannot_express(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        megatron_export.check_exportable(TransformerConfig(**SMALL, **fields))


def test_refuses_a_field_the_args_would_lose():
    config = TransformerConfig(**SMALL, **CONFIGS["moe"])
    config.moe_router_topk_scaling_factor = 0.0  # Megatron's args read 0 as none
    with pytest.raises(ValueError, match=re.escape(
            "moe_router_topk_scaling_factor=0.0 (read back as None): Megatron-LM's args "
            "cannot carry it")):
        megatron_export.check_exportable(config)


def test_refuses_weights_the_config_does_not_name():
    config = TransformerConfig(**SMALL, **CONFIGS["llama"])
    weights = _named_weights(config)
    del weights["decoder.layers.1.mlp.linear_gate.weight"]
    weights["decoder.layers.0.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=re.escape(
            "mp checkpoint (for its config): missing ['decoder.layers.1.mlp.linear_gate."
            "weight']; unexpected ['decoder.layers.0.mlp.extra.weight']")):
        megatron_export.mp_to_megatron(weights, config)
    with pytest.raises(ValueError, match=r"transformer_impl='te': Megatron-LM's are "):
        megatron_export.sharded_state_dict({}, config, transformer_impl="te")


def test_cli_refuses_by_name(tmp_path):
    config = TransformerConfig(**SMALL, activation="gelu_tanh")
    save_global_model(tmp_path / "mp", config, _named_weights(config))
    with pytest.raises(SystemExit, match=r"convert_checkpoint.py: error: activation='gelu_tanh'"):
        _export(tmp_path / "mp", tmp_path / "out")
    assert not (tmp_path / "out").exists()
