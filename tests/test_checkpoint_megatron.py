"""Megatron-Core checkpoints in mp: tiny GPTs that real Megatron-Core 0.14 built, ran and saved
(``tests/fixtures/megatron/``, written by ``tools/make_megatron_fixture.py``; megatron-core is
not needed here), converted by ``tools/convert_checkpoint.py megatron-to-mp``, give the
logits Megatron-Core computed, in mp at TP 1 and TP 2 (the mixtures of experts at EP 2 too):

- ``gpt``: LayerNorm, GeLU, learned positions, biases, tied embeddings; TP 2 torch_dist;
- ``llama``: RMSNorm, SwiGLU, RoPE (base 5e5), 2 query groups of 4 heads, untied, no
  biases; TP 2 torch_dist;
- ``qwen``: ``llama`` with q/k norms, QKV biases, heads 12 wide (hidden 16 / 4 heads is 4),
  half of each head rotated, tied; TP 1 torch_dist;
- ``llama_interleaved``: ``llama`` with GPT-J's interleaved RoPE pairs
  (``--rotary-interleaved``); TP 2 torch_dist;
- ``gpt_legacy``, ``llama_legacy``: the same models in the legacy ``torch`` format (a file
  per tensor-parallel rank);
- ``moe``: ``llama``'s attention, a dense first layer, then 4 SwiGLU experts (top 2 of a
  softmax over the top logits) and a shared expert gated per token; SequentialMLP, TP 2
  torch_dist;
- ``moe_grouped``: every layer a mixture, DeepSeek-V3's routing (sigmoid scores, an expert
  bias, 2 groups, the weights scaled by 2.5), an ungated shared expert, tied; the legacy
  GroupedMLP, TP 2 x EP 2 torch_dist.

Each fixture's weights are random (norms around 1, biases non-zero), a vocabulary of 60
tokens padded by Megatron to 64 rows. Refusals name the value and the rule."""

import argparse
import importlib
import json
import pickle
import re
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
from mp.checkpointing import (
    CheckpointError,
    load_checkpoint,
    megatron,
    megatron_files,
    read_checkpoint_info,
)
from mp.model import GPTModel, TransformerConfig
from mp.tensor_parallel import gather_from_tensor_model_parallel_region

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
convert = importlib.import_module("convert_checkpoint")

FIXTURES = Path(__file__).parent / "fixtures" / "megatron"
LOGITS = {"gpt": "gpt", "llama": "llama", "qwen": "qwen",
          "llama_interleaved": "llama_interleaved", "gpt_legacy": "gpt",
          "llama_legacy": "llama", "moe": "moe",
          "moe_grouped": "moe_grouped"}  # fixture -> the fixture whose logits.pt it gives
MOE = ("moe", "moe_grouped")


def _convert(fixture: str, output: Path, *options: str) -> Path:
    convert.main(["megatron-to-mp", "--input", str(FIXTURES / fixture), "--output",
                  str(output), *options])
    return output


def _logits(path: str, tp: int, tokens: torch.Tensor, ep: int = 1) -> torch.Tensor:
    """The converted checkpoint's logits ``[b, s, padded vocab]`` at TP ``tp`` x EP ``ep``."""
    config = TransformerConfig(**{**read_checkpoint_info(path).model_config,
                                  "tensor_model_parallel_size": tp,
                                  "expert_model_parallel_size": ep})
    ps.initialize_model_parallel(tp, expert_model_parallel_size=ep)
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


@pytest.mark.parametrize("fixture", MOE)
@pytest.mark.parametrize("tp", [1, 2])
def test_moe_logits_match_megatron_core_at_ep_2(tmp_path, fixture, tp):
    path = _convert(fixture, tmp_path / "mp")
    reference = torch.load(FIXTURES / fixture / "logits.pt", weights_only=True)
    logits = run_distributed(tp * 2, _logits, str(path), tp, reference["tokens"], 2)
    for rank_logits in logits:
        assert_rel_close(rank_logits, reference["logits"], 1e-5, f"{fixture} at TP {tp} x EP 2")


def test_moe_weights_land_stacked(tmp_path):
    """Megatron's ``mlp.experts.experts.linear_fc1.weight [E, 2 f, h]`` (``[gate; up]``
    per expert, global expert order) is mp's ``gate_weight`` and ``fc1_weight`` ``[E, f, h]``;
    the router and shared experts keep theirs (the gate split off ``linear_fc1`` too)."""
    args, weights = megatron_files.read_checkpoint(FIXTURES / "moe")
    mp = megatron.megatron_to_mp(weights, megatron.config_from_args(args))
    layer, f = "decoder.layers.1.mlp.", 8
    fused = weights[layer + "experts.experts.linear_fc1.weight"]
    assert torch.equal(mp[layer + "experts.gate_weight"], fused[:, :f])
    assert torch.equal(mp[layer + "experts.fc1_weight"], fused[:, f:])
    assert torch.equal(mp[layer + "experts.fc2_weight"],
                       weights[layer + "experts.experts.linear_fc2.weight"])
    shared = weights[layer + "shared_experts.linear_fc1.weight"]
    assert torch.equal(mp[layer + "shared_experts.linear_gate.weight"], shared[:12])
    assert torch.equal(mp[layer + "shared_experts.gate_weight"],
                       weights[layer + "shared_experts.gate_weight"])
    assert "decoder.layers.0.mlp.linear_gate.weight" in mp  # the dense first layer
    _, grouped = megatron_files.read_checkpoint(FIXTURES / "moe_grouped")
    bias = grouped["decoder.layers.0.mlp.router.expert_bias"]
    assert bias.shape == (4,) and bias.abs().min() > 0


def test_legacy_and_torch_dist_hold_the_same_weights():
    for name in ("gpt", "llama"):
        _, dist = megatron_files.read_checkpoint(FIXTURES / name)
        _, legacy = megatron_files.read_checkpoint(FIXTURES / f"{name}_legacy")
        assert legacy.keys() == dist.keys()
        assert all(torch.equal(legacy[k], dist[k]) for k in dist), name


def test_per_layer_keys_read_as_stacked_ones(tmp_path):
    """Megatron's non-homogeneous layers key each layer apart (``decoder.layers.0. ...``)."""
    _, stacked = megatron_files.read_checkpoint(FIXTURES / "llama")
    per_layer = tmp_path / "per_layer"
    per_layer.mkdir()
    for name in ("common.pt", "metadata.json"):
        shutil.copy(FIXTURES / "llama" / "iter_0000010" / name, per_layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # that DCP "assumes" one process: as asked
        torch.distributed.checkpoint.save(stacked, checkpoint_id=per_layer, no_dist=True)
    _, got = megatron_files.read_checkpoint(per_layer)
    assert got.keys() == stacked.keys()
    assert all(torch.equal(got[k], stacked[k]) for k in stacked)


def test_transformer_engine_moe_norm_name(tmp_path):
    """The TE spec's MoE layers keep their norm apart (``pre_mlp_layernorm``), which the local
    spec saves as ``mlp.linear_fc1.layer_norm_weight``: both are read."""
    _, local = megatron_files.read_checkpoint(FIXTURES / "moe")
    te = tmp_path / "te"
    te.mkdir()
    for name in ("common.pt", "metadata.json"):
        shutil.copy(FIXTURES / "moe" / "iter_0000010" / name, te)
    renamed = {k.replace("1.mlp.linear_fc1.layer_norm_", "1.pre_mlp_layernorm."): v
               for k, v in local.items()}
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in renamed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.distributed.checkpoint.save(renamed, checkpoint_id=te, no_dist=True)
    _, got = megatron_files.read_checkpoint(te)
    assert got.keys() == local.keys()
    assert all(torch.equal(got[k], local[k]) for k in local)


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
                     tensor_model_parallel_size=1),
        "moe": dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8,
                    ffn_hidden_size=24, moe_layer_freq=[0, 1],
                    moe_shared_expert_intermediate_size=12, moe_shared_expert_gate=True,
                    moe_router_score_function="softmax", moe_router_pre_softmax=False,
                    moe_router_topk_scaling_factor=None, moe_router_enable_expert_bias=False,
                    moe_router_num_groups=None, moe_aux_loss_coeff=0.01,
                    moe_router_load_balancing_type="aux_loss", moe_grouped_gemm=False,
                    expert_model_parallel_size=1),
        "moe_grouped": dict(num_moe_experts=4, moe_layer_freq=1,
                            moe_shared_expert_intermediate_size=8,
                            moe_shared_expert_gate=False, moe_router_score_function="sigmoid",
                            moe_router_enable_expert_bias=True,
                            moe_router_topk_scaling_factor=2.5, moe_router_num_groups=2,
                            moe_router_group_topk=1, moe_grouped_gemm=True,
                            moe_aux_loss_coeff=0.0, untie_embeddings_and_output_weights=False)}
    fields.update({name: read_checkpoint_info(_convert(name, tmp_path / name)).model_config
                   for name in MOE})
    for name, want in expected.items():
        got = {k: fields[name][k] for k in {**common, **want}}
        assert got == {**common, **want}, name


def _args(**changes) -> argparse.Namespace:
    args, _ = megatron_files.read_checkpoint(FIXTURES / "llama")
    return argparse.Namespace(**{**vars(args), **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(moe_input_jitter_eps=0.01), "moe_input_jitter_eps=0.01 in the Megatron checkpoint's "
                                      "args: mp converts moe_input_jitter_eps in (None,)"),
    (dict(num_experts=4, moe_router_load_balancing_type="sinkhorn"),
     "moe_router_load_balancing_type='sinkhorn' in the Megatron checkpoint's args: mp routes "
     "by the top k scores"),
    (dict(num_experts=4, moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
          moe_aux_loss_coeff=[0.01, 0.001]),
     "moe_router_load_balancing_type=['aux_loss', 'seq_aux_loss'] in the Megatron "
     "checkpoint's args: mp's router takes one load-balancing loss"),
    (dict(multi_latent_attention=True), "multi_latent_attention=True"),
    (dict(position_embedding_type="mrope"), "position_embedding_type='mrope'"),
    (dict(normalization="L2Norm"), "normalization='L2Norm'"),
    (dict(apply_residual_connection_post_layernorm=True),
     "apply_residual_connection_post_layernorm=True"),
])
def test_refuses_what_mp_cannot_express(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        megatron.config_from_args(_args(**changes))


def test_moe_args_fields():
    def config(**changes):
        return megatron.config_from_args(_args(num_experts=4, moe_router_topk=2, **changes))
    limited = config(expert_model_parallel_size=2, moe_router_topk_limited_devices=1)
    assert (limited.moe_router_num_groups, limited.moe_router_group_topk) == (2, 1)
    one = config(moe_router_load_balancing_type=["seq_aux_loss"], moe_aux_loss_coeff=[0.1],
                 moe_expert_capacity_factor=1.5, moe_token_drop_policy="position",
                 moe_router_topk_scaling_factor=0.0, moe_layer_freq="([0]+[1]*1)")
    assert (one.moe_router_load_balancing_type, one.moe_aux_loss_coeff) == ("seq_aux_loss", 0.1)
    assert (one.moe_expert_capacity_factor, one.moe_token_drop_policy) == (1.5, "position")
    assert one.moe_router_topk_scaling_factor is None and one.moe_layer_freq == [0, 1]
    sigmoid = config(moe_router_score_function="sigmoid", moe_router_pre_softmax=True,
                     moe_router_num_groups=2)  # neither counts there
    assert not sigmoid.moe_router_pre_softmax and sigmoid.moe_router_num_groups is None
    dense = config()  # Megatron-LM's defaults where older args lack a field
    assert (dense.moe_ffn_hidden_size, dense.moe_layer_freq) == (24, 1)
    assert config(moe_expert_capacity_factor=-1.0).moe_expert_capacity_factor is None
    llama4 = megatron.config_from_args(_args(  # Llama 4's top-1 layer; the benchmark switch
        num_experts=4, moe_router_topk=1, moe_apply_probs_on_input=True,  # is the run's
        moe_router_force_load_balancing=True))
    assert llama4.moe_apply_probs_on_input and not llama4.moe_router_force_load_balancing


def test_refuses_a_shared_expert_gate_the_args_do_not_name():
    """Megatron-Core before ``--moe-shared-expert-gate`` gated shared experts only through
    the spec: such a checkpoint holds the gate but its args do not say so."""
    args, weights = megatron_files.read_checkpoint(FIXTURES / "moe")
    args.moe_shared_expert_gate = False
    with pytest.raises(ValueError, match=r"unexpected \['decoder.layers.1.mlp.shared_experts."
                                         r"gate_weight'\]"):
        megatron.megatron_to_mp(weights, megatron.config_from_args(args))


def test_refuses_legacy_moe(tmp_path):
    stages = _copy("llama_legacy", tmp_path) / "iter_0000010"
    for rank in stages.glob("mp_rank_*"):
        state = megatron_files.safe_load(rank / "model_optim_rng.pt")
        state["args"] = argparse.Namespace(**{  # without Megatron's enums, read as mp's
            k: v for k, v in vars(state["args"]).items()
            if not isinstance(v, megatron_files.MegatronEnum)} | {"num_experts": 4})
        torch.save(state, rank / "model_optim_rng.pt")
    (stages / "mp_rank_01").rename(stages / "mp_rank_00_001")  # EP 2's second rank
    with pytest.raises(CheckpointError, match=r"a legacy \(torch\) checkpoint of a mixture of "
                                              r"experts \(num_experts=4\); mp reads those in "
                                              "torch_dist"):
        megatron_files.read_checkpoint(stages)


def test_refuses_args_without_a_field():
    args = _args()
    del args.swiglu
    with pytest.raises(ValueError, match="the Megatron checkpoint's args have no swiglu"):
        megatron.config_from_args(args)


def test_args_fields():
    args = _args()  # Megatron's enums in them, read without Megatron
    assert isinstance(args.attention_backend, megatron_files.MegatronEnum)
    assert isinstance(args.model_type, megatron_files.MegatronEnum)
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
        megatron_files.read_checkpoint(zarr.parent)
    (zarr.parent / "latest_checkpointed_iteration.txt").write_text("ten")
    with pytest.raises(CheckpointError, match="should hold an iteration or 'release'"):
        megatron_files.read_checkpoint(zarr.parent)
    stages = _copy("gpt_legacy", tmp_path) / "iter_0000010"
    (stages / "mp_rank_00").rename(stages / "mp_rank_00_000")
    (stages / "mp_rank_01").rename(stages / "mp_rank_00_001")
    with pytest.raises(CheckpointError, match="2 pipeline stages; mp reads legacy ones of one"):
        megatron_files.read_checkpoint(stages)
    (stages / "mp_rank_00_001").rename(stages / "mp_rank_03")
    with pytest.raises(CheckpointError, match=r"has no mp_rank_TT/model_optim_rng.pt of "
                                              r"tensor-parallel rank\(s\) \[1, 2\]"):
        megatron_files.read_checkpoint(stages)
    shutil.rmtree(stages / "mp_rank_03")
    with pytest.raises(CheckpointError, match="holds 1 tensor-parallel rank.s. but its args say "
                                              "tensor_model_parallel_size=2"):
        megatron_files.read_checkpoint(stages)


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_reads_without_unpickling_code(tmp_path):
    index = _copy("gpt", tmp_path) / "iter_0000010" / ".metadata"
    index.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="builtins.print is not allowed"):
        megatron_files.read_checkpoint(index.parent)
    torch.save({"args": _Exploit()}, index.parent / "common.pt")
    with pytest.raises(CheckpointError, match=r"common.pt safely \(.*\): Unsupported global: "
                                              r"GLOBAL print was not an allowed global by "
                                              r"default\.$"):
        megatron_files.read_checkpoint(index.parent)
