"""Selective recompute of Megatron-Core's modules (``recompute_modules``) in the estimator,
against the code: the bytes a layer keeps for backward with each module and with
combinations of them (`SavedTensorMeter`, read after the forward: an output that
`mp.tensor_parallel.CheckpointWithoutOutput` frees counts nothing), the bytes its recomputes
rebuild in backward (the same meter read again after the backward: the outputs refilled and
what the recomputed functions saved anew), to the byte with the `CPU` storage rules; dense
layers, mixture-of-experts layers (EP 1: every rank's experts take all ``N k`` copies),
multi-latent attention and sliding windows, at TP 1 and TP 2 with SP off and on, bf16 with
dropout as in tests/test_estimate_activations.py."""

import dataclasses
import itertools
import os
from unittest import mock

import pytest
import torch
from checks import counted_flops
from harness import run_distributed
from test_estimate_activations import HEADS, B, H, S
from test_estimate_plan import CONFIGS, _tool
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from mp import parallel_state as ps
from mp.config import load_config
from mp.estimate import CPU, SavedTensorMeter
from mp.estimate.memory import chunk_saved_bytes, rebuilt_bytes
from mp.estimate.planner import default_recompute_modes, recompute_fields, recompute_mode
from mp.model import TransformerConfig
from mp.model.context_parallel import local_positions
from mp.model.rope import rotary_freqs
from mp.model.transformer import TransformerBlock, TransformerLayer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)
MLA = dict(multi_latent_attention=True, position_embedding_type="rope", kv_lora_rank=24,
           qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12)
LLAMA = dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
             add_bias_linear=False)

CASES = {  # name -> (config overrides, recompute modules)
    # dense layers: GPT-3's (LayerNorm, GeLU, biases) and Llama's
    "mlp": ({}, ["mlp"]),
    "layernorm": ({}, ["layernorm"]),
    "layernorm_zero_centered_unfused": (dict(layernorm_zero_centered_gamma=True,
                                             attention_backend="unfused"), ["layernorm"]),
    "core_attn_mlp_layernorm": ({}, ["core_attn", "mlp", "layernorm"]),
    "llama_layernorm": (LLAMA, ["layernorm"]),
    "llama_mlp_core_attn": (LLAMA, ["mlp", "core_attn"]),
    "llama_fp32_layernorm_mlp": (dict(LLAMA, precision="fp32", attention_backend="unfused"),
                                 ["layernorm", "mlp"]),
    # an fp32 residual stream: the norms keep fp32 inputs, rebuild fp32 weight copies
    "layernorm_fp32_residual_zero_centered": (dict(fp32_residual_connection=True,
                                                   layernorm_zero_centered_gamma=True),
                                              ["layernorm"]),
    "llama_fp32_residual_layernorm_mlp": (dict(LLAMA, fp32_residual_connection=True),
                                          ["layernorm", "mlp"]),
    # mixtures of experts
    "moe": (MOE, ["moe"]),
    "moe_act": (MOE, ["moe_act"]),
    "moe_act_swiglu_nobias": (dict(MOE, activation="swiglu", add_bias_linear=False),
                              ["moe_act"]),
    "moe_act_squared_relu": (dict(MOE, activation="squared_relu"), ["moe_act"]),
    "shared_experts": (dict(MOE, moe_shared_expert_intermediate_size=32), ["shared_experts"]),
    "moe_layernorm_fp32_router": (dict(MOE, moe_router_dtype="fp32", moe_z_loss_coeff=0.01),
                                  ["moe", "layernorm"]),
    "layernorm_moe_act_shared_core_attn": (
        dict(MOE, **LLAMA, moe_shared_expert_intermediate_size=32, moe_aux_loss_coeff=0.1),
        ["layernorm", "moe_act", "shared_experts", "core_attn"]),
    # multi-latent attention
    "mla_up_proj": (MLA, ["mla_up_proj"]),
    "mla_up_proj_q_lora_unfused": (dict(MLA, q_lora_rank=20, attention_backend="unfused"),
                                   ["mla_up_proj"]),
    "mla_up_proj_layernorm_core_attn_q_lora": (dict(MLA, q_lora_rank=20),
                                               ["mla_up_proj", "layernorm", "core_attn"]),
    "mla_up_proj_rmsnorm_flash": (dict(MLA, normalization="RMSNorm", v_head_dim=24,
                                       attention_dropout=0.0), ["mla_up_proj"]),
    # DeepSeek-V3's: RMSNorm, SwiGLU, no biases, a shared expert, sigmoid routing
    "deepseek": (dict(MLA, **MOE, normalization="RMSNorm", activation="swiglu",
                      add_bias_linear=False, q_lora_rank=20,
                      moe_shared_expert_intermediate_size=32,
                      moe_router_score_function="sigmoid", moe_aux_loss_coeff=0.1),
                 ["layernorm", "moe_act", "mla_up_proj"]),
    # sliding windows (8 of S = 32 keys): core_attn rebuilds the window's mask with the core,
    # the others leave it saved
    "window_core_attn_unfused": (dict(window_size=[8, 0], attention_backend="unfused"),
                                 ["core_attn"]),
    "window_layernorm_flash": (dict(window_size=[8, 0], attention_dropout=0.0), ["layernorm"]),
    "window_mla_up_proj_flash": (dict(MLA, window_size=[8, 0], v_head_dim=24,
                                      attention_dropout=0.0), ["mla_up_proj"]),
}

CHUNKS = {  # two-layer chunks: each layer keeps its own, and the RoPE angles once
    "mla_up_proj_two_layers": (dict(MLA, q_lora_rank=20), ["mla_up_proj", "layernorm"]),
    "moe_then_dense": (dict(MOE, moe_layer_freq=2, activation="swiglu"),
                       ["moe_act", "mlp", "layernorm"]),
    "dense_then_moe_mla": (dict(MLA, **MOE, moe_layer_freq=[0, 1]),
                           ["moe", "mlp", "mla_up_proj", "core_attn"]),
    "full_then_sliding_unfused": (dict(window_size=[8, 0], window_attn_skip_freq=[0, 1],
                                       attention_backend="unfused"), ["core_attn", "mlp"]),
}

ALL_CASES = {**CASES, **CHUNKS}


def _config(tp: int, sp: bool, overrides: dict, modules: list, num_layers: int = 1
            ) -> TransformerConfig:
    kw = dict(num_layers=num_layers, hidden_size=H, num_attention_heads=HEADS, vocab_size=300,
              seq_length=S, hidden_dropout=0.1, attention_dropout=0.1, precision="bf16",
              tensor_model_parallel_size=tp, sequence_parallel=sp,
              recompute_granularity="selective", recompute_modules=modules)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _kept_and_rebuilt(module: torch.nn.Module, cfg: TransformerConfig) -> tuple[int, int]:
    """(bytes ``module(x, None, rotary)`` keeps for backward after its forward, bytes its
    backward's recomputes add: the outputs refilled, what they save anew), parameters
    excluded; a storage counts once, at its size when read."""
    s, cp = cfg.seq_length, cfg.context_parallel_size
    rows = s // cp // (cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)
    torch.manual_seed(0)
    x = torch.randn(rows, B, H, requires_grad=True,
                    dtype=torch.float32 if cfg.fp32_residual_connection else cfg.params_dtype)
    positions = local_positions(s, cp, ps.get_context_parallel_rank())
    freqs = (rotary_freqs(s, cfg.rotary_dim, cfg.rotary_base, x.device)[positions]
             if cfg.position_embedding_type == "rope" else None)
    meter = SavedTensorMeter(exclude=module.parameters())
    with meter:
        y = module(x, None, freqs)
    kept = meter.bytes
    loss = y.float().square().sum()  # what the loss saves is not the layer's
    with meter:
        loss.backward()
    assert x.grad is not None
    return kept, meter.bytes - kept


def _measure(tp: int, names: list[str], num_layers: int = 1) -> dict:
    ps.initialize_model_parallel(tp)
    results = {}
    for name, sp in itertools.product(names, (False, True)[:tp]):
        model_parallel_cuda_manual_seed(1234)
        cfg = _config(tp, sp, *ALL_CASES[name], num_layers=num_layers)
        module = (TransformerLayer(cfg, 1) if num_layers == 1
                  else TransformerBlock(cfg, post_process=False))
        results[name, sp] = _kept_and_rebuilt(module.train(), cfg)
    return results


def _failures(tp: int, measured: list[dict], num_layers: int = 1) -> list[str]:
    failures = []
    for rank, results in enumerate(measured):
        for (name, sp), (kept, rebuilt) in results.items():
            cfg = _config(tp, sp, *ALL_CASES[name], num_layers=num_layers)
            expected = chunk_saved_bytes(cfg, B, CPU, cfg.chunk_layers())
            expected_rebuilt = sum(sum(rebuilt_bytes(cfg, B, CPU, cfg.is_moe_layer(i), i))
                                   for i in cfg.chunk_layers())
            for what, got, want in (("kept", kept, expected),
                                    ("rebuilt", rebuilt, expected_rebuilt)):
                if got != want:
                    failures.append(f"rank {rank}, {name} (SP {sp}), {what}: measured {got} B, "
                                    f"estimated {want:.0f} B ({got - want:+.0f} B)")
    return failures


@pytest.mark.parametrize("tp", [1, 2])
def test_bytes_a_layer_keeps_and_rebuilds_match_the_estimate(tp):
    names = list(CASES)
    failures = _failures(tp, run_distributed(tp, _measure, tp, names))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("tp", [1, 2])
def test_bytes_a_chunk_keeps_and_rebuilds_match_the_estimate(tp):
    failures = _failures(tp, run_distributed(tp, _measure, tp, list(CHUNKS), 2), 2)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------ FLOPs

FLOP_CASES = {  # name -> (config overrides, recompute modules); counted_flops's small GPT
    "core_attn": ({}, ["core_attn"]),
    "mlp_swiglu": (dict(activation="swiglu"), ["mlp"]),
    "layernorm_mlp_core_attn": ({}, ["layernorm", "mlp", "core_attn"]),
    "moe": (dict(MOE, moe_shared_expert_intermediate_size=24), ["moe"]),
    "shared_experts_moe_act_mlp": (dict(MOE, moe_layer_freq=2, activation="swiglu",
                                        moe_shared_expert_intermediate_size=24),
                                   ["shared_experts", "moe_act", "mlp"]),
    "mla_up_proj": (MLA, ["mla_up_proj"]),
    "mla_up_proj_q_lora_core_attn": (dict(MLA, q_lora_rank=20), ["mla_up_proj", "core_attn"]),
    # the depth of multi-token prediction recomputes as the decoder's layers
    "deepseek_with_a_depth": (dict(MLA, **MOE, q_lora_rank=20, activation="swiglu",
                                   moe_layer_freq=[0, 1], moe_shared_expert_intermediate_size=24,
                                   moe_router_score_function="sigmoid", mtp_num_layers=1,
                                   untie_embeddings_and_output_weights=True),
                              ["layernorm", "moe", "mla_up_proj", "mlp"]),
}


class _MatrixFlops(TorchDispatchMode):
    """Torch's FLOP formulas (`torch.utils.flop_counter`) summed over the operations run
    inside it, forward and backward: `FlopCounterMode` for `checks.counted_flops`, which
    also tracks modules, through hooks that refuse the inputs a recompute in backward gives
    a mixture of experts."""

    def __init__(self, display: bool = False):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


def _counted_flops(overrides: dict) -> tuple[int, float]:
    with mock.patch("torch.utils.flop_counter.FlopCounterMode", _MatrixFlops):
        return counted_flops(overrides)


@pytest.mark.parametrize("name", list(FLOP_CASES))
def test_flops_equal_what_torch_counts(name):
    """Forward, backward and each module's recompute: torch's FLOP formulas count the rerun
    matrix products inside the backward."""
    overrides, modules = FLOP_CASES[name]
    counted, formula = run_distributed(1, _counted_flops, dict(
        overrides, recompute_granularity="selective", recompute_modules=modules))[0]
    assert counted == formula


# ------------------------------------------------------------------------- planner and CLI

def test_planner_tries_the_modules_the_model_has():
    """Dense: the norms; mixture of experts: the norms and the experts' activation, or the
    whole MoE layers; multi-latent attention: its up projections too. A row names its
    modules, and its estimate is the one the CLI gives for them."""
    dense = _config(1, False, {}, ["core_attn"])
    deepseek = _config(1, False, dict(MLA, **MOE, moe_layer_freq=[0, 1]), ["core_attn"], 2)
    assert default_recompute_modes(dense) == ("none", "selective", "layernorm",
                                              "layernorm+mlp+core_attn", "full")
    assert default_recompute_modes(deepseek) == (
        "none", "selective", "layernorm+moe_act+mla_up_proj",
        "layernorm+moe+mlp+mla_up_proj+core_attn", "full")
    assert recompute_fields("layernorm+moe_act")["recompute_modules"] == ["layernorm",
                                                                         "moe_act"]
    with pytest.raises(ValueError, match="'moe_ac' is none of"):
        recompute_fields("layernorm+moe_ac")
    for mode in default_recompute_modes(deepseek):
        assert recompute_mode(dataclasses.replace(deepseek, **recompute_fields(mode))) == mode
    tool = _tool()
    path = os.path.join(CONFIGS, "deepseek-v3.yaml")
    overrides = ["--model.recompute_method", "null", "--model.recompute_num_layers", "null",
                 "--recompute-granularity", "selective", "--recompute-modules", "layernorm",
                 "moe_act", "mla_up_proj"]
    job = load_config(path, overrides, world_size=2048)
    assert job.model.recompute_modules == ["layernorm", "moe_act", "mla_up_proj"]
    assert tool.main(["--config", path, "--gpus", "2048", *overrides]) == 0
