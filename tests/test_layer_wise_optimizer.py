"""Muon with the distributed optimizer: Megatron's layer-wise one (`mp.optim.layer_wise`).

Whole parameters (Muon's units whole: QKV, SwiGLU's gate with its up projection) dealt over
the data-parallel ranks must train as plain Muon on one process does (losses, gradient norms
and weights, fp32): at DP 2, DP 4, TP 2 x DP 2 in the distributed TP mode and with experts at
EP 2 x DP 4; without clipping, bit for bit as plain Muon at the same layout. Each element's
master and state live on exactly one rank of its data-parallel (or expert-data-parallel)
group, the same on every TP rank; a rank may own nothing of an update rule. Checkpoints resume
bit-exactly (bf16) and load into plain Muon at DP 1 and 4, and plain Muon's into the
layer-wise one at DP 4. Config: ``dist_muon`` maps to it with a notice; what it cannot do is
refused; the job builds it over all-reducing chunks.
"""

import contextlib
import logging
from unittest import mock

import gpt_runs
import pytest
import torch
from checks import assert_rel_close, seeded
from gpt_runs import assemble, masters, pieces, setup, train_from, train_step
from harness import run_distributed
from test_config import TINY
from test_optimizers import MUON_MODEL, _initial_weights
from torch import nn

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.config import TrainingConfig, parse_args
from mp.config.coerce import ConfigError
from mp.distributed import DistributedDataParallel
from mp.optim import MuonSettings, get_megatron_optimizer
from mp.optim.layer_wise import LayerWiseDistributedOptimizer
from mp.training.pretrain import setup_model_and_optimizer

STEPS = 3
MOE = dict(num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2)


def _muon(mode: str = "duplicated") -> dict:
    return {"optimizer": "muon", "muon": MuonSettings(tp_mode=mode, fp32_matmul_prec="high")}


@contextlib.contextmanager
def _optimizer(layer_wise: bool, **overrides):
    """`gpt_runs.setup` building the layer-wise optimizer (over its plain DDP chunks) or
    plain Muon, with more of `get_megatron_optimizer`'s arguments (``overrides``)."""
    forced = {"use_distributed_optimizer": layer_wise, **overrides}
    with mock.patch.object(gpt_runs, "get_megatron_optimizer", lambda *args, **kwargs:
                           get_megatron_optimizer(*args, **{**kwargs, **forced})):
        yield


def _train(tp: int, whole: dict, layer_wise: bool, ep: int = 1, mode: str = "duplicated",
           **overrides) -> dict:
    """`train_from` ``whole`` with Muon (``overrides``: of the model, or ``clip_grad``)."""
    clip = {k: overrides.pop(k) for k in ("clip_grad",) if k in overrides}
    with _optimizer(layer_wise, **clip):
        return train_from(whole, tp, 1, STEPS, ep=ep, optimizer_args=_muon(mode), **overrides)


# Weights to 1e-5: Newton-Schulz amplifies the last-bit differences of the data-parallel sums
# (plain Muon at DP 2 is 2e-6 from one process too); losses and gradient norms to 1e-6.
@pytest.mark.parametrize("world,tp,ep,mode,model", [
    (2, 1, 1, "duplicated", MUON_MODEL), (4, 1, 1, "duplicated", MUON_MODEL),
    (4, 2, 1, "distributed", MUON_MODEL), (4, 1, 2, "duplicated", MOE)],
    ids=["DP2", "DP4", "TP2xDP2-distributed", "EP2xDP4-moe"])
def test_follows_plain_muon_on_one_process(world, tp, ep, mode, model):
    whole = assemble(run_distributed(1, _initial_weights, **model))
    serial = run_distributed(1, _train, 1, whole, False, **model)[0]
    runs = run_distributed(world, _train, tp, whole, True, ep=ep, mode=mode, **model)
    assert max(serial["norms"]) > 0.5, "clipping never acted"
    for key in ("losses", "norms"):
        assert_rel_close(torch.tensor(runs[0][key]), torch.tensor(serial[key]), rtol=1e-6,
                         what=key)
    got, want = assemble([r["weights"] for r in runs]), assemble([serial["weights"]])
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], rtol=1e-5, what=name)


def test_equals_plain_muon_at_the_same_layout():
    """Without clipping (whose norm sums in another order) every update is plain Muon's."""
    whole = assemble(run_distributed(1, _initial_weights, **MUON_MODEL))
    plain, layer_wise = (run_distributed(2, _train, 1, whole, lw, clip_grad=0.0, **MUON_MODEL)
                         for lw in (False, True))
    assert plain[0]["losses"] == layer_wise[0]["losses"]
    got, want = (assemble([r["weights"] for r in runs]) for runs in (layer_wise, plain))
    assert all(torch.equal(got[name], want[name]) for name in want)


def _ownership(tp: int, ep: int, **model) -> dict:
    """After a step: the masters this rank holds (NaN where another rank owns them), its
    weights, what it owns by name, and whether its state covers exactly its masters."""
    with _optimizer(True):
        models, optimizer, scheduler = setup(tp, 1, seed=3, ep=ep, optimizer_args=_muon(),
                                             **model)
    train_step(models, optimizer, scheduler, 0)
    assert isinstance(optimizer, LayerWiseDistributedOptimizer)
    state = optimizer.optimizer.state
    mains = {id(s.main) for s in optimizer.shards}
    own = masters(models, optimizer)
    return {"dp": ps.get_data_parallel_rank(), "masters": own, "weights": pieces(models),
            "owned": sorted(n for n, items in own.items() if not items[0][1].isnan().any()),
            "partial": [n for n, items in own.items()
                        if items[0][1].isnan().any() and not items[0][1].isnan().all()],
            "state_is_own": {id(p) for p in state} == mains and all(state[p] for p in state),
            "held": len(optimizer.shards), "params": len(optimizer.params)}


@pytest.mark.parametrize("tp,ep,model", [(2, 1, MUON_MODEL), (1, 2, MOE)],
                         ids=["TP2xDP2", "EP2xDP4-moe"])
def test_each_element_has_one_owner_in_its_data_parallel_group(tp, ep, model):
    ranks = run_distributed(4, _ownership, tp, ep, **model)
    dp = 4 // tp
    for rank in ranks:
        assert rank["state_is_own"] and not rank["partial"], rank["partial"]
        assert 0 < rank["held"] < rank["params"], (rank["held"], rank["params"])
        gates = [n for n in rank["owned"] if n.endswith(("linear_gate.weight", "gate_weight"))]
        assert all(n.replace("linear_gate", "linear_fc1").replace("gate_weight", "fc1_weight")
                   in rank["owned"] for n in gates), "a gate and its up projection were parted"
    for a in ranks:  # every TP rank of a data-parallel index owns the same parameters
        assert all(a["owned"] == b["owned"] for b in ranks if b["dp"] == a["dp"])
    for name in ranks[0]["weights"]:
        held = sum((~piece.isnan()).sum() for r in ranks for _, piece in r["weights"][name])
        owned = sum((~piece.isnan()).sum() for r in ranks for _, piece in r["masters"][name])
        experts = ".experts." in name and "shared" not in name
        group = dp // ep if experts else dp  # the ranks it is dealt over
        assert owned * group == held, f"{name}: {owned} owned of {held} held"


def _one_linear(layer_wise: bool) -> dict:
    """A Linear's weight (Muon) and bias (AdamW) at DP 2, two steps on each rank's own data:
    under the layer-wise optimizer each rank owns one of them, none of the other rule."""
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(8, 4), bucket_size=None)
    optimizer = get_megatron_optimizer([model], lr=0.1, clip_grad=0.0, optimizer="muon",
                                       use_distributed_optimizer=layer_wise)
    for step in range(2):
        model.zero_grad_buffer()
        model(seeded((4, 8), 10 * step + ps.get_data_parallel_rank())).square().sum().backward()
        model.finish_grad_sync()
        optimizer.step()
    return {"weights": [p.detach().clone() for p in model.parameters()],
            "held": [tuple(s.param.shape) for s in optimizer.shards]}


def test_a_rank_may_own_nothing_of_an_update_rule():
    plain, layer_wise = (run_distributed(2, _one_linear, lw) for lw in (False, True))
    assert [r["held"] for r in layer_wise] == [[(4, 8)], [(4,)]]
    for want, got in zip(plain, layer_wise):
        assert all(torch.equal(w, g) for w, g in zip(want["weights"], got["weights"]))


# --- checkpoints ----------------------------------------------------------------------------


def _save(directory: str, layer_wise: bool, precision: str) -> dict:
    """Two steps, a checkpoint, two more: the straight run's losses and weights."""
    with _optimizer(layer_wise):
        models, optimizer, scheduler = setup(1, 1, seed=4, precision=precision,
                                             optimizer_args=_muon(), **MUON_MODEL)
    for step in range(2):
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(directory, 2, models, optimizer, scheduler)
    return {"losses": [train_step(models, optimizer, scheduler, s) for s in (2, 3)],
            "weights": pieces(models)}


def _resume(directory: str, layer_wise: bool, precision: str) -> dict:
    """A fresh model (other seed) loads the checkpoint and takes the same two steps."""
    with _optimizer(layer_wise):
        models, optimizer, scheduler = setup(1, 1, seed=8, precision=precision,
                                             optimizer_args=_muon(), **MUON_MODEL)
    load_checkpoint(directory, models, optimizer, scheduler)
    return {"losses": [train_step(models, optimizer, scheduler, s) for s in (2, 3)],
            "weights": pieces(models)}


def test_resume_is_bit_exact(tmp_path):
    """bf16: the fp32 masters are saved by their owners and broadcast after the load."""
    straight = run_distributed(2, _save, str(tmp_path), True, "bf16")
    resumed = run_distributed(2, _resume, str(tmp_path), True, "bf16")
    for want, got in zip(straight, resumed):
        assert want["losses"] == got["losses"]
        for name, items in want["weights"].items():
            assert all(torch.equal(w, g) for (_, w), (_, g) in zip(items, got["weights"][name]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """``{"layer-wise": ..., "plain": ...}``: (directory, the straight run's rank 0) of a
    checkpoint of the layer-wise optimizer at DP 2 and of plain Muon on one process."""
    out = {}
    for name, world, layer_wise in (("layer-wise", 2, True), ("plain", 1, False)):
        directory = str(tmp_path_factory.mktemp(name))
        out[name] = directory, run_distributed(world, _save, directory, layer_wise, "fp32")[0]
    return out


# Weights to 1e-5 across data-parallel sizes (see test_follows_plain_muon_on_one_process).
@pytest.mark.parametrize("saved,world,layer_wise", [
    ("layer-wise", 1, False), ("layer-wise", 4, False), ("plain", 4, True)],
    ids=["layer-wise>DP1", "layer-wise>DP4", "DP1>layer-wise-DP4"])
def test_checkpoints_cross_load_with_plain_muon(checkpoints, saved, world, layer_wise):
    directory, straight = checkpoints[saved]
    resumed = run_distributed(world, _resume, directory, layer_wise, "fp32")[0]
    assert_rel_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"]),
                     rtol=1e-6, what="losses and norms")
    want, got = assemble([straight["weights"]]), assemble([resumed["weights"]])
    for name in want:
        assert_rel_close(got[name], want[name], rtol=1e-5, what=name)


# --- configuration --------------------------------------------------------------------------

BASE = dict(micro_batch_size=1, global_batch_size=8, lr=1e-3, train_iters=10)


def test_dist_muon_is_muon_with_the_distributed_optimizer(caplog):
    with caplog.at_level(logging.WARNING):
        tr = TrainingConfig(**BASE, optimizer="dist_muon")
    assert (tr.optimizer, tr.use_distributed_optimizer) == ("muon", True)
    assert tr.use_layer_wise_distributed_optimizer
    assert "training.optimizer='dist_muon' is deprecated" in caplog.text
    assert "--optimizer muon --use-distributed-optimizer" in caplog.text
    tr = parse_args(["--config", TINY, "--optimizer", "muon", "--use-distributed-optimizer"],
                    world_size=4).training
    assert tr.use_layer_wise_distributed_optimizer
    assert not TrainingConfig(**BASE, use_distributed_optimizer=True) \
        .use_layer_wise_distributed_optimizer


@pytest.mark.parametrize("keys,message", [
    ({"num_distributed_optimizer_instances": 2}, "training.optimizer='muon' with training."
     "num_distributed_optimizer_instances=2: not supported (the layer-wise distributed "
     "optimizer keeps one copy"),
    ({"use_torch_fsdp2": True}, "training.optimizer='muon' with training.use_torch_fsdp2="
     "True: not supported (FSDP shards the matrices by rows"),
    ({"use_precision_aware_optimizer": True}, "the precision-aware optimizer is AdamW's"),
])
def test_config_refusals(keys, message):
    with pytest.raises(ConfigError) as error:
        TrainingConfig(**BASE, optimizer="dist_muon", **keys)
    assert message in str(error.value)


def _pretrain_setup() -> dict:
    cfg = parse_args(["--config", TINY, "--optimizer", "dist_muon", "--num-layers", "1",
                      "--tensor-model-parallel-size", "1"], world_size=2)
    ps.initialize_model_parallel(1)
    model, optimizer, _ = setup_model_and_optimizer(cfg)
    ps.destroy_model_parallel()
    with pytest.raises(ValueError, match="needs model chunks wrapped in DistributedDataParallel"
                       r"\(\.\.\., use_distributed_optimizer=False\)"):
        setup(1, 1, seed=1, distributed_optimizer=True, optimizer_args=_muon())
    return {"plain_chunks": not any(chunk.use_distributed_optimizer for chunk in model),
            "layer_wise": isinstance(optimizer, LayerWiseDistributedOptimizer)}


def test_the_job_builds_it_over_all_reducing_chunks():
    assert run_distributed(2, _pretrain_setup) == [{"plain_chunks": True,
                                                    "layer_wise": True}] * 2
    with pytest.raises(ValueError, match="LayerWiseDistributedOptimizer is Muon's"):
        LayerWiseDistributedOptimizer([], [], lr=1.0, optimizer="adam")
