"""Attention sinks in the activation estimate where a sliding window attends in tiles: each
tile's mask takes the sink's kept column, so it is a mask of the tile's own (no view of the
window's shared one, which no layer then keeps) beside the tile's padded q, k and v. Measured
with saved-tensor hooks against the CPU estimate to the byte, at TP 2 with and without SP, as
test_estimate_window measures the tiles without sinks (the layers' other paths, every CP
exchange and whole models with sinks: tests/test_estimate_activations.py)."""

import dataclasses
import itertools

import pytest
from harness import run_distributed
from test_estimate_window import TILE_ROWS, B, _saved_bytes, _tiled_config, _tiles_of

from mp import parallel_state as ps
from mp.estimate import CPU, layer_terms
from mp.estimate.attention_calls import TILE_MASK
from mp.estimate.memory import chunk_saved_bytes
from mp.model import attention_masks
from mp.model.transformer import TransformerBlock, TransformerLayer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

TILED = {  # test_estimate_window's case -> softmax_type
    "two_layers_sdpa_flash": "learnable",
    "window_5_gqa_unfused": "off-by-one",
    "unfused_core_attn": "learnable",  # selective recompute: the checkpoint keeps q, k, v
}


def _config(name: str, tp: int, sp: bool):
    return dataclasses.replace(_tiled_config(name, tp, sp), softmax_type=TILED[name])


def _measure(tp: int) -> dict:
    ps.initialize_model_parallel(tp)
    model_parallel_cuda_manual_seed(1234)
    results = {}
    with _tiles_of(TILE_ROWS):
        for name, sp in itertools.product(TILED, (False, True)):
            cfg = _config(name, tp, sp)
            module = (TransformerLayer(cfg, 1) if cfg.num_layers == 1
                      else TransformerBlock(cfg, post_process=False))
            results[name, sp] = _saved_bytes(module, cfg)
    return results


def test_tiles_with_sinks_save_what_the_estimate_says(monkeypatch):
    monkeypatch.setattr(attention_masks, "WINDOW_TILE", TILE_ROWS)
    measured = run_distributed(2, _measure, 2)
    failures = []
    for (name, sp), got in measured[0].items():
        cfg = _config(name, 2, sp)
        assert not any(TILE_MASK in term for term in layer_terms(cfg, B, CPU)), name
        expected = chunk_saved_bytes(cfg, B, CPU)
        if [results[name, sp] for results in measured] != [expected] * 2:
            failures.append(f"{name} (SP {sp}): measured {got} B, estimated {expected:.0f} B")
    assert not failures, "\n".join(failures)


def test_sinks_over_multi_latent_attention_are_refused():
    cfg = dataclasses.replace(_tiled_config("mla_flash", 1, False), softmax_type="learnable")
    with pytest.raises(ValueError, match="softmax_type='learnable' with multi_latent_attention"):
        layer_terms(cfg, B, CPU)
