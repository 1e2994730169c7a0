"""Uneven pipeline splits: the layers of each chunk, written out by hand from Megatron-LM's
description of ``--decoder-first/last-pipeline-num-layers``,
``--account-for-embedding/loss-in-pipeline-split`` and ``--pipeline-model-parallel-layout``;
their rules and messages; the flags."""

import re

import pytest
from test_config import TINY, error_of, shipped

from mp.config import load_config
from mp.estimate import Setup
from mp.model import TransformerConfig
from mp.model.pipeline_split import uneven_stages_text


def _config(num_layers: int, pp: int, vpp: int | None = None, **split) -> TransformerConfig:
    return TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=2,
                             vocab_size=16, seq_length=4, pipeline_model_parallel_size=pp,
                             virtual_pipeline_model_parallel_size=vpp, **split)


FIRST, LAST = "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"
EMBEDDING, LOSS = "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"
LAYOUT = "pipeline_model_parallel_layout"

# (num_layers, pp, vpp, split) -> the layers of each stage's chunks, as global index ranges
CASES = {
    "even": ((8, 4, None, {}), [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 8)]]),
    "even interleaved": ((8, 2, 2, {}), [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]),
    # the first stage holds 1, the last 3, the two middle ones share 10 - 1 - 3 = 6
    "first and last": ((10, 4, None, {FIRST: 1, LAST: 3}),
                       [[(0, 1)], [(1, 4)], [(4, 7)], [(7, 10)]]),
    "first only": ((7, 3, None, {FIRST: 1}), [[(0, 1)], [(1, 4)], [(4, 7)]]),
    "last only, no middle left over": ((5, 2, None, {LAST: 4}), [[(0, 1)], [(1, 5)]]),
    "an empty first stage": ((6, 3, None, {FIRST: 0}), [[(0, 0)], [(0, 3)], [(3, 6)]]),
    # each stage's layers spread over its 2 chunks: round 1 (chunks 0) takes 1 + 2 + 2 + 1
    # layers, round 2 (chunks 1) the next 6
    "first and last, interleaved": ((12, 4, 2, {FIRST: 2, LAST: 2}),
                                    [[(0, 1), (6, 7)], [(1, 3), (7, 9)], [(3, 5), (9, 11)],
                                     [(5, 6), (11, 12)]]),
    # 7 layers + the embedding + the loss = 9 over 3 stages: 2, 3 and 2 transformer layers
    "embedding and loss": ((7, 3, None, {EMBEDDING: True, LOSS: True}),
                           [[(0, 2)], [(2, 5)], [(5, 7)]]),
    "loss only": ((7, 4, None, {LOSS: True}), [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 7)]]),
    # 6 + 2 over 4 x 2 chunks, one each: the model's first chunk holds only the embedding,
    # its last only the output layer and loss
    "embedding and loss, interleaved": ((6, 4, 2, {EMBEDDING: True, LOSS: True}),
                                        [[(0, 0), (3, 4)], [(0, 1), (4, 5)], [(1, 2), (5, 6)],
                                         [(2, 3), (6, 6)]]),
    # chunks in model order: 3, 2, 2, 2 (round 1), 2, 2, 2, 1 and the loss (round 2)
    "layout": ((16, 4, None, {LAYOUT: "Et*3|(tt|)*6,tL"}),
               [[(0, 3), (9, 11)], [(3, 5), (11, 13)], [(5, 7), (13, 15)], [(7, 9), (15, 16)]]),
    "layout, one chunk a stage": ((5, 2, None, {LAYOUT: "E|t*5L"}), [[(0, 0)], [(0, 5)]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunks_hold_the_layers_megatron_gives_them(case):
    (num_layers, pp, vpp, split), expected = CASES[case]
    cfg = _config(num_layers, pp, vpp, **split)
    vpp = cfg.virtual_pipeline_model_parallel_size  # a layout sets it
    got = [[(r.start, r.stop) for r in (cfg.chunk_layers(stage, c) for c in range(vpp or 1))]
           for stage in range(pp)]
    assert got == expected
    assert [cfg.stage_num_layers(stage) for stage in range(pp)] == \
        [sum(b - a for a, b in chunks) for chunks in expected]
    every = sorted(i for stage in range(pp) for c in range(vpp or 1)
                   for i in cfg.chunk_layers(stage, c))
    assert every == list(range(num_layers)), "each layer exactly once"
    stage_layers = [sum(b - a for a, b in chunks) for chunks in expected]
    text = uneven_stages_text(cfg.chunk_layer_counts)
    assert text == ("" if len(set(stage_layers)) == 1 else
                    "layers " + "+".join(map(str, stage_layers)))


def test_the_estimate_names_an_uneven_split():
    cfg = _config(12, 4, 2, **{FIRST: 2, LAST: 2})
    assert Setup(cfg, data_parallel_size=1, num_microbatches=4).describe().startswith(
        "TP1 PP4 (v2, layers 2+4+4+2) DP1")


@pytest.mark.parametrize("num_layers,pp,vpp,split,message", [
    (8, 3, None, {}, "num_layers=8 is not divisible by pipeline_model_parallel_size x "
                     "virtual_pipeline_model_parallel_size=3; give the first or last stage its "
                     "own count"),
    (8, 4, None, {EMBEDDING: True}, "num_layers=8 + 1 (the embedding) is not divisible by "
                                    "pipeline_model_parallel_size x "
                                    "virtual_pipeline_model_parallel_size=4"),
    (8, 1, None, {FIRST: 2}, "num_layers_in_first/last_pipeline_stage need "
                             "pipeline_model_parallel_size > 1, got 1"),
    (8, 4, 2, {FIRST: 3}, "num_layers_in_first_pipeline_stage=3 must be a non-negative integer "
                          "divisible by virtual_pipeline_model_parallel_size=2"),
    (8, 4, None, {LAST: -1}, "num_layers_in_last_pipeline_stage=-1 must be a non-negative"),
    (8, 4, None, {FIRST: 1, LAST: 2}, "num_layers=8 minus num_layers_in_first_pipeline_stage=1 "
                                      "and num_layers_in_last_pipeline_stage=2 leaves 5 layers "
                                      "for the 2 other stages x "
                                      "virtual_pipeline_model_parallel_size=1 chunks"),
    (8, 2, None, {FIRST: 3, LAST: 3}, "leaves 2 layers for the 0 other stages"),
    (8, 2, None, {FIRST: 9}, "leaves -1 layers"),
    (8, 2, None, {FIRST: 4, LOSS: True}, "set one of them"),
    (8, 2, None, {LAYOUT: "Ett*3|t*4L", LOSS: True},
     "account_for_embedding/loss_in_pipeline_split and pipeline_model_parallel_layout are ways "
     "to split the layers unevenly; set one of them"),
    (8, 2, 2, {LAYOUT: "Et*4|t*4L"}, "pipeline_model_parallel_layout='Et*4|t*4L' has 2 chunks; "
                                     "pipeline_model_parallel_size x "
                                     "virtual_pipeline_model_parallel_size = 2 x 2 = 4"),
    (8, 2, None, {LAYOUT: "Et*4|t*3L"}, "pipeline_model_parallel_layout='Et*4|t*3L' holds 7 "
                                        "transformer layers (t) but num_layers=8"),
    (8, 2, None, {LAYOUT: "t*4|Et*4L"}, "E must open the first chunk and L close the last"),
    (8, 2, None, {LAYOUT: "Et*4|t*4|mL"}, "places multi-token prediction layers (m), which mp "
                                          "does not have"),
    (8, 2, None, {LAYOUT: "Et*4|t*4x"}, "only E, t, L, |, repetitions"),
    (8, 2, None, {LAYOUT: "Et*4||t*4|L"}, "this split of num_layers=8 leaves chunk 0 of "
                                          "pipeline stage 1 without layers"),
    (8, 2, 2, {FIRST: 0}, "this split of num_layers=8 leaves chunk 1 of pipeline stage 0 "
                          "without layers (layers per stage and chunk: [[0, 0], [4, 4]]); only "
                          "the model's first chunk (the embedding) and last chunk (the loss) may "
                          "be empty"),
    (8, 3, None, {FIRST: 4, LAST: 4}, "leaves chunk 0 of pipeline stage 1 without layers"),
])
def test_impossible_splits_are_refused_by_name(num_layers, pp, vpp, split, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(num_layers, pp, vpp, **split)


def test_recompute_counts_layers_of_the_largest_chunk():
    cfg = _config(10, 4, None, **{FIRST: 1, LAST: 3}, recompute_granularity="full",
                  recompute_method="block", recompute_num_layers=3)
    assert cfg.recompute_num_layers == 3
    with pytest.raises(ValueError, match="recompute_num_layers=4 exceeds the 3 layers of the "
                                         "largest pipeline chunk"):
        _config(10, 4, None, **{FIRST: 1, LAST: 3}, recompute_granularity="full",
                recompute_method="block", recompute_num_layers=4)


def test_layout_flag_sets_the_virtual_stages():
    """Megatron's ``--pipeline-model-parallel-layout``: 6 chunks at PP 3 are 2 a stage."""
    m = load_config(TINY, ["--tensor-model-parallel-size", "1", "--num-layers", "6",
                           "--pipeline-model-parallel-size", "3",
                           "--pipeline-model-parallel-layout", "E|(t|)*4,ttL",
                           "--global-batch-size", "24"], 3).model
    assert m.virtual_pipeline_model_parallel_size == 2
    assert m.chunk_layer_counts == ((0, 1), (1, 1), (1, 2))


def test_megatron_flags_set_the_split():
    m = shipped("gpt3-175b", "--decoder-first-pipeline-num-layers", "5",
                "--decoder-last-pipeline-num-layers", "7").model
    assert (m.num_layers_in_first_pipeline_stage, m.num_layers_in_last_pipeline_stage) == (5, 7)
    per_stage = [m.stage_num_layers(r) for r in range(m.pipeline_model_parallel_size)]
    assert per_stage == [5] + [6] * 14 + [7]  # 96 - 5 - 7 = 84 over 14 middle stages
    m = load_config(TINY, ["--num-layers", "5", "--pipeline-model-parallel-size", "2",
                           "--account-for-embedding-in-pipeline-split"], 4).model
    assert [m.stage_num_layers(r) for r in range(2)] == [2, 3]
    assert "num_layers=4 + 1 (the embedding) + 1 (the loss) is not divisible" in error_of(
        "--pipeline-model-parallel-size", "4", "--account-for-embedding-in-pipeline-split",
        "--account-for-loss-in-pipeline-split")


@pytest.mark.parametrize("split,setting", [
    (["--decoder-first-pipeline-num-layers", "2"], "num_layers_in_first_pipeline_stage=2"),
    (["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"],
     "account_for_embedding_in_pipeline_split=True")])
def test_layers_per_virtual_stage_is_refused_with_an_uneven_split(split, setting):
    """``--num-layers-per-virtual-pipeline-stage`` assumes ``L / p`` layers a stage; an uneven
    split gives the chunks per stage instead."""
    common = ["--tensor-model-parallel-size", "1", "--num-layers", "6",
              "--pipeline-model-parallel-size", "2", *split]
    assert error_of(*common, "--num-layers-per-virtual-pipeline-stage", "1") == (
        f"--num-layers-per-virtual-pipeline-stage assumes an even split and model.{setting} is "
        "set: give the chunks per stage with --num-virtual-stages-per-pipeline-rank instead")
    m = load_config(TINY, [*common, "--num-virtual-stages-per-pipeline-rank", "2"], 4).model
    assert m.virtual_pipeline_model_parallel_size == 2
