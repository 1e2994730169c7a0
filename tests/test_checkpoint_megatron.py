"""Megatron-Core checkpoints in mp: tiny GPTs that real Megatron-Core 0.14 built, ran and saved
(``tests/fixtures/megatron/``, written by ``tools/make_megatron_fixture.py``; megatron-core is
not needed here), converted by ``tools/convert_checkpoint.py megatron-to-mp``, give the
logits Megatron-Core computed, in mp at TP 1 and TP 2:

- ``gpt``: LayerNorm, GeLU, learned positions, biases, tied embeddings; TP 2 torch_dist;
- ``llama``: RMSNorm, SwiGLU, RoPE (base 5e5), 2 query groups of 4 heads, untied, no
  biases; TP 2 torch_dist;
- ``qwen``: ``llama`` with q/k norms, QKV biases, heads 12 wide (hidden 16 / 4 heads is 4),
  half of each head rotated, tied; TP 1 torch_dist;
- ``llama_interleaved``: ``llama`` with GPT-J's interleaved RoPE pairs
  (``--rotary-interleaved``); TP 2 torch_dist;
- ``gpt_legacy``, ``llama_legacy``: the same models in the legacy ``torch`` format (a file
  per tensor-parallel rank).

Each fixture's weights are random (norms around 1, biases non-zero), a vocabulary of 60
tokens padded by Megatron to 64 rows. Refusals name the value and the rule."""

import argparse
import importlib
import json
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint
from checks import assert_rel_close
from harness import run_distributed

from mp import parallel_state as ps
from mp.checkpointing import CheckpointError, load_checkpoint, megatron, read_checkpoint_info
from mp.model import GPTModel, TransformerConfig
from mp.tensor_parallel import gather_from_tensor_model_parallel_region

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
convert = importlib.import_module("convert_checkpoint")

FIXTURES = Path(__file__).parent / "fixtures" / "megatron"
LOGITS = {"gpt": "gpt", "llama": "llama", "qwen": "qwen",
          "llama_interleaved": "llama_interleaved", "gpt_legacy": "gpt",
          "llama_legacy": "llama"}  # fixture -> the fixture whose logits.pt it gives


def _convert(fixture: str, output: Path, *options: str) -> Path:
    convert.main(["megatron-to-mp", "--input", str(FIXTURES / fixture), "--output",
                  str(output), *options])
    return output


def _logits(path: str, tp: int, tokens: torch.Tensor) -> torch.Tensor:
    """The converted checkpoint's logits ``[b, s, padded vocab]`` at TP ``tp``."""
    config = TransformerConfig(**{**read_checkpoint_info(path).model_config,
                                  "tensor_model_parallel_size": tp})
    ps.initialize_model_parallel(tp)
    model = GPTModel(config).eval()
    load_checkpoint(path, model)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(tokens))


@pytest.mark.parametrize("fixture", list(LOGITS))
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_megatron_core(tmp_path, fixture, tp):
    path = _convert(fixture, tmp_path / "mp")
    reference = torch.load(FIXTURES / LOGITS[fixture] / "logits.pt", weights_only=True)
    logits = run_distributed(tp, _logits, str(path), tp, reference["tokens"])
    for rank_logits in logits:
        assert_rel_close(rank_logits, reference["logits"], 1e-5, f"{fixture} at TP {tp}")


def test_legacy_and_torch_dist_hold_the_same_weights():
    for name in ("gpt", "llama"):
        _, dist = megatron.read_checkpoint(FIXTURES / name)
        _, legacy = megatron.read_checkpoint(FIXTURES / f"{name}_legacy")
        assert legacy.keys() == dist.keys()
        assert all(torch.equal(legacy[k], dist[k]) for k in dist), name


def test_per_layer_keys_read_as_stacked_ones(tmp_path):
    """Megatron's non-homogeneous layers key each layer apart (``decoder.layers.0. ...``)."""
    _, stacked = megatron.read_checkpoint(FIXTURES / "llama")
    per_layer = tmp_path / "per_layer"
    per_layer.mkdir()
    for name in ("common.pt", "metadata.json"):
        shutil.copy(FIXTURES / "llama" / "iter_0000010" / name, per_layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # that DCP "assumes" one process: as asked
        torch.distributed.checkpoint.save(stacked, checkpoint_id=per_layer, no_dist=True)
    _, got = megatron.read_checkpoint(per_layer)
    assert got.keys() == stacked.keys()
    assert all(torch.equal(got[k], stacked[k]) for k in stacked)


def test_config_from_args(tmp_path):
    fields = {name: read_checkpoint_info(_convert(name, tmp_path / name)).model_config
              for name in ("gpt", "llama", "qwen")}
    common = dict(num_layers=2, hidden_size=16, num_attention_heads=4, vocab_size=64,
                  make_vocab_size_divisible_by=16, seq_length=16, max_position_embeddings=16,
                  layernorm_epsilon=1e-5, hidden_dropout=0.0, attention_dropout=0.0)
    expected = {
        "gpt": dict(normalization="LayerNorm", activation="gelu", ffn_hidden_size=32,
                    position_embedding_type="learned_absolute", add_bias_linear=True,
                    num_query_groups=4, kv_channels=4, tensor_model_parallel_size=2,
                    untie_embeddings_and_output_weights=False),
        "llama": dict(normalization="RMSNorm", activation="swiglu", ffn_hidden_size=24,
                      position_embedding_type="rope", rotary_base=500000.0,
                      add_bias_linear=False, num_query_groups=2, kv_channels=4,
                      untie_embeddings_and_output_weights=True, tensor_model_parallel_size=2),
        "qwen": dict(qk_layernorm=True, add_qkv_bias=True, kv_channels=12, rotary_percent=0.5,
                     num_query_groups=2, untie_embeddings_and_output_weights=False,
                     tensor_model_parallel_size=1)}
    for name, want in expected.items():
        got = {k: fields[name][k] for k in {**common, **want}}
        assert got == {**common, **want}, name


def _args(**changes) -> argparse.Namespace:
    args, _ = megatron.read_checkpoint(FIXTURES / "llama")
    return argparse.Namespace(**{**vars(args), **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts=8), "num_experts=8 in the Megatron checkpoint's args: mp converts "
                          "num_experts in (None,)"),
    (dict(multi_latent_attention=True), "multi_latent_attention=True"),
    (dict(position_embedding_type="mrope"), "position_embedding_type='mrope'"),
    (dict(normalization="L2Norm"), "normalization='L2Norm'"),
    (dict(apply_residual_connection_post_layernorm=True),
     "apply_residual_connection_post_layernorm=True"),
])
def test_refuses_what_mp_cannot_express(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        megatron.config_from_args(_args(**changes))


def test_refuses_args_without_a_field():
    args = _args()
    del args.swiglu
    with pytest.raises(ValueError, match="the Megatron checkpoint's args have no swiglu"):
        megatron.config_from_args(args)


def test_args_fields():
    args = _args()  # Megatron's enums in them, read without Megatron
    assert isinstance(args.attention_backend, megatron.MegatronEnum)
    assert isinstance(args.model_type, megatron.MegatronEnum)
    window = megatron.config_from_args(_args(window_size=(7, 0), window_attn_skip_freq=2,
                                             apply_layernorm_1p=True, squared_relu=True,
                                             swiglu=False))
    assert (window.window_size, window.window_attn_skip_freq) == ([7, 0], 2)
    assert window.layernorm_zero_centered_gamma and window.activation == "squared_relu"
    old = vars(_args()).copy()
    del old["position_embedding_type"]
    assert megatron.config_from_args(argparse.Namespace(
        **old, use_rotary_position_embeddings=True)).position_embedding_type == "rope"


def test_vocabulary_padding(tmp_path):
    with pytest.raises(SystemExit, match=r"padded_vocab_size=64 in the Megatron checkpoint, "
                                         r"but vocab_size=64 padded .* 128 x 2 is 256"):
        _convert("llama", tmp_path / "a", "--make-vocab-size-divisible-by", "128")
    config = megatron.config_from_args(_args(), vocab_size=60, make_vocab_size_divisible_by=32)
    assert (config.vocab_size, config.padded_vocab_size) == (60, 64)


def _copy(fixture: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / fixture, tmp_path / fixture))


def test_refuses_other_formats(tmp_path):
    with pytest.raises(SystemExit, match="is not a Megatron checkpoint: it has no metadata.json"):
        convert.main(["megatron-to-mp", "--input", str(tmp_path), "--output",
                      str(tmp_path / "mp")])
    zarr = _copy("gpt", tmp_path) / "iter_0000010"
    (zarr / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(CheckpointError, match="sharded_backend='zarr'; mp reads Megatron's "
                                              "torch_dist"):
        megatron.read_checkpoint(zarr.parent)
    (zarr.parent / "latest_checkpointed_iteration.txt").write_text("ten")
    with pytest.raises(CheckpointError, match="should hold an iteration or 'release'"):
        megatron.read_checkpoint(zarr.parent)
    stages = _copy("gpt_legacy", tmp_path) / "iter_0000010"
    (stages / "mp_rank_00").rename(stages / "mp_rank_00_000")
    (stages / "mp_rank_01").rename(stages / "mp_rank_00_001")
    with pytest.raises(CheckpointError, match="2 pipeline stages; mp reads legacy ones of one"):
        megatron.read_checkpoint(stages)
    (stages / "mp_rank_00_001").rename(stages / "mp_rank_03")
    with pytest.raises(CheckpointError, match=r"has no mp_rank_TT/model_optim_rng.pt of "
                                              r"tensor-parallel rank\(s\) \[1, 2\]"):
        megatron.read_checkpoint(stages)
    shutil.rmtree(stages / "mp_rank_03")
    with pytest.raises(CheckpointError, match="holds 1 tensor-parallel rank.s. but its args say "
                                              "tensor_model_parallel_size=2"):
        megatron.read_checkpoint(stages)


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_reads_without_unpickling_code(tmp_path):
    index = _copy("gpt", tmp_path) / "iter_0000010" / ".metadata"
    index.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="builtins.print is not allowed"):
        megatron.read_checkpoint(index.parent)
    torch.save({"args": _Exploit()}, index.parent / "common.pt")
    with pytest.raises(CheckpointError, match=r"common.pt safely \(.*\): Unsupported global: "
                                              r"GLOBAL print was not an allowed global by "
                                              r"default\.$"):
        megatron.read_checkpoint(index.parent)
