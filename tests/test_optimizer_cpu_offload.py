"""``--optimizer-cpu-offload`` (Megatron's flag; `mp.optim.optimizer`'s ``cpu_offload``): the
masters and state of the first ``offload_fraction`` of a rank's optimizer elements in host
memory. On the CPU the host is the device, but the offloaded masters are still copies of the
parameters, their gradients copies of the device gradients, written back after each step: the
runs must be the same as without the offload, bit for bit, and checkpoints must travel between
the two."""

from pathlib import Path

import pytest
import torch
from gpt_runs import masters, pieces, setup, train_step
from harness import run_distributed

from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.config import ConfigError, load_config

STEPS = 4
TINY = Path(__file__).resolve().parent.parent / "configs" / "gpt-tiny.yaml"


def _assert_same(got: list, want: list, what: str) -> None:
    """`gpt_runs.pieces` equal bit for bit (NaN where a rank holds no master, alike)."""
    assert len(got) == len(want), what
    for (_, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)


def _optimizer_args(fraction: float | None, precision_aware: bool) -> dict:
    args = {} if fraction is None else {"optimizer_cpu_offload": True,
                                        "optimizer_offload_fraction": fraction}
    if precision_aware:
        args.update(use_precision_aware_optimizer=True, exp_avg_dtype=torch.bfloat16)
    return args


def _train(tp: int, distributed_optimizer: bool, precision: str, fraction: float | None,
           precision_aware: bool = False) -> dict:
    models, optimizer, scheduler = setup(
        tp, 1, seed=1, precision=precision, distributed_optimizer=distributed_optimizer,
        clip_grad=0.5, sequence_parallel=tp > 1,
        optimizer_args=_optimizer_args(fraction, precision_aware))
    shards = [(s.offloaded, s.end - s.start,
               s.main.untyped_storage().data_ptr() != s.param.untyped_storage().data_ptr())
              for s in optimizer.shards]
    losses, norms = zip(*(train_step(models, optimizer, scheduler, step)
                          for step in range(STEPS)))
    return {"losses": losses, "norms": norms, "weights": pieces(models),
            "masters": masters(models, optimizer), "shards": shards,
            "params_norm": optimizer.calc_params_l2_norm()}


@pytest.mark.parametrize("world,tp,distributed_optimizer,precision,fraction,precision_aware", [
    (4, 2, True, "fp32", 1.0, False), (4, 1, False, "fp32", 0.5, False),
    (4, 2, True, "bf16", 0.5, True), (2, 1, True, "bf16", 0.3, False)],
    ids=["TP2xDP2-distopt", "DP4-half", "TP2-SPxDP2-distopt-bf16-precision-aware",
         "DP2-distopt-bf16-0.3"])
def test_offloaded_training_is_the_same_bit_for_bit(world, tp, distributed_optimizer,
                                                     precision, fraction, precision_aware):
    plain = run_distributed(world, _train, tp, distributed_optimizer, precision, None,
                            precision_aware)
    offloaded = run_distributed(world, _train, tp, distributed_optimizer, precision, fraction,
                                precision_aware)
    for rank, (want, got) in enumerate(zip(plain, offloaded)):
        assert got["losses"] == want["losses"] and got["norms"] == want["norms"], rank
        assert got["params_norm"] == want["params_norm"], rank
        for kind in ("weights", "masters"):
            assert got[kind].keys() == want[kind].keys()
            for name, value in want[kind].items():
                _assert_same(got[kind][name], value, f"rank {rank}: {kind} of {name}")
        # Megatron's rule: whole shards in order while fewer than the fraction's elements
        # are offloaded; each offloaded master a copy of its own, none of the others
        flags = [offloaded for offloaded, _, _ in got["shards"]]
        sizes = [size for _, size, _ in got["shards"]]
        n = flags.count(True)
        assert flags == [True] * n + [False] * (len(flags) - n), rank
        assert sum(sizes[:n - 1]) < fraction * sum(sizes) <= sum(sizes[:n]), rank
        assert all(own for offloaded, _, own in got["shards"] if offloaded), rank


def _steps(fraction: float | None, load: str | None = None, save: str | None = None) -> dict:
    """Seed 1's run for `STEPS` steps and a checkpoint in ``save``; or, from ``load`` (built
    from another seed first: the weights must come from the checkpoint, into the host masters
    of fp32 parameters too), step `STEPS` + 1. Its last loss, norm and the weights."""
    models, optimizer, scheduler = setup(2, 1, seed=7 if load else 1, distributed_optimizer=True,
                                         clip_grad=0.5, sequence_parallel=True,
                                         optimizer_args=_optimizer_args(fraction, False))
    if load:
        load_checkpoint(load, models, optimizer, scheduler)
    for step in range(STEPS, STEPS + 1) if load else range(STEPS + (save is None)):
        loss, norm = train_step(models, optimizer, scheduler, step)
    if save:
        save_checkpoint(save, STEPS, models, optimizer, scheduler)
    return {"loss": loss, "norm": norm, "weights": pieces(models)}


@pytest.mark.parametrize("saved,loaded", [(0.5, None), (None, 1.0)],
                         ids=["offloaded-to-plain", "plain-to-offloaded"])
def test_checkpoints_travel_between_offloaded_and_plain(tmp_path, saved, loaded):
    """Saved after `STEPS` steps with one, resumed with the other for one more: the same as
    the plain run of `STEPS` + 1 steps straight."""
    path = str(tmp_path / "ckpt")
    want = run_distributed(4, _steps, None)
    run_distributed(4, _steps, saved, None, path)
    got = run_distributed(4, _steps, loaded, path)
    for rank, (w, g) in enumerate(zip(want, got)):
        assert (g["loss"], g["norm"]) == (w["loss"], w["norm"]), rank
        for name, value in w["weights"].items():
            _assert_same(g["weights"][name], value, f"rank {rank}: {name}")


@pytest.mark.parametrize("override,message", [
    (["--optimizer-offload-fraction", "1.5"],
     "training.optimizer_offload_fraction=1.5 must be a number in [0, 1]"),
    (["--optimizer-cpu-offload", "--optimizer", "muon"],
     "training.optimizer_cpu_offload=true with training.optimizer='muon': not supported"),
    (["--optimizer-cpu-offload", "--use-torch-fsdp2"],
     "training.optimizer_cpu_offload=true with training.use_torch_fsdp2=True: not supported")])
def test_the_config_refuses_what_it_cannot_offload(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(str(TINY), override, world_size=4)
