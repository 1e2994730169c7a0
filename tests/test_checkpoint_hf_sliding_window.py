"""Hugging Face sliding-window attention both ways: random-weight Mistral, Mixtral, Qwen2,
Qwen3, Qwen3-MoE and Qwen2-MoE models (built from a config, no download) whose windows (4 or
5 keys over 24 tokens) slide in every layer or in some, given by ``layer_types`` or derived
from ``max_window_layers``, converted by ``tools/convert_checkpoint.py``, give transformers'
own logits in mp (``window_size``, ``window_attn_skip_freq``) at TP 1 and 2 with the SDPA and
unfused cores; transformers' logits without the window differ, so the window is tested.
Converted back, transformers loads the same model and mp the same checkpoint, config for
config; what either side cannot express is refused by name."""

import json
import re

import pytest
import torch
from checks import assert_rel_close
from harness import run_distributed
from hf_convert import (
    assert_same_checkpoint,
    assert_same_model,
    convert,
    mp_logits,
    to_mp,
    transformers,
)
from test_checkpoint_hf_llama import _llama
from test_checkpoint_hf_moe import VOCAB, _moe, _tokens

from mp.checkpointing import hf_llama, read_checkpoint_info
from mp.model import TransformerConfig

_ON = {"use_sliding_window": True}
#: id -> (transformers family, its window fields, whether config.json loses ``layer_types``
#: (an older file: mp derives them from ``max_window_layers``), mp's window_size,
#: window_attn_skip_freq)
CASES = {
    "mistral": ("Mistral", {"sliding_window": 4}, False, [3, 0], None),
    "qwen2-max-window-layers": ("Qwen2", {**_ON, "sliding_window": 4, "max_window_layers": 1},
                                True, [3, 0], [0, 1]),
    "qwen3-layer-types": ("Qwen3", {**_ON, "sliding_window": 5, "layer_types": [
        "sliding_attention", "full_attention"]}, False, [4, 0], [1, 0]),
    "mixtral": ("Mixtral", {"sliding_window": 4}, False, [3, 0], None),
    "qwen3-moe": ("Qwen3Moe", {**_ON, "sliding_window": 4}, False, [3, 0], None),
    "qwen2-moe-max-window-layers": ("Qwen2Moe", {**_ON, "sliding_window": 4,
                                                 "max_window_layers": 2}, True, [3, 0], [1, 0]),
}


def _model(family: str, window: dict):
    """A perturbed random model of ``family`` with the config fields ``window``."""
    if family.endswith("Moe") or family == "Mixtral":
        return _moe(family, **window)
    return _llama(2, family=family, **({"head_dim": 12} if family == "Qwen3" else {}), **window)


def _save(model, directory, drop_layer_types: bool = False) -> None:
    model.save_pretrained(directory)
    if drop_layer_types:  # as files written before transformers had layer_types
        config = json.loads((directory / "config.json").read_text())
        del config["layer_types"]
        (directory / "config.json").write_text(json.dumps(config))


def _window_less_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model``'s logits with its weights in the same family without sliding windows."""
    config = model.config.to_dict()
    config.update(sliding_window=None, use_sliding_window=False, layer_types=None)
    plain = type(model)(type(model.config).from_dict(config)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        return plain(tokens).logits


@pytest.mark.parametrize("case, tp, backend", [
    ("mistral", 1, "sdpa"), ("mistral", 2, "sdpa"), ("mistral", 2, "unfused"),
    ("qwen2-max-window-layers", 2, "sdpa"), ("qwen2-max-window-layers", 1, "unfused"),
    ("qwen3-layer-types", 2, "sdpa"), ("mixtral", 2, "sdpa"), ("qwen3-moe", 2, "unfused"),
    ("qwen2-moe-max-window-layers", 2, "sdpa")])
def test_windowed_logits_match_transformers(tmp_path, case, tp, backend):
    family, window, drop, window_size, skip = CASES[case]
    model = _model(family, window)
    _save(model, tmp_path / "hf", drop)
    to_mp(tmp_path / "hf", tmp_path / "mp", tp)
    saved = read_checkpoint_info(tmp_path / "mp").model_config
    assert (saved["window_size"], saved["window_attn_skip_freq"]) == (window_size, skip)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    plain = _window_less_logits(model, tokens)
    assert (plain - expected).abs().max() > 0.1, "transformers applied no window"
    logits = run_distributed(tp, mp_logits, str(tmp_path / "mp"), tp, 1, tokens, VOCAB,
                             attention_backend=backend)
    assert_rel_close(logits[0], expected, rtol=1e-5, what=f"{case} logits")


@pytest.mark.parametrize("case", CASES)
def test_windowed_round_trip_is_exact(tmp_path, case):
    """Hugging Face -> mp -> Hugging Face -> mp: transformers reads the written config.json
    as the same model (its logits bitwise), mp the same checkpoint."""
    family, window, drop, _, _ = CASES[case]
    model = _model(family, window)
    _save(model, tmp_path / "hf", drop)
    to_mp(tmp_path / "hf", tmp_path / "mp", 1)
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output", str(tmp_path / "back")])
    back = getattr(transformers, f"{family}ForCausalLM").from_pretrained(tmp_path / "back")
    if hasattr(model.config, "layer_types"):
        assert back.config.layer_types == model.config.layer_types
    assert_same_model(back.eval(), model, _tokens())
    to_mp(tmp_path / "back", tmp_path / "mp2", 1)
    assert_same_checkpoint(tmp_path / "mp", tmp_path / "mp2")


def _mp_config(**fields) -> TransformerConfig:
    return TransformerConfig(**{
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 8, "vocab_size": VOCAB,
        "seq_length": 32, "normalization": "RMSNorm", "activation": "swiglu",
        "position_embedding_type": "rope", "add_bias_linear": False, **fields})


@pytest.mark.parametrize("fields, written", [
    ({"window_size": [7, 0]}, {"model_type": "mistral", "sliding_window": 8}),
    ({"window_size": [7, 0], "window_attn_skip_freq": 2, "qk_layernorm": True},
     {"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8,
      "layer_types": ["sliding_attention", "full_attention"] * 2}),
    ({"window_size": [3, 0], "window_attn_skip_freq": [0, 0, 1, 1], "add_qkv_bias": True},
     {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
      "max_window_layers": 2}),
    ({"window_size": [3, 0], "window_attn_skip_freq": [1, 0, 1, 0], "num_moe_experts": 4,
      "add_qkv_bias": True, "moe_shared_expert_intermediate_size": 32,
      "moe_shared_expert_gate": True},
     {"model_type": "qwen2_moe", "max_window_layers": 3}),
    ({}, {"model_type": "llama"}),
    ({"qk_layernorm": True}, {"model_type": "qwen3", "use_sliding_window": False}),
    ({"num_moe_experts": 4}, {"model_type": "mixtral", "sliding_window": None})],
    ids=["mistral", "qwen3-every-2nd-full", "qwen2-last-two-slide", "qwen2-moe-even-slide",
         "llama", "qwen3-full", "mixtral-full"])
def test_mp_windows_export_as_transformers_reads_them(fields, written):
    """mp's windows as the family's fields; transformers' config class reads them as the
    layers mp slides, with ``sliding_window = left + 1``; a model without windows writes
    what it wrote before windows were converted."""
    config = _mp_config(**fields)
    hf = hf_llama.hf_config(config)
    assert {key: hf.get(key) for key in written} == written
    if config.window_size is None:
        assert "layer_types" not in hf and not hf.get("use_sliding_window")
        return
    ours = [config.attention_window(i + 1) for i in range(config.num_layers)]
    reader = getattr(transformers, hf["architectures"][0].replace("ForCausalLM", "Config"))
    reads = [reader(**hf)]
    if "max_window_layers" in hf:  # it alone gives the same layers
        reads.append(reader(**{k: v for k, v in hf.items() if k != "layer_types"}))
    for read in reads:
        types = getattr(read, "layer_types", None) or ["sliding_attention"] * config.num_layers
        assert [read.sliding_window - 1 if kind == "sliding_attention" else None
                for kind in types] == ours, read
    back = hf_llama.config_from_hf(hf)
    assert back.window_size == config.window_size
    assert [back.attention_window(i + 1) for i in range(config.num_layers)] == ours


@pytest.mark.parametrize("family, change, message", [
    ("Qwen3", {**_ON, "layer_types": ["sliding_attention", "chunked_attention"]},
     "layer_types=['sliding_attention', 'chunked_attention']: mp's Qwen3 needs "
     "'full_attention' or 'sliding_attention' for each of the num_hidden_layers=2 layers"),
    ("Qwen2", {**_ON, "layer_types": ["sliding_attention"]},
     "layer_types=['sliding_attention']: mp's Qwen2 needs"),
    ("Qwen2", {"use_sliding_window": False, "layer_types": ["sliding_attention"] * 2},
     "layer_types=['sliding_attention', 'sliding_attention'] with use_sliding_window=False: "
     "mp's Qwen2 slides the 'sliding_attention' layers with use_sliding_window=true"),
    ("Mistral", {"sliding_window": 0}, "sliding_window=0: mp's Mistral needs an integer >= 1 "
     "for its layers of 'sliding_attention'"),
    ("Qwen2Moe", {**_ON, "sliding_window": 0, "layer_types": ["sliding_attention"] * 2},
     "sliding_window=0: mp's Qwen2-MoE needs an integer >= 1"),
    ("Qwen3", {**_ON, "sliding_window": None, "layer_types": ["sliding_attention"] * 2},
     "sliding_window=None: mp's Qwen3")],
    ids=["qwen3-chunked", "qwen2-one-type-for-two-layers", "qwen2-sliding-types-switched-off",
         "mistral-window-0", "qwen2-moe-window-0", "qwen3-window-null"])
def test_windows_mp_cannot_express_are_refused_by_name(tmp_path, family, change, message):
    _model(family, {}).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit, match=re.escape(message)):
        to_mp(tmp_path / "hf", tmp_path / "mp", 1)


@pytest.mark.parametrize("fields, family", [
    ({}, "Mistral"), ({"num_moe_experts": 4}, "Mixtral"),
    ({"num_moe_experts": 4, "qk_layernorm": True}, "Qwen3-MoE")])
def test_windows_a_family_cannot_express_do_not_export(fields, family):
    """Mistral, Mixtral and Qwen3-MoE slide every layer or none."""
    config = _mp_config(window_size=[3, 0], window_attn_skip_freq=[1, 1, 0, 1], **fields)
    with pytest.raises(ValueError, match=rf"model.window_attn_skip_freq=\[1, 1, 0, 1\]: "
                                         rf"{family} has a sliding window in every layer or "
                                         "none"):
        hf_llama.hf_config(config)
