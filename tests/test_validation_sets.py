"""Megatron's ``--multiple-validation-sets`` and ``--full-validation``. A DP 2 job with two
validation datasets reports, at each evaluation, one loss per dataset in Megatron's line and
TensorBoard names; at the last iteration each equals the final checkpoint's loss over that
dataset's whole epoch computed in one process. A full validation reads every micro-batch
group of the one-epoch dataset once, and again from its first sample at the next evaluation;
without it each set reads what a job given that dataset alone would. Megatron's rules
(``valid_data_path`` needed, no weights, no mock data) are refused by name before any process
group exists."""

import contextlib
import io
import os
import re

import pytest
import torch
from harness import DistributedTestError, run_distributed
from test_checkpoint_flags import _variant
from test_data_gpt_dataset import make_dataset
from test_end_evaluation import _scalars

from mp import parallel_state as ps
from mp.checkpointing import job as checkpoint_job
from mp.config import ConfigError, load_config
from mp.data.dataset_builder import build_gpt_datasets
from mp.training.data import ValidationPass, ValidationSets, build_data_iterators
from mp.training.pretrain import pretrain, setup_model_and_optimizer

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "gpt-tiny.yaml")
SEQ, SEED, MBS, DP = 16, 3, 2, 2
JOB = ["--tensor-model-parallel-size", "1", "--num-layers", "1", "--hidden-size", "32",
       "--num-attention-heads", "2", "--tokenizer-type", "NullTokenizer", "--vocab-size", "300",
       "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size", "8",
       "--train-iters", "2", "--lr", "3e-3", "--lr-warmup-iters", "0", "--eval-interval", "1",
       "--eval-iters", "1", "--num-workers", "0", "--seed", str(SEED), "--log-interval", "1",
       "--logging.progress", "false"]
LINE = (r"^validation-(\d) loss at iteration (\d) \| lm loss value: (\S+) \| "
        r"lm loss PPL: (\S+) \|$")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Training file a and validation files b and c: {name: prefix}. b holds 22 samples of
    one epoch and c 30, so at MBS x DP = 4 each leaves 2 out and reads 5 and 7 micro-batches
    per rank: two full iterations of 2 and a shorter last one."""
    root = tmp_path_factory.mktemp("validation-sets")
    return {name: make_dataset(str(root / name), num_docs=n, seed=i, high=300).path_prefix
            for i, (name, n) in enumerate((("a", 40), ("b", 14), ("c", 24)))}


def _config(files, tmp_path, *flags: str, world_size: int = DP):
    return load_config(TINY, [*JOB, "--train-data-path", files["a"], "--valid-data-path",
                              files["b"], files["c"], "--data-cache-path",
                              str(tmp_path / "cache"), *flags], world_size=world_size)


def _one_epoch(files, tmp_path, name: str):
    """``name``'s validation dataset alone, one epoch (what a job given only it builds)."""
    return build_gpt_datasets(None, None, SEQ, SEED, 0, None, 0,
                              per_split_data_path=[[files["a"]], [files[name]], None],
                              path_to_cache=str(tmp_path / "cache"))[1]


def _read_passes(full, partial, alone):
    """This rank's validation micro-batches: two full passes of each set under ``full`` (the
    second after a restart), the first micro-batch of each set under ``partial`` and the
    first validation micro-batch under ``alone``."""
    ps.initialize_model_parallel(1)
    sets = build_data_iterators(full)[1]
    assert isinstance(sets, ValidationSets) and len(sets) == 2
    passes = []
    for valid in sets:
        assert isinstance(valid, ValidationPass)
        first = [next(valid)["tokens"] for _ in range(valid.num_microbatches)]
        valid.restart()
        second = [next(valid)["tokens"] for _ in range(valid.num_microbatches)]
        passes.append((first, second))
    return (passes, [next(valid)["tokens"] for valid in build_data_iterators(partial)[1]],
            next(build_data_iterators(alone)[1])["tokens"])


def test_a_full_validation_reads_each_set_whole_once(files, tmp_path):
    full = _config(files, tmp_path, "--multiple-validation-sets", "--full-validation")
    partial = _config(files, tmp_path, "--multiple-validation-sets")
    alone = load_config(TINY, [*JOB, "--train-data-path", files["a"], "--valid-data-path",
                               files["c"], "--data-cache-path", str(tmp_path / "cache")],
                        world_size=DP)
    ranks = run_distributed(DP, _read_passes, full, partial, alone)
    for index, name in enumerate("bc"):
        dataset = _one_epoch(files, tmp_path, name)
        tokens = int(dataset.dataset.sequence_lengths.sum())
        assert len(dataset) == (tokens - 1) // SEQ  # one epoch: every full window once
        groups = len(dataset) // (MBS * DP)  # the last incomplete group is left out
        assert (len(dataset), groups) == ((22, 5), (30, 7))[index]
        for rank, (passes, _, _) in enumerate(ranks):
            first, second = passes[index]
            assert len(first) == groups and all(torch.equal(a, b) for a, b in zip(first, second))
            for g, batch in enumerate(first):  # rank r reads slice r of each group
                start = g * MBS * DP + rank * MBS
                want = torch.stack([dataset[i]["tokens"] for i in range(start, start + MBS)])
                assert torch.equal(batch, want), (name, rank, g)
    # without --full-validation each set reads what a job given it alone reads
    for partial_first, alone_first in ((p, a) for _, p, a in ranks):
        assert torch.equal(partial_first[1], alone_first)
        assert not torch.equal(partial_first[0], alone_first)


def _job(cfg) -> str:
    """What the job prints on this rank."""
    ps.initialize_model_parallel(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(cfg)
    return out.getvalue()


def _direct_losses(cfg, files, tmp_path) -> list[float]:
    """One process: the checkpoint ``cfg`` saved, its mean loss over each validation
    dataset's whole epoch built alone, the last incomplete group of ``MBS x DP`` left out
    (every micro-batch holds the same number of tokens, so that mean is the job's mean of
    micro-batch means)."""
    ps.initialize_model_parallel(1)
    serial = _variant(cfg, training={"load": cfg.training.save, "save": None})
    model, optimizer, scheduler = setup_model_and_optimizer(serial)
    checkpoint_job.resume(checkpoint_job.start_point(serial), model, optimizer, scheduler)
    model[0].eval()
    losses = []
    for name in "bc":
        dataset = _one_epoch(files, tmp_path, name)
        samples = [dataset[i] for i in range(len(dataset) // (MBS * DP) * MBS * DP)]
        with torch.no_grad():
            loss = model[0](*(torch.stack([s[k] for s in samples])
                              for k in ("tokens", "position_ids")),
                            labels=torch.stack([s["labels"] for s in samples]))
        losses.append(loss.double().mean().item())
    return losses


def test_each_set_reports_the_final_models_loss_on_its_whole_data(files, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = _config(files, tmp_path, "--multiple-validation-sets", "--full-validation",
                  "--eval-iters", "0", "--save", str(tmp_path / "ckpt"), "--tensorboard-dir",
                  str(tmp_path / "tb"))
    out = run_distributed(DP, _job, cfg)[0]
    lines = re.findall(LINE, out, re.MULTILINE)
    assert [(s, it) for s, it, _, _ in lines] == [("0", "1"), ("1", "1"), ("0", "2"),
                                                  ("1", "2")], out
    want = run_distributed(1, _direct_losses, cfg, files, tmp_path)[0]
    for (_, _, value, ppl), loss in zip(lines[2:], want):
        assert float(value) == pytest.approx(loss, rel=2e-5)
        assert float(ppl) == pytest.approx(torch.tensor(loss).exp().item(), rel=2e-5)
    assert lines[2][2] != lines[3][2]  # two sets, two losses
    scalars = _scalars(tmp_path / "tb")
    for index in (0, 1):
        tag = f"lm loss validation-{index}"
        assert [step for step, _ in scalars[tag]] == [1, 2]
        assert scalars[tag][1][1] == pytest.approx(want[index], rel=2e-5)
        assert scalars[f"{tag} ppl"][1][1] == pytest.approx(float(lines[2 + index][3]),
                                                           rel=1e-5)
    assert not any(tag.startswith("validation") for tag in scalars)


def test_megatron_rules_are_refused_by_name(files, tmp_path):
    with pytest.raises(ConfigError, match=r"data.multiple_validation_sets=true evaluates each "
                                          r"dataset of valid_data_path on its own, and "
                                          r"valid_data_path is not set \(data_path=\['x'\]"):
        load_config(TINY, ["--data-path", "x", "--multiple-validation-sets"], world_size=4)
    with pytest.raises(ConfigError, match=r"multiple_validation_sets=true with valid_data_path "
                                          r"weights \[0.5, 0.5\]"):
        load_config(TINY, ["--train-data-path", "t", "--valid-data-path", "0.5", "b", "0.5",
                           "c", "--multiple-validation-sets"], world_size=4)
    with pytest.raises(ConfigError, match=r"data.full_validation=true with data_path weights "
                                          r"\[0.3, 0.7\]: a full validation"):
        load_config(TINY, ["--data-path", "0.3", "a", "0.7", "b", "--full-validation"],
                    world_size=4)
    with pytest.raises(ConfigError, match="data.full_validation=true needs datasets of "
                                          "documents"):
        load_config(TINY, ["--mock-data", "--full-validation"], world_size=4)
    small = _config(files, tmp_path, "--full-validation", "--micro-batch-size", "64",
                    "--global-batch-size", "64", world_size=1)
    with pytest.raises(DistributedTestError, match=r"data.full_validation: the validation "
                                                   r"split holds \d+ samples, fewer than one "
                                                   r"micro-batch on each data-parallel rank"):
        run_distributed(1, _first_valid_micro_batch, small)


def _first_valid_micro_batch(cfg):
    ps.initialize_model_parallel(1)
    return next(build_data_iterators(cfg)[1])
