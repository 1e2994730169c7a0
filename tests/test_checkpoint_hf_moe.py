"""Hugging Face mixture-of-experts round trip: random-weight ``MixtralForCausalLM``,
``Qwen3MoeForCausalLM`` and ``Qwen2MoeForCausalLM`` models (built from a config, no download;
Qwen3-MoE and Qwen2-MoE with and without ``norm_topk_prob``; Qwen2-MoE's gated shared expert
and q, k, v biases) converted by ``tools/convert_checkpoint.py`` give transformers' own logits
in mp at TP 1, TP 2 and EP 2 (mp's experts and router against transformers' sparse MoE
blocks), with dense layers among them (Qwen3-MoE's ``mlp_only_layers`` and
``decoder_sparse_step``); converted back, transformers loads the same weights. What mp
cannot express is refused by name."""

import dataclasses
import json

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from hf_convert import assert_same_model, convert, mp_logits, to_mp, transformers

from mp.checkpointing import read_checkpoint_info
from mp.model import TransformerConfig

VOCAB, EXPERTS, TOPK = 200, 4, 2


def _moe(family: str = "Mixtral", topk: int = TOPK, **extra):
    """A Mixtral, a Qwen3-MoE or a Qwen2-MoE (``extra``: its ``norm_topk_prob``, ...), with
    experts 96 wide (Qwen2-MoE's shared expert 80)."""
    experts = {"num_local_experts": EXPERTS, "intermediate_size": 96} if family == "Mixtral" \
        else {"num_experts": EXPERTS, "moe_intermediate_size": 96, "intermediate_size": 160,
              **({"head_dim": 12} if family == "Qwen3Moe"
                 else {"shared_expert_intermediate_size": 80})}
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=32, num_experts_per_tok=topk,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        **experts, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # the norms non-trivial, the router's choices spread out
        for i, param in enumerate(model.parameters()):
            param.add_(seeded(param.shape, 100 + i, scale=0.05))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family,world,tp,ep,topk,extra", [
    ("Mixtral", 1, 1, 1, 2, {}), ("Mixtral", 2, 2, 1, 2, {}), ("Mixtral", 2, 1, 2, 2, {}),
    ("Mixtral", 1, 1, 1, 1, {}), ("Qwen3Moe", 2, 2, 1, 2, {"norm_topk_prob": True}),
    ("Qwen3Moe", 2, 1, 2, 2, {"norm_topk_prob": False}),
    ("Qwen3Moe", 2, 2, 1, 2, {"norm_topk_prob": True, "mlp_only_layers": [0]}),
    ("Qwen3Moe", 1, 1, 1, 2, {"norm_topk_prob": True, "decoder_sparse_step": 2}),
    ("Qwen2Moe", 2, 2, 1, 2, {"norm_topk_prob": False}),
    ("Qwen2Moe", 2, 1, 2, 2, {"norm_topk_prob": True, "mlp_only_layers": [0]}),
    ("Qwen2Moe", 1, 1, 1, 2, {"norm_topk_prob": False, "qkv_bias": False})],
    ids=["mixtral-TP1", "mixtral-TP2", "mixtral-EP2", "mixtral-top1", "qwen3-moe-TP2",
         "qwen3-moe-unnormalized-EP2", "qwen3-moe-dense-layer-0-TP2", "qwen3-moe-sparse-step-2",
         "qwen2-moe-TP2", "qwen2-moe-dense-layer-0-EP2", "qwen2-moe-no-qkv-bias"])
def test_moe_logits_match_after_conversion(tmp_path, family, world, tp, ep, topk, extra):
    model = _moe(family, topk, **extra)
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", tp)
    saved = read_checkpoint_info(tmp_path / "mp").model_config
    pattern = {"mlp_only_layers": [0, 1], "decoder_sparse_step": [0, 1]}
    layers = next((v for k, v in pattern.items() if k in extra), 1)
    assert (saved["num_moe_experts"], saved["moe_router_topk"], saved["moe_ffn_hidden_size"],
            saved["moe_layer_freq"]) == (EXPERTS, topk, 96, layers)
    assert saved["qk_layernorm"] == (family == "Qwen3Moe")
    assert saved["moe_router_pre_softmax"] == (extra.get("norm_topk_prob") is False)
    qwen2 = family == "Qwen2Moe"
    assert (saved["moe_shared_expert_gate"], saved["add_qkv_bias"]) == \
        (qwen2, qwen2 and extra.get("qkv_bias", True))
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    logits = run_distributed(world, mp_logits, str(tmp_path / "mp"), tp, ep, tokens, VOCAB)
    for got in logits:  # EP 2: both ranks ran the same tokens
        assert_rel_close(got, expected, rtol=1e-5, what="logits")


@pytest.mark.parametrize("family,extra,model_type", [
    ("Mixtral", {}, "mixtral"), ("Qwen3Moe", {"norm_topk_prob": True}, "qwen3_moe"),
    ("Qwen3Moe", {"norm_topk_prob": False}, "qwen3_moe"),
    ("Qwen3Moe", {"norm_topk_prob": True, "mlp_only_layers": [1]}, "qwen3_moe"),
    ("Qwen2Moe", {"norm_topk_prob": False}, "qwen2_moe"),
    ("Qwen2Moe", {"norm_topk_prob": True, "mlp_only_layers": [1], "qkv_bias": False},
     "qwen2_moe")],
    ids=["mixtral", "qwen3-moe", "qwen3-moe-unnormalized", "qwen3-moe-dense-layer-1",
         "qwen2-moe", "qwen2-moe-dense-layer-1-no-qkv-bias"])
def test_moe_round_trip_is_exact(tmp_path, family, extra, model_type):
    model = _moe(family, **extra)
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", 1)
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config.get("norm_topk_prob", True) == extra.get("norm_topk_prob", True)
    assert config.get("mlp_only_layers", []) == extra.get("mlp_only_layers", [])
    back_model = getattr(transformers, f"{family}ForCausalLM").from_pretrained(
        tmp_path / "back").eval()
    assert_same_model(back_model, model, _tokens())


# (sliding windows convert: test_checkpoint_hf_sliding_window.py)
@pytest.mark.parametrize("family, change, message", [
    ("Mixtral", {"router_jitter_noise": 0.1},
     "router_jitter_noise=0.1: mp's Mixtral needs router_jitter_noise=0.0")])
def test_unsupported_moe_configs_are_refused_by_name(tmp_path, family, change, message):
    _moe(family).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit, match=message):
        to_mp(tmp_path / "hf", tmp_path / "mp", 1)


def test_mp_moe_models_mixtral_cannot_express_are_refused():
    from mp.checkpointing import hf_llama
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8,
                               vocab_size=VOCAB, seq_length=16, normalization="RMSNorm",
                               activation="swiglu", position_embedding_type="rope",
                               add_bias_linear=False, num_moe_experts=4, moe_layer_freq=2)
    with pytest.raises(ValueError, match=r"model.moe_layer_freq=2: Mixtral has experts in "
                                         "every layer"):
        hf_llama.hf_config(config)
    top1 = dataclasses.replace(config, moe_layer_freq=1, moe_router_topk=1,
                               moe_apply_probs_on_input=True)
    with pytest.raises(ValueError, match="moe_apply_probs_on_input=True"):
        hf_llama.hf_config(top1)
