"""Hugging Face DeepSeek-V3 round trip: random-weight ``DeepseekV3ForCausalLM`` models (built
from a config, no download) converted by ``tools/convert_checkpoint.py`` give transformers'
own logits in mp at TP 1, TP 2 and EP 2: multi-latent attention with and without a query
latent, DeepSeek's paired RoPE channels and YaRN, a dense first layer, then experts with a
shared expert and group-limited sigmoid routing with the score-correction bias. Converted
back, transformers loads the same model. What mp cannot express is refused by name."""

import json

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from hf_convert import assert_same_model, convert, mp_logits, to_mp, transformers

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, read_checkpoint_info
from mp.model import GPTModel, TransformerConfig

VOCAB = 200
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 1.0,
        "mscale": 0.9, "mscale_all_dim": 0.8}


def _deepseek(**extra):
    """A DeepSeek-V3 of 3 layers (the first dense) and 8 experts in 4 groups."""
    return _random(transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 24, "q_lora_rank": 40,
        "qk_rope_head_dim": 8, "v_head_dim": 12, "qk_nope_head_dim": 16, "n_group": 4,
        "topk_group": 2, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_parameters": YARN,
        **extra}))


def _deepseek_v2(**extra):
    """A DeepSeek-V2 of 3 layers (the first dense), 8 experts routed by softmax, 2 shared,
    without a query latent (as DeepSeek-V2-Lite)."""
    return _random(transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "n_shared_experts": 2, "n_routed_experts": 8,
        "kv_lora_rank": 24, "q_lora_rank": None, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "qk_nope_head_dim": 16, "num_experts_per_tok": 3, "first_k_dense_replace": 1,
        "topk_method": "greedy", "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "rope_parameters": YARN, **extra}))


def _random(model_class, config):
    """``model_class(config)`` with seeded weights."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # the norms non-trivial, the routers' choices spread out
        for i, (name, tensor) in enumerate(model.state_dict().items()):
            scale = 0.3 if "gate." in name else 0.05
            tensor.add_(seeded(tensor.shape, 100 + i, scale=scale))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("world,tp,ep,extra", [
    (1, 1, 1, {}), (2, 2, 1, {}), (2, 1, 2, {}),
    (2, 2, 1, {"q_lora_rank": None, "rope_interleave": False, "n_group": 1, "topk_group": 1,
               "num_experts_per_tok": 3, "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 500.0}})],
    ids=["TP1", "TP2", "EP2", "no-query-latent-halved-rope-ungrouped-TP2"])
def test_logits_match_after_conversion(tmp_path, world, tp, ep, extra):
    model = _deepseek(**extra)
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", tp)
    saved = read_checkpoint_info(tmp_path / "mp").model_config
    assert (saved["multi_latent_attention"], saved["q_lora_rank"], saved["moe_layer_freq"],
            saved["moe_shared_expert_intermediate_size"]) == (
        True, extra.get("q_lora_rank", 40), [0, 1, 1], 32)
    assert saved["rope_type"] == ("rope" if "rope_parameters" in extra else "yarn")
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    for got in run_distributed(world, mp_logits, str(tmp_path / "mp"), tp, ep, tokens, VOCAB):
        assert_rel_close(got, expected, rtol=1e-5, what="logits")


@pytest.mark.parametrize("world,tp,ep,extra", [
    (1, 1, 1, {}), (2, 2, 1, {"q_lora_rank": 40, "routed_scaling_factor": 2.0}),
    (2, 1, 2, {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})],
    ids=["lite-TP1", "query-latent-scaled-TP2", "plain-rope-EP2"])
def test_deepseek_v2_logits_match_after_conversion(tmp_path, world, tp, ep, extra):
    """DeepSeek-V2's routing (a softmax over every expert, its top k as they are, scaled) is
    mp's ``moe_router_pre_softmax`` with ``moe_router_topk_scaling_factor``."""
    model = _deepseek_v2(**extra)
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", tp)
    saved = read_checkpoint_info(tmp_path / "mp").model_config
    assert (saved["moe_router_pre_softmax"], saved["moe_router_score_function"],
            saved["moe_router_enable_expert_bias"], saved["moe_router_topk_scaling_factor"],
            saved["moe_shared_expert_intermediate_size"]) == (
        True, "softmax", False, extra.get("routed_scaling_factor"), 64)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    for got in run_distributed(world, mp_logits, str(tmp_path / "mp"), tp, ep, tokens, VOCAB):
        assert_rel_close(got, expected, rtol=1e-5, what="logits")


@pytest.mark.parametrize("extra", [{}, {"q_lora_rank": 40, "routed_scaling_factor": 2.0}],
                         ids=["lite", "query-latent-scaled"])
def test_deepseek_v2_round_trip_is_exact(tmp_path, extra):
    """Back to DeepSeek-V2 (its RoPE channels paired again): the same tensors."""
    model = _deepseek_v2(**extra)
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", 1)
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["model_type"], config["topk_method"], config["n_shared_experts"]) == (
        "deepseek_v2", "greedy", 2)
    back = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert_same_model(back, model, _tokens())




def test_paired_rope_channels_are_reordered(tmp_path):
    """Read as if halved, DeepSeek's paired RoPE rows give other logits: the reordering is
    what makes them agree."""
    model = _deepseek()
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config,
                                                             "rope_interleave": False}))
    to_mp(tmp_path / "hf", tmp_path / "mp", 1)
    with torch.no_grad():
        expected = model(_tokens()).logits
    [got] = run_distributed(1, mp_logits, str(tmp_path / "mp"), 1, 1, _tokens(), VOCAB)
    assert (got - expected).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [{"rope_interleave": False}, {}],
                         ids=["halved-rope", "paired-rope"])
def test_round_trip(tmp_path, extra):
    """Back in transformers: the same tensors for halved RoPE channels (what mp writes);
    paired ones come back halved, the same model to rounding."""
    model = _deepseek(**extra)
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", 1)
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["model_type"], config["rope_interleave"], config["first_k_dense_replace"],
            config["n_shared_experts"], config["rope_parameters"]) == (
        "deepseek_v3", False, 1, 1, YARN)
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "back").eval()
    if extra:
        assert_same_model(back, model, _tokens())
    else:
        with torch.no_grad():
            assert_rel_close(back(_tokens()).logits, model(_tokens()).logits, rtol=1e-5,
                             what="logits")


V3_REFUSALS = [
    ({"quantization_config": {"quant_method": "fp8"}},
     "quantization_config=.*: mp's DeepSeek-V3 needs quantization_config=None"),
    ({"topk_method": "greedy"}, "topk_method='greedy': mp's DeepSeek-V3 needs "
                                "topk_method='noaux_tc'"),
    ({"topk_group": 1}, "num_experts_per_tok=4, topk_group=1: DeepSeek-V3 ranks its groups by "
                        "their top 2 scores"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05: DeepSeek-V3's latent norms take 1e-6"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     "RoPE scaling .*: mp's DeepSeek has YaRN")]
V2_REFUSALS = [
    ({"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
     "topk_method='group_limited_greedy': mp's DeepSeek-V2 needs topk_method='greedy'"),
    ({"norm_topk_prob": True}, "norm_topk_prob=True: mp's DeepSeek-V2 needs "
                               "norm_topk_prob=False")]


@pytest.mark.parametrize("build, change, message",
                         [(_deepseek, *case) for case in V3_REFUSALS]
                         + [(_deepseek_v2, *case) for case in V2_REFUSALS])
def test_unsupported_configs_are_refused_by_name(tmp_path, build, change, message):
    build().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit, match=message):
        to_mp(tmp_path / "hf", tmp_path / "mp", 1)


def test_mp_models_deepseek_cannot_express_are_refused():
    from mp.checkpointing import hf_deepseek
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               vocab_size=VOCAB, seq_length=16, normalization="RMSNorm",
                               activation="swiglu", position_embedding_type="rope",
                               layernorm_epsilon=1e-6, add_bias_linear=False,
                               untie_embeddings_and_output_weights=True,
                               multi_latent_attention=True, num_moe_experts=4,
                               moe_layer_freq=[1, 0], moe_router_score_function="sigmoid",
                               moe_router_enable_expert_bias=True)
    with pytest.raises(ValueError, match=r"moe_layer_freq=\[1, 0\]: DeepSeek-V3 has dense "
                                         "layers first"):
        hf_deepseek.hf_config(config)


def _with_prediction_depth(hf_dir, extra: dict | None = None) -> dict:
    """Add to a transformers-written DeepSeek-V3 directory what DeepSeek's own files also
    hold: one multi-token prediction depth as layer ``num_hidden_layers`` (random weights for
    an MoE layer, ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, and copies of the
    embedding and output layer), ``num_nextn_predict_layers: 1``. Returns the tensors."""
    from safetensors.torch import load_file, save_file
    config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    last, depth = f"model.layers.{config['num_hidden_layers'] - 1}.", \
        f"model.layers.{config['num_hidden_layers']}."
    h = config["hidden_size"]
    added = {depth + name[len(last):]: seeded(t.shape, 500 + i, scale=0.1)
             for i, (name, t) in enumerate(sorted(state.items())) if name.startswith(last)}
    added.update({f"{depth}enorm.weight": 1 + seeded((h,), 1, scale=0.1),
                  f"{depth}hnorm.weight": 1 + seeded((h,), 2, scale=0.1),
                  f"{depth}eh_proj.weight": seeded((h, 2 * h), 3, scale=0.05),
                  f"{depth}shared_head.norm.weight": 1 + seeded((h,), 4, scale=0.1),
                  f"{depth}embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
                  f"{depth}shared_head.head.weight": state["lm_head.weight"].clone(),
                  **(extra or {})})
    save_file({**state, **added}, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return {**state, **added}


def test_deepseeks_prediction_depth_converts_both_ways(tmp_path):
    """DeepSeek's own files hold a prediction depth past the decoder's layers: it becomes mp's
    `mtp.layers.0` (its layer's RoPE rows reordered as the decoder's are), and mp-to-hf
    writes every tensor back as it was (halved RoPE channels: tensor for tensor)."""
    from mp.checkpointing import load_global_model
    _deepseek(rope_interleave=False).save_pretrained(tmp_path / "hf")
    state = _with_prediction_depth(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", 1)
    weights, info = load_global_model(str(tmp_path / "mp"))
    assert info.model_config["mtp_num_layers"] == 1
    layer = "mtp.layers.0.transformer_layer."
    for mp_name, hf_name in (("mtp.layers.0.eh_proj.weight", "model.layers.3.eh_proj.weight"),
                             ("mtp.layers.0.final_layernorm.weight",
                              "model.layers.3.shared_head.norm.weight"),
                             (layer + "self_attention.linear_kv_up_proj.weight",
                              "model.layers.3.self_attn.kv_b_proj.weight"),
                             (layer + "mlp.router.expert_bias",
                              "model.layers.3.mlp.gate.e_score_correction_bias")):
        assert torch.equal(weights[mp_name], state[hf_name]), mp_name
    assert torch.equal(weights[layer + "mlp.experts.fc2_weight"][5],
                       state["model.layers.3.mlp.experts.5.down_proj.weight"])
    convert.main(["mp-to-hf", "--input", str(tmp_path / "mp"), "--output", str(tmp_path / "back")])
    from safetensors.torch import load_file
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1


def test_a_prediction_depth_with_its_own_embedding_is_refused(tmp_path):
    _deepseek().save_pretrained(tmp_path / "hf")
    _with_prediction_depth(tmp_path / "hf", {
        "model.layers.3.embed_tokens.weight": seeded((VOCAB, 64), 9)})
    with pytest.raises(SystemExit, match=r"layers.3.embed_tokens.weight differs from "
                                         r"embed_tokens.weight: mp's prediction depths use"):
        to_mp(tmp_path / "hf", tmp_path / "mp", 1)


def test_the_prediction_depths_rope_rows_are_reordered(tmp_path):
    """DeepSeek's paired RoPE rows of the depth's query and key projections, as the
    decoder's: each head's last ``dr`` rows, evens then odds."""
    from mp.checkpointing import load_global_model
    _deepseek().save_pretrained(tmp_path / "hf")
    state = _with_prediction_depth(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", 1)
    weights, _ = load_global_model(str(tmp_path / "mp"))
    dr, order = 8, [0, 2, 4, 6, 1, 3, 5, 7]
    layer = "mtp.layers.0.transformer_layer.self_attention."
    q = state["model.layers.3.self_attn.q_b_proj.weight"].view(4, 24, -1)  # heads, dn + dr
    assert torch.equal(weights[layer + "linear_q_up_proj.weight"].view(4, 24, -1),
                       torch.cat((q[:, :-dr], q[:, -dr:][:, order]), dim=1))
    kv = state["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"]  # c + dr rows
    assert torch.equal(weights[layer + "linear_kv_down_proj.weight"],
                       torch.cat((kv[:-dr], kv[-dr:][order])))


def _mp_greedy(path: str, prompts: torch.Tensor, new: int) -> torch.Tensor:
    from mp.generation import SamplingParams, generate
    ps.initialize_model_parallel(2)
    saved = read_checkpoint_info(path).model_config
    model = GPTModel(TransformerConfig(**{**saved, "tensor_model_parallel_size": 2})).eval()
    load_checkpoint(path, model)
    return generate(model, prompts, new, SamplingParams(greedy=True), kv_cache=True)


def test_greedy_generation_matches_transformers_at_tp2(tmp_path):
    """mp's cache of latents (the key and value projections folded into the queries and the
    output) against transformers' own decoding of DeepSeek-V3 with its cache: the same
    tokens at TP 2, with YaRN and the routers' group-limited choice at every step."""
    model = _deepseek()
    model.save_pretrained(tmp_path / "hf")
    to_mp(tmp_path / "hf", tmp_path / "mp", 2)
    prompts = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = run_distributed(2, _mp_greedy, str(tmp_path / "mp"), prompts, 12)
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0], expected)
    assert len(set(expected[:, 5:].flatten().tolist())) > 3, "a degenerate reference"
