"""Activation memory: the bytes autograd saves for backward, counted with saved-tensor hooks
on the real layers, against the estimate; and the estimate against Korthikanti et al.'s
closed forms. 16-bit (bf16) activations, dropout on, as the formulas assume.

On the CPU the kernels save a little differently from CUDA (dropout masks in bf16, the
softmax in fp32, the SDPA math path under dropout): the CPU measurement is compared with the
estimate for `mp.estimate.CPU`, which must match it to the byte, and the CUDA estimate, which
the same code computes with CUDA's storage rules, is tied to the paper's formulas term for
term (tests/test_estimate_gpu.py measures it on a GPU).

With context parallelism the ranks differ a little: CP rank 0's first query chunk is square
and needs no bottom-right mask. The estimate is the busiest rank's, which every other CP rank
matches to the byte (rank 0 saves less).
"""

import contextlib
import dataclasses
import itertools

import pytest
import torch
from checks import jit_compiled_on_cpu
from harness import run_distributed

from mp import parallel_state as ps
from mp.estimate import CPU, CUDA, SavedTensorMeter, korthikanti_layer_bytes, layer_terms
from mp.estimate.memory import chunk_saved_bytes
from mp.estimate.stage_ends import embedding_terms, output_terms
from mp.model import GPTModel, TransformerConfig
from mp.model.context_parallel import local_positions
from mp.model.rope import rotary_freqs
from mp.model.transformer import TransformerBlock, TransformerLayer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

S, B, H, HEADS = 32, 2, 64, 4

LAYER_CASES = {  # name -> config overrides (tp and sequence_parallel are added per case)
    "unfused": dict(attention_backend="unfused"),
    "unfused_selective": dict(attention_backend="unfused", recompute_granularity="selective"),
    "sdpa_math": dict(attention_backend="sdpa"),  # attention dropout on: torch's math path
    "sdpa_flash": dict(attention_backend="sdpa", attention_dropout=0.0),
    "sdpa_selective": dict(attention_backend="sdpa", recompute_granularity="selective"),
    "swiglu_rope_nobias": dict(attention_backend="unfused", activation="swiglu",
                               position_embedding_type="rope", add_bias_linear=False),
    # torch's composite RMSNorm: fp32 input copy, fp32 normalized input, fp32 rstd
    "rmsnorm_swiglu_rope_gqa": dict(normalization="RMSNorm", activation="swiglu",
                                    position_embedding_type="rope", add_bias_linear=False,
                                    num_attention_heads=16, num_query_groups=4),
    "rmsnorm_zero_centered_selective": dict(normalization="RMSNorm",
                                            layernorm_zero_centered_gamma=True,
                                            recompute_granularity="selective"),
    # grouped-query attention: 16 heads share 4 keys and values
    "gqa_unfused": dict(attention_backend="unfused", num_attention_heads=16, num_query_groups=4),
    "gqa_sdpa_math": dict(num_attention_heads=16, num_query_groups=4),
    "gqa_sdpa_flash": dict(num_attention_heads=16, num_query_groups=4, attention_dropout=0.0),
    "gqa_unfused_selective": dict(attention_backend="unfused", num_attention_heads=16,
                                  num_query_groups=4, recompute_granularity="selective"),
    "gqa_unfused_rope": dict(attention_backend="unfused", num_attention_heads=16,
                             num_query_groups=4, position_embedding_type="rope"),
    "gqa_rope_selective": dict(num_attention_heads=16, num_query_groups=4,
                               position_embedding_type="rope",
                               recompute_granularity="selective"),
    # heads 24 wide (64 / 4 would be 16): queries 96, output projection 96 -> 64
    "kv_channels_sdpa_math": dict(kv_channels=24),
    "kv_channels_sdpa_flash_zero_centered": dict(kv_channels=24, attention_dropout=0.0,
                                                 layernorm_zero_centered_gamma=True),
    "kv_channels_gqa_unfused_partial_rope": dict(
        attention_backend="unfused", num_attention_heads=8, num_query_groups=4, kv_channels=24,
        position_embedding_type="rope", rotary_percent=0.5),
    # qk_layernorm: the q and k norms' inputs, statistics per head row, normalized q and k
    "qk_layernorm_gqa_unfused": dict(qk_layernorm=True, attention_backend="unfused",
                                     num_attention_heads=16, num_query_groups=4),
    "qk_rmsnorm_rope_zero_centered_selective": dict(
        qk_layernorm=True, normalization="RMSNorm", position_embedding_type="rope",
        layernorm_zero_centered_gamma=True, recompute_granularity="selective"),
    "qk_rmsnorm_gqa_sdpa_flash_kv_channels": dict(
        qk_layernorm=True, normalization="RMSNorm", num_attention_heads=16, num_query_groups=4,
        attention_dropout=0.0, kv_channels=24),
    "squared_relu_nobias": dict(activation="squared_relu", add_bias_linear=False),
    # gpt-oss's gated unit: eager, the clamp keeps both halves before it, the offset a copy
    "quick_geglu_clamp_offset": dict(activation="quick_geglu", activation_func_clamp_value=0.5,
                                     glu_linear_offset=1.0),
    "swiglu_offset_nobias": dict(activation="swiglu", glu_linear_offset=1.0,
                                 add_bias_linear=False),
    # qk_l2_norm: fp32 copies of q and k and a factor per head row; a NoPE layer
    # (no_rope_freq) keeps its normalized q and k, no rotated ones, no rotary tables
    "qk_l2_norm_gqa_unfused_nope": dict(qk_l2_norm=True, position_embedding_type="rope",
                                        no_rope_freq=1, attention_backend="unfused",
                                        num_attention_heads=16, num_query_groups=4),
    "qk_l2_norm_rope_sdpa_flash": dict(qk_l2_norm=True, position_embedding_type="rope",
                                       attention_dropout=0.0),
    # sliding windows of 8 earlier keys (of S = 32): an explicit mask where a call's keys
    # reach past the window (at CP 4, rank 1's first chunk's 8 keys do not: mixed calls)
    "window_unfused": dict(attention_backend="unfused", window_size=[8, 0]),
    "window_unfused_selective": dict(attention_backend="unfused", window_size=[8, 0],
                                     recompute_granularity="selective"),
    "window_sdpa_math": dict(window_size=[8, 0]),  # the math path adds the mask: saves none
    "window_gqa_sdpa_flash_rope": dict(window_size=[8, 0], attention_dropout=0.0,
                                       num_attention_heads=16, num_query_groups=4,
                                       position_embedding_type="rope"),
    "window_0_sdpa_flash_selective": dict(window_size=[0, 0], attention_dropout=0.0,
                                          recompute_granularity="selective"),
    # a window reaching the first key from the last query: no mask, as without one
    "window_31_sdpa_flash": dict(window_size=[S - 1, 0], attention_dropout=0.0),
    # attention sinks: q, k, v padded per call (a channel, a key), a mask for every call
    # (a kept column; the causal ones bottom-right), the output cut to its channels; p2p's
    # ring keeps its inputs and the logits (off-by-one's zeros)
    "sinks_learnable_gqa_unfused_window": dict(softmax_type="learnable", window_size=[8, 0],
                                               attention_backend="unfused",
                                               num_attention_heads=16, num_query_groups=4),
    "sinks_off_by_one_kv_channels_sdpa_flash_rope": dict(
        softmax_type="off-by-one", kv_channels=12, attention_dropout=0.0,
        position_embedding_type="rope"),
    "sinks_learnable_sdpa_math": dict(softmax_type="learnable"),  # fp32 copies, wider
    # an fp32 residual stream: fp32 norm inputs and statistics, the norms' fp32 weight copies
    "fp32_residual_zero_centered": dict(fp32_residual_connection=True,
                                        layernorm_zero_centered_gamma=True),
    "fp32_residual_rmsnorm_swiglu_rope_selective": dict(
        fp32_residual_connection=True, normalization="RMSNorm", activation="swiglu",
        position_embedding_type="rope", recompute_granularity="selective"),
}
BLOCK_CASES = {  # two-layer chunks: full recompute over them, or layers that differ
    "full_uniform": dict(recompute_granularity="full", recompute_method="uniform"),
    "full_uniform_distributed": dict(recompute_granularity="full", recompute_method="uniform",
                                     distribute_saved_activations=True),
    "full_block": dict(recompute_granularity="full", recompute_method="block",
                       recompute_num_layers=1, attention_backend="unfused"),
    # the checkpoints keep the chunk's RoPE angles, one tensor for both
    "full_uniform_rope": dict(recompute_granularity="full", recompute_method="uniform",
                              position_embedding_type="rope"),
    # the second layer slides and is saved whole, the first is checkpointed
    "full_block_window_second_layer": dict(recompute_granularity="full", recompute_method="block",
                                           recompute_num_layers=1, attention_backend="unfused",
                                           window_size=[8, 0], window_attn_skip_freq=[0, 1]),
    # Llama 4's attention: the second layer skips RoPE, both L2-normalize q and k
    "no_rope_second_layer_qk_l2_norm_gqa": dict(position_embedding_type="rope", no_rope_freq=2,
                                                qk_l2_norm=True, num_attention_heads=16,
                                                num_query_groups=4, attention_dropout=0.0),
    "window_every_other_layer_sdpa_flash": dict(window_size=[8, 0], window_attn_skip_freq=2,
                                                attention_dropout=0.0),
    "full_uniform_distributed_fp32_residual": dict(
        recompute_granularity="full", recompute_method="uniform",
        distribute_saved_activations=True, fp32_residual_connection=True),
}


def _config(tp: int, sequence_parallel: bool, num_layers: int = 1, cp: int = 1, **overrides):
    kw = dict(num_layers=num_layers, hidden_size=H, num_attention_heads=HEADS, vocab_size=300,
              seq_length=S, hidden_dropout=0.1, attention_dropout=0.1, precision="bf16",
              tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
              context_parallel_size=cp)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _saved_bytes(module: torch.nn.Module, cfg: TransformerConfig, *args) -> int:
    """Bytes ``module(x, None, rotary)`` saves for backward on this rank (parameters excluded);
    runs the backward too, so that a wrong save would also show up as a failure."""
    s, cp = cfg.seq_length, cfg.context_parallel_size
    rows = s // cp // (cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)
    dtype = torch.float32 if cfg.fp32_residual_connection else torch.bfloat16
    x = torch.randn(rows, B, H, dtype=dtype, requires_grad=True)
    positions = local_positions(s, cp, ps.get_context_parallel_rank())  # this CP rank's
    freqs = (rotary_freqs(s, cfg.rotary_dim, cfg.rotary_base, x.device)[positions]
             if cfg.position_embedding_type == "rope" else None)
    with SavedTensorMeter(exclude=module.parameters()) as meter:
        y = module(x, None, freqs)
    y.float().square().sum().backward()
    assert x.grad is not None
    return meter.bytes


def _case(overrides: dict, cp: int, comm_type: str) -> dict:
    """A case's overrides at CP ``cp`` with ``comm_type`` (p2p: without attention dropout,
    which its ring attention does not have)."""
    case = {**overrides, "cp": cp, "cp_comm_type": comm_type}
    return {**case, "attention_dropout": 0.0} if comm_type == "p2p" else case


def _measure_layers(tp: int, cp: int = 1, comm_type: str = "all_gather") -> dict:
    """Saved bytes of one layer (or a two-layer chunk under full recompute) per case."""
    ps.initialize_model_parallel(tp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)
    results = {}
    sps = (False, True) if tp > 1 else (False,)
    for (name, overrides), sp in itertools.product(LAYER_CASES.items(), sps):
        cfg = _config(tp, sp, **_case(overrides, cp, comm_type))
        results[name, sp] = _saved_bytes(TransformerLayer(cfg, 1), cfg)
    for (name, overrides), sp in itertools.product(BLOCK_CASES.items(), sps):
        cfg = _config(tp, sp, num_layers=2, **_case(overrides, cp, comm_type))
        results[name, sp] = _saved_bytes(TransformerBlock(cfg, post_process=False), cfg)
    return results


def _check_layers(tp: int, cp: int = 1, comm_type: str = "all_gather") -> None:
    """Every rank's measured bytes against the estimate: equal, except all_gather's CP rank
    0's, which may only be smaller (module doc)."""
    measured = run_distributed(tp * cp, _measure_layers, tp, cp, comm_type)
    failures = []
    for rank, results in enumerate(measured):
        # ranks are laid out TP first, then CP
        busiest = cp == 1 or comm_type != "all_gather" or rank // tp % cp != 0
        for (name, sp), got in results.items():
            if name in LAYER_CASES:
                cfg = _config(tp, sp, **_case(LAYER_CASES[name], cp, comm_type))
                expected = sum(layer_terms(cfg, B, CPU).values())
            else:
                cfg = _config(tp, sp, num_layers=2, **_case(BLOCK_CASES[name], cp, comm_type))
                expected = chunk_saved_bytes(cfg, B, CPU)
            # the CPU estimate is exact to the byte
            if got != expected if busiest else got > expected:
                failures.append(f"rank {rank}, {name} (SP {sp}): measured {got} B, estimated "
                                f"{expected:.0f} B ({got / expected - 1:+.2%})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_saved_bytes_of_a_layer_match_the_estimate(tp):
    _check_layers(tp)


@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2), (1, 4)], ids=["cp2", "tp2_cp2", "cp4"])
@pytest.mark.parametrize("comm_type", ["all_gather", "a2a", "p2p"])
def test_saved_bytes_of_a_layer_with_context_parallelism_match_the_estimate(tp, cp, comm_type):
    """all_gather: the keys and values gathered over CP, each query chunk's attention (scores,
    masks, outputs); a2a: Q, K, V exchanged for every token of 1 / CP of the heads, attended
    whole; p2p: the ring's q, k, v inputs, output and log-sum-exp (without attention dropout);
    all: the rank's share of every per-token tensor."""
    _check_layers(tp, cp, comm_type)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("recompute", [None, "selective"])
def test_cuda_estimate_is_korthikanti_term_for_term(tp, sequence_parallel, recompute):
    """GPT-3's layer (GeLU 4h, LayerNorm, biases, dropout on), unfused attention with the fused
    softmax: the CUDA estimate without the norm statistics (which the paper leaves out) is
    the paper's formula exactly."""
    if tp == 1 and sequence_parallel:
        pytest.skip("sequence parallelism needs TP > 1")
    s, b, h, a = 2048, 4, 12288, 96
    cfg = TransformerConfig(num_layers=96, hidden_size=h, num_attention_heads=a,
                            vocab_size=51200, seq_length=s, precision="bf16",
                            attention_backend="unfused", tensor_model_parallel_size=tp,
                            sequence_parallel=sequence_parallel,
                            recompute_granularity=recompute)
    terms = layer_terms(cfg, b, CUDA)
    ours = sum(terms.values()) - terms["norm statistics"]
    assert ours == pytest.approx(korthikanti_layer_bytes(s, b, h, a, tp, sequence_parallel,
                                                         recompute), rel=1e-12)


def test_full_recompute_keeps_the_layer_input():
    """Korthikanti's full recompute: ``2 s b h`` per layer (a checkpoint per layer, no SP)."""
    cfg = TransformerConfig(num_layers=8, hidden_size=256, num_attention_heads=8,
                            vocab_size=1000, seq_length=128, precision="bf16",
                            tensor_model_parallel_size=2, recompute_granularity="full",
                            recompute_method="uniform")
    per_layer = chunk_saved_bytes(cfg, 4, CUDA) / cfg.num_layers
    assert per_layer == korthikanti_layer_bytes(128, 4, 256, 8, 2, recompute="full")


def test_flash_attention_saves_less_than_the_formula():
    """SDPA's flash kernel keeps the log-sum-exp, not the formula's ``5 a s^2 b`` bytes."""
    s, b, h, a = 2048, 1, 4096, 32
    common = dict(num_layers=1, hidden_size=h, num_attention_heads=a, vocab_size=51200,
                  seq_length=s, precision="bf16")
    flash = layer_terms(TransformerConfig(attention_backend="sdpa", **common), b, CUDA)
    unfused = layer_terms(TransformerConfig(attention_backend="unfused", **common), b, CUDA)
    assert "softmax output" not in flash and flash["softmax log-sum-exp"] == 4 * a * s * b
    assert sum(unfused.values()) - sum(flash.values()) == pytest.approx(
        5 * a * s * s * b - 4 * a * s * b, rel=1e-12)


def _measure_model(tp: int, sequence_parallel: bool, compiled: bool, **overrides) -> int:
    """Saved bytes of a two-layer GPT's forward with the loss; ``compiled``: with `mp.jit`'s
    fused functions compiled (on the CPU by inductor's C++ backend)."""
    cp = overrides.get("cp", 1)
    ps.initialize_model_parallel(tp, context_parallel_size=cp)
    return model_saved_bytes(_config(tp, sequence_parallel, num_layers=2, **overrides),
                             compiled)


def model_saved_bytes(cfg: TransformerConfig, compiled: bool) -> int:
    """Saved bytes of ``cfg``'s GPT forward with the loss on this rank's ``s / CP`` tokens of
    ``B`` sequences (model-parallel state already initialized)."""
    model_parallel_cuda_manual_seed(1234)
    model = GPTModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, cfg.seq_length // cfg.context_parallel_size),
                        generator=torch.Generator().manual_seed(0))
    with jit_compiled_on_cpu() if compiled else contextlib.nullcontext():
        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = model(ids, labels=ids)
        loss.float().mean().backward()
    return meter.bytes


@pytest.mark.parametrize("tp,sequence_parallel,compiled,overrides", [
    (1, False, False, dict(attention_backend="unfused")),
    (2, True, False, dict(attention_backend="unfused")),
    # compiled: bool residual dropout masks, the SiLU recomputed, the loss's own saves
    (2, True, True, dict(attention_backend="unfused", activation="swiglu")),
    (2, True, False, dict(layernorm_zero_centered_gamma=True, kv_channels=24)),
    (2, True, False, dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                          position_embedding_type="rope")),
    (2, False, False, dict(qk_layernorm=True, activation="squared_relu")),
    (1, False, False, dict(cp=2)),  # learned positions at the rank's own
    (2, True, False, dict(cp=2, normalization="RMSNorm", activation="swiglu",
                          add_bias_linear=False, position_embedding_type="rope")),
    # the first layer slides, the second attends fully
    (2, True, False, dict(cp=2, cp_comm_type="a2a", window_size=[8, 0],
                          window_attn_skip_freq=2, attention_dropout=0.0)),
    # the embedding's output, the layers' and the final norm's inputs in fp32
    (2, True, False, dict(fp32_residual_connection=True)),
    # attention sinks, the core recomputed
    (2, True, False, dict(softmax_type="learnable", recompute_granularity="selective",
                          position_embedding_type="rope", num_query_groups=2)),
], ids=["tp1", "tp2_sp", "tp2_sp_compiled_swiglu", "tp2_sp_zero_centered_kv_channels",
        "tp2_sp_rmsnorm_llama", "tp2_qk_layernorm_squared_relu", "cp2", "tp2_cp2_sp_llama",
        "tp2_cp2_sp_a2a_window_every_other_layer", "tp2_sp_fp32_residual",
        "tp2_sp_sinks_selective"])
def test_saved_bytes_of_the_whole_model(tp, sequence_parallel, compiled, overrides):
    """Embedding, layers, final norm, output layer and what the cross-entropy saves (with
    context parallelism, on the last CP rank: a busiest one)."""
    world = tp * overrides.get("cp", 1)
    got = run_distributed(world, _measure_model, tp, sequence_parallel, compiled,
                          **overrides)[-1]
    cfg = _config(tp, sequence_parallel, num_layers=2, **overrides)
    kernels = dataclasses.replace(CPU, jit_compiled=compiled)
    expected = (chunk_saved_bytes(cfg, B, kernels)  # both layers
                + sum(embedding_terms(cfg, B, kernels).values())
                + sum(output_terms(cfg, B, kernels).values()))
    assert got == expected
