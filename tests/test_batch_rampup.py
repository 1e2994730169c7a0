"""Batch-size ramp-up and runs counted in samples (Megatron's ``--rampup-batch-size`` and
``--train-samples``).

`BatchSchedule` against Megatron's own calculator written out here (float arithmetic, on a
case where it is exact) and against a step-by-step count of iterations; the config rules and
their messages; and the training loop: a ramped run at TP2 x DP2 and at PP2 x DP2 follows a
single-process reference fed the same samples in hand-computed batches, with the learning
rate following the consumed samples by the written-out cosine formula.
"""

import math
import random
import re

import pytest
import torch
from checks import own_rank_group, seeded
from harness import run_distributed

from mp import parallel_state as ps
from mp.config import BatchSchedule, ConfigError, JobConfig
from mp.data.samplers import build_pretraining_data_loader
from mp.model import GPTModel
from mp.training import gpt_step
from mp.training.pretrain import setup_model_and_optimizer
from mp.training.training import TrainState, train, train_step

# --- the schedule ----------------------------------------------------------------------------


def megatron_batch(consumed: int, global_batch: int, start: int, increment: int,
                   samples: int) -> int:
    """Megatron-LM's RampupBatchsizeNumMicroBatches.update, as it is written there."""
    per_increment = samples / ((global_batch - start) / increment)
    if consumed > samples:
        return global_batch
    return start + int(consumed / per_increment) * increment


def count_iterations(schedule: BatchSchedule, train_samples: int) -> int:
    """Iterations one at a time, each taking its batch while a whole one still fits."""
    consumed = iterations = 0
    while consumed + schedule.global_batch_size_at(consumed) <= train_samples:
        consumed += schedule.global_batch_size_at(consumed)
        iterations += 1
    return iterations


def test_ramp_matches_megatrons_calculator():
    # 4 increments over 4096 samples: 1024 samples per increment, exact in floats
    schedule = BatchSchedule(80, 2, 8, (16, 16, 4096))
    for consumed in range(0, 6000, 7):
        assert schedule.global_batch_size_at(consumed) == \
            megatron_batch(consumed, 80, 16, 16, 4096), consumed
    assert schedule.batch_sizes() == [16, 32, 48, 64, 80]
    assert [schedule.num_microbatches_at(c) for c in (0, 1023, 1024, 4095, 4096)] == \
        [1, 1, 2, 4, 5]


def test_gpt3_175b_ramp_of_megatrons_example():
    """Megatron-LM's GPT-3 175B script: --rampup-batch-size 16 16 5859375, batch 1536,
    --train-samples 146484375 (300B tokens of 2048), DP 8 x micro-batch 1."""
    schedule = BatchSchedule(1536, 1, 8, (16, 16, 5859375))
    assert len(schedule.batch_sizes()) == 96
    assert schedule.global_batch_size_at(0) == 16
    # 95 increments: the first after ceil(5859375 / 95) = 61678 samples
    assert [schedule.global_batch_size_at(c) for c in (61677, 61678)] == [16, 32]
    assert schedule.global_batch_size_at(5859374) == 1520
    assert schedule.global_batch_size_at(5859375) == 1536
    assert schedule.iterations(146484375) == count_iterations(schedule, 146484375)


def test_iterations_equal_the_count_one_at_a_time():
    rng = random.Random(0)
    for _ in range(2000):
        step = rng.choice([1, 2, 4])
        start, increment = step * rng.randint(1, 4), step * rng.randint(1, 3)
        global_batch = start + increment * rng.randint(1, 6)
        ramp = (start, increment, rng.randint(1, 300)) if rng.random() < 0.9 else None
        schedule = BatchSchedule(global_batch, step, 1, ramp)
        train_samples = rng.randint(1, 1000)
        assert schedule.iterations(train_samples) == count_iterations(schedule, train_samples), \
            (schedule, train_samples)


@pytest.mark.parametrize("ramp, message", [
    ((48, 16, 100), "training.rampup_batch_size start=48 must lie in 1..47 (below training."
                    "global_batch_size=48; equal to it is no ramp: drop the key)"),
    ((16, 10, 100), "training.rampup_batch_size increment=10 must be >= 1 and divide "
                    "training.global_batch_size - start = 48 - 16 = 32"),
    ((16, 16, 0), "training.rampup_batch_size samples=0 must be >= 1"),
    ((8, 8, 100), "global batch size 8 (a step of training.rampup_batch_size=[8, 8, 100]) is "
                  "not divisible by training.micro_batch_size x data_parallel_size = 2 x 8 = 16"),
])
def test_bad_ramps_are_named(ramp, message):
    with pytest.raises(ConfigError) as error:
        BatchSchedule(48, 2, 8, ramp)
    assert str(error.value) == message


# --- the config ------------------------------------------------------------------------------

def job(world_size: int = 4, tp: int = 2, pp: int = 1, vpp: int | None = None,
        **training) -> JobConfig:
    cfg = JobConfig.from_dict({
        "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
                  "vocab_size": 64, "seq_length": 16, "make_vocab_size_divisible_by": 16,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                  "virtual_pipeline_model_parallel_size": vpp},
        "training": {"micro_batch_size": 2, "global_batch_size": 16, "lr": 3e-3,
                     "min_lr": 3e-4, "train_samples": 124, "lr_warmup_samples": 20,
                     "rampup_batch_size": [4, 4, 40], "seed": 7, "eval_interval": None,
                     "eval_iters": 0, **training},
        "logging": {"log_interval": 1000, "progress": False},
    })
    cfg.validate(world_size)
    return cfg


# consumed 0, 4, 8, 12 -> 4 (floor(3c / 40) = 0); 16, 24 -> 8; 32 -> 12; 44 ... -> 16
BATCHES = [4, 4, 4, 4, 8, 8, 12, 16, 16, 16, 16, 16]


def test_a_run_in_samples_takes_the_iterations_that_fit():
    cfg = job()
    assert cfg.train_iterations(4) == len(BATCHES) and sum(BATCHES) == 124
    assert cfg.training.lr_decay_samples == 124  # defaults to the run's samples
    assert job(train_samples=123).train_iterations(4) == len(BATCHES) - 1
    assert job(rampup_batch_size=None, train_samples=40).train_iterations(4) == 2


@pytest.mark.parametrize("training, message", [
    ({"train_iters": 10}, "set exactly one of training.train_iters and training.train_samples "
                          "(got train_iters=10, train_samples=124): a run is counted in "
                          "iterations or in samples"),
    ({"lr_warmup_iters": 5}, "training.lr_warmup_iters=5 is counted in iterations, but the run "
                             "is counted in samples (training.train_samples): set it to 0 and "
                             "use training.lr_warmup_samples"),
    ({"train_samples": None, "train_iters": 10, "lr_warmup_samples": 0},
     "training.rampup_batch_size=[4, 4, 40] needs a run counted in samples (training."
     "train_samples, and lr_warmup_samples / lr_decay_samples for the schedule), as in "
     "Megatron-LM: an iteration no longer has a fixed size"),
    ({"rampup_batch_size": [4, 4]}, "training.rampup_batch_size=[4, 4] must be three ints: "
                                    "start batch size, increment, ramp-up samples"),
    ({"train_samples": 3, "lr_warmup_samples": 0}, "training.train_samples=3 holds no whole "
                                                   "iteration (the first takes 4 samples)"),
])
def test_config_rules_name_the_keys(training, message):
    with pytest.raises(ConfigError) as error:
        job(**training)
    assert str(error.value) == message


def test_interleaving_checks_every_batch_of_the_ramp():
    with pytest.raises(ConfigError) as error:
        job(tp=1, pp=2, vpp=2)
    assert str(error.value) == (
        "the interleaved pipeline schedule needs the number of micro-batches (1 = global batch "
        "4 (a step of training.rampup_batch_size=[4, 4, 40]) / (training.micro_batch_size x "
        "data_parallel_size = 4)) to be a multiple of pipeline_model_parallel_size=2")


# --- training --------------------------------------------------------------------------------

SEQ, VOCAB = 16, 64


def sample(index: int) -> dict:
    """Training sample ``index``: a noisy counting pattern, the same on every rank."""
    base = torch.arange(SEQ + 1) + 3 * index
    tokens = (base + (seeded((SEQ + 1,), 900 + index) > 1.0).long() * 5) % VOCAB
    return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(SEQ),
            "position_ids": torch.arange(SEQ)}


class Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return sample(index)


def start_from_the_reference(model, cfg: JobConfig) -> None:
    """Give this rank's chunks the single-process model's weights for ``cfg``'s seed, by
    global layer number and shard offset (pipeline stages are seeded apart, and each builds
    only its own layers). fp32: the parameters are the optimizer's masters."""
    torch.manual_seed(cfg.training.seed)
    whole = dict(GPTModel(job(world_size=1, tp=1).model, group=own_rank_group())
                 .named_parameters())
    with torch.no_grad():
        for c, ddp in enumerate(model):
            first = ddp.module.config.chunk_layers(ps.get_pipeline_model_parallel_rank(), c).start
            for name, param in ddp.module.named_parameters():
                layer = re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", name)
                if layer:
                    name = f"decoder.layers.{first + int(layer[1])}.{layer[2]}"
                elif name not in whole:  # the tied output layer's copy on the last stage
                    name = "embedding.word_embeddings.weight"
                offsets = getattr(param, "shard_offset", (0,) * param.dim())
                param.copy_(whole[name][tuple(slice(o, o + n)
                                              for o, n in zip(offsets, param.shape))])


class Recorder:
    """A `TrainingLogger` stand-in that keeps what the loop reports each iteration."""

    def __init__(self):
        self.rows = []

    def training_iteration(self, iteration, consumed, losses, lr, grad_norm, loss_scale,
                           update_successful, global_batch_size, **norms_and_counts):
        self.rows.append((global_batch_size, consumed, losses["lm loss"], grad_norm, lr))


def _ramped_run(tp: int, pp: int):
    cfg = job(tp=tp, pp=pp)
    ps.initialize_model_parallel(tp, pp)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    start_from_the_reference(model, cfg)
    loader = build_pretraining_data_loader(Samples(), 0, 2, ps.get_data_parallel_rank(),
                                           ps.get_data_parallel_world_size())
    recorder = Recorder()
    state = train(gpt_step.forward_step, model, optimizer, scheduler, [iter(loader)], None,
                  cfg, recorder, state=TrainState())
    return recorder.rows, state.consumed_train_samples


def _reference_run():
    """One process, the hand-computed batches of consecutive samples; the learning rate is
    stepped by each batch's samples."""
    cfg = job(world_size=1, tp=1)
    ps.initialize_model_parallel(1)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    start_from_the_reference(model, cfg)
    rows, consumed = [], 0
    for batch in BATCHES:
        micro = [torch.utils.data.default_collate([sample(consumed + m * 2 + i)
                                                   for i in range(2)])
                 for m in range(batch // 2)]
        out = train_step(gpt_step.forward_step, iter(micro), model, optimizer, scheduler,
                         num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=2,
                         lr_increment=batch)
        consumed += batch
        rows.append((batch, consumed, out.losses["lm loss"], out.grad_norm, scheduler.get_lr()))
    return rows


def cosine_lr(samples: int) -> float:
    """Warm-up over 20 samples, then cosine from 3e-3 to 3e-4 by sample 124."""
    if samples <= 20:
        return 3e-3 * samples / 20
    ratio = (samples - 20) / (124 - 20)
    return 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * ratio))


@pytest.fixture(scope="module")
def reference():
    return run_distributed(1, _reference_run)[0]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2_dp2", "pp2_dp2"])
def test_ramped_run_follows_the_single_process_reference(reference, tp, pp):
    results = run_distributed(4, _ramped_run, tp, pp)
    rows, consumed = results[0]
    assert all(r == results[0] for r in results), "ranks disagree on the reported values"
    assert consumed == 124
    assert [r[0] for r in rows] == BATCHES
    assert [r[1] for r in rows] == [sum(BATCHES[:i + 1]) for i in range(len(BATCHES))]
    losses = [r[2] for r in reference]
    assert losses[-1] < 0.95 * losses[0], f"the loss does not fall: {losses}"
    for i, ((_, done, loss, norm, lr), (_, _, want_loss, want_norm, want_lr)) in enumerate(
            zip(rows, reference)):
        assert loss == pytest.approx(want_loss, rel=1e-5), f"loss at iteration {i + 1}"
        assert norm == pytest.approx(want_norm, rel=1e-5), f"grad norm at iteration {i + 1}"
        assert lr == want_lr == pytest.approx(cosine_lr(done), rel=1e-12), f"lr at {i + 1}"
