"""Hugging Face Llama round trip: random-weight ``LlamaForCausalLM`` models (built from a
config, no download; Qwen2's with q, k, v biases and Qwen3's with q/k norms besides) with
grouped-query, multi-query and multi-head attention, a non-default
RoPE base, Llama 3.1's RoPE scaling, a ``head_dim`` other than hidden / heads (mp's
``kv_channels``) and tied or untied embeddings, converted by ``tools/convert_checkpoint.py``
(also into an mp model with zero-centred norms), give transformers' own logits in mp at TP 1
and 2; converted back, the same state dict, and a model transformers loads with the same
logits. Configs one side cannot express are refused by name."""

import json

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from hf_convert import assert_same_model, convert, transformers

from mp import parallel_state as ps
from mp.checkpointing import (
    hf_llama,
    load_checkpoint,
    load_global_model,
    read_checkpoint_info,
)
from mp.model import GPTModel, TransformerConfig
from mp.tensor_parallel import gather_from_tensor_model_parallel_region

VOCAB, POSITIONS, HEADS = 200, 32, 8


# Llama 3.1's RoPE scaling: with head size 8 and base 5e5 the wavelengths are about 6, 167,
# 4443 and 118,000 tokens, one in each of its three regimes (kept, blended, divided).
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LINEAR_SCALING = {"rope_type": "linear", "factor": 4.0}  # positions / 4


def _saved_rope(scaling: dict | None) -> dict:
    """The RoPE fields mp's config should hold for Hugging Face's ``scaling``."""
    kind = (scaling or {}).get("rope_type")
    return {"use_rope_scaling": kind == "llama3",
            "rope_scaling_factor": scaling["factor"] if kind == "llama3" else 8.0,
            "rotary_seq_len_interpolation_factor": scaling["factor"] if kind == "linear"
            else None}


def _llama(kv_heads: int, tied: bool = False, scaling: dict | None = None,
           head_dim: int | None = None, family: str = "Llama", **extra):
    """``head_dim``: the default (None) is hidden / heads = 8. ``family``: Llama, Qwen2 (a
    Llama with q, k, v biases), Qwen3 (a Llama with q/k norms) or Mistral. ``extra``: more
    of the config's fields (its sliding window, ...)."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads,
        **({} if head_dim is None else {"head_dim": head_dim}),  # Qwen3's default: 128
        max_position_embeddings=POSITIONS, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, **(scaling or {})},
        tie_word_embeddings=tied, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # make the norms non-trivial too
        for i, param in enumerate(model.parameters()):
            param.add_(seeded(param.shape, 100 + i, scale=0.05))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def _mp_logits(path: str, tp: int, tokens: torch.Tensor) -> torch.Tensor:
    saved = read_checkpoint_info(path).model_config
    ps.initialize_model_parallel(tp)
    model = GPTModel(TransformerConfig(**{**saved, "tensor_model_parallel_size": tp})).eval()
    load_checkpoint(path, model)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens))
    return logits[..., :VOCAB]


def _to_mp(hf_dir, mp_dir, tp: int, *options: str) -> None:
    convert.main(["hf-to-mp", "--input", str(hf_dir), "--output", str(mp_dir),
                  "--tensor-model-parallel-size", str(tp), "--make-vocab-size-divisible-by",
                  "16", *options])


@pytest.mark.parametrize("kv_heads, tied, tp, scaling, head_dim, family", [
    (2, False, 2, None, None, "Llama"), (8, False, 2, None, None, "Llama"),
    (1, False, 1, None, None, "Llama"), (2, True, 2, None, None, "Llama"),
    (2, True, 2, LLAMA3_SCALING, None, "Llama"),
    (2, False, 1, {**LLAMA3_SCALING, "factor": 32.0}, None, "Llama"),
    (2, False, 2, LINEAR_SCALING, None, "Llama"),
    (2, False, 2, None, 12, "Llama"), (8, False, 1, LLAMA3_SCALING, 16, "Llama"),
    (2, False, 2, None, 12, "Qwen3"), (2, True, 1, None, 12, "Qwen3"),
    (2, True, 2, None, 12, "Qwen3"), (2, True, 2, None, None, "Qwen2"),
    (4, False, 1, None, None, "Qwen2")],
    ids=["grouped-TP2", "multi-head-TP2", "multi-query-TP1", "tied-TP2",
         "llama3.1-rope-TP2", "llama3.2-rope-TP1", "linear-rope-TP2", "head-dim-12-TP2",
         "head-dim-16-TP1", "qwen3-head-dim-12-TP2", "qwen3-tied-TP1", "qwen3-tied-TP2",
         "qwen2-tied-TP2", "qwen2-TP1"])
def test_llama_logits_match_after_conversion(tmp_path, kv_heads, tied, tp, scaling, head_dim,
                                             family):
    model = _llama(kv_heads, tied, scaling, head_dim, family)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    _to_mp(tmp_path / "hf", tmp_path / "mp", tp)
    saved = read_checkpoint_info(tmp_path / "mp").model_config
    assert (saved["num_query_groups"], saved["rotary_base"]) == (kv_heads, 500000.0)
    assert saved["kv_channels"] == (head_dim or 64 // HEADS)
    assert saved["qk_layernorm"] == (family == "Qwen3")
    assert saved["add_qkv_bias"] == (family == "Qwen2")
    assert {key: saved[key] for key in _saved_rope(None)} == _saved_rope(scaling)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    logits = run_distributed(tp, _mp_logits, str(tmp_path / "mp"), tp, tokens)
    assert_rel_close(logits[0], expected, rtol=1e-5, what=f"logits ({kv_heads} kv heads)")


@pytest.mark.parametrize("scaling, head_dim, options, family", [
    (None, None, (), "Llama"), (LLAMA3_SCALING, None, (), "Llama"),
    (LINEAR_SCALING, None, (), "Llama"), (None, 12, (), "Llama"),
    (None, 12, ("--apply-layernorm-1p",), "Llama"), (None, 12, (), "Qwen3"),
    (None, 12, ("--apply-layernorm-1p",), "Qwen3"), (None, None, (), "Qwen2")],
    ids=["plain", "llama3.1-rope", "linear-rope", "head-dim-12", "head-dim-12-layernorm-1p",
         "qwen3", "qwen3-layernorm-1p", "qwen2"])
def test_llama_state_dict_round_trip_is_exact(tmp_path, scaling, head_dim, options, family):
    model = _llama(2, scaling=scaling, head_dim=head_dim, family=family)
    model.save_pretrained(tmp_path / "hf")
    _to_mp(tmp_path / "hf", tmp_path / "mp", 1, *options)
    if options:  # mp's zero-centred norms hold Hugging Face's weights minus 1, same logits
        weights, info = load_global_model(tmp_path / "mp")
        assert info.model_config["layernorm_zero_centered_gamma"]
        hf_norm = model.state_dict()["model.layers.1.post_attention_layernorm.weight"]
        assert torch.equal(weights["decoder.layers.1.pre_mlp_layernorm.weight"], hf_norm - 1)
        with torch.no_grad():
            expected = model(_tokens()).logits
        logits = run_distributed(1, _mp_logits, str(tmp_path / "mp"), 1, _tokens())[0]
        assert_rel_close(logits, expected, rtol=1e-5, what="zero-centred mp logits")
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output", str(tmp_path / "back")])
    back_model = getattr(transformers, f"{family}ForCausalLM").from_pretrained(
        tmp_path / "back").eval()
    # the written config.json means the same model (its RoPE too)
    assert_same_model(back_model, model, _tokens())


@pytest.mark.parametrize("change, message, family", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "mp's RoPE has Llama 3.1's scaling", "Llama"),
    ({"rope_parameters": {**LLAMA3_SCALING, "high_freq_factor": 2.0, "rope_theta": 1e4}},
     "mp's RoPE has Llama 3.1's scaling", "Llama"),
    ({"attention_bias": True}, "attention_bias=True: mp's Llama needs attention_bias=False",
     "Llama"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu': mp's Llama needs hidden_act='silu'", "Llama"),
    ({"attention_bias": True}, "attention_bias=True: mp's Qwen3 needs attention_bias=False",
     "Qwen3"),
])  # sliding windows: test_checkpoint_hf_sliding_window.py
def test_unsupported_llama_configs_are_refused_by_name(tmp_path, change, message, family):
    model = _llama(2, family=family)
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        _to_mp(tmp_path / "hf", tmp_path / "mp", 1)


@pytest.mark.parametrize("rope, message", [
    ({"rotary_percent": 0.5}, r"model.rotary_percent=0.5: Llama needs .*rotary_percent in "
                              r"\(1.0,\)"),
    ({"rotary_interleaved": True}, r"model.rotary_interleaved=True: Llama needs .*"
                                   r"rotary_interleaved in \(False,\)")],
    ids=["partly_rotated", "interleaved"])
def test_rope_llama_lacks_does_not_export(rope, message):
    """Llama rotates whole heads, in halves: ``rotary_percent < 1`` and GPT-J's interleaved
    pairs are refused."""
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=HEADS,
                               vocab_size=VOCAB, seq_length=16, normalization="RMSNorm",
                               activation="swiglu", position_embedding_type="rope",
                               add_bias_linear=False, **rope)
    with pytest.raises(ValueError, match=message):
        hf_llama.mp_to_hf({}, config)
