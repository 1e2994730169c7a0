"""Mock data (Megatron's ``--mock-data``): random tokens in the dataset's item format, the
same for every rank and run, and a job that builds its iterators from them with no tokenizer
or corpus on the machine (the Llama 3 config names a tokenizer file that is not there)."""

import os

import pytest
import torch
from harness import run_distributed

from mp import parallel_state as ps
from mp.config import load_config
from mp.data.mock import MockGPTDataset
from mp.training.data import build_data_iterators

LLAMA3_8B = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "configs", "llama3-8b.yaml")


def test_items_are_shifted_random_tokens_fixed_by_seed_and_index():
    ds = MockGPTDataset(10, 32, 50, seed=3)
    item = ds[4]
    assert {k: tuple(v.shape) for k, v in item.items()} == {
        "tokens": (32,), "labels": (32,), "loss_mask": (32,), "position_ids": (32,)}
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert 0 <= int(item["tokens"].min()) and int(item["tokens"].max()) < 50
    assert len(set(item["tokens"].tolist())) > 10, "not random"
    assert torch.equal(MockGPTDataset(10, 32, 50, seed=3)[4]["labels"], item["labels"])
    assert not torch.equal(ds[5]["tokens"], item["tokens"])
    assert not torch.equal(MockGPTDataset(10, 32, 50, seed=4)[4]["tokens"], item["tokens"])
    assert torch.equal(item["loss_mask"], torch.ones(32))
    with pytest.raises(IndexError, match="sample 10 is outside 0..9"):
        ds[10]


def _first_batches(cfg):
    ps.initialize_model_parallel(2)
    train, valid, _ = build_data_iterators(cfg)
    return next(train), next(valid)


def test_a_job_reads_mock_data_without_its_tokenizer():
    cfg = load_config(LLAMA3_8B, ["--mock-data", "--seq-length", "16", "--global-batch-size", "4",
                                  "--lr-warmup-iters", "0", "--num-workers", "0",
                                  "--train-iters", "3", "--eval-interval", "2", "--eval-iters",
                                  "1"], world_size=2)
    assert cfg.data.tokenizer_type == "HuggingFaceTokenizer" and cfg.data.tokenizer_model is None
    (train, valid), same = run_distributed(2, _first_batches, cfg)
    for batch in (train, valid):
        assert batch["tokens"].shape == (1, 16)  # micro-batch 1, TP 2 x DP 1
        assert int(batch["tokens"].max()) < cfg.model.vocab_size
    assert torch.equal(train["tokens"], same[0]["tokens"])  # both TP ranks read the same
    reference = MockGPTDataset(12, 16, cfg.model.vocab_size, cfg.training.seed)
    assert torch.equal(train["tokens"][0], reference[0]["tokens"])
