"""Hugging Face GPT-2 round trip: a random-weight ``GPT2LMHeadModel`` (built from a config, no
download) converted by ``tools/convert_checkpoint.py`` (also into an mp model with zero-centred
LayerNorms) loads into mp at TP=2 and gives transformers' own logits; converted back, it is
the same state dict, tensor for tensor. mp models GPT-2 cannot express are refused by name."""


import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from hf_convert import convert, transformers

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, read_checkpoint_info
from mp.checkpointing.hf_gpt2 import hf_config
from mp.model import GPTModel, TransformerConfig
from mp.tensor_parallel import gather_from_tensor_model_parallel_region

VOCAB, POSITIONS, BATCH, SEQ = 200, 32, 2, 24


def _gpt2(activation: str):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=64, n_layer=2, n_head=4,
        activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make LayerNorms and biases non-trivial too
        for i, param in enumerate(model.parameters()):
            param.add_(seeded(param.shape, 100 + i, scale=0.05))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def _mp_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    saved = read_checkpoint_info(path).model_config
    config = TransformerConfig(**{**saved, "tensor_model_parallel_size": 2})
    ps.initialize_model_parallel(2)
    model = GPTModel(config).eval()
    info = load_checkpoint(path, model)
    assert not info.has_optimizer and info.iteration == 0
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens))
    return logits[..., :VOCAB]


def _convert_to_mp(hf_dir, mp_dir, *options: str) -> None:
    convert.main(["hf-to-mp", "--input", str(hf_dir), "--output", str(mp_dir),
                  "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "16",
                  *options])


# gelu_new (GPT-2's default) and gelu_fast are mp's gelu_tanh; gelu is the exact one
@pytest.mark.parametrize("activation, options", [
    ("gelu", ()), ("gelu_new", ()), ("gelu_fast", ()), ("gelu_new", ("--apply-layernorm-1p",))],
    ids=["gelu", "gelu_new", "gelu_fast", "gelu_new-layernorm-1p"])
def test_gpt2_logits_match_after_conversion_at_tp2(tmp_path, activation, options):
    model = _gpt2(activation)
    model.save_pretrained(tmp_path / "hf")
    _convert_to_mp(tmp_path / "hf", tmp_path / "mp", *options)
    saved = read_checkpoint_info(tmp_path / "mp").model_config
    assert saved["layernorm_zero_centered_gamma"] is bool(options)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    logits = run_distributed(2, _mp_logits, str(tmp_path / "mp"), tokens)
    assert torch.equal(logits[0], logits[1])
    assert_rel_close(logits[0], expected, rtol=1e-5, what=f"logits ({activation})")


@pytest.mark.parametrize("fmt, options", [("safetensors", ()), ("bin", ()),
                                          ("safetensors", ("--apply-layernorm-1p",))],
                         ids=["safetensors", "bin", "safetensors-layernorm-1p"])
def test_gpt2_state_dict_round_trip_is_exact(tmp_path, fmt, options):
    model = _gpt2("gelu_new")
    expected = model.state_dict()
    source = tmp_path / "gpt2.bin"  # a lone .bin with its config beside it in another name
    torch.save(expected, source)
    model.config.to_json_file(tmp_path / "gpt2-config.json")
    convert.main(["hf-to-mp", "--input", str(source), "--config",
                  str(tmp_path / "gpt2-config.json"), "--output", str(tmp_path / "mp"),
                  *options])
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output",
                  str(tmp_path / "back"), "--format", fmt])
    back_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back")
    assert back_model.config.activation_function == "gelu_new"  # mp's gelu_tanh maps back
    back = back_model.state_dict()
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_unsupported_gpt2_configs_are_refused_by_name(tmp_path):
    model = _gpt2("gelu")
    model.config.scale_attn_by_inverse_layer_idx = True
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(SystemExit, match="scale_attn_by_inverse_layer_idx=True: mp's attention "
                                         "needs scale_attn_by_inverse_layer_idx=False"):
        _convert_to_mp(tmp_path / "hf", tmp_path / "mp")


@pytest.mark.parametrize("model, message", [
    ({"num_query_groups": 2},
     r"model.num_query_groups=2: GPT-2 needs .*num_query_groups in \(4,\)"),
    ({"kv_channels": 16}, r"model.kv_channels=16: GPT-2 needs .*kv_channels in \(8,\)"),
    ({"hidden_size": 30, "kv_channels": 8},
     r"model.kv_channels=8: GPT-2 needs .*kv_channels in \(\)"),
    ({"window_size": [3, 0]}, r"model.window_size=\[3, 0\]: GPT-2 needs .*window_size in "
                              r"\(None,\)")],
    ids=["grouped_query", "kv_channels", "heads_do_not_divide_hidden", "sliding_window"])
def test_models_gpt2_cannot_express_do_not_export(model, message):
    config = TransformerConfig(**{"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                  "vocab_size": 64, "seq_length": 16, **model})
    with pytest.raises(ValueError, match=message):
        hf_config(config)
