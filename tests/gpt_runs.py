"""A small GPT trained on seeded batches, for tests that compare runs across layouts and
optimizers (checkpoint layouts, the distributed optimizer).

Everything here is collective: call it from a function that `harness.run_distributed` runs
on every rank. Results are gathered into whole tensors by global parameter name, with a
naming of their own (not `mp.checkpointing`'s), so that tests check that code independently.
"""

import re

import torch
import torch.distributed as dist

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel
from mp.model import TransformerConfig
from mp.model.stages import build_gpt_chunks, chunk_first_layer
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer
from mp.pipeline_parallel.schedules import get_forward_backward_func
from mp.tensor_parallel import model_parallel_cuda_manual_seed
from mp.training.gpt_step import forward_step

S, MBS, GLOBAL_BATCH, VOCAB = 16, 2, 8, 128  # VOCAB pads to 128 rows at TP 1, 2 and 4
LR, EPS = 3e-3, 1e-5


def gpt_config(tp: int, pp: int, precision: str = "fp32", **overrides) -> TransformerConfig:
    return TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                             vocab_size=VOCAB, seq_length=S, make_vocab_size_divisible_by=8,
                             hidden_dropout=0.0, attention_dropout=0.0, precision=precision,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             **overrides)


def setup(tp: int, pp: int, seed: int, precision: str = "fp32", *,
          distributed_optimizer: bool = False, overlap_param_gather: bool = True,
          bucket_size: int = 5000, clip_grad: float = 1.0, **overrides):
    """This rank's DDP-wrapped chunks, optimizer and LR schedule, weights from ``seed``
    (``overrides``: `TransformerConfig` fields)."""
    ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(seed)
    models = [DistributedDataParallel(chunk, bucket_size=bucket_size,
                                      use_distributed_optimizer=distributed_optimizer,
                                      overlap_param_gather=overlap_param_gather)
              for chunk in build_gpt_chunks(gpt_config(tp, pp, precision, **overrides))]
    optimizer = get_megatron_optimizer(models, lr=LR, weight_decay=0.1, clip_grad=clip_grad,
                                       adam_eps=EPS,
                                       use_distributed_optimizer=distributed_optimizer)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=LR, min_lr=LR / 10,
                                        lr_warmup_steps=2, lr_decay_steps=20)
    return models, optimizer, scheduler


def batch(seed: int) -> list[dict]:
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


def run(models, micro: list[dict], forward_only: bool) -> float:
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


def train_step(models, optimizer, scheduler, seed: int) -> tuple[float, float]:
    """One iteration on batch ``seed``: (its loss, the gradient norm before clipping)."""
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run(models, batch(seed), forward_only=False)
    result = optimizer.step()
    assert result.update_successful
    scheduler.step()
    return loss, result.grad_norm


def pieces(models, value=lambda param: param) -> dict:
    """``{global name: [(offsets, value(param))]}`` of the parameters this rank owns (the
    tied embedding's last-stage copy excluded). NaN elements of a value are "not here"."""
    found = {}
    for model in models:
        model.finish_param_sync()  # updated parameters may still be on their way
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
            found.setdefault(name, []).append((offsets, value(param).detach().clone()))
    return found


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
