"""Sliding-window attention (``window_size``, ``window_attn_skip_freq``) in the estimator's
FLOPs, its CUDA storage rules and its command line. The bytes windowed layers save and the
bytes they move are checked with the other layers': windowed cases in
tests/test_estimate_activations.py (both cores, TP 1/2/4 with SP, every CP exchange, full
recompute, whole models), test_estimate_recompute.py (what selective recompute keeps and
rebuilds), test_estimate_mla.py, test_estimate_mtp.py (the depths slide as the last layer)
and test_estimate_comm.py (no byte more or less).

A windowed layer's attention products count the full ``s x s`` square times the share of the
causal (query, key) pairs its window keeps, written out here query by query."""

import dataclasses
import os

import pytest
from checks import counted_flops
from harness import run_distributed
from test_estimate_flops import _config
from test_estimate_plan import CONFIGS, _tool

from mp.config import load_config
from mp.estimate import CUDA, layer_terms, training_flops
from mp.model import TransformerConfig
from mp.training.flops import num_floating_point_operations

S, BATCH, HEADS, HIDDEN = 2048, 4, 32, 4096


def _kept_pairs(s: int, window: int) -> int:
    """(query, key) pairs a window of ``window`` earlier keys keeps, query by query."""
    return sum(min(i + 1, window + 1) for i in range(s))


def _cut_flops(s: int, batch: int, width: int, window: int) -> float:
    """Forward FLOPs of ``Q K^T`` and ``P V`` (``width`` query channels) that a window cuts
    from the full square."""
    square = 2 * 2 * batch * s * s * width
    return square * (1 - _kept_pairs(s, window) / (s * (s + 1) / 2))


@pytest.mark.parametrize("skip_freq,sliding", [
    (None, [1, 2, 3, 4]), (2, [1, 3]), ([0, 1, 1, 0], [2, 3]), ("([1]*3+[0])*1", [1, 2, 3])],
    ids=["every_layer", "freq_2", "list", "expression"])
@pytest.mark.parametrize("recompute", [None, "selective", "full"])
@pytest.mark.parametrize("window", [0, 127, S - 2])
def test_windowed_layers_count_the_pairs_their_window_keeps(window, recompute, skip_freq,
                                                            sliding):
    """Per sliding layer (1-based numbers listed by hand), forward and backward, and the
    recompute of full or selective (``core_attn``) recompute; two multi-token prediction
    depths slide as the last layer, rerun by selective recompute only."""
    common = dict(recompute_granularity=recompute, mtp_num_layers=2,
                  recompute_method="uniform" if recompute == "full" else None)
    plain = _config(HEADS, HIDDEN, 4, **common)
    cfg = _config(HEADS, HIDDEN, 4, window_size=[window, 0], window_attn_skip_freq=skip_freq,
                  **common)
    passes = 3 + (recompute is not None)
    depth_passes = 3 + (recompute == "selective")
    cut = _cut_flops(S, BATCH, HIDDEN, window) * (
        passes * len(sliding) + depth_passes * 2 * (4 in sliding))
    assert cut > 0
    assert training_flops(cfg, BATCH) == pytest.approx(training_flops(plain, BATCH) - cut,
                                                       rel=1e-12)
    assert num_floating_point_operations(cfg, BATCH) == training_flops(cfg, BATCH)


@pytest.mark.parametrize("window", [S - 1, S, 10 * S])
def test_a_window_reaching_the_first_key_changes_nothing(window):
    plain = _config(HEADS, HIDDEN, 4, recompute_granularity="selective")
    cfg = dataclasses.replace(plain, window_size=[window, 0])
    for recompute in (None, "selective"):
        assert training_flops(cfg, BATCH, recompute) == training_flops(plain, BATCH, recompute)
    assert layer_terms(cfg, 1, CUDA) == layer_terms(plain, 1, CUDA)


@pytest.mark.parametrize("overrides,passes", [
    (dict(window_size=[3, 0], window_attn_skip_freq=[1, 0]), 3),
    (dict(window_size=[0, 0], recompute_granularity="selective"), 2 * 4),
], ids=["first_layer_slides", "both_slide_core_attn_recomputed"])
def test_torch_counts_the_square_the_cores_compute(overrides, passes):
    """mp's unfused core computes every score and masks the window's: torch's FLOP counter
    sees the full square, the estimate less by what the window cuts (`checks.counted_flops`'s
    GPT: 2 sequences of 16, 32 query channels), in every pass that runs the products."""
    counted, formula = run_distributed(1, counted_flops, overrides)[0]
    window = overrides["window_size"][0]
    assert counted - formula == pytest.approx(passes * _cut_flops(16, 2, 32, window), rel=1e-12)


@pytest.mark.parametrize("s", [2048, 2000])  # 2000: the last 32-query tile part-filled
def test_cuda_runs_the_memory_efficient_kernel_for_a_window(s):
    """On CUDA a windowed SDPA layer saves what the flash one does plus the window's mask in
    the activation dtype (the memory-efficient kernel's additive bias) and its log-sum-exp
    for whole 32-query tiles; the unfused core's fused softmax keeps no mask."""
    for backend, extra in (("sdpa", 2 * s * s + 4 * 16 * 2 * (-s % 32)), ("unfused", 0)):
        plain = TransformerConfig(num_layers=1, hidden_size=1024, num_attention_heads=16,
                                  vocab_size=1000, seq_length=s, precision="bf16",
                                  attention_dropout=0.0, attention_backend=backend)
        windowed = dataclasses.replace(plain, window_size=[64, 0])
        saved = [sum(layer_terms(c, 2, CUDA).values()) for c in (plain, windowed)]
        assert saved[1] - saved[0] == extra, backend


def test_the_busiest_cp_rank_masks_the_most_pairs_by_its_window():
    """``all_gather`` at CP 4 (chunks of ``L = s / 8``), a window of ``2L``: CP rank 1's
    chunks attend over ``2L`` keys (within the window: the bottom-right form, no mask on
    CUDA) and ``7L`` (a mask), ranks 2 and 3's over ``3L`` and ``6L``, ``4L`` and ``5L``
    (masks of ``9L^2`` in all): the CUDA estimate is theirs."""
    chunk = 256
    plain = TransformerConfig(num_layers=1, hidden_size=1024, num_attention_heads=16,
                              vocab_size=1000, seq_length=8 * chunk, precision="bf16",
                              attention_dropout=0.0, context_parallel_size=4)
    windowed = dataclasses.replace(plain, window_size=[2 * chunk, 0])
    saved = [sum(layer_terms(c, 1, CUDA).values()) for c in (plain, windowed)]
    assert saved[1] - saved[0] == 2 * 9 * chunk * chunk


def test_the_estimate_tool_takes_a_window(capsys):
    """``--window-size`` and ``--window-attn-skip-freq`` reach the estimate and the planner as
    any config override: the FLOPs line is the windowed model's, the activations are shown for
    the sliding and the full layers apart."""
    config = os.path.join(CONFIGS, "gpt-tiny.yaml")
    window = ["--window-size", "4,0", "--window-attn-skip-freq", "2"]
    tool = _tool()
    assert tool.main(["--config", config, "--gpus", "4", *window]) == 0
    out = capsys.readouterr().out
    cfg = load_config(config, window, world_size=4).model
    plain = load_config(config, [], world_size=4).model
    windowed, full = (training_flops(c, 16, None) for c in (cfg, plain))
    assert f"{windowed:.3e} model" in out and windowed < full
    assert "(sliding window 4)" in out and "(full attention)" in out
    assert tool.main(["--config", config, "--gpus", "4", "--plan", "--top", "2", *window]) == 0
    assert "valid layouts fit" in capsys.readouterr().out
