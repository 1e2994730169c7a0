"""Checkpoints move between parallel layouts: a GPT trained and saved at TP2 x DP2 is loaded at
TP1, TP4, TP1 x DP4, TP2 x PP2, uneven pipeline splits (and again at TP2 x DP2); the loss on a
fixed batch, the next optimizer step and the weights after it agree with the saving run
continuing on its own (to 1e-6; bit for bit at the saving layout, where the RNG states come back
too). Mixed precision: the fp32 masters, not the bf16 weights, travel. The same holds for
checkpoints written or read with the distributed optimizer (masters and moments sharded over
DP). A bf16 job that loads a model-only checkpoint, or fine-tunes from a full one, takes its
masters from the stored fp32 weights."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close
from harness import run_distributed

from gpt_runs import GLOBAL_BATCH, assemble, batch, masters, pieces, run, setup, train_step
from test_config import TINY

from mp.checkpointing import job as checkpoint_job
from mp.config import load_config
from mp.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from mp.tensor_parallel import get_cuda_rng_tracker

SAVED_AT = 3


def _probe(models, optimizer, scheduler) -> dict:
    """What must not depend on the layout: a fixed batch's loss, the next step's loss, the
    loss and the weights after that step."""
    before = run(models, batch(100), forward_only=True)
    step, _ = train_step(models, optimizer, scheduler, SAVED_AT)
    after = run(models, batch(100), forward_only=True)
    return {"before": before, "step": step, "after": after, "weights": pieces(models),
            "lr": scheduler.get_lr(), "draws": _draws()}


def _draws() -> torch.Tensor:
    """The next numbers of the default generator and the tensor-parallel stream."""
    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(4)
    return torch.cat([torch.rand(4), tracker])


def _train_save_and_continue(path: str, distributed_optimizer: bool = False) -> dict:
    models, optimizer, scheduler = setup(2, 1, seed=1, distributed_optimizer=distributed_optimizer)
    for step in range(SAVED_AT):
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(path, SAVED_AT, models, optimizer, scheduler,
                    consumed_train_samples=SAVED_AT * GLOBAL_BATCH)
    return _probe(models, optimizer, scheduler)


def _load_and_continue(path: str, tp: int, pp: int, distributed_optimizer: bool = False,
                       **split) -> dict:
    models, optimizer, scheduler = setup(  # other weights before the load
        tp, pp, seed=2, distributed_optimizer=distributed_optimizer, **split)
    info = load_checkpoint(path, models, optimizer, scheduler)
    assert (info.iteration, info.consumed_train_samples) == (SAVED_AT, SAVED_AT * GLOBAL_BATCH)
    assert info.rng_restored == (dist.get_world_size() == 4 and (tp, pp) == (2, 1)
                                 and split.get("cp", 1) == 1)
    return _probe(models, optimizer, scheduler)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("layouts") / "save")
    return path, run_distributed(4, _train_save_and_continue, path)


@pytest.fixture(scope="module")
def saved_sharded(tmp_path_factory):
    """Saved by a run with the distributed optimizer."""
    path = str(tmp_path_factory.mktemp("layouts-distopt") / "save")
    return path, run_distributed(4, _train_save_and_continue, path, True)


def _check_continues(saved, world: int, tp: int, pp: int, distributed_optimizer: bool,
                     same_layout: bool, **split) -> None:
    path, reference = saved
    results = run_distributed(world, _load_and_continue, path, tp, pp, distributed_optimizer,
                              **split)
    expected, got = reference[0], results[0]
    tolerance = 0.0 if same_layout else 1e-6
    for key in ("before", "step", "after", "lr"):
        assert abs(got[key] - expected[key]) <= tolerance * abs(expected[key]), \
            f"{key}: {got[key]!r} after loading, {expected[key]!r} in the saving run"
    want = assemble([r["weights"] for r in reference])
    have = assemble([r["weights"] for r in results])
    assert want.keys() == have.keys()
    for name in want:
        if same_layout:
            assert torch.equal(have[name], want[name]), name
        else:
            assert_rel_close(have[name], want[name], rtol=1e-6, what=name)
    if same_layout:  # the RNG states came back: the next draws are the saving run's
        for mine, theirs in zip(results, reference):
            assert torch.equal(mine["draws"], theirs["draws"])


@pytest.mark.parametrize("world,tp,pp,distopt", [
    (1, 1, 1, False), (4, 4, 1, False), (4, 1, 1, False), (4, 2, 2, False), (4, 2, 1, False),
    (4, 1, 1, True), (4, 2, 2, True)],
    ids=["TP1", "TP4", "TP1xDP4", "TP2xPP2", "TP2xDP2-same", "TP1xDP4-distopt",
         "TP2xPP2-distopt"])
def test_load_at_another_layout_continues_the_run(saved, world, tp, pp, distopt):
    _check_continues(saved, world, tp, pp, distopt, same_layout=(world, tp, pp, distopt)
                     == (4, 2, 1, False))


@pytest.mark.parametrize("tp,pp,distopt,split", [
    (1, 4, False, {"num_layers_in_first_pipeline_stage": 0,
                   "num_layers_in_last_pipeline_stage": 2}),
    (1, 2, True, {"num_layers_in_first_pipeline_stage": 1}),
    (1, 1, True, {"cp": 2}), (2, 1, False, {"cp": 2, "sequence_parallel": True})],
    ids=["PP4-0-1-1-2", "PP2xDP2-1-3-distopt", "CP2xDP2-distopt", "TP2xCP2-SP"])
def test_uneven_pipelines_and_context_parallelism_load_and_continue(saved, tp, pp, distopt,
                                                                     split):
    """Saved at TP2 x DP2; loaded at PP4 with stages of 0, 1, 1 and 2 layers, at PP2 x DP2
    with 1 and 3 layers and the distributed optimizer, at CP2 x DP2 with the distributed
    optimizer (sharded over DP x CP) and at TP2 x CP2 with SP."""
    _check_continues(saved, 4, tp, pp, distopt, same_layout=False, **split)


@pytest.mark.parametrize("world,tp,pp,distopt", [
    (4, 2, 1, True), (4, 1, 1, False), (1, 1, 1, False), (4, 1, 2, True)],
    ids=["TP2xDP2-distopt-same", "TP1xDP4-plain", "TP1-plain", "PP2xDP2-distopt"])
def test_distributed_optimizer_checkpoint_loads_anywhere(saved_sharded, world, tp, pp, distopt):
    """Saved with the distributed optimizer: loads without it and at other DP sizes."""
    _check_continues(saved_sharded, world, tp, pp, distopt,
                     same_layout=(world, tp, pp, distopt) == (4, 2, 1, True))


def _save_bf16(path: str, distributed_optimizer: bool) -> dict:
    models, optimizer, scheduler = setup(2, 1, seed=1, precision="bf16",
                                         distributed_optimizer=distributed_optimizer)
    for step in range(2):
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(path, 2, models, optimizer, scheduler)
    return masters(models, optimizer)


def _load_precision(path: str, tp: int, precision: str,
                    distributed_optimizer: bool) -> tuple[dict, dict]:
    models, optimizer, scheduler = setup(tp, 1, seed=2, precision=precision,
                                         distributed_optimizer=distributed_optimizer)
    load_checkpoint(path, models, optimizer, scheduler)
    return masters(models, optimizer), pieces(models)


@pytest.mark.parametrize("save_distopt,world,tp,precision,load_distopt", [
    (False, 1, 1, "bf16", False), (False, 4, 4, "fp32", False), (True, 1, 1, "bf16", False),
    (False, 4, 1, "bf16", True), (True, 4, 2, "fp32", True)],
    ids=["TP1-bf16", "TP4-fp32", "distopt-to-TP1-bf16", "to-DP4-bf16-distopt",
         "distopt-to-TP2xDP2-fp32-distopt"])
def test_masters_travel_between_layouts_and_precisions(tmp_path, save_distopt, world, tp,
                                                       precision, load_distopt):
    path = str(tmp_path / "save")
    saved = assemble(run_distributed(4, _save_bf16, path, save_distopt))
    loaded = run_distributed(world, _load_precision, path, tp, precision, load_distopt)
    got_masters = assemble([m for m, _ in loaded])
    got_weights = assemble([w for _, w in loaded])
    for name, master in saved.items():
        assert master.dtype == torch.float32
        assert torch.equal(got_masters[name], master), name
        assert torch.equal(got_weights[name], master.to(got_weights[name].dtype)), name


def _save_model_only(path: str) -> dict:
    models, _, _ = setup(2, 1, seed=1)
    save_checkpoint(path, 0, models)  # no optimizer: what tools/convert_checkpoint.py writes
    return pieces(models)


def _job_loads_model_only(path: str, distributed_optimizer: bool) -> dict:
    models, optimizer, scheduler = setup(2, 1, seed=2, precision="bf16",
                                         distributed_optimizer=distributed_optimizer)
    checkpoint_job.resume(checkpoint_job.StartPoint(Path(path)), models, optimizer, scheduler)
    return masters(models, optimizer)


@pytest.mark.parametrize("distopt", [False, True], ids=["", "distopt"])
def test_a_bf16_job_loading_weights_only_refreshes_its_masters(tmp_path, distopt):
    """The masters were made from the initial weights: left so, the first step would put
    those back over the loaded ones. They take the stored fp32 weights, not their bf16
    rounding."""
    path = str(tmp_path / "save")
    saved = assemble(run_distributed(4, _save_model_only, path))
    got = assemble(run_distributed(4, _job_loads_model_only, path, distopt))
    for name, weight in saved.items():
        assert torch.equal(got[name], weight), name


def _save_model(path: str, model: dict) -> float:
    models, _, _ = setup(2, 1, seed=1, **model)
    save_checkpoint(path, 0, models)
    return run(models, batch(100), forward_only=True)


def _load_model(path: str, tp: int, model: dict) -> float | str:
    """The loaded model's loss on the probe batch, or the refusal's message."""
    models, _, _ = setup(tp, 1, seed=2, **model)
    try:
        load_checkpoint(path, models)
    except CheckpointError as error:
        return str(error)
    return run(models, batch(100), forward_only=True)


GROUPED = {"num_query_groups": 2}  # 4 heads share 2 keys and values
WIDE_HEADS = {**GROUPED, "kv_channels": 12, "position_embedding_type": "rope",
              "rotary_percent": 0.5, "layernorm_zero_centered_gamma": True}  # 32 / 4 = 8 wide


@pytest.mark.parametrize("model, other, refusal", [
    (GROUPED, {"num_query_groups": 4}, "model.num_query_groups=2 in the checkpoint but 4 here"),
    (WIDE_HEADS, {**WIDE_HEADS, "kv_channels": 8},
     "model.kv_channels=12 in the checkpoint but 8 here"),
    (WIDE_HEADS, {**WIDE_HEADS, "rotary_percent": 1.0},
     "model.rotary_percent=0.5 in the checkpoint but 1.0 here"),
    (WIDE_HEADS, {**WIDE_HEADS, "layernorm_zero_centered_gamma": False},
     "model.layernorm_zero_centered_gamma=True in the checkpoint but False here"),
], ids=["grouped_query", "kv_channels", "rotary_percent", "zero_centered_gamma"])
def test_checkpoint_loads_at_other_tp_sizes_and_refuses_another_model(tmp_path, model, other,
                                                                      refusal):
    """The grouped QKV weight (whole query groups per TP rank; heads of any width) saved at
    TP2 x DP2 gives the same loss at TP1 and TP2; a model that differs refuses it, naming
    the field."""
    path = str(tmp_path / "save")
    expected = run_distributed(4, _save_model, path, model)[0]
    for world, tp in ((1, 1), (2, 2)):
        got = run_distributed(world, _load_model, path, tp, model)[0]
        assert got == pytest.approx(expected, rel=1e-6), f"TP{tp}"
    assert refusal in run_distributed(1, _load_model, path, 1, other)[0]


def _finetune(path: str) -> tuple[dict, int, int, float]:
    """A bf16 job with ``--finetune`` from ``path``: its masters, scheduler step, Adam state
    count and learning rate after the load."""
    cfg = load_config(TINY, ["--load", path, "--finetune"], world_size=4)
    models, optimizer, scheduler = setup(2, 1, seed=2, precision="bf16")
    start = checkpoint_job.start_point(cfg)
    assert (start.checkpoint, start.resumes, start.iteration, start.consumed_train_samples) == \
        (Path(path) / "iter_0000002", False, 0, 0)
    checkpoint_job.resume(start, models, optimizer, scheduler)
    return (masters(models, optimizer), scheduler.num_steps, len(optimizer.optimizer.state),
            scheduler.get_lr())


def test_finetune_takes_only_the_weights_of_a_full_checkpoint(tmp_path):
    """Megatron's --finetune: the weights of a checkpoint saved with its optimizer and
    schedule after 2 steps, then iteration 0, no Adam moments, the warm-up's first rate."""
    path = str(tmp_path / "save")
    saved = assemble(run_distributed(4, _save_bf16, path, False))
    loaded = run_distributed(4, _finetune, path)
    got = assemble([m for m, *_ in loaded])
    for name, master in saved.items():
        assert torch.equal(got[name], master), name
    assert {tuple(rest) for _, *rest in loaded} == {(0, 0, 0.0)}
