"""Checkpoints move between parallel layouts: a GPT trained and saved at TP2 x DP2 is loaded
at TP1, TP4, TP1 x DP4 and TP2 x PP2 (and again at TP2 x DP2); the loss on a fixed batch, the
next optimizer step and the weights after it agree with the saving run continuing on its own
(to 1e-6; bit for bit at the saving layout, where the RNG states come back too). Mixed
precision: the fp32 masters, not the bf16 weights, travel."""

import re

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close
from harness import run_distributed

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.distributed import DistributedDataParallel
from mp.model import TransformerConfig
from mp.model.stages import build_gpt_chunks, chunk_first_layer
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer
from mp.pipeline_parallel.schedules import get_forward_backward_func
from mp.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from mp.training.gpt_step import forward_step

S, MBS, GLOBAL_BATCH, VOCAB = 16, 2, 8, 128  # VOCAB pads to 128 rows at TP 1, 2 and 4
LR, EPS, SAVED_AT = 3e-3, 1e-5, 3


def _config(tp: int, pp: int, precision: str = "fp32") -> TransformerConfig:
    return TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                             vocab_size=VOCAB, seq_length=S, make_vocab_size_divisible_by=8,
                             hidden_dropout=0.0, attention_dropout=0.0, precision=precision,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _setup(tp: int, pp: int, seed: int, precision: str = "fp32"):
    ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(seed)
    models = [DistributedDataParallel(chunk, bucket_size=5000)
              for chunk in build_gpt_chunks(_config(tp, pp, precision))]
    optimizer = get_megatron_optimizer(models, lr=LR, weight_decay=0.1, clip_grad=1.0,
                                       adam_eps=EPS)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=LR, min_lr=LR / 10,
                                        lr_warmup_steps=2, lr_decay_steps=20)
    return models, optimizer, scheduler


def _batch(seed: int) -> list[dict]:
    """This data-parallel rank's micro-batches of a seeded global batch."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, S), generator=g)
    batch = {"tokens": tokens, "labels": torch.randint(0, VOCAB, (GLOBAL_BATCH, S), generator=g),
             "loss_mask": torch.ones(GLOBAL_BATCH, S),
             "position_ids": torch.arange(S).expand(GLOBAL_BATCH, S)}
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = {k: v.chunk(dp)[rank] for k, v in batch.items()}
    return [{k: v[i:i + MBS] for k, v in local.items()} for i in range(0, len(local["tokens"]),
                                                                      MBS)]


def _run(models, micro: list[dict], forward_only: bool) -> float:
    """The global batch's mean loss, on every rank."""
    reported = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(micro) for _ in models],
        model=models, num_microbatches=len(micro), seq_length=S, micro_batch_size=MBS,
        forward_only=forward_only)
    loss = torch.zeros(())
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    if last_stage and ps.get_tensor_model_parallel_rank() == 0:
        loss = torch.stack([r["lm loss"] for r in reported]).mean()
    dist.all_reduce(loss)  # one term per data-parallel replica
    return loss.item() / ps.get_data_parallel_world_size()


def _train_step(models, optimizer, scheduler, seed: int) -> float:
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _run(models, _batch(seed), forward_only=False)
    assert optimizer.step().update_successful
    scheduler.step()
    return loss


def _pieces(models, value=lambda param: param) -> dict:
    """``{global name: [(offsets, value(param))]}`` of the parameters this rank owns (the
    tied embedding's last-stage copy excluded), named independently of mp.checkpointing."""
    pieces = {}
    for c, model in enumerate(models):
        chunk = model.module
        first = chunk_first_layer(chunk.config, ps.get_pipeline_model_parallel_rank(), c)
        for name, param in chunk.named_parameters():
            if getattr(param, "shared", False):
                continue
            match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", name)
            if match:
                name = f"decoder.layers.{first + int(match[1])}.{match[2]}"
            offsets = getattr(param, "shard_offset", (0,) * param.dim())
            pieces.setdefault(name, []).append((offsets, value(param).detach().clone()))
    return pieces


def _masters(models, optimizer) -> dict:
    main_of = {id(m): main for m, main in zip(optimizer.model_params, optimizer.main_params)}
    return _pieces(models, lambda param: main_of[id(param)])


def _assemble(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Whole tensors from the pieces every rank returned (every element must be covered)."""
    parts = {}
    for pieces in per_rank:
        for name, found in pieces.items():
            parts.setdefault(name, []).extend(found)
    out = {}
    for name, found in parts.items():
        shape = [max(o[d] + t.shape[d] for o, t in found) for d in range(found[0][1].dim())]
        whole = torch.full(shape, float("nan"), dtype=found[0][1].dtype)
        for offsets, tensor in found:
            whole[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
        assert not whole.isnan().any(), f"{name} was not covered"
        out[name] = whole
    return out


def _probe(models, optimizer, scheduler) -> dict:
    """What must not depend on the layout: a fixed batch's loss, the next step's loss, the
    loss and the weights after that step."""
    before = _run(models, _batch(100), forward_only=True)
    step = _train_step(models, optimizer, scheduler, SAVED_AT)
    after = _run(models, _batch(100), forward_only=True)
    return {"before": before, "step": step, "after": after, "weights": _pieces(models),
            "lr": scheduler.get_lr(), "draws": _draws()}


def _draws() -> torch.Tensor:
    """The next numbers of the default generator and the tensor-parallel stream."""
    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(4)
    return torch.cat([torch.rand(4), tracker])


def _train_save_and_continue(path: str) -> dict:
    models, optimizer, scheduler = _setup(2, 1, seed=1)
    for step in range(SAVED_AT):
        _train_step(models, optimizer, scheduler, step)
    save_checkpoint(path, SAVED_AT, models, optimizer, scheduler,
                    consumed_train_samples=SAVED_AT * GLOBAL_BATCH)
    return _probe(models, optimizer, scheduler)


def _load_and_continue(path: str, tp: int, pp: int) -> dict:
    models, optimizer, scheduler = _setup(tp, pp, seed=2)  # other weights before the load
    info = load_checkpoint(path, models, optimizer, scheduler)
    assert (info.iteration, info.consumed_train_samples) == (SAVED_AT, SAVED_AT * GLOBAL_BATCH)
    assert info.rng_restored == (dist.get_world_size() == 4 and (tp, pp) == (2, 1))
    return _probe(models, optimizer, scheduler)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("layouts") / "save")
    return path, run_distributed(4, _train_save_and_continue, path)


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (4, 4, 1), (4, 1, 1), (4, 2, 2),
                                         (4, 2, 1)],
                         ids=["TP1", "TP4", "TP1xDP4", "TP2xPP2", "TP2xDP2-same"])
def test_load_at_another_layout_continues_the_run(saved, world, tp, pp):
    path, reference = saved
    results = run_distributed(world, _load_and_continue, path, tp, pp)
    expected, got = reference[0], results[0]
    same_layout = (world, tp, pp) == (4, 2, 1)
    tolerance = 0.0 if same_layout else 1e-6
    for key in ("before", "step", "after", "lr"):
        assert abs(got[key] - expected[key]) <= tolerance * abs(expected[key]), \
            f"{key}: {got[key]!r} after loading, {expected[key]!r} in the saving run"
    want = _assemble([r["weights"] for r in reference])
    have = _assemble([r["weights"] for r in results])
    assert want.keys() == have.keys()
    for name in want:
        if same_layout:
            assert torch.equal(have[name], want[name]), name
        else:
            assert_rel_close(have[name], want[name], rtol=1e-6, what=name)
    if same_layout:  # the RNG states came back: the next draws are the saving run's
        for mine, theirs in zip(results, reference):
            assert torch.equal(mine["draws"], theirs["draws"])


def _save_bf16(path: str) -> dict:
    models, optimizer, scheduler = _setup(2, 1, seed=1, precision="bf16")
    for step in range(2):
        _train_step(models, optimizer, scheduler, step)
    save_checkpoint(path, 2, models, optimizer, scheduler)
    return _masters(models, optimizer)


def _load_precision(path: str, tp: int, precision: str) -> tuple[dict, dict]:
    models, optimizer, scheduler = _setup(tp, 1, seed=2, precision=precision)
    load_checkpoint(path, models, optimizer, scheduler)
    return _masters(models, optimizer), _pieces(models)


@pytest.mark.parametrize("world,tp,precision", [(1, 1, "bf16"), (4, 4, "fp32")])
def test_masters_travel_between_layouts_and_precisions(tmp_path, world, tp, precision):
    path = str(tmp_path / "save")
    masters = _assemble(run_distributed(4, _save_bf16, path))
    loaded = run_distributed(world, _load_precision, path, tp, precision)
    got_masters = _assemble([m for m, _ in loaded])
    got_weights = _assemble([w for _, w in loaded])
    for name, master in masters.items():
        assert master.dtype == torch.float32
        assert torch.equal(got_masters[name], master), name
        assert torch.equal(got_weights[name], master.to(got_weights[name].dtype)), name
