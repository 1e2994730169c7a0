"""Hugging Face StarCoder2 both ways: random-weight ``Starcoder2ForCausalLM`` models (built
from a config, no download; LayerNorm with biases, a GeLU MLP, biases on every linear layer or
none, grouped-query, multi-query and multi-head attention, RoPE, tied or untied embeddings,
sliding windows of 4 keys over 24 tokens) converted by ``tools/convert_checkpoint.py`` give
transformers' own logits in mp at TP 1 and 2 (transformers' logits without the window differ,
so the window is tested); converted back, transformers loads the same model (its config field
for field) and mp the same checkpoint; mp's fields as transformers' config class reads them;
what either side cannot express is refused by name."""

import json
import re

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from hf_convert import assert_same_checkpoint, assert_same_model, convert, mp_logits, transformers
from test_checkpoint_hf_llama import _to_mp

from mp.checkpointing import hf_starcoder2, load_global_model, read_checkpoint_info
from mp.model import TransformerConfig

VOCAB, HEADS = 200, 8


def _starcoder2(kv_heads: int = 2, tied: bool = True, **extra):
    """A perturbed random StarCoder2 (hidden 64, 8 heads, 2 layers, RoPE base 5e5, dropouts
    0.1, which eval mode leaves out); ``extra``: more of the config's fields (``use_bias``,
    ``sliding_window``, ``hidden_act``, ``head_dim``, ...)."""
    config = transformers.Starcoder2Config(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 32, "norm_epsilon": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": tied, "residual_dropout": 0.1, "embedding_dropout": 0.1,
        "attention_dropout": 0.1, "bos_token_id": None, "eos_token_id": None, **extra})
    torch.manual_seed(0)
    model = transformers.Starcoder2ForCausalLM(config).eval()
    with torch.no_grad():  # the norms and the (zero-initialized) biases non-trivial too
        for i, param in enumerate(model.parameters()):
            param.add_(seeded(param.shape, 100 + i, scale=0.05))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


#: id -> (key/value heads, tied, the config's other fields, TP, mp's attention core)
CASES = {
    "grouped-tied-TP1": (2, True, {}, 1, "sdpa"),
    "grouped-tied-TP2": (2, True, {}, 2, "sdpa"),
    "untied-TP2": (2, False, {}, 2, "sdpa"),
    "multi-head-TP2": (8, True, {}, 2, "sdpa"),
    "multi-query-untied-TP1": (1, False, {}, 1, "sdpa"),
    "no-bias-TP2": (2, True, {"use_bias": False}, 2, "sdpa"),
    "exact-gelu-head-dim-12-TP2": (2, False, {"hidden_act": "gelu", "head_dim": 12}, 2, "sdpa"),
    "window-TP1": (2, True, {"sliding_window": 4}, 1, "sdpa"),
    "window-TP2": (2, True, {"sliding_window": 4}, 2, "sdpa"),
    "window-untied-TP2-unfused": (2, False, {"sliding_window": 4}, 2, "unfused"),
}


@pytest.mark.parametrize("case", CASES)
def test_starcoder2_logits_match_transformers(tmp_path, case):
    kv_heads, tied, extra, tp, backend = CASES[case]
    model = _starcoder2(kv_heads, tied, **extra)
    model.save_pretrained(tmp_path / "hf")
    _to_mp(tmp_path / "hf", tmp_path / "mp", tp)
    saved = read_checkpoint_info(tmp_path / "mp").model_config
    window = extra.get("sliding_window")
    assert {key: saved[key] for key in (
        "normalization", "num_query_groups", "kv_channels", "add_bias_linear", "activation",
        "rotary_base", "window_size", "untie_embeddings_and_output_weights", "hidden_dropout",
        "attention_dropout")} == {
        "normalization": "LayerNorm", "num_query_groups": kv_heads,
        "kv_channels": extra.get("head_dim", 64 // HEADS),
        "add_bias_linear": extra.get("use_bias", True),
        "activation": "gelu" if extra.get("hidden_act") == "gelu" else "gelu_tanh",
        "rotary_base": 500000.0, "window_size": None if window is None else [window - 1, 0],
        "untie_embeddings_and_output_weights": not tied, "hidden_dropout": 0.1,
        "attention_dropout": 0.1}
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
        if window is not None:  # the same weights without the window give other logits
            model.config.sliding_window = None
            assert (model(tokens).logits - expected).abs().max() > 0.1, \
                "transformers applied no window"
    logits = run_distributed(tp, mp_logits, str(tmp_path / "mp"), tp, 1, tokens, VOCAB,
                             attention_backend=backend)
    assert_rel_close(logits[0], expected, rtol=1e-5, what=f"{case} logits")


#: transformers' config fields that do not describe the model
_BOOKKEEPING = {"transformers_version", "dtype", "_name_or_path", "bos_token_id",
                "eos_token_id", "pad_token_id", "use_cache"}


@pytest.mark.parametrize("extra, options", [
    ({}, ()), ({"sliding_window": 4}, ()), ({"use_bias": False, "tie_word_embeddings": False},
                                            ()),
    ({"hidden_act": "gelu", "head_dim": 12, "num_key_value_heads": 1}, ()),
    ({"sliding_window": 5}, ("--apply-layernorm-1p",))],
    ids=["tied", "window", "no-bias-untied", "exact-gelu-head-dim-12-mqa", "layernorm-1p"])
def test_starcoder2_round_trip_is_exact(tmp_path, extra, options):
    """Hugging Face -> mp -> Hugging Face -> mp: transformers reads the written config.json
    as the same config and model (state dict tensor for tensor, logits bitwise), mp the
    same checkpoint; with ``--apply-layernorm-1p`` mp's norm weights are Hugging Face's minus 1
    and its logits still transformers'."""
    model = _starcoder2(**extra)
    model.save_pretrained(tmp_path / "hf")
    _to_mp(tmp_path / "hf", tmp_path / "mp", 1, *options)
    if options:
        weights, _ = load_global_model(tmp_path / "mp")
        hf_norm = model.state_dict()["model.layers.1.post_attention_layernorm.weight"]
        assert torch.equal(weights["decoder.layers.1.pre_mlp_layernorm.weight"], hf_norm - 1)
        with torch.no_grad():
            expected = model(_tokens()).logits
        logits = run_distributed(1, mp_logits, str(tmp_path / "mp"), 1, 1, _tokens(), VOCAB)
        assert_rel_close(logits[0], expected, rtol=1e-5, what="zero-centred mp logits")
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output", str(tmp_path / "back")])
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["architectures"] == ["Starcoder2ForCausalLM"]
    back = transformers.Starcoder2ForCausalLM.from_pretrained(tmp_path / "back").eval()
    got, want = back.config.to_dict(), model.config.to_dict()
    assert {k: v for k, v in got.items() if k not in _BOOKKEEPING} == \
        {k: v for k, v in want.items() if k not in _BOOKKEEPING}
    assert_same_model(back, model, _tokens())
    _to_mp(tmp_path / "back", tmp_path / "mp2", 1, *options)
    assert_same_checkpoint(tmp_path / "mp", tmp_path / "mp2")


def _mp_config(**fields) -> TransformerConfig:
    return TransformerConfig(**{
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 8, "num_query_groups": 2,
        "vocab_size": VOCAB, "seq_length": 32, "position_embedding_type": "rope",
        "activation": "gelu_tanh", **fields})


@pytest.mark.parametrize("fields", [
    {}, {"window_size": [7, 0], "kv_channels": 16, "untie_embeddings_and_output_weights": True},
    {"add_bias_linear": False, "activation": "gelu", "hidden_dropout": 0.0,
     "attention_dropout": 0.05, "window_size": [3, 0], "window_attn_skip_freq": [1] * 4}],
    ids=["defaults", "window-head-dim-16-untied", "no-bias-exact-gelu-window"])
def test_mp_models_export_as_transformers_reads_them(fields):
    """An mp model's ``config.json`` as transformers' ``Starcoder2Config`` reads it: the
    same shape, window (``sliding_window = left + 1``), biases, dropouts; and read back by
    `config_from_hf`, the same mp model."""
    config = _mp_config(**fields)
    hf = hf_starcoder2.hf_config(config)
    read = transformers.Starcoder2Config(**hf)
    window = config.window_size
    assert (read.sliding_window, read.use_bias, read.hidden_act, read.tie_word_embeddings) == (
        None if window is None else window[0] + 1, config.add_bias_linear,
        {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[config.activation],
        not config.untie_embeddings_and_output_weights)
    assert (getattr(read, "head_dim", None) or read.hidden_size // read.num_attention_heads,
            read.num_key_value_heads, read.rope_parameters["rope_theta"]) == (
        config.kv_channels, config.num_query_groups, config.rotary_base)
    assert (read.residual_dropout, read.embedding_dropout, read.attention_dropout) == (
        config.hidden_dropout, config.hidden_dropout, config.attention_dropout)
    back = hf_starcoder2.config_from_hf(hf, seq_length=config.seq_length)
    ours = [config.attention_window(i + 1) for i in range(config.num_layers)]
    assert [back.attention_window(i + 1) for i in range(config.num_layers)] == ours
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "ffn_hidden_size", "normalization", "layernorm_epsilon",
                "activation", "rotary_base", "add_bias_linear", "hidden_dropout",
                "attention_dropout", "init_method_std", "untie_embeddings_and_output_weights",
                "max_position_embeddings"):
        assert getattr(back, key) == getattr(config, key), key


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "relu"}, "hidden_act='relu': mp's StarCoder2 MLP takes one of "
     "'gelu_pytorch_tanh', 'gelu_new', 'gelu_fast', 'gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "RoPE scaling {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 10000.0}: mp's "
     "StarCoder2 has RoPE without scaling (rope_type 'default')"),
    ({"residual_dropout": 0.1, "embedding_dropout": 0.0},
     "residual_dropout=0.1 with embedding_dropout=0.0: mp's StarCoder2 drops both with its "
     "hidden_dropout, so they must be equal"),
    ({"sliding_window": 0}, "sliding_window=0: mp's StarCoder2 needs null or an integer >= 1"),
    ({"sliding_window": 4.5}, "sliding_window=4.5: mp's StarCoder2 needs null or an integer")],
    ids=["relu", "linear-rope", "dropouts-differ", "window-0", "window-float"])
def test_starcoder2_configs_mp_cannot_express_are_refused_by_name(tmp_path, change, message):
    _starcoder2().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit, match=re.escape(message)):
        _to_mp(tmp_path / "hf", tmp_path / "mp", 1)


@pytest.mark.parametrize("fields, message", [
    ({"activation": "swiglu"}, "model.activation='swiglu': StarCoder2 needs"),
    ({"add_bias_linear": False, "add_qkv_bias": True},
     "model.add_qkv_bias=True: StarCoder2 needs"),
    ({"rotary_percent": 0.5}, "model.rotary_percent=0.5: StarCoder2 needs"),
    ({"qk_layernorm": True}, "model.qk_layernorm=True: StarCoder2 needs"),
    ({"num_moe_experts": 4}, "model.num_moe_experts=4: StarCoder2 needs"),
    ({"rotary_seq_len_interpolation_factor": 4.0},
     "model.rotary_seq_len_interpolation_factor=4.0: StarCoder2 needs"),
    ({"window_size": [3, 0], "window_attn_skip_freq": [1, 1, 0, 1]},
     "model.window_attn_skip_freq=[1, 1, 0, 1]: StarCoder2 has a sliding window in every "
     "layer or none")],
    ids=["swiglu", "qkv-bias-only", "part-rotated", "qk-norms", "experts", "linear-rope",
         "some-layers-slide"])
def test_mp_models_starcoder2_cannot_express_do_not_export(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_starcoder2.mp_to_hf({}, _mp_config(**fields))


def test_rope_models_export_by_their_norm():
    """``mp-to-hf`` writes StarCoder2 for an mp model with RoPE and LayerNorm, a Llama-like
    for RMSNorm, GPT-2 without RoPE."""
    assert convert._format_of(_mp_config()) is hf_starcoder2
    assert convert._format_of(_mp_config(normalization="RMSNorm")).__name__.endswith("hf_llama")
    assert convert._format_of(_mp_config(position_embedding_type="learned_absolute")) \
        .__name__.endswith("hf_gpt2")
