"""Multi-latent attention (`mp.model.mla`) in the estimator, against the code as the other
estimate tests check the standard attention: parameters per rank and model-state bytes
(meta-built chunks, DDP and the optimizer after a step), FLOPs (torch's FLOP counter on a
forward and backward of the model), the bytes a layer saves for backward (`SavedTensorMeter`,
to the byte with the `CPU` storage rules, with context parallelism too) and the bytes of every
collective in a training iteration (`CollectiveMeter`). Heads of 16 + 8 query/key channels and
12 value channels, a 24-wide key-value latent and a 20-wide query latent (or none), so that
every width is told apart."""

import itertools

import pytest
import torch
from checks import counted_flops
from harness import run_distributed
from test_estimate_activations import _saved_bytes, model_saved_bytes
from test_estimate_comm import WORLD, _one_iteration, _pipelined_iteration
from test_estimate_params import _config as _params_config
from test_estimate_params import _measured_state, assert_rank_params_equal_the_built_model

from mp import parallel_state as ps
from mp.estimate import CPU, CUDA, Setup, layer_terms, rank_params, state_bytes, training_flops
from mp.estimate.memory import chunk_saved_bytes
from mp.estimate.stage_ends import embedding_terms, output_terms
from mp.model import TransformerConfig
from mp.model.transformer import TransformerBlock, TransformerLayer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

MLA = dict(multi_latent_attention=True, position_embedding_type="rope", kv_lora_rank=24,
           qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12)
Q_LORA = dict(MLA, q_lora_rank=20)


# ---------------------------------------------------------------- parameters and model state

PARAM_VARIANTS = {
    "mla": MLA,
    "mla_q_lora_rmsnorm_swiglu_nobias": dict(Q_LORA, normalization="RMSNorm",
                                             activation="swiglu", add_bias_linear=False),
}


@pytest.mark.parametrize("variant", list(PARAM_VARIANTS))
@pytest.mark.parametrize("tp,pp,vpp", [(1, 1, None), (2, 1, None), (2, 2, 2)])
def test_rank_params_equal_the_built_model(tp, pp, vpp, variant):
    assert_rank_params_equal_the_built_model(tp, pp, vpp, PARAM_VARIANTS[variant])


@pytest.mark.parametrize("distributed_optimizer", [False, True])
@pytest.mark.parametrize("tp,variant", [(2, "mla"), (1, "mla_q_lora_rmsnorm_swiglu_nobias"),
                                        (2, "mla_q_lora_rmsnorm_swiglu_nobias")])
def test_state_bytes_equal_model_ddp_and_optimizer(tp, variant, distributed_optimizer):
    """bf16 weights, the fp32 gradient buffer, masters, moments and step counters (the
    distributed optimizer's sharded over DP without its per-shard counters)."""
    overrides = dict(PARAM_VARIANTS[variant], vocab_size=1056 if tp == 1 else 1152)
    measured = run_distributed(2, _measured_state, tp, "bf16", overrides, torch.float32,
                               distributed_optimizer)
    cfg = _params_config(tp, precision="bf16", **overrides)
    expected = state_bytes(Setup(cfg, data_parallel_size=2 // tp,
                                 distributed_optimizer=distributed_optimizer), rank_params(cfg))
    for rank, got in enumerate(measured):
        assert got == (expected.weights, expected.grads, expected.optimizer), f"rank {rank}"


# ------------------------------------------------------------------------------------ FLOPs

@pytest.mark.parametrize("overrides", [MLA, dict(Q_LORA, activation="swiglu")],
                         ids=["mla", "q_lora_swiglu"])
def test_flops_equal_what_torch_counts(overrides):
    counted, formula = run_distributed(1, counted_flops, overrides)[0]
    assert counted == formula


def test_selective_recompute_adds_both_attention_products():
    """``Q K^T`` over ``dn + dr`` channels and ``P V`` over ``dv``, once more each."""
    cfg = TransformerConfig(num_layers=3, hidden_size=1024, num_attention_heads=16,
                            vocab_size=1000, seq_length=512, **MLA)
    extra = training_flops(cfg, 4, "selective") - training_flops(cfg, 4, None)
    assert extra == 3 * 2 * 4 * 512 * 512 * 16 * (16 + 8 + 12)


# ------------------------------------------------------------------------ activation bytes

S, B, H = 32, 2, 64
LAYER_CASES = {  # name -> overrides of MLA (tp and sequence_parallel are added per case)
    # the CPU's SDPA takes values as wide as the keys only: its math path, dropout or not
    "sdpa_math": {},
    "sdpa_math_no_dropout_q_lora": dict(q_lora_rank=20, attention_dropout=0.0),
    # values as wide as the keys (16 + 8): SDPA's flash kernel without dropout
    "sdpa_flash_equal_widths": dict(v_head_dim=24, attention_dropout=0.0),
    "unfused": dict(attention_backend="unfused"),
    "unfused_q_lora_selective": dict(attention_backend="unfused", q_lora_rank=20,
                                     recompute_granularity="selective"),
    "sdpa_selective": dict(recompute_granularity="selective"),
    # torch's composite RMSNorm: an fp32 copy of the latent instead of the down projection
    "rmsnorm_swiglu_q_lora_nobias": dict(normalization="RMSNorm", activation="swiglu",
                                         q_lora_rank=20, add_bias_linear=False),
    "rmsnorm_zero_centered_unfused": dict(normalization="RMSNorm", attention_backend="unfused",
                                          layernorm_zero_centered_gamma=True, q_lora_rank=20),
    "layernorm_zero_centered_flash": dict(layernorm_zero_centered_gamma=True, v_head_dim=24,
                                          attention_dropout=0.0),
    # a sliding window of 8 earlier keys: the flash kernel keeps its mask, math adds it
    "window_sdpa_math_no_dropout": dict(window_size=[8, 0], attention_dropout=0.0),
    "window_sdpa_flash_equal_widths": dict(window_size=[8, 0], v_head_dim=24,
                                           attention_dropout=0.0),
}
BLOCK_CASES = {  # full recompute over a two-layer chunk (the checkpoints keep RoPE's angles)
    "full_block": dict(recompute_granularity="full", recompute_method="block",
                       recompute_num_layers=1, q_lora_rank=20),
    "full_uniform_distributed": dict(recompute_granularity="full", recompute_method="uniform",
                                     distribute_saved_activations=True),
}
CP_CASES = ("sdpa_math", "sdpa_flash_equal_widths", "unfused", "unfused_q_lora_selective",
            "rmsnorm_swiglu_q_lora_nobias", "window_sdpa_flash_equal_widths")


def _layer_config(tp: int, sp: bool, num_layers: int = 1, cp: int = 1, **overrides):
    kw = dict(num_layers=num_layers, hidden_size=H, num_attention_heads=4, vocab_size=300,
              seq_length=S, hidden_dropout=0.1, attention_dropout=0.1, precision="bf16",
              tensor_model_parallel_size=tp, sequence_parallel=sp, context_parallel_size=cp,
              **MLA)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _cases(cp: int, comm_type: str):
    """(name, overrides, layers) of each case at this CP size (p2p: without attention
    dropout, which its ring attention does not have)."""
    names = LAYER_CASES if cp == 1 else {n: LAYER_CASES[n] for n in CP_CASES}
    cases = [(n, o, 1) for n, o in names.items()] + [(n, o, 2) for n, o in BLOCK_CASES.items()]
    extra = dict(cp=cp, cp_comm_type=comm_type)
    if comm_type == "p2p":
        extra["attention_dropout"] = 0.0
    return [(name, {**overrides, **extra}, layers) for name, overrides, layers in cases]


def _measure_layers(tp: int, cp: int, comm_type: str) -> dict:
    ps.initialize_model_parallel(tp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)
    results = {}
    for (name, overrides, layers), sp in itertools.product(_cases(cp, comm_type),
                                                           (False, True)[:tp]):
        cfg = _layer_config(tp, sp, layers, **overrides)
        module = TransformerLayer(cfg, 1) if layers == 1 else TransformerBlock(
            cfg, post_process=False)
        results[name, sp] = _saved_bytes(module, cfg)
    return results


def _check_layers(tp: int, cp: int = 1, comm_type: str = "all_gather") -> None:
    """Every rank's bytes against the CPU estimate: equal, but all_gather's CP rank 0's,
    which may only be smaller (its first query chunk is square: no bottom-right mask)."""
    measured = run_distributed(tp * cp, _measure_layers, tp, cp, comm_type)
    cases = {name: (overrides, layers) for name, overrides, layers in _cases(cp, comm_type)}
    failures = []
    for rank, results in enumerate(measured):
        busiest = cp == 1 or comm_type != "all_gather" or rank // tp % cp != 0
        for (name, sp), got in results.items():
            overrides, layers = cases[name]
            cfg = _layer_config(tp, sp, layers, **overrides)
            expected = (sum(layer_terms(cfg, B, CPU).values()) if layers == 1
                        else chunk_saved_bytes(cfg, B, CPU))
            if got != expected if busiest else got > expected:
                failures.append(f"rank {rank}, {name} (SP {sp}): measured {got} B, estimated "
                                f"{expected:.0f} B ({got / expected - 1:+.2%})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("tp", [1, 2])
def test_saved_bytes_of_a_layer_match_the_estimate(tp):
    _check_layers(tp)


@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2)], ids=["cp2", "tp2_cp2"])
@pytest.mark.parametrize("comm_type", ["all_gather", "a2a", "p2p"])
def test_saved_bytes_with_context_parallelism_match_the_estimate(tp, cp, comm_type):
    _check_layers(tp, cp, comm_type)


def _measure_model(tp: int, sp: bool, overrides: dict) -> int:
    ps.initialize_model_parallel(tp, context_parallel_size=overrides.get("cp", 1))
    return model_saved_bytes(_layer_config(tp, sp, num_layers=2, **overrides), False)


@pytest.mark.parametrize("tp,sp,overrides", [
    (1, False, dict(attention_backend="unfused")),
    (2, True, LAYER_CASES["rmsnorm_swiglu_q_lora_nobias"]),
    (2, False, dict(q_lora_rank=20, cp=2, cp_comm_type="a2a")),
], ids=["tp1_unfused", "tp2_sp_rmsnorm_swiglu_q_lora", "tp2_cp2_a2a_q_lora"])
def test_saved_bytes_of_the_whole_model(tp, sp, overrides):
    """Embedding, two MLA layers, final norm, output layer and the loss's saves (the last
    rank's: a busiest one)."""
    got = run_distributed(tp * overrides.get("cp", 1), _measure_model, tp, sp, overrides)[-1]
    cfg = _layer_config(tp, sp, num_layers=2, **overrides)
    assert got == (2 * sum(layer_terms(cfg, B, CPU).values())
                   + sum(embedding_terms(cfg, B, CPU).values())
                   + sum(output_terms(cfg, B, CPU).values()))


# ------------------------------------------------------------------- bytes per collective

ITERATIONS = {  # name -> (overrides, distributed optimizer), at TP 2 x DP 2
    "tp2": (MLA, False),
    "tp2_sp_q_lora": (dict(Q_LORA, sequence_parallel=True), False),
    "tp2_sp_full_recompute": (dict(MLA, sequence_parallel=True, recompute_granularity="full",
                                   recompute_method="uniform"), False),
    "tp2_q_lora_selective_distributed_optimizer": (
        dict(Q_LORA, recompute_granularity="selective", precision="bf16"), True),
    # mla_up_proj: under SP the latents' and the RoPE channels' gathers (and the queries'
    # projection's from h) again in backward; without SP nothing more
    "tp2_up_proj": (dict(MLA, recompute_granularity="selective",
                         recompute_modules=["mla_up_proj"]), False),
    "tp2_sp_q_lora_up_proj_layernorm": (dict(Q_LORA, sequence_parallel=True,
                                             recompute_granularity="selective",
                                             recompute_modules=["mla_up_proj", "layernorm"]),
                                        False),
    "tp2_sp_up_proj_core_attn": (dict(MLA, sequence_parallel=True,
                                      recompute_granularity="selective",
                                      recompute_modules=["mla_up_proj", "core_attn"]), False),
}


@pytest.mark.parametrize("variant", list(ITERATIONS))
def test_collective_bytes_of_one_iteration(variant):
    """Without SP the up projections' and the RoPE channels' input gradients all-reduced over
    TP; with SP the latents and the RoPE channels gathered, their gradients reduce-scattered,
    and the down projections' and latent norms' gradients all-reduced."""
    overrides, distributed_optimizer = ITERATIONS[variant]
    for rank, (measured, expected) in enumerate(run_distributed(
            WORLD, _one_iteration, 2, overrides, distributed_optimizer)):
        assert measured == expected, f"rank {rank}"


PIPELINED = {  # name -> (tp, cp, pp, overrides), through train_step
    "tp2_pp2_sp_q_lora": (2, 1, 2, dict(Q_LORA, sequence_parallel=True)),
    "cp2_dp2_all_gather": (1, 2, 1, MLA),
    "tp2_cp2_sp_a2a_q_lora": (2, 2, 1, dict(Q_LORA, sequence_parallel=True,
                                            cp_comm_type="a2a")),
    "cp2_pp2_p2p_selective": (1, 2, 2, dict(MLA, cp_comm_type="p2p", attention_dropout=0.0,
                                            recompute_granularity="selective")),
}


@pytest.mark.parametrize("variant", list(PIPELINED))
def test_collective_bytes_of_one_pipelined_iteration(variant):
    """One `train_step`, stage by stage: with CP the keys (``dn + dr`` channels a head) and
    values (``dv``) gathered, exchanged with the queries and output, or sent around the
    ring."""
    tp, cp, pp, overrides = PIPELINED[variant]
    results = run_distributed(WORLD, _pipelined_iteration, None, overrides, False, tp, cp, pp)
    for rank, (measured, expected, _) in enumerate(results):
        assert measured == expected, f"rank {rank}"


def _closed_form_cuda_layer(s: int, b: int, h: int, a: int, t: int, sp: bool, c: int,
                            r: int | None, selective: bool, cp: int) -> int:
    """docs/estimate.md's MLA layer on CUDA (bf16, LayerNorm, GeLU 4h, dropout, SDPA: the
    memory-efficient kernel, values narrower than the keys), dn 128, dr 64, dv 128; with
    ``cp > 1`` ranks (``all_gather``) CP rank 1's."""
    e, dn, dr, dv = 2, 128, 64, 128
    n = s * b // cp
    rows = n // (t if sp else 1)
    total = rows * (4 * e * h + 2 * 2 * 4 + 2 * h)  # norm, attention and MLP inputs; norm
    # statistics (fp32 mean and rstd); the residual dropout masks (bools)
    total += rows * (e * (c + dr) + 2 * 4 + e * c)  # the latent norm's input, statistics, output
    if r is not None:
        total += rows * (e * r + 2 * 4 + e * r)
    if cp == 1 or selective:
        total += e * n * a // t * (2 * (dn + dr) + dv)  # Q, K; V (a copy)
    else:  # Q; K and V gathered; each query chunk's output before their concatenation
        total += e * n * a // t * (dn + dr) + e * s * b * a // t * (dn + dr + dv)
        total += e * n * a // t * dv
    total += 4 * 4 * s // cp * dr  # cos and sin of the rotated channels, for q and for k
    chunks = [s] if cp == 1 else [s // (2 * cp)] * 2  # queries of each attention call
    if not selective:  # the log-sum-exp, 32-query tiles
        total += 4 * a // t * b * sum(-(-q // 32) * 32 for q in chunks)
    total += e * n * a * dv // t  # the attention output
    total += 2 * e * n * 4 * h // t  # GeLU input, fc2 input
    return total


@pytest.mark.parametrize("tp,sp,cp", [(1, False, 1), (2, False, 1), (8, True, 1),
                                      (2, True, 4)])
@pytest.mark.parametrize("q_lora_rank", [None, 1536])
@pytest.mark.parametrize("recompute", [None, "selective"])
def test_cuda_estimate_of_a_layer_is_the_documented_closed_form(tp, sp, cp, q_lora_rank,
                                                                recompute):
    s, b, h, a, c = 2056, 2, 2048, 16, 512  # 2056 queries: 65 tiles of 32 (CP 4: 2 x 9)
    cfg = TransformerConfig(num_layers=4, hidden_size=h, num_attention_heads=a,
                            vocab_size=51200, seq_length=s, precision="bf16",
                            tensor_model_parallel_size=tp, sequence_parallel=sp,
                            context_parallel_size=cp, recompute_granularity=recompute,
                            multi_latent_attention=True, position_embedding_type="rope",
                            kv_lora_rank=c, q_lora_rank=q_lora_rank)
    assert sum(layer_terms(cfg, b, CUDA).values()) == _closed_form_cuda_layer(
        s, b, h, a, tp, sp, c, q_lora_rank, recompute == "selective", cp)
