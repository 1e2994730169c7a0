"""Multi-latent attention (`mp.model.mla`): one layer against DeepSeek-V2's equations written
out head by head in float64, training at tensor, sequence, pipeline, context and data
parallel layouts against one process, decoding through the cache of latents, and the
config's rules. (`tests/test_gpt_model.py` checks the model at TP 2 and 4 against TP 1 besides.)"""

import math

import pytest
import torch
from checks import assert_rel_close, greedy_tokens
from gpt_runs import (
    assemble,
    assert_same_training,
    pieces,
    setup,
    train_from,
)
from harness import run_distributed

from mp import parallel_state as ps
from mp.model import GPTModel, TransformerConfig
from mp.model.mla import MLASelfAttention
from mp.model.rope import rotary_freqs

MLA = {"multi_latent_attention": True, "position_embedding_type": "rope", "kv_lora_rank": 16,
       "qk_head_dim": 8, "qk_pos_emb_head_dim": 4, "v_head_dim": 12}
S, B = 10, 3


def _layer_config(**overrides) -> TransformerConfig:
    return TransformerConfig(**{"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                "vocab_size": 64, "seq_length": S, "hidden_dropout": 0.0,
                                "attention_dropout": 0.0, **MLA, **overrides})


def _norm(x: torch.Tensor, weights: dict, name: str, cfg: TransformerConfig) -> torch.Tensor:
    if cfg.normalization == "RMSNorm":
        rms = x.pow(2).mean(-1, keepdim=True).add(cfg.layernorm_epsilon).sqrt()
        return x / rms * weights[f"{name}.weight"]
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return ((x - mean) / (var + cfg.layernorm_epsilon).sqrt() * weights[f"{name}.weight"]
            + weights[f"{name}.bias"])


def _rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on ``x [s, b, heads, dr]``: channel ``i`` and ``i + dr / 2`` turned by ``p base^(-2i
    / dr)`` at position ``p``."""
    s, dr = x.size(0), x.size(-1)
    angle = torch.arange(s, dtype=x.dtype)[:, None] * base ** (
        -torch.arange(0, dr, 2, dtype=x.dtype) / dr)  # [s, dr / 2]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    x1, x2 = x[..., :dr // 2], x[..., dr // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _reference(weights: dict, x: torch.Tensor, cfg: TransformerConfig) -> torch.Tensor:
    """DeepSeek-V2's multi-latent attention of ``x [s, b, h]``, head by head."""
    a, dn, dr, dv = (cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim,
                     cfg.v_head_dim)
    s, b, _ = x.shape
    if cfg.q_lora_rank is None:
        q = x @ weights["linear_q_proj.weight"].T
    else:
        c_q = _norm(x @ weights["linear_q_down_proj.weight"].T, weights, "q_layernorm", cfg)
        q = c_q @ weights["linear_q_up_proj.weight"].T
    q = q.view(s, b, a, dn + dr)
    compressed = x @ weights["linear_kv_down_proj.weight"].T
    c_kv, k_rope = compressed[..., :cfg.kv_lora_rank], compressed[..., cfg.kv_lora_rank:]
    kv = (_norm(c_kv, weights, "kv_layernorm", cfg) @ weights["linear_kv_up_proj.weight"].T
          ).view(s, b, a, dn + dv)
    k_rope = _rotate(k_rope[:, :, None], cfg.rotary_base)[:, :, 0]  # [s, b, dr], every head's
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    heads = []
    for head in range(a):
        q_h = torch.cat((q[:, :, head, :dn], _rotate(q[:, :, head:head + 1, dn:],
                                                    cfg.rotary_base)[:, :, 0]), dim=-1)
        k_h = torch.cat((kv[:, :, head, :dn], k_rope), dim=-1)
        v_h = kv[:, :, head, dn:]
        scores = torch.einsum("sbd,tbd->bst", q_h, k_h) / math.sqrt(dn + dr)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        heads.append(torch.einsum("bst,tbd->sbd", probs, v_h))
    out = torch.cat(heads, dim=-1) @ weights["dense.weight"].T
    return out + weights["dense.bias"] if "dense.bias" in weights else out


def _layer_vs_reference(overrides: dict):
    ps.initialize_model_parallel(1)
    cfg = _layer_config(**overrides)
    torch.manual_seed(0)
    layer = MLASelfAttention(cfg)
    with torch.no_grad():  # norms away from their initial ones and zeros
        for name, p in layer.named_parameters():
            if "layernorm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(S, B, cfg.hidden_size, requires_grad=True)
    out, bias = layer(x, rotary_freqs=rotary_freqs(S, cfg.qk_pos_emb_head_dim, cfg.rotary_base,
                                                    "cpu"))
    if bias is not None:
        out = out + bias
    weights = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    expected = _reference(weights, x64, cfg)
    assert_rel_close(out, expected, what="output")
    cotangent = torch.randn_like(expected)
    out.backward(cotangent.float())
    expected.backward(cotangent)
    assert_rel_close(x.grad, x64.grad, what="input gradient")
    for name, p in layer.named_parameters():
        assert_rel_close(p.grad, weights[name].grad, what=f"grad of {name}")


@pytest.mark.parametrize("overrides", [
    {}, {"q_lora_rank": 24, "normalization": "RMSNorm"},
    {"q_lora_rank": 6, "attention_backend": "unfused", "add_bias_linear": False,
     "qk_pos_emb_head_dim": 2, "v_head_dim": 4, "rotary_base": 500.0}],
    ids=["q-projected", "q-latent-rms", "q-latent-unfused-narrow"])
def test_layer_matches_deepseeks_equations(overrides):
    run_distributed(1, _layer_vs_reference, overrides)


STEPS = 3


def _initial_weights(**overrides) -> dict:
    models, _, _ = setup(1, 1, seed=5, **MLA, **overrides)
    return pieces(models)


def _train(tp: int, pp: int, whole: dict, distributed_optimizer: bool = False, cp: int = 1,
           **overrides) -> dict:
    return train_from(whole, tp, pp, STEPS, cp=cp, distributed_optimizer=distributed_optimizer,
                      **MLA, **overrides)


@pytest.mark.parametrize("world,tp,pp,cp,distributed_optimizer,overrides", [
    (2, 2, 1, 1, False, {}),
    (4, 2, 1, 1, True, {"sequence_parallel": True}),
    (4, 2, 2, 1, False, {"sequence_parallel": True}),
    (4, 2, 1, 2, False, {"sequence_parallel": True, "cp_comm_type": "p2p"}),
], ids=["TP2", "TP2-SPxDP2-distributed-optimizer", "TP2-SPxPP2", "TP2-SPxCP2-p2p"])
@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["q-projected", "q-latent"])
def test_training_follows_one_process(world, tp, pp, cp, distributed_optimizer, overrides,
                                      q_lora_rank):
    """A few optimizer steps: losses, gradient norms (with clipping) and every weight after
    them; the duplicated projections' and latent norms' gradients are summed over TP under
    sequence parallelism by `finalize_model_grads`, or whole on every rank without it."""
    model = {"q_lora_rank": q_lora_rank}
    whole = assemble(run_distributed(1, _initial_weights, **model))
    serial = run_distributed(1, _train, 1, 1, whole, **model)[0]
    runs = run_distributed(world, _train, tp, pp, whole, distributed_optimizer, cp,
                           **model, **overrides)
    assert_same_training(runs, serial)


def test_generation_is_the_same_at_tp1_and_tp2_with_and_without_the_cache():
    """Greedy decoding through the cache of latents: TP 2 gives TP 1's tokens, with the cache
    or not."""
    expected = run_distributed(1, greedy_tokens, 1, False, {"q_lora_rank": 24, **MLA})[0]
    assert len(set(expected[:, 5:].flatten().tolist())) > 3, "a degenerate reference"
    for tp, kv_cache in ((1, True), (2, True), (2, False)):
        got = run_distributed(tp, greedy_tokens, tp, kv_cache, {"q_lora_rank": 24, **MLA})
        assert all(torch.equal(g, expected) for g in got), (tp, kv_cache)


def _logits_through_the_cache(tp: int, overrides: dict) -> tuple:
    """(logits of 2 x 20 tokens in one forward, the same fed through the latent cache in
    pieces of 7, 1 and 12 tokens, the cache's two tensors' shapes for layer 1)."""
    from mp.model.inference import InferenceParams
    from mp.tensor_parallel import gather_from_tensor_model_parallel_region
    ps.initialize_model_parallel(tp)
    torch.manual_seed(7)
    cfg = TransformerConfig(**{"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                               "vocab_size": 64, "seq_length": 32,
                               "make_vocab_size_divisible_by": 8,
                               "tensor_model_parallel_size": tp, "hidden_dropout": 0.0,
                               "attention_dropout": 0.0, "init_method_std": 0.3, **MLA,
                               **overrides})
    model = GPTModel(cfg).eval()
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(4))
    cache, parts = InferenceParams(20), []
    with torch.no_grad():
        whole = gather_from_tensor_model_parallel_region(model(tokens))
        for start, end in ((0, 7), (7, 8), (8, 20)):
            parts.append(gather_from_tensor_model_parallel_region(
                model(tokens[:, start:end], inference_params=cache)))
            cache.sequence_len_offset = end
    shapes = [tuple(t.shape) for t in cache.key_value_memory_dict[1]]
    return whole, torch.cat(parts, dim=1), shapes


@pytest.mark.parametrize("tp,overrides", [
    (1, {}), (2, {"q_lora_rank": 24}),
    (2, {"rope_type": "yarn", "yarn_rotary_scaling_factor": 4.0, "yarn_mscale": 0.9,
         "yarn_mscale_all_dim": 0.8, "yarn_original_max_position_embeddings": 8})],
    ids=["TP1", "TP2-q-latent", "TP2-yarn"])
def test_the_latent_cache_gives_the_whole_sequences_logits(tp, overrides):
    """Decoding through the cache of latents (the key and value projections folded into the
    query and the output) against one forward over the whole sequence, 1e-5; the cache
    holds a latent and the rotated key channels per token, not the heads' keys and values."""
    for whole, parts, shapes in run_distributed(tp, _logits_through_the_cache, tp, overrides):
        assert_rel_close(parts, whole, rtol=1e-5, what="logits through the cache")
        assert shapes == [(20, 2, 16), (20, 2, 4)]  # [length, b, kv_lora_rank], [.., dr]


@pytest.mark.parametrize("overrides,message", [
    ({"position_embedding_type": "learned_absolute"}, "needs position_embedding_type='rope'"),
    ({"num_query_groups": 2}, "num_query_groups=2 must equal num_attention_heads=4"),
    ({"qk_layernorm": True}, "qk_layernorm=True does not apply to multi_latent_attention"),
    ({"rotary_percent": 0.5}, "rotary_percent=0.5 does not apply"),
    ({"add_qkv_bias": True}, "add_qkv_bias=True does not apply to multi_latent_attention"),
    ({"qk_pos_emb_head_dim": 3}, "qk_pos_emb_head_dim=3 must be even"),
    ({"kv_lora_rank": 0}, "kv_lora_rank=0 must be a positive integer"),
    ({"q_lora_rank": -1}, "q_lora_rank=-1 must be a positive integer"),
    ({"multi_latent_attention": False, "q_lora_rank": 8},
     "q_lora_rank=8 needs multi_latent_attention=True"),
    ({"rope_type": "ntk"}, "rope_type='ntk' must be one of 'rope', 'yarn'"),
    ({"rope_type": "yarn", "use_rope_scaling": True},
     "rope_type='yarn' and use_rope_scaling=True (Llama 3.1's) are two ways"),
    ({"rope_type": "yarn", "multi_latent_attention": False, "position_embedding_type": "none"},
     "it needs position_embedding_type='rope', not 'none'"),
    ({"rope_type": "yarn", "yarn_beta_slow": 0.0}, "yarn_beta_slow=0.0 must be > 0"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _layer_config(**overrides)


def test_sizes_follow_the_latent_dims():
    cfg = _layer_config()
    assert cfg.query_projection_size == 4 * 12  # heads x v_head_dim: dense's input
    assert cfg.softmax_scale == pytest.approx(1 / math.sqrt(8 + 4))
    assert cfg.rotary_dim == 4
    # the heads need not divide the hidden size: kv_channels is a query head's width
    assert _layer_config(hidden_size=30).kv_channels == 8 + 4


def test_megatron_flags_set_the_fields():
    from test_config import TINY

    from mp.config import parse_args
    cfg = parse_args(["--config", TINY, "--multi-latent-attention", "--q-lora-rank", "24",
                      "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim",
                      "4", "--v-head-dim", "12", "--position-embedding-type", "rope",
                      "--rope-type", "yarn", "--rotary-scaling-factor", "40", "--mscale",
                      "0.707", "--mscale-all-dim", "0.5"], world_size=4).model
    assert (cfg.multi_latent_attention, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim,
            cfg.qk_pos_emb_head_dim, cfg.v_head_dim) == (True, 24, 16, 8, 4, 12)
    assert (cfg.rope_type, cfg.yarn_rotary_scaling_factor, cfg.yarn_mscale,
            cfg.yarn_mscale_all_dim) == ("yarn", 40.0, 0.707, 0.5)


def test_a_checkpoint_of_another_latent_width_is_refused():
    from mp.checkpointing.fit import architecture_problems
    saved = {**vars(_layer_config(q_lora_rank=24))}
    assert architecture_problems(saved, _layer_config(q_lora_rank=24)) == []
    assert architecture_problems(saved, _layer_config(q_lora_rank=16)) == [
        "model.q_lora_rank=24 in the checkpoint but 16 here"]
    plain = {**vars(_layer_config(multi_latent_attention=False))}
    assert architecture_problems(plain, _layer_config(multi_latent_attention=False,
                                                      kv_lora_rank=8)) == []
