"""Hugging Face gpt-oss both ways: random-weight ``GptOssForCausalLM`` models (built from a
config, no download; 2 or 3 layers, 4 heads of 16 channels in 2 query groups with biases and
non-zero sinks, a window of 4 keys over 24 tokens on the ``sliding_attention`` layers, YaRN
with ``truncate: false`` stretching a 16-token context by 4, 4 biased experts of which a
biased router picks 2, the gated unit clamped) converted by ``tools/convert_checkpoint.py``
give transformers' own logits in mp at TP 1 and TP 2 (and transformers' logits change when
any of those features is switched off, so each is tested); converted back, transformers
loads the same model (its config field for field, state dict and logits bitwise) and mp the
same checkpoint; quantized checkpoints and what either side cannot express are refused by
name."""

import json
import re

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from hf_convert import (
    assert_same_checkpoint,
    assert_same_model,
    convert,
    mp_logits,
    to_mp,
    transformers,
)
from test_gpt_model import _check_against_tp1

from mp.checkpointing import hf_gpt_oss, read_checkpoint_info
from mp.model import TransformerConfig

VOCAB = 200
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 2.0,
         "beta_slow": 0.25, "truncate": False, "original_max_position_embeddings": 16}


def _config(**extra):
    """A tiny ``GptOssConfig``; ``extra``: more of its fields (``layer_types``, ...)."""
    return transformers.GptOssConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64, "sliding_window": 4, "swiglu_limit": 0.5,
        "rope_parameters": dict(_YARN), **extra})


def _gpt_oss(config=None, state=None):
    """A random gpt-oss of ``config`` (default `_config`) with every weight perturbed (the
    zero-initialized biases too; the sinks by O(1), so that they weigh beside the scores), or
    with the weights ``state``."""
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config or _config()).eval()
    with torch.no_grad():
        if state is not None:
            model.load_state_dict(state)
        else:
            for i, (name, param) in enumerate(model.named_parameters()):
                param.add_(seeded(param.shape, 100 + i, scale=1.0 if "sinks" in name else 0.05))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens()).logits


def _swapped_gate_up(state: dict) -> dict:
    return {k: torch.cat([v[..., 1::2], v[..., 0::2]], dim=-1) if "gate_up" in k else v
            for k, v in state.items()}


def test_each_feature_changes_transformers_logits():
    """Without its window, with YaRN's ends rounded, without sinks, clamp or gate/up order,
    the same model gives other logits: the conversion tests below test each."""
    model = _gpt_oss()
    state, expected = model.state_dict(), _logits(model)
    rounded = {**_YARN, "truncate": True}
    variants = {
        "no window": (_config(layer_types=["full_attention"] * 2), state),
        "rounded YaRN": (_config(rope_parameters=rounded), state),
        "no sinks": (_config(), {k: v * 0 if k.endswith("sinks") else v
                                 for k, v in state.items()}),
        "no clamp": (_config(swiglu_limit=100.0), state),
        "gate and up swapped": (_config(), _swapped_gate_up(state))}
    for what, (config, weights) in variants.items():
        other = _logits(_gpt_oss(config, weights))
        assert (other - expected).abs().max() > 1e-3, f"{what}: the same logits"


#: id -> (the config's other fields, TP, mp's attention core)
CASES = {
    "TP1": ({}, 1, "sdpa"),
    "three-layers-tied-TP2-unfused": ({"num_hidden_layers": 3, "tie_word_embeddings": True,
                                       "swiglu_limit": 7.0, "layer_types": [
                                           "full_attention", "sliding_attention",
                                           "sliding_attention"]}, 2, "unfused"),
}


@pytest.mark.parametrize("case", CASES)
def test_gpt_oss_logits_match_transformers(tmp_path, case):
    extra, tp, backend = CASES[case]
    model = _gpt_oss(_config(**extra))
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", tp)
    saved = read_checkpoint_info(tmp_path / "mp").model_config
    slides = [int(t == "sliding_attention") for t in model.config.layer_types]
    assert {key: saved[key] for key in (
        "normalization", "activation", "activation_func_clamp_value", "glu_linear_offset",
        "softmax_type", "add_bias_linear", "kv_channels", "num_query_groups", "rope_type",
        "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings",
        "yarn_correction_range_round_to_int", "window_size", "window_attn_skip_freq",
        "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_bias",
        "untie_embeddings_and_output_weights")} == {
        "normalization": "RMSNorm", "activation": "quick_geglu",
        "activation_func_clamp_value": extra.get("swiglu_limit", 0.5), "glu_linear_offset": 1.0,
        "softmax_type": "learnable", "add_bias_linear": True, "kv_channels": 16,
        "num_query_groups": 2, "rope_type": "yarn", "yarn_rotary_scaling_factor": 4.0,
        "yarn_original_max_position_embeddings": 16,
        "yarn_correction_range_round_to_int": False, "window_size": [3, 0],
        "window_attn_skip_freq": slides, "num_moe_experts": 4, "moe_router_topk": 2,
        "moe_ffn_hidden_size": 48, "moe_router_bias": True,
        "untie_embeddings_and_output_weights": not extra.get("tie_word_embeddings", False)}
    logits = run_distributed(tp, mp_logits, str(tmp_path / "mp"), tp, 1, _tokens(), VOCAB,
                             attention_backend=backend)
    assert_rel_close(logits[0], _logits(model), rtol=1e-5, what=f"{case} logits")


#: transformers' config fields that do not describe the model
_BOOKKEEPING = {"transformers_version", "dtype", "_name_or_path", "bos_token_id",
                "eos_token_id", "pad_token_id", "use_cache"}


@pytest.mark.parametrize("extra", [{}, {"rope_parameters": {**_YARN, "truncate": True},
                                        "layer_types": ["full_attention", "sliding_attention"],
                                        "tie_word_embeddings": True}],
                         ids=["gpt-oss", "rounded-yarn-tied"])
def test_gpt_oss_round_trip_is_exact(tmp_path, extra):
    """Hugging Face -> mp -> Hugging Face -> mp: transformers reads the written config.json
    as the same config and model (state dict tensor for tensor, logits bitwise), mp the
    same checkpoint."""
    model = _gpt_oss(_config(**extra))
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", 1)
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output", str(tmp_path / "back")])
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (written["architectures"], written["model_type"]) == (["GptOssForCausalLM"], "gpt_oss")
    back = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "back").eval()
    got, want = back.config.to_dict(), model.config.to_dict()
    assert {k: v for k, v in got.items() if k not in _BOOKKEEPING} == \
        {k: v for k, v in want.items() if k not in _BOOKKEEPING}
    assert_same_model(back, model, _tokens())
    to_mp(tmp_path / "back", tmp_path / "mp2", 1)
    assert_same_checkpoint(tmp_path / "mp", tmp_path / "mp2")


@pytest.mark.parametrize("change, message", [
    ({"quantization_config": {"quant_method": "mxfp4"}},
     "quantization_config={'quant_method': 'mxfp4'}: mp converts unquantized weights"),
    ({"attention_bias": False}, "attention_bias=False: mp's gpt-oss needs attention_bias=True"),
    ({"swiglu_alpha": 1.0}, "swiglu_alpha=1.0: mp's gpt-oss needs swiglu_alpha=1.702"),
    ({"rope_parameters": {**_YARN, "attention_factor": 1.5}},
     "mp's gpt-oss has YaRN (rope_type 'yarn' scaling the rotated channels by"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "RoPE scaling {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 10000.0}"),
    ({"layer_types": ["sliding_attention"]}, "layer_types=['sliding_attention']: mp's gpt-oss "
     "needs 'full_attention' or 'sliding_attention' for each of the num_hidden_layers=2")],
    ids=["mxfp4", "no-attention-bias", "other-alpha", "attention-factor", "linear-rope",
         "layer-types-short"])
def test_gpt_oss_configs_mp_cannot_express_are_refused_by_name(tmp_path, change, message):
    _gpt_oss().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit, match=re.escape(message)):
        to_mp(tmp_path / "hf", tmp_path / "mp", 1)


def test_a_gpt_oss_model_trains_at_tp2_as_at_tp1():
    """The mixture of experts a conversion gives mp (the biased router, the biased experts'
    clamped quick GeGLU) at TP 2 with sequence parallelism: loss, logits and every gradient
    (the router bias's summed over TP) those of TP 1. (Sinks and windows at TP 2:
    test_gpt_oss_knobs; YaRN only changes RoPE's frequency table, which TP leaves alone.)"""
    run_distributed(2, _check_against_tp1, 2, {
        "normalization": "RMSNorm", "position_embedding_type": "rope", "num_query_groups": 2,
        "activation": "quick_geglu", "activation_func_clamp_value": 0.5,
        "glu_linear_offset": 1.0, "num_moe_experts": 4, "moe_ffn_hidden_size": 16,
        "moe_router_bias": True, "sequence_parallel": True})


def _mp_config(**fields) -> TransformerConfig:
    return TransformerConfig(**{
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "kv_channels": 16, "vocab_size": VOCAB, "seq_length": 32, "normalization": "RMSNorm",
        "position_embedding_type": "rope", "activation": "quick_geglu",
        "activation_func_clamp_value": 7.0, "glu_linear_offset": 1.0,
        "softmax_type": "learnable", "num_moe_experts": 4, "moe_ffn_hidden_size": 32,
        "moe_router_bias": True, **fields})


@pytest.mark.parametrize("fields, message", [
    ({"moe_router_bias": False}, "model.moe_router_bias=False: gpt-oss needs"),
    ({"glu_linear_offset": 0.0}, "model.glu_linear_offset=0.0: gpt-oss needs"),
    ({"normalization": "LayerNorm"}, "model.normalization='LayerNorm': gpt-oss needs"),
    ({"moe_layer_freq": [1, 0]}, "model.activation_func_clamp_value=7.0, num_moe_experts=4, "
     "moe_layer_freq=[1, 0]: gpt-oss clamps its gated unit (swiglu_limit) and has experts in "
     "every layer"),
    ({"activation_func_clamp_value": None}, "model.activation_func_clamp_value=None")],
    ids=["unbiased-router", "no-offset", "layernorm", "dense-layer", "no-clamp"])
def test_mp_models_gpt_oss_cannot_express_do_not_export(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_gpt_oss.mp_to_hf({}, _mp_config(**fields))


def test_models_with_sinks_or_quick_geglu_export_as_gpt_oss():
    """``mp-to-hf`` writes gpt-oss for an mp model with attention sinks or quick GeGLU, and
    the Llama family refuses a biased router."""
    assert convert._format_of(_mp_config()) is hf_gpt_oss
    assert convert._format_of(_mp_config(softmax_type="vanilla")) is hf_gpt_oss
    plain = _mp_config(softmax_type="vanilla", activation="swiglu", add_bias_linear=False,
                       activation_func_clamp_value=None, glu_linear_offset=0.0)
    assert convert._format_of(plain).__name__.endswith("hf_llama")
    with pytest.raises(ValueError, match=re.escape("model.moe_router_bias=True: Mixtral needs")):
        convert._format_of(plain).hf_config(plain)


@pytest.mark.parametrize("name,layers,experts", [("gpt-oss-20b", 24, 32),
                                                 ("gpt-oss-120b", 36, 128)])
def test_shipped_configs_are_transformers_gpt_oss(name, layers, experts):
    """configs/gpt-oss-*.yaml describe the model transformers' ``GptOssConfig`` defaults
    describe (its released sizes), as the converter reads it: every architecture field (the
    sliding layers compared layer by layer: the file says "every second layer attends fully",
    the converter lists them)."""
    from test_config import shipped

    from mp.config.loader import CHECKPOINT_ARGS

    hf = transformers.GptOssConfig(num_hidden_layers=layers, num_local_experts=experts)
    want = hf_gpt_oss.config_from_hf(hf.to_dict())
    have = shipped(name).model
    different = {field: (getattr(have, field), getattr(want, field))
                 for field in CHECKPOINT_ARGS
                 if field not in ("seq_length", "window_attn_skip_freq")
                 and getattr(have, field) != getattr(want, field)}
    assert different == {}
    windows = [[cfg.attention_window(n) for n in range(1, layers + 1)] for cfg in (have, want)]
    assert windows[0] == windows[1] and windows[0][:2] == [127, None]
