"""Data-parallel gradient sync against a float64 single-process reference of the full batch.

`ToyModel` is a pre-norm residual MLP with a column-parallel head, built from the
tensor-parallel layers; `dense_loss` is its float64 twin on full weights. Each layout (TP x DP,
sequence parallelism, several micro-batches, overlapped or not, one bucket or many) must give
every rank the matching slice of the reference gradient of the mean loss over the whole batch.
"""

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from checks import assert_rel_close, seeded
from harness import run_distributed
from torch import nn

from mp import parallel_state as ps
from mp import tensor_parallel as tp_
from mp.device import get_device
from mp.distributed import DistributedDataParallel, finalize_model_grads

S, B, H, FFN, OUT = 8, 2, 8, 16, 12  # sequence, micro-batch per DP rank, hidden, ffn, head


def full_weights() -> dict[str, torch.Tensor]:
    """The serial model's weights (the same on every rank)."""
    shapes = {"ln1.weight": (H,), "ln1.bias": (H,), "fc1.weight": (FFN, H), "fc1.bias": (FFN,),
              "fc2.weight": (H, FFN), "fc2.bias": (H,), "ln2.weight": (H,), "ln2.bias": (H,),
              "head.weight": (OUT, H)}
    weights = {name: seeded(shape, 100 + i, scale=0.5) for i, (name, shape)
               in enumerate(shapes.items())}
    weights["ln1.weight"] += 1.0
    weights["ln2.weight"] += 1.0
    return weights


def local_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``full`` as ``param`` is sharded (the whole of it if replicated)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    t = ps.get_tensor_model_parallel_world_size()
    return full.chunk(t, param.partition_dim)[ps.get_tensor_model_parallel_rank()]


class ToyModel(nn.Module):
    """``head(ln2(x + fc2(gelu(fc1(ln1(x))))))``: ``x [s, b, H]`` (``[s / t, b, H]`` with sequence
    parallelism) to head outputs ``[s, b, OUT / t]``, on this rank's device. The norms are
    replicated over TP (and marked ``sequence_parallel`` when their gradients are partial);
    ``unused`` never gets a gradient."""

    def __init__(self, sequence_parallel: bool = False, dtype=torch.float32):
        super().__init__()
        kw = {"sequence_parallel": sequence_parallel, "params_dtype": dtype}
        self.device = get_device()
        self.ln1 = nn.LayerNorm(H, dtype=dtype, device=self.device)
        self.ln2 = nn.LayerNorm(H, dtype=dtype, device=self.device)
        self.fc1 = tp_.ColumnParallelLinear(H, FFN, **kw)
        self.fc2 = tp_.RowParallelLinear(FFN, H, input_is_parallel=True, **kw)
        self.head = tp_.ColumnParallelLinear(H, OUT, bias=False, **kw)
        self.unused = nn.Parameter(torch.zeros(3, dtype=dtype, device=self.device))
        for norm in (self.ln1, self.ln2):
            for p in norm.parameters():
                p.sequence_parallel = sequence_parallel
        weights = full_weights()
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name in weights:
                    param.copy_(local_shard(param, weights[name]))

    def forward(self, x):
        x = x.to(self.device)
        h = x + self.fc2(F.gelu(self.fc1(self.ln1(x))[0]))[0]
        return self.head(self.ln2(h))[0]


def local_loss(out: torch.Tensor) -> torch.Tensor:
    """Mean of squares over this rank's samples; a partial sum over the TP ranks' head shards
    (like vocab-parallel cross-entropy), so summing it over TP gives the model's loss."""
    return out.float().square().sum() / (out.size(0) * out.size(1) * OUT)


def dense_loss(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The float64 serial model's mean loss on ``x [S, batch, H]``."""
    w = weights
    h = F.layer_norm(x, (H,), w["ln1.weight"], w["ln1.bias"])
    h = x + F.linear(F.gelu(F.linear(h, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"],
                     w["fc2.bias"])
    out = F.linear(F.layer_norm(h, (H,), w["ln2.weight"], w["ln2.bias"]), w["head.weight"])
    return out.square().mean()


def dense_grads(x: torch.Tensor) -> dict[str, torch.Tensor]:
    weights = {n: w.double().requires_grad_(True) for n, w in full_weights().items()}
    dense_loss(weights, x.double()).backward()
    return {n: w.grad for n, w in weights.items()}


def local_batch(x: torch.Tensor, microbatch: int, sequence_parallel: bool) -> torch.Tensor:
    """Micro-batch ``microbatch`` of this DP rank (``B`` samples) from the full batch ``x``,
    sliced along the sequence for sequence parallelism. Samples are dealt as the pretraining
    sampler deals them: each micro-batch step takes ``B x DP`` consecutive samples."""
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    start = (microbatch * dp + d) * B
    mine = x[:, start:start + B]
    if sequence_parallel:
        t = ps.get_tensor_model_parallel_world_size()
        mine = mine.chunk(t, 0)[ps.get_tensor_model_parallel_rank()]
    return mine


def _check_ddp(tp: int, sequence_parallel: bool, microbatches: int, overlap: bool,
               bucket_size: int | None):
    ps.initialize_model_parallel(tp)
    dp = ps.get_data_parallel_world_size()
    model = DistributedDataParallel(ToyModel(sequence_parallel), overlap_grad_reduce=overlap,
                                    bucket_size=bucket_size)
    x = seeded((S, B * dp * microbatches, H), 7)
    for _ in range(2):  # twice: buffers and bucket state must reset between iterations
        model.zero_grad_buffer()
        for m in range(microbatches):
            last = m == microbatches - 1
            with model.no_sync() if not last else torch.enable_grad():
                (local_loss(model(local_batch(x, m, sequence_parallel))) / microbatches).backward()
        finalize_model_grads([model])
    expected = dense_grads(x)
    for name, param in model.module.named_parameters():
        assert param.grad is None, f"{name}: .grad should have moved into main_grad"
        want = local_shard(param, expected[name]) if name in expected else \
            torch.zeros_like(param)
        assert_rel_close(param.main_grad, want, what=f"{name} grad")


@pytest.mark.parametrize("world,tp,sp", [(2, 1, False), (4, 1, False), (4, 2, False),
                                         (4, 2, True)])
@pytest.mark.parametrize("overlap,bucket_size", [(True, 1), (True, None), (False, 100)])
def test_data_parallel_grads_equal_full_batch(world, tp, sp, overlap, bucket_size):
    run_distributed(world, _check_ddp, tp, sp, 1, overlap, bucket_size)


@pytest.mark.parametrize("world,tp,sp", [(1, 1, False), (2, 1, False), (4, 2, True)])
def test_gradient_accumulation_equals_one_large_batch(world, tp, sp):
    run_distributed(world, _check_ddp, tp, sp, 3, True, 1)


def _check_no_communication_inside_no_sync():
    ps.initialize_model_parallel(1)
    model = DistributedDataParallel(ToyModel(), bucket_size=1)
    x = seeded((S, B, H), 3 + dist.get_rank())  # different data per rank
    with model.no_sync():
        local_loss(model(x)).backward()
    expected = dense_grads(x)
    for name, param in model.module.named_parameters():
        if name in expected:  # still this rank's own gradient: nothing was averaged
            assert_rel_close(param.main_grad, expected[name], what=f"{name} local grad")
    assert all(b.handle is None for b in model.buckets)


def test_no_sync_only_accumulates():
    run_distributed(2, _check_no_communication_inside_no_sync)


def _check_bucketing():
    ps.initialize_model_parallel(1)
    one = DistributedDataParallel(ToyModel(), bucket_size=None)
    per_param = DistributedDataParallel(ToyModel(), bucket_size=1)
    params = [p for p in per_param.module.parameters()]
    assert len(one.buckets) == 1 and len(per_param.buckets) == len(params)
    # reverse registration order (roughly the order backward produces gradients)
    assert [next(iter(b.params)) for b in per_param.buckets] == params[::-1]
    for p in params:  # main_grad views tile one contiguous fp32 buffer
        assert p.main_grad.dtype == torch.float32
        assert p.main_grad.untyped_storage().data_ptr() == \
            per_param.grad_buffer.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="bucket_size=0 must be a positive number"):
        DistributedDataParallel(ToyModel(), bucket_size=0)


def test_buckets_tile_one_fp32_buffer():
    run_distributed(2, _check_bucketing)


def _check_bf16_accumulates_in_fp32():
    ps.initialize_model_parallel(1)
    model = DistributedDataParallel(ToyModel(dtype=torch.bfloat16), bucket_size=None)
    x = seeded((S, 2 * B, H), 11, dtype=torch.bfloat16)
    expected = {}
    for m in range(2):
        mb = x[:, m * B:(m + 1) * B]
        with model.no_sync() if m == 0 else torch.enable_grad():
            local_loss(model(mb)).backward()
        # the reference: each micro-batch's bf16 grads summed in fp32
        probe = ToyModel(dtype=torch.bfloat16)
        with torch.no_grad():
            for p, q in zip(probe.parameters(), model.module.parameters()):
                p.copy_(q)
        local_loss(probe(mb)).backward()
        for name, p in probe.named_parameters():
            if p.grad is not None:
                expected[name] = expected.get(name, 0) + p.grad.float()
    finalize_model_grads([model])
    for name, p in model.module.named_parameters():
        assert p.main_grad.dtype == torch.float32
        if name in expected:
            assert torch.equal(p.main_grad, expected[name]), name


def test_bf16_grads_accumulate_in_fp32():
    run_distributed(1, _check_bf16_accumulates_in_fp32)


def _dropped_wrappers_are_freed(distributed_optimizer: bool) -> tuple[bool, bool]:
    """Build, run backward through and drop a wrapper: are it and its module gone?"""
    ps.initialize_model_parallel(1)
    model = DistributedDataParallel(nn.Linear(4, 4),
                                    use_distributed_optimizer=distributed_optimizer,
                                    overlap_param_gather=distributed_optimizer)
    model(torch.ones(2, 4)).sum().backward()
    model.finish_grad_sync()
    wrapper, module = weakref.ref(model), weakref.ref(model.module)
    del model
    gc.collect()
    return wrapper() is None, module() is None


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_a_dropped_wrapper_frees_its_model(distributed_optimizer):
    """The gradient hooks on the parameters (and the parameter-gather pre-hooks) must not keep
    the wrapper alive: through autograd's hooks that cycle is out of the collector's sight,
    and a long-lived process (a notebook, a test worker) kept every model it built, with its
    process groups' threads."""
    for rank, freed in enumerate(run_distributed(2, _dropped_wrappers_are_freed,
                                                 distributed_optimizer)):
        assert freed == (True, True), f"rank {rank}"
