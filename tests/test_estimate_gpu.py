"""On a GPU: the estimate against ``torch.cuda.max_memory_allocated`` of real training
iterations, and the bytes a layer saves with CUDA's kernels (flash attention, the fused
softmax, bool dropout masks, fp32 norm statistics). Skipped without CUDA.

    python -m pytest -s tests/test_estimate_gpu.py   # prints the table docs/benchmarks.md holds

Each case builds GPT-3 350M or 1.3B on one GPU (TP = PP = DP = 1) with mp's data-parallel
gradient buffer and mixed-precision AdamW, runs one iteration of two micro-batches to create
the optimizer state, then measures the peak of a second one. A context-parallel layer runs
on two ranks sharing the GPU (gloo carries the CUDA tensors of the K/V all-gathers).
"""

import dataclasses
import gc
import os

import pytest
import torch
from harness import run_distributed

from mp import jit
from mp import parallel_state as ps
from mp.config import load_config
from mp.distributed import DistributedDataParallel, finalize_model_grads
from mp.estimate import CUDA, SavedTensorMeter, Setup, estimate, gpu_spec, layer_terms
from mp.estimate.activations import korthikanti_layer_bytes
from mp.estimate.attention_activations import busiest_calls
from mp.estimate.attention_calls import AttentionCall
from mp.estimate.hardware import GiB
from mp.fused import load_fused_kernels
from mp.initialize import initialize_distributed
from mp.model import GPTModel
from mp.model.context_parallel import local_positions
from mp.model.rope import rotary_freqs
from mp.model.transformer import TransformerLayer
from mp.optim import get_megatron_optimizer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
MICROBATCHES = 2
TOLERANCE = 0.10


@pytest.fixture(scope="module", autouse=True)
def one_gpu_world():
    os.environ.setdefault("MP_DEVICE", "cuda")
    initialize_distributed()
    yield


@pytest.fixture(autouse=True)
def fresh_groups():
    ps.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(1234)
    yield
    ps.destroy_model_parallel()
    gc.collect()
    torch.cuda.empty_cache()


def _kernels():
    """CUDA's storage rules, with the fused softmax only if mp's extension built here and the
    compiled loss only if `mp.jit` could compile (call it after the model ran)."""
    return dataclasses.replace(CUDA, fused_softmax=load_fused_kernels() is not None,
                               jit_compiled=jit.compiles_on(torch.device("cuda")))


def _gpu():
    return gpu_spec("h200" if "H200" in torch.cuda.get_device_name() else "h100")


def _job(name: str, mbs: int, recompute: str):
    overrides = ["--micro-batch-size", str(mbs), "--global-batch-size", str(mbs * MICROBATCHES),
                 "--use-distributed-optimizer", "false"]
    if recompute == "full":
        overrides += ["--recompute-granularity", "full", "--recompute-method", "uniform"]
    return load_config(os.path.join(CONFIGS, f"gpt3-{name}.yaml"), overrides, world_size=1)


def _iteration(model, opt, batches):
    model.zero_grad_buffer()
    for i, ids in enumerate(batches):
        with model.no_sync() if i < len(batches) - 1 else torch.enable_grad():
            (model(ids, labels=ids).float().mean() / len(batches)).backward()
    finalize_model_grads([model])
    assert opt.step().update_successful


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("mbs", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["350m", "1.3b"])
def test_peak_memory_of_an_iteration(name, mbs, recompute):
    job = _job(name, mbs, recompute)
    cfg = job.model
    base = torch.cuda.memory_allocated()
    model = DistributedDataParallel(GPTModel(cfg))
    opt = get_megatron_optimizer([model], lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (mbs, cfg.seq_length), device="cuda",
                             generator=gen) for _ in range(MICROBATCHES)]
    _iteration(model, opt, batches)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _iteration(model, opt, batches)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    est = estimate(Setup.from_job(job, 1), _gpu(), kernels=_kernels())
    stage = est.stages[0]
    print(f"\n| gpt3-{name} | {mbs} | {recompute} | {measured / GiB:.2f} GiB | "
          f"{est.peak_bytes / GiB:.2f} GiB | {est.peak_bytes / measured - 1:+.1%} | "
          f"{stage.state.total / GiB:.2f} GiB | {stage.activations / GiB:.2f} GiB | "
          f"{stage.transient / GiB:.2f} GiB |")
    del model, opt
    assert abs(est.peak_bytes - measured) <= TOLERANCE * measured


@pytest.mark.parametrize("window", [None, 512], ids=["full", "window_512"])
@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_saved_bytes_of_a_layer_on_cuda(backend, window):
    """GPT-3 1.3B's layer at micro-batch 2, dropout on: the CUDA estimate, and for the unfused
    core without a window Korthikanti's ``s b h (34 + 5 a s / h)`` (plus the norm statistics
    it leaves out).
    A window of 512 over 2048 tokens attends in two tiles of 1024 queries (over 1024 and 1536
    keys): SDPA runs the memory-efficient kernel on each, which keeps its view of the one
    ``[1024, 1536]`` additive bias, its log-sum-exp and its output (apart from the tiles'
    concatenation, the projection's input)."""
    job = _job("1.3b", 2, "none")
    cfg = dataclasses.replace(job.model, attention_backend=backend,
                              window_size=None if window is None else [window, 0])
    if window is not None:
        assert busiest_calls(cfg, 2, _kernels(), window) == [
            AttentionCall(1024, 1024, "tile"), AttentionCall(1024, 1536, "tile")]
    layer = TransformerLayer(cfg, 1)
    x = torch.randn(cfg.seq_length, 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    with SavedTensorMeter(exclude=layer.parameters()) as meter:
        y = layer(x)
    y.float().sum().backward()
    terms = layer_terms(cfg, 2, _kernels())
    expected = sum(terms.values())
    paper = korthikanti_layer_bytes(cfg.seq_length, 2, cfg.hidden_size,
                                    cfg.num_attention_heads) + terms["norm statistics"]
    print(f"\n{backend}, window {window}: measured {meter.bytes} B, estimate {expected:.0f} B "
          f"({expected / meter.bytes - 1:+.2%}), Korthikanti + statistics {paper:.0f} B "
          f"({paper / meter.bytes - 1:+.2%}); fused softmax built: "
          f"{load_fused_kernels() is not None}")
    assert abs(expected - meter.bytes) <= TOLERANCE * meter.bytes
    if backend == "unfused" and window is None and _kernels().fused_softmax:  # the tiles
        # score s (1024 + 512) pairs a head, not the formula's s^2
        assert abs(paper - meter.bytes) <= TOLERANCE * meter.bytes


def cp_layer_saved_bytes(config, device: str) -> int:
    """Bytes one layer of ``config`` (context-parallel) saves on this rank for micro-batch 1,
    on ``device``. Module level: `run_distributed` runs it on each rank."""
    ps.initialize_model_parallel(1, context_parallel_size=config.context_parallel_size)
    model_parallel_cuda_manual_seed(1234)
    layer = TransformerLayer(config, 1).to(device)
    cp = config.context_parallel_size
    x = torch.randn(config.seq_length // cp, 1, config.hidden_size, device=device,
                    dtype=torch.bfloat16, requires_grad=True)
    assert local_positions(config.seq_length, cp, ps.get_context_parallel_rank()).numel() \
        == x.size(0)
    with SavedTensorMeter(exclude=layer.parameters()) as meter:
        y = layer(x)
    y.float().sum().backward()
    return meter.bytes


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_saved_bytes_of_a_context_parallel_layer_on_cuda(backend):
    """GPT-3 1.3B's layer at CP 2 on two ranks sharing the GPU: CP rank 1 (the busiest)
    against the CUDA estimate: flash attention's bottom-right causal form without a mask,
    each query chunk's output, the keys and values gathered over CP."""
    job = _job("1.3b", 1, "none")
    cfg = dataclasses.replace(job.model, attention_backend=backend, context_parallel_size=2)
    measured = run_distributed(2, cp_layer_saved_bytes, cfg, "cuda")
    expected = sum(layer_terms(cfg, 1, _kernels()).values())
    print(f"\nCP 2, {backend}: measured {measured} B, estimate {expected:.0f} B "
          f"({expected / measured[1] - 1:+.2%} against rank 1)")
    assert measured[0] <= measured[1]
    assert abs(expected - measured[1]) <= TOLERANCE * measured[1]


@pytest.mark.parametrize("v_head_dim", [128, 192], ids=["efficient", "flash"])
def test_saved_bytes_of_a_multi_latent_attention_layer_on_cuda(v_head_dim):
    """GPT-3 1.3B's layer with DeepSeek-V2's attention (16 heads of 128 + 64 query/key
    channels, a 512-wide key-value latent, a 1536-wide query latent), dropout on, micro-batch
    2: values 128 wide (SDPA's memory-efficient kernel, its log-sum-exp in 32-query tiles) or
    192 (flash) against the CUDA estimate."""
    job = _job("1.3b", 2, "none")
    cfg = dataclasses.replace(job.model, multi_latent_attention=True,
                              position_embedding_type="rope", q_lora_rank=1536,
                              kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                              v_head_dim=v_head_dim)
    layer = TransformerLayer(cfg, 1)
    x = torch.randn(cfg.seq_length, 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    freqs = rotary_freqs(cfg.seq_length, cfg.rotary_dim, cfg.rotary_base, x.device)
    with SavedTensorMeter(exclude=layer.parameters()) as meter:
        y = layer(x, None, freqs)
    y.float().sum().backward()
    expected = sum(layer_terms(cfg, 2, _kernels()).values())
    print(f"\nMLA, dv {v_head_dim}: measured {meter.bytes} B, estimate {expected:.0f} B "
          f"({expected / meter.bytes - 1:+.2%})")
    assert abs(expected - meter.bytes) <= TOLERANCE * meter.bytes
