"""A small GPT trained on seeded batches, for tests that compare runs across layouts and
optimizers (checkpoint layouts, the distributed optimizer).

Everything here is collective: call it from a function that `harness.run_distributed` runs
on every rank. Results are gathered into whole tensors by global parameter name, with a
naming of their own (not `mp.checkpointing`'s), so that tests check that code independently.
"""

import re

import torch
from checks import assert_rel_close

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel
from mp.model import TransformerConfig
from mp.model.stages import build_gpt_chunks
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer
from mp.pipeline_parallel.schedules import get_forward_backward_func
from mp.tensor_parallel import model_parallel_cuda_manual_seed
from mp.training.evaluation import average_losses
from mp.training.gpt_step import forward_step

S, MBS, GLOBAL_BATCH, VOCAB = 16, 2, 8, 128  # VOCAB pads to 128 rows at TP 1, 2 and 4
LR, EPS = 3e-3, 1e-5
WARMUP, DECAY = 2, 20  # the cosine schedule's steps (from 0 to LR, then down to LR / 10)


def gpt_config(tp: int, pp: int, precision: str = "fp32", **overrides) -> TransformerConfig:
    """The test GPT (no dropout unless ``overrides`` set it)."""
    overrides = {"hidden_dropout": 0.0, "attention_dropout": 0.0, **overrides}
    return TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                             vocab_size=VOCAB, seq_length=S, make_vocab_size_divisible_by=8,
                             precision=precision, tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp, **overrides)


def setup(tp: int, pp: int, seed: int, precision: str = "fp32", *,
          distributed_optimizer: bool = False, overlap_param_gather: bool = True,
          bucket_size: int = 5000, clip_grad: float = 1.0,
          calculate_per_token_loss: bool = False, grad_dtype: torch.dtype = torch.float32,
          vpp: int | None = None, cp: int = 1, ep: int = 1, decoupled_lr: float | None = None,
          decoupled_min_lr: float | None = None, optimizer_args: dict | None = None,
          instances: int = 1, **overrides):
    """This rank's DDP-wrapped chunks, optimizer and LR schedule, weights from ``seed``
    (``optimizer_args``: more of `get_megatron_optimizer`'s; ``overrides``:
    `TransformerConfig` fields; ``cp``: context-parallel ranks; ``ep``: expert-parallel ones;
    ``instances``: distributed-optimizer instances; the groups take the overrides' expert
    tensor-parallel size)."""
    ps.initialize_model_parallel(
        tp, pp, vpp, context_parallel_size=cp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=overrides.get("expert_tensor_parallel_size"),
        num_distributed_optimizer_instances=instances)
    model_parallel_cuda_manual_seed(seed)
    config = gpt_config(tp, pp, precision, virtual_pipeline_model_parallel_size=vpp,
                        context_parallel_size=cp, expert_model_parallel_size=ep, **overrides)
    models = [DistributedDataParallel(chunk, bucket_size=bucket_size,
                                      use_distributed_optimizer=distributed_optimizer,
                                      overlap_param_gather=overlap_param_gather,
                                      calculate_per_token_loss=calculate_per_token_loss,
                                      grad_dtype=grad_dtype,
                                      num_distributed_optimizer_instances=instances)
              for chunk in build_gpt_chunks(config)]
    optimizer = get_megatron_optimizer(models, lr=LR, weight_decay=0.1, clip_grad=clip_grad,
                                       adam_eps=EPS,
                                       use_distributed_optimizer=distributed_optimizer,
                                       decoupled_lr=decoupled_lr, **(optimizer_args or {}))
    scheduler = OptimizerParamScheduler(optimizer, max_lr=LR, min_lr=LR / 10,
                                        lr_warmup_steps=WARMUP, lr_decay_steps=DECAY,
                                        decoupled_lr=decoupled_lr,
                                        decoupled_min_lr=decoupled_min_lr)
    return models, optimizer, scheduler


def global_batch(seed: int, masked: bool = False) -> dict:
    """A seeded global batch: ``[GLOBAL_BATCH, S]`` tensors. ``masked``: sample ``i`` keeps each
    token in the loss with probability ``(i + 1) / GLOBAL_BATCH``, so micro-batches (and
    data-parallel ranks) hold unequal numbers of loss tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, S), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, S), generator=g)
    keep = torch.arange(1, GLOBAL_BATCH + 1).unsqueeze(1) / GLOBAL_BATCH
    mask = (torch.rand(GLOBAL_BATCH, S, generator=g) < keep).float() if masked else \
        torch.ones(GLOBAL_BATCH, S)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask,
            "position_ids": torch.arange(S).expand(GLOBAL_BATCH, S)}


def batch(seed: int, masked: bool = False) -> list[dict]:
    """This data-parallel rank's micro-batches of `global_batch` ``seed``: rank ``r`` takes the
    ``r``-th of DP equal blocks of samples and cuts it into micro-batches of ``MBS``."""
    batch = global_batch(seed, masked)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = {k: v.chunk(dp)[rank] for k, v in batch.items()}
    return [{k: v[i:i + MBS] for k, v in local.items()} for i in range(0, len(local["tokens"]),
                                                                      MBS)]


def run(models, micro: list[dict], forward_only: bool, per_token: bool = False,
        grad_scale_func=None) -> float:
    """The global batch's loss, on every rank: the mean of the micro-batches', or with
    ``per_token`` the mean over its loss tokens (`average_losses`)."""
    reported = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(micro) for _ in models],
        model=models, num_microbatches=len(micro), seq_length=S, micro_batch_size=MBS,
        forward_only=forward_only, calculate_per_token_loss=per_token,
        grad_scale_func=grad_scale_func)
    return average_losses(reported, per_token)[0]["lm loss"]


def train_step(models, optimizer, scheduler, seed: int, *, per_token: bool = False,
               masked: bool = False, micro_batches=batch) -> tuple[float, float]:
    """One iteration on batch ``seed``: (its loss, the gradient norm before clipping).
    ``micro_batches(seed, masked)``: this rank's micro-batches of it (default `batch`)."""
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run(models, micro_batches(seed, masked), forward_only=False, per_token=per_token,
               grad_scale_func=optimizer.scale_loss)
    result = optimizer.step()
    assert result.update_successful
    scheduler.step()
    return loss, result.grad_norm


def _global_parameters(models):
    """``(global name, offsets, parameter)`` of this rank's chunks; the tied embedding's
    last-stage copy is named as the embedding (and marked ``shared``)."""
    for c, model in enumerate(models):
        chunk = model.module
        first = chunk.config.chunk_layers(ps.get_pipeline_model_parallel_rank(), c).start
        for name, param in chunk.named_parameters():
            match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", name)
            if match:
                name = f"decoder.layers.{first + int(match[1])}.{match[2]}"
            elif getattr(param, "shared", False):
                name = "embedding.word_embeddings.weight"
            yield name, getattr(param, "shard_offset", (0,) * param.dim()), param


def pieces(models, value=lambda param: param) -> dict:
    """``{global name: [(offsets, value(param))]}`` of the parameters this rank owns (the
    tied embedding's last-stage copy excluded). NaN elements of a value are "not here"."""
    found = {}
    for model in models:
        model.finish_param_sync()  # updated parameters may still be on their way
    for name, offsets, param in _global_parameters(models):
        if not getattr(param, "shared", False):
            found.setdefault(name, []).append((offsets, value(param).detach().clone()))
    return found


@torch.no_grad()
def load_whole(models, optimizer, whole: dict[str, torch.Tensor]) -> None:
    """Give this rank's parameters (and the optimizer's masters) their pieces of ``whole``,
    `assemble`'s tensors: any layout then starts from the same weights."""
    for name, offsets, param in _global_parameters(models):
        param.copy_(whole[name][tuple(slice(o, o + n) for o, n in zip(offsets, param.shape))])
    optimizer.reload_model_params()


def masters(models, optimizer) -> dict:
    """`pieces` of the fp32 masters: each shard's elements in place, NaN elsewhere."""
    by_param = {}
    for shard in optimizer.shards:
        whole = by_param.setdefault(shard.param, torch.full(shard.param.shape, float("nan")))
        whole.view(-1)[shard.start:shard.end] = shard.main.detach().reshape(-1)
    nothing = lambda param: torch.full(param.shape, float("nan"))  # noqa: E731
    return pieces(models, lambda param: by_param.get(param, nothing(param)))


def assemble(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Whole tensors from the pieces every rank returned (every element must be covered)."""
    parts = {}
    for found in per_rank:
        for name, items in found.items():
            parts.setdefault(name, []).extend(items)
    out = {}
    for name, items in parts.items():
        shape = [max(o[d] + t.shape[d] for o, t in items) for d in range(items[0][1].dim())]
        whole = torch.full(shape, float("nan"), dtype=items[0][1].dtype)
        for offsets, tensor in items:
            region = whole[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))]
            here = ~tensor.isnan()
            region[here] = tensor[here]
        assert not whole.isnan().any(), f"{name} was not covered"
        out[name] = whole
    return out


def train_from(whole: dict[str, torch.Tensor], tp: int, pp: int, steps: int,
               masked: bool = False, micro_batches=batch, **setup_args) -> dict:
    """``steps`` iterations (clipping at 0.5, seeded batches, `batch`'s ``masked``) from the
    weights ``whole`` at TP ``tp`` x PP ``pp`` (``setup_args``: `setup`'s others;
    ``micro_batches``: `train_step`'s): this rank's ``{"losses", "norms", "weights"}`` for
    `assert_same_training`."""
    models, optimizer, scheduler = setup(tp, pp, seed=9, clip_grad=0.5, bucket_size=1500,
                                         **setup_args)
    load_whole(models, optimizer, whole)
    losses, norms = zip(*(train_step(models, optimizer, scheduler, step, masked=masked,
                                     micro_batches=micro_batches)
                          for step in range(steps)))
    return {"losses": losses, "norms": norms, "weights": pieces(models)}


def assert_same_training(runs: list[dict], serial: dict) -> dict[str, torch.Tensor]:
    """Each rank's ``{"losses", "norms", "weights"}`` (``weights``: its `pieces`) against one
    process's: the losses and gradient norms of every step and every weight after them, to
    1e-5 relative (clipping must have acted: a norm above 0.5). Returns the serial weights."""
    assert max(serial["norms"]) > 0.5, "clipping never acted"
    assert_rel_close(torch.tensor(runs[0]["losses"]), torch.tensor(serial["losses"]),
                     rtol=1e-5, what="losses")
    assert_rel_close(torch.tensor(runs[0]["norms"]), torch.tensor(serial["norms"]),
                     rtol=1e-5, what="gradient norms")
    got, want = assemble([r["weights"] for r in runs]), assemble([serial["weights"]])
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], rtol=1e-5, what=name)
    return want
