"""Comparison and data helpers shared by the distributed tests."""

from __future__ import annotations

import contextlib
import os

import torch

RTOL = 1e-6  # the project's bar for fp32 against a float64 or single-process reference


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL,
                     what: str = "tensor") -> None:
    """Norm-wise relative error ``|a - e| / |e| <= rtol`` (computed in float64), same shape."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).norm().item()
    scale = max(e.norm().item(), 1e-30)
    assert err <= rtol * scale, f"{what}: relative error {err / scale:.3e} > {rtol:.1e}"


def seeded(shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """A reproducible normal tensor: the same on every rank for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def own_rank_group():
    """A process group holding only this rank (every rank must call this together): lets a
    single-process reference model run beside the parallel one in the same worker."""
    import torch.distributed as dist

    mine = None
    for r in range(dist.get_world_size()):
        group = dist.new_group([r])
        if r == dist.get_rank():
            mine = group
    return mine


def computed_once(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` computed on global rank 0 only and sent to every rank (all ranks
    call this together). For a single-process reference that does not depend on the rank:
    every rank of a simulated cluster computing it alike would multiply its cost on the shared
    cores. ``fn`` must not take part in collectives."""
    import torch.distributed as dist

    out = [fn(*args, **kwargs) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(out, src=0)
    return out[0]


@contextlib.contextmanager
def jit_compiled_on_cpu():
    """Within it, `mp.jit` fused functions run their ``torch.compile`` build on the CPU (the
    pool workers outlive a test, so the switch is set and undone in the rank itself)."""
    from mp import jit

    before = os.environ.get("MP_JIT_FUSION_CPU")
    os.environ["MP_JIT_FUSION_CPU"] = "1"
    try:
        yield
        assert jit.compiles_on(torch.device("cpu")), "torch.compile failed; eager ran instead"
    finally:
        if before is None:
            del os.environ["MP_JIT_FUSION_CPU"]
        else:
            os.environ["MP_JIT_FUSION_CPU"] = before


def counted_flops(overrides: dict) -> tuple[float, float]:
    """(the FLOPs torch's counter sees in one forward and backward, with labels, of a small GPT
    (2 layers unless ``overrides`` say, 2 sequences of 16, unfused attention and element-wise
    code, so that every product is a counted kernel), `mp.estimate.training_flops` of its
    config). Run on one rank."""
    from torch.utils.flop_counter import FlopCounterMode

    from mp import parallel_state as ps
    from mp.estimate import training_flops
    from mp.model import GPTModel, TransformerConfig
    ps.initialize_model_parallel(1)
    cfg = TransformerConfig(**{
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64,
        "seq_length": 16, "make_vocab_size_divisible_by": 8, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "bias_activation_fusion": False,
        "bias_dropout_fusion": False, "cross_entropy_loss_fusion": False,
        "attention_backend": "unfused", **overrides})
    model = GPTModel(cfg)
    ids = torch.randint(0, 64, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).sum().backward()
    return counter.get_total_flops(), training_flops(cfg, 2)


def greedy_tokens(tp: int, kv_cache: bool, overrides: dict) -> torch.Tensor:
    """Three seeded prompts of 5 tokens and 10 greedy ones after them ``[3, 15]``, from a small
    GPT (``overrides``: more of its config; weights seeded, the same at every TP size) at TP
    ``tp``, with the key/value cache or not. Run on ``tp`` ranks."""
    from mp import parallel_state as ps
    from mp.generation import SamplingParams, generate
    from mp.model import GPTModel, TransformerConfig
    ps.initialize_model_parallel(tp)
    torch.manual_seed(7)
    cfg = TransformerConfig(**{
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64,
        "seq_length": 32, "make_vocab_size_divisible_by": 8, "tensor_model_parallel_size": tp,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3, **overrides})
    prompts = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    return generate(GPTModel(cfg).eval(), prompts, 10, SamplingParams(greedy=True),
                    kv_cache=kv_cache)
