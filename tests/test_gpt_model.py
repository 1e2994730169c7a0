"""GPT under tensor (and sequence) parallelism equals the TP=1 model on the same weights:
logits, loss and every gradient, for each recompute mode and architecture option."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from checks import RTOL, assert_rel_close, jit_compiled_on_cpu, own_rank_group, seeded
from harness import run_distributed

from mp import parallel_state as ps
from mp.model import GPTModel, TransformerConfig, attention
from mp.model.attention import SDPA_TAKES_GROUPS
from mp.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    model_parallel_cuda_manual_seed,
)

B, S, VOCAB = 2, 16, 96
MLA = {"multi_latent_attention": True, "position_embedding_type": "rope", "kv_lora_rank": 16,
       "qk_head_dim": 8, "qk_pos_emb_head_dim": 4, "v_head_dim": 12}
SEED = 77


def _config(tp: int, **overrides) -> TransformerConfig:
    kw = dict(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
              seq_length=S, make_vocab_size_divisible_by=8,  # 96: padded alike up to TP=4
              hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _build(config, group):
    torch.manual_seed(SEED)
    return GPTModel(config, group=group)


def _batch():
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, VOCAB, (B, S), generator=g),
            torch.randint(0, VOCAB, (B, S), generator=g))


def _check_against_tp1(tp: int, overrides: dict):
    ps.initialize_model_parallel(tp)
    ref_group = own_rank_group()
    tp_group = ps.get_tensor_model_parallel_group()
    r = ps.get_tensor_model_parallel_rank()
    ids, labels = _batch()
    config = _config(tp, **overrides)
    model, ref = _build(config, tp_group), _build(_config(1, **{
        k: v for k, v in overrides.items() if k not in ("sequence_parallel", "compile_layers")}),
        ref_group)

    # compiled layers take mp.jit's compiled functions inside, as they do on CUDA
    compiled = jit_compiled_on_cpu if config.compile_layers else contextlib.nullcontext
    with compiled():
        loss = model(ids, labels=labels)
    ref_loss = ref(ids, labels=labels)
    assert_rel_close(loss, ref_loss, what="loss")
    weights = torch.linspace(0.5, 1.5, B * S).view(B, S)  # a loss-mask-like weighting
    (loss * weights).sum().backward()
    (ref_loss * weights).sum().backward()

    with torch.no_grad(), compiled():
        logits = gather_from_tensor_model_parallel_region(model(ids), group=tp_group)
        assert_rel_close(logits, ref(ids), what="logits")

    ref_params = dict(ref.named_parameters())
    assert set(dict(model.named_parameters())) == set(ref_params)
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        grad = p.grad.clone()
        if getattr(p, "tensor_model_parallel", False):
            expected = expected.chunk(tp, dim=p.partition_dim)[r]
        elif getattr(p, "sequence_parallel", False):
            dist.all_reduce(grad, group=tp_group)  # what finalize_model_grads does
        if name.endswith("k_layernorm.bias"):
            # it shifts all scores of a query alike, which the softmax ignores: its gradient
            # is 0 up to rounding in both models
            assert max(grad.abs().max(), expected.abs().max()) < 1e-6, name
            continue
        # the q/k norms' gradients sum over every head and token, per layout in another order
        rtol = 5 * RTOL if "q_layernorm" in name or "k_layernorm" in name else RTOL
        assert_rel_close(grad, expected, rtol=rtol, what=f"grad of {name}")


VARIANTS = {
    "plain": {},
    "sequence_parallel": {"sequence_parallel": True},
    # Glorot's uniform of each full weight: each TP shard is the serial weight's slice
    "xavier_uniform_sp": {"init_method_xavier_uniform": True, "sequence_parallel": True},
    # no position information (NoPE): the word embedding reduce-scattered straight under SP
    "no_position_embedding_sp": {"position_embedding_type": "none", "sequence_parallel": True},
    "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": 2},
    "full_block_sp": {"recompute_granularity": "full", "recompute_method": "block",
                      "recompute_num_layers": 2, "sequence_parallel": True},
    "selective": {"recompute_granularity": "selective"},
    "distributed_saved": {"recompute_granularity": "full", "recompute_method": "uniform",
                          "distribute_saved_activations": True},
    "rope_swiglu_rms_untied_sp": {"position_embedding_type": "rope", "activation": "swiglu",
                                  "normalization": "RMSNorm", "sequence_parallel": True,
                                  "untie_embeddings_and_output_weights": True,
                                  "add_bias_linear": False},
    "unfused_attention": {"attention_backend": "unfused"},
    "grouped_query_sp": {"num_attention_heads": 8, "num_query_groups": 4,
                         "sequence_parallel": True},
    "grouped_query_unfused_rope": {"num_attention_heads": 8, "num_query_groups": 4,
                                   "attention_backend": "unfused",
                                   "position_embedding_type": "rope"},
    # heads wider than hidden / heads: queries 4 x 24 = 96 wide, the output projection 96 -> 64
    "kv_channels": {"hidden_size": 64, "kv_channels": 24},
    "kv_channels_grouped_query_sp": {"hidden_size": 64, "kv_channels": 24,
                                     "num_attention_heads": 8, "num_query_groups": 4,
                                     "sequence_parallel": True},
    "partial_rope_kv_channels_unfused": {"kv_channels": 24, "position_embedding_type": "rope",
                                         "rotary_percent": 0.5, "attention_backend": "unfused"},
    "zero_centered_gamma_rms_sp": {"layernorm_zero_centered_gamma": True,
                                   "normalization": "RMSNorm", "sequence_parallel": True},
    # q/k norms replicated over TP, each rank normalizing its heads: gradients summed over TP
    "qk_layernorm_grouped_query": {"qk_layernorm": True, "num_attention_heads": 8,
                                   "num_query_groups": 4},
    "qk_layernorm_rms_rope_kv_channels_selective_sp": {
        "qk_layernorm": True, "normalization": "RMSNorm", "position_embedding_type": "rope",
        "kv_channels": 12, "layernorm_zero_centered_gamma": True,
        "recompute_granularity": "selective", "sequence_parallel": True},
    "qk_layernorm_full_recompute_sp": {"qk_layernorm": True, "recompute_granularity": "full",
                                       "recompute_method": "uniform",
                                       "sequence_parallel": True},
    "squared_relu": {"activation": "squared_relu"},
    "rotary_interleaved_grouped_query_sp": {"position_embedding_type": "rope",
                                            "rotary_interleaved": True, "num_attention_heads": 8,
                                            "num_query_groups": 4, "sequence_parallel": True},
    # a window of 3 earlier keys in layers 1 and 3 (the second attends fully), grouped keys
    "sliding_window_grouped_query_sp": {"window_size": [3, 0], "window_attn_skip_freq": 2,
                                        "num_attention_heads": 8, "num_query_groups": 4,
                                        "sequence_parallel": True},
    "sliding_window_unfused_selective": {"window_size": [5, 0], "attention_backend": "unfused",
                                         "recompute_granularity": "selective"},
    # multi-latent attention: the duplicated down projections and latent norms see each rank's
    # tokens under SP (partial gradients), the key's RoPE channels reach every rank's heads
    "mla": MLA,
    "mla_q_latent_rms_selective_sp": {**MLA, "q_lora_rank": 24, "normalization": "RMSNorm",
                                      "recompute_granularity": "selective",
                                      "sequence_parallel": True, "add_bias_linear": False},
    "mla_full_recompute_unfused_sp": {**MLA, "recompute_granularity": "full",
                                      "recompute_method": "uniform", "sequence_parallel": True,
                                      "attention_backend": "unfused"},
}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpt_tp_equals_tp1(tp, variant):
    run_distributed(tp, _check_against_tp1, tp, VARIANTS[variant])


def test_xavier_uniform_init_draws_glorots_distribution():
    """Every weight matrix uniform on ``(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))`` of
    the full weight: none beyond ``a``, the standard deviation ``a / sqrt(3)`` (within 10 %)."""
    for name, (largest, std, bound) in run_distributed(1, _xavier_statistics)[0].items():
        assert largest <= bound, f"{name}: {largest} beyond {bound}"
        assert std == pytest.approx(bound / 3 ** 0.5, rel=0.1), name


def _xavier_statistics() -> dict:
    ps.initialize_model_parallel(1)
    config = _config(1, init_method_xavier_uniform=True,
                     untie_embeddings_and_output_weights=True)
    model = _build(config, ps.get_tensor_model_parallel_group())
    found = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            fan_out, fan_in = p.shape
            found[name] = (p.abs().max().item(), p.std().item(),
                           (6 / (fan_in + fan_out)) ** 0.5)
    assert len(found) == 2 + 4 * 3 + 1, sorted(found)  # embeddings, 4 per layer, output
    return found


def test_compiled_layers_equal_tp1():
    """``compile_layers`` (torch.compile of each layer; here inductor's C++ backend) at TP=2
    with SP, `mp.jit`'s functions compiled within, against the eager TP=1 model: the
    collectives' autograd Functions run eagerly between compiled pieces, the results stay
    within 1e-6."""
    run_distributed(2, _check_against_tp1, 2, {"compile_layers": True, "sequence_parallel": True})


def _check_recompute_replays_compiled_dropout(tp: int):
    """Full recompute re-runs compiled layers (first without grad, then with): the dropout
    masks must be the forward's, so loss and gradients match the run without recompute."""
    ps.initialize_model_parallel(tp)
    ids, labels = _batch()
    results = []
    for recompute in ({}, {"recompute_granularity": "full", "recompute_method": "uniform"}):
        config = _config(tp, compile_layers=True, sequence_parallel=True, hidden_dropout=0.2,
                         attention_dropout=0.2, **recompute)
        model = _build(config, ps.get_tensor_model_parallel_group())
        model_parallel_cuda_manual_seed(SEED)
        loss = model(ids, labels=labels)
        loss.sum().backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for plain, recomputed in zip(*results):
        assert_rel_close(recomputed, plain, what="recomputed run")


def test_recompute_replays_compiled_dropout():
    run_distributed(2, _check_recompute_replays_compiled_dropout, 2)


def _check_custom_mask_backends_agree():
    """A custom (padding + causal) mask through SDPA and through the unfused softmax path."""
    ps.initialize_model_parallel(1)
    ids, labels = _batch()
    mask = torch.ones(S, S, dtype=torch.bool).triu(1).expand(B, 1, S, S).clone()
    mask[1, :, :, :3] = True  # the second sequence may not see its first three tokens
    mask[1, :, :3, 0] = False  # ... except the first token, so no row is fully masked
    losses = []
    for backend in ("sdpa", "unfused"):
        model = _build(_config(1, attention_backend=backend), None)
        losses.append(model(ids, attention_mask=mask, labels=labels))
    assert_rel_close(losses[1], losses[0], what="unfused vs sdpa loss")
    causal = _build(_config(1), None)(ids, labels=labels)
    assert not torch.allclose(causal[1], losses[0][1]), "the custom mask had no effect"


def test_custom_mask_backends_agree():
    run_distributed(1, _check_custom_mask_backends_agree)


def _grouped_qkv_as_multi_head(t: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """A grouped-query QKV weight or bias (``[g, a / g + 2, d]`` along dim 0) as the
    multi-head one (``[a, 3, d]``) that gives every query head its group's key and value."""
    per_group = heads // groups
    grouped = t.view(groups, per_group + 2, -1, *t.shape[1:])
    q = grouped[:, :per_group].flatten(0, 1)  # [a, d, ...]
    k, v = (grouped[:, i].repeat_interleave(per_group, dim=0)
            for i in (per_group, per_group + 1))
    return torch.stack((q, k, v), dim=1).flatten(0, 2)


def _check_grouped_query_is_multi_head_with_shared_keys(groups: int, overrides: dict):
    """Grouped-query attention against the multi-head model whose heads of a group share one
    key and one value projection: logits, loss, and the gradients of every parameter (the
    shared key/value rows get the sum over the heads that read them, through autograd)."""
    ps.initialize_model_parallel(1)
    ids, labels = _batch()
    heads = 8
    gqa = _build(_config(1, num_attention_heads=heads, num_query_groups=groups, **overrides),
                 None)
    mha = _build(_config(1, num_attention_heads=heads, **overrides), None)
    leaves = {n: p.detach().clone().requires_grad_() for n, p in gqa.named_parameters()}
    as_mha = {n: _grouped_qkv_as_multi_head(p, heads, groups) if "query_key_value" in n else p
              for n, p in leaves.items()}
    ref_loss = torch.func.functional_call(mha, as_mha, (ids,), {"labels": labels})
    loss = gqa(ids, labels=labels)
    assert_rel_close(loss, ref_loss, what="loss")
    loss.sum().backward()
    ref_loss.sum().backward()
    for name, p in gqa.named_parameters():
        assert_rel_close(p.grad, leaves[name].grad, what=f"grad of {name}")


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("overrides", [{}, {"attention_backend": "unfused",
                                            "position_embedding_type": "rope"}],
                         ids=["sdpa", "unfused_rope"])
def test_grouped_query_is_multi_head_with_shared_keys(groups, overrides):
    run_distributed(1, _check_grouped_query_is_multi_head_with_shared_keys, groups, overrides)


def _check_zero_centered_gamma_is_the_plain_model_plus_one(normalization: str):
    """Zero-centred norms (Megatron's ``--apply-layernorm-1p``) start at zeros; with weights
    ``w`` they are the plain model with ``w + 1``: loss, logits and every gradient (the norm
    weights' too: d(1 + w)/dw = 1)."""
    ps.initialize_model_parallel(1)
    ids, labels = _batch()
    centered = _build(_config(1, normalization=normalization,
                              layernorm_zero_centered_gamma=True), None)
    plain = _build(_config(1, normalization=normalization), None)
    norm_weights = [n for n, _ in centered.named_parameters() if n.endswith("layernorm.weight")]
    assert len(norm_weights) == 2 * 3 + 1
    params, plain_params = dict(centered.named_parameters()), dict(plain.named_parameters())
    with torch.no_grad():
        for i, name in enumerate(norm_weights):
            assert torch.equal(params[name], torch.zeros(32)), f"{name} does not start at 0"
            params[name].copy_(seeded((32,), 50 + i, scale=0.3))
            plain_params[name].copy_(params[name].double() + 1)
    loss, ref_loss = centered(ids, labels=labels), plain(ids, labels=labels)
    assert_rel_close(loss, ref_loss, what="loss")
    loss.sum().backward()
    ref_loss.sum().backward()
    for name, p in params.items():
        assert_rel_close(p.grad, plain_params[name].grad, what=f"grad of {name}")
    with torch.no_grad():
        assert_rel_close(centered(ids), plain(ids), what="logits")
        assert not torch.allclose(centered(ids), _build(_config(1, normalization=normalization),
                                                        None)(ids)), \
            "the norm weights had no effect"


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_zero_centered_gamma_is_the_plain_model_plus_one(normalization):
    run_distributed(1, _check_zero_centered_gamma_is_the_plain_model_plus_one, normalization)


def _check_sdpa_before_torch_2_5_repeats_the_groups():
    """Where SDPA has no ``enable_gqa`` (torch < 2.5), the grouped keys and values are
    repeated per query head first: the same logits as SDPA reading the groups itself."""
    ps.initialize_model_parallel(2)
    ids, _ = _batch()
    model = _build(_config(2, num_attention_heads=8, num_query_groups=4),
                   ps.get_tensor_model_parallel_group())
    logits = {}
    try:
        for takes_groups in (True, False):
            attention.SDPA_TAKES_GROUPS = takes_groups
            logits[takes_groups] = model(ids)
    finally:
        attention.SDPA_TAKES_GROUPS = True
    assert_rel_close(logits[False], logits[True], what="logits")


@pytest.mark.skipif(not SDPA_TAKES_GROUPS, reason="this torch has no enable_gqa: every "
                                                   "grouped test takes the repeated path")
def test_sdpa_before_torch_2_5_repeats_the_groups():
    run_distributed(2, _check_sdpa_before_torch_2_5_repeats_the_groups)
