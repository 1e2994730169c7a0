"""Sliding-window attention (``window_size``, ``window_attn_skip_freq``) in the estimator's
FLOPs, its CUDA storage rules and its command line, and the tiles a long sequence attends in
(`mp.model.attention_masks.window_tile`), measured here. The bytes windowed layers save and the
bytes they move are checked with the other layers': windowed cases in
tests/test_estimate_activations.py (both cores, TP 1/2/4 with SP, every CP exchange, full
recompute, whole models), test_estimate_recompute.py (what selective recompute keeps and
rebuilds), test_estimate_mla.py, test_estimate_mtp.py (the depths slide as the last layer)
and test_estimate_comm.py (no byte more or less).

A windowed layer's attention products count the full ``s x s`` square times the share of the
causal (query, key) pairs its window keeps, written out here query by query."""

import contextlib
import dataclasses
import itertools
import os

import pytest
from checks import counted_flops
from harness import run_distributed
from test_estimate_activations import B, _saved_bytes, model_saved_bytes
from test_estimate_activations import _config as _layer_config
from test_estimate_flops import _config
from test_estimate_plan import CONFIGS, _tool
from test_estimate_recompute import MLA, _kept_and_rebuilt

from mp import parallel_state as ps
from mp.config import load_config
from mp.estimate import CPU, CUDA, Setup, layer_terms, stage_memory, training_flops
from mp.estimate.attention_activations import busiest_calls
from mp.estimate.attention_calls import tile_mask_name
from mp.estimate.memory import chunk_saved_bytes, rebuilt_bytes
from mp.model import TransformerConfig, attention_masks
from mp.model.transformer import TransformerBlock, TransformerLayer
from mp.tensor_parallel import model_parallel_cuda_manual_seed
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
def test_cuda_runs_the_memory_efficient_kernel_for_a_window(monkeypatch, s):
    """On CUDA a windowed SDPA layer saves what the flash one does plus the window's mask in
    the activation dtype (the memory-efficient kernel's additive bias) and its log-sum-exp
    for whole 32-query tiles; the unfused core's fused softmax keeps no mask. In one call
    (the tile raised above ``s``): an ``[s, s]`` mask. In tiles of 1024 queries (a window of
    64: 1024 + 64 keys a tile, the first tile's cut to 1024): one shared ``[1024, 1088]``
    mask and the first tile's copy of its ``[1024, 1024]`` part, each tile's log-sum-exp
    rounded up (2000's last tile: 976 rows, 992 kept), the tiles' outputs apart from their
    concatenation (the projection's input), and for the fused softmax only its smaller
    scores."""
    heads, b, e = 16, 2, 2
    pairs = 1024 * 1024 + (s - 1024) * (s - 1024 + 64)  # the tiles' (query, key) pairs
    tiled = {"sdpa": e * 1024 * (1088 + 1024) + e * s * b * 1024
             + 4 * heads * b * (-(s - 1024) % 32),
             "unfused": e * heads * b * (pairs - s * s)}
    one_call = {"sdpa": e * s * s + 4 * heads * b * (-s % 32), "unfused": 0}
    for (layout, extra), backend in itertools.product(
            (("tiles", tiled), ("one call", one_call)), ("sdpa", "unfused")):
        monkeypatch.setattr(attention_masks, "WINDOW_TILE", 1024 if layout == "tiles" else s)
        plain = TransformerConfig(num_layers=1, hidden_size=1024, num_attention_heads=heads,
                                  vocab_size=1000, seq_length=s, precision="bf16",
                                  attention_dropout=0.0, attention_backend=backend)
        windowed = dataclasses.replace(plain, window_size=[64, 0])
        saved = [sum(layer_terms(c, b, CUDA).values()) for c in (plain, windowed)]
        assert saved[1] - saved[0] == extra[backend], (layout, backend)


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


# --------------------------------------------------------------------------------- tiles

TILE_ROWS = 4  # attention_masks.WINDOW_TILE while measuring tiles
S_TILED = 96  # tokens: a window of 6 attends in tiles of 10 queries (4 rounded: 10 + 6 = 16)
TILED = {  # name -> (config overrides, layers); a window of 6 but where set
    "sdpa_flash": (dict(attention_dropout=0.0), 1),
    "sdpa_math": ({}, 1),  # attention dropout: torch's math path copies q, k, v per tile
    "unfused": (dict(attention_backend="unfused"), 1),
    "unfused_core_attn": (dict(attention_backend="unfused", recompute_granularity="selective"),
                          1),
    # a window of 8: tiles of 8 (the window itself); of 5: tiles of 11
    "window_8_gqa_sdpa_flash_rope": (dict(window_size=[8, 0], attention_dropout=0.0,
                                          num_attention_heads=16, num_query_groups=4,
                                          position_embedding_type="rope"), 1),
    "window_5_gqa_unfused": (dict(window_size=[5, 0], attention_backend="unfused",
                                  num_attention_heads=16, num_query_groups=4), 1),
    "gqa_sdpa_math": (dict(num_attention_heads=16, num_query_groups=4), 1),
    # multi-latent attention: values as wide as the queries (flash) or narrower (math)
    "mla_flash": (dict(MLA, v_head_dim=24, attention_dropout=0.0), 1),
    "mla_math": (dict(MLA, attention_dropout=0.0), 1),
    # two layers of one window: one tile mask (SDPA's additive, the unfused core's boolean)
    "two_layers_sdpa_flash": (dict(attention_dropout=0.0), 2),
    "two_layers_unfused_mlp": (dict(attention_backend="unfused",
                                    recompute_granularity="selective",
                                    recompute_modules=["mlp"]), 2),
    # the first layer checkpointed, the second saved whole with its mask
    "two_layers_full_block": (dict(recompute_granularity="full", recompute_method="block",
                                   recompute_num_layers=1, attention_dropout=0.0), 2),
}


@contextlib.contextmanager
def _tiles_of(rows: int):
    """`attention_masks.WINDOW_TILE` at ``rows`` inside, put back after (pool workers persist)."""
    saved = attention_masks.WINDOW_TILE
    attention_masks.WINDOW_TILE = rows
    try:
        yield
    finally:
        attention_masks.WINDOW_TILE = saved


def _tiled_config(name: str, tp: int, sp: bool, cp: int = 1, comm_type: str = "all_gather"
                  ) -> TransformerConfig:
    overrides, layers = TILED[name]
    return _layer_config(tp, sp, layers, **{"window_size": [6, 0], **overrides, "cp": cp,
                                            "cp_comm_type": comm_type,
                                            "seq_length": S_TILED})


def _measure_tiled(tp: int, cp: int, comm_type: str) -> dict:
    """Saved bytes of one layer, or a two-layer chunk, per case, attending in tiles."""
    ps.initialize_model_parallel(tp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)
    results = {}
    with _tiles_of(TILE_ROWS):
        for name, sp in itertools.product(TILED, (False, True)[:tp]):
            cfg = _tiled_config(name, tp, sp, cp, comm_type)
            module = (TransformerLayer(cfg, 1) if cfg.num_layers == 1
                      else TransformerBlock(cfg, post_process=False))
            results[name, sp] = _saved_bytes(module, cfg)
    return results


@pytest.mark.parametrize("tp,cp,comm_type", [
    (1, 1, "all_gather"), (2, 1, "all_gather"), (1, 2, "all_gather"), (1, 4, "all_gather"),
    (1, 2, "a2a"), (2, 2, "a2a")], ids=["tp1", "tp2", "cp2", "cp4", "cp2_a2a", "tp2_cp2_a2a"])
def test_saved_bytes_of_tiled_layers_match_the_estimate(monkeypatch, tp, cp, comm_type):
    """Tiles of 10 queries under a window of 6 (8 and 11 under windows of 8 and 5) over 96
    tokens: a whole sequence (also ``a2a``'s, over half the heads) in 9 tiles and a last one
    of 6 queries; ``all_gather``'s chunks of 24 (CP 2) or 12 (CP 4) queries in tiles too, the
    first ones cut at key 0 on CP rank 0 only (which copy their masks). Each layer's and each
    chunk's bytes to the byte against the CPU estimate, the busiest rank's (no rank above
    it, one on it), the tile mask once for a chunk's two layers."""
    monkeypatch.setattr(attention_masks, "WINDOW_TILE", TILE_ROWS)
    measured = run_distributed(tp * cp, _measure_tiled, tp, cp, comm_type)
    failures = []
    for case in measured[0]:
        name, sp = case
        cfg = _tiled_config(name, tp, sp, cp, comm_type)
        window = cfg.attention_window(1)
        assert any(call.mask == "tile" for call in busiest_calls(cfg, B, CPU, window)), name
        expected = chunk_saved_bytes(cfg, B, CPU)
        got = [results[case] for results in measured]
        if max(got) != expected:
            failures.append(f"{name} (SP {sp}): measured {got} B on the ranks, estimated "
                            f"{expected:.0f} B")
    assert not failures, "\n".join(failures)


def test_a_chunk_holds_one_tile_mask_for_its_layers(monkeypatch):
    """What makes a chunk's bytes less than its layers': SDPA's bf16 ``[10, 16]`` mask
    (320 B) and the unfused core's boolean one (160 B), counted once."""
    monkeypatch.setattr(attention_masks, "WINDOW_TILE", TILE_ROWS)
    for name, mask in (("two_layers_sdpa_flash", 320), ("two_layers_unfused_mlp", 160)):
        cfg = _tiled_config(name, 1, False)
        layers = [layer_terms(cfg, B, CPU, layer=i) for i in range(2)]
        assert all(terms[tile_mask_name(6)] == mask for terms in layers)
        assert chunk_saved_bytes(cfg, B, CPU) == sum(sum(t.values()) for t in layers) - mask


def _measure_tiled_recompute(tp: int) -> dict:
    """(kept, rebuilt) bytes of a ``core_attn`` layer attending in tiles, per SP."""
    ps.initialize_model_parallel(tp)
    model_parallel_cuda_manual_seed(1234)
    results = {}
    with _tiles_of(TILE_ROWS):
        for sp in (False, True)[:tp]:
            cfg = _tiled_config("unfused_core_attn", tp, sp)
            results[sp] = _kept_and_rebuilt(TransformerLayer(cfg, 1).train(), cfg)
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_core_attn_rebuilds_the_tiles_and_their_mask(monkeypatch, tp):
    """Selective ``core_attn`` keeps no tile mask and brings it back (its storage, whole)
    with the tiles' scores when its recompute runs."""
    monkeypatch.setattr(attention_masks, "WINDOW_TILE", TILE_ROWS)
    for sp, got in run_distributed(tp, _measure_tiled_recompute, tp)[0].items():
        cfg = _tiled_config("unfused_core_attn", tp, sp)
        assert tile_mask_name(6) not in layer_terms(cfg, B, CPU)
        assert tile_mask_name(6) in layer_terms(cfg, B, CPU, modules=())
        assert got == (chunk_saved_bytes(cfg, B, CPU), sum(rebuilt_bytes(cfg, B, CPU, False)))


def _measure_tiled_model(tp: int, overrides: dict) -> int:
    ps.initialize_model_parallel(tp)
    with _tiles_of(TILE_ROWS):
        return model_saved_bytes(_layer_config(tp, True, 2, **overrides), False)


@pytest.mark.parametrize("overrides", [
    dict(attention_dropout=0.0),
    dict(attention_backend="unfused", mtp_num_layers=2, position_embedding_type="rope"),
], ids=["sdpa_flash", "unfused_rope_two_depths"])
def test_a_tiled_model_holds_one_tile_mask(monkeypatch, overrides):
    """A whole GPT at TP 2 + SP, both layers (and two multi-token prediction depths, which
    slide as the last layer) in tiles: one mask for all of them, and the stage's estimate
    (one micro-batch in flight) is the model's bytes."""
    monkeypatch.setattr(attention_masks, "WINDOW_TILE", TILE_ROWS)
    overrides = dict(overrides, window_size=[6, 0], seq_length=S_TILED)
    got = run_distributed(2, _measure_tiled_model, 2, overrides)[-1]
    cfg = _layer_config(2, True, 2, **overrides)
    assert got == stage_memory(Setup(cfg, micro_batch_size=B), 0, CPU).activations
