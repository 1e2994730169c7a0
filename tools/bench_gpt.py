"""Training throughput of mp's GPT at TP=1 against a plain-PyTorch GPT of the same shape.

    python tools/bench_gpt.py                                   # gpt3-1.3b, micro-batch 8, bf16
    python tools/bench_gpt.py --config configs/gpt-tiny.yaml    # CPU-sized
    python tools/bench_gpt.py --iters 10 --recompute-granularity selective
    python tools/bench_gpt.py --hidden-dropout 0 --attention-dropout 0      # no dropout in either
    python tools/bench_gpt.py --no-bias-dropout-fusion --no-bias-gelu-fusion \
        --no-cross-entropy-loss-fusion                          # mp.jit's fusions off
    python tools/bench_gpt.py --model.compile_layers true --compile-reference  # both compiled

Both models take full training steps on the same batch of random tokens, one after the other
in this process: mp runs its real training step (`mp.training.training.train_step`: fp32
gradient buffers, fp32 master weights, global-norm clipping, fused AdamW, the loss averaged
for logging); the reference is nanoGPT's recipe (``nn.Linear``, ``scaled_dot_product_attention``,
fp32 weights under bf16/fp16 autocast, ``clip_grad_norm_``, fused AdamW). Both apply the
config's dropouts (nanoGPT's places: the embeddings, SDPA's attention dropout, each residual
branch); GPT-3's configs have 0.1, as Megatron's defaults. The table gives the
median step time over ``--iters`` steps after ``--warmup``, tokens/s, achieved TFLOP/s
(Narayanan et al.'s count, recompute included), MFU (the model's FLOPs against the GPU's dense
bf16 peak), and CUDA peak memory (each model measured alone). Extra arguments are config
overrides (see ``launch/pretrain_gpt.py --help``); TP and PP are forced to 1.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mp import jit, parallel_state
from mp.config import load_config
from mp.device import get_device
from mp.initialize import initialize_distributed
from mp.model import TransformerConfig
from mp.training import gpt_step
from mp.training.flops import num_floating_point_operations, peak_tflops
from mp.training.pretrain import set_random_seed, setup_model_and_optimizer
from mp.training.training import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PlainBlock(nn.Module):
    """nanoGPT's block: ``x + drop(attn(ln_1(x)))``, then ``x + drop(mlp(ln_2(x)))``, ``x [b, s,
    h]``, with the config's hidden dropout there and its attention dropout inside SDPA."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.attn_dropout = cfg.attention_dropout
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.ln_1, self.ln_2 = nn.LayerNorm(h, eps=cfg.layernorm_epsilon), \
            nn.LayerNorm(h, eps=cfg.layernorm_epsilon)
        self.c_attn, self.attn_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.c_fc, self.mlp_proj = nn.Linear(h, cfg.ffn_hidden_size), \
            nn.Linear(cfg.ffn_hidden_size, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(h, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.drop(self.attn_proj(y.transpose(1, 2).reshape(b, s, h)))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class PlainGPT(nn.Module):
    """nanoGPT: learned positions, embedding dropout, tied input/output embeddings, mean
    cross-entropy."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        h, vocab = cfg.hidden_size, cfg.padded_vocab_size
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(cfg.seq_length, h)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(h, eps=cfg.layernorm_epsilon)
        self.lm_head = nn.Linear(h, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=cfg.init_method_std)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(tokens) + self.wpe(torch.arange(tokens.size(1),
                                                               device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def check_plain_architecture(cfg: TransformerConfig) -> None:
    """The reference is the standard GPT; refuse configs it does not reproduce."""
    expected = {"normalization": "LayerNorm", "activation": "gelu",
                "position_embedding_type": "learned_absolute", "add_bias_linear": True,
                "untie_embeddings_and_output_weights": False}
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in expected.items() if getattr(cfg, k) != v]
    if wrong:
        raise SystemExit(f"bench_gpt compares against a standard GPT (LayerNorm, GeLU, learned "
                         f"positions, biases, tied embeddings); the config has {', '.join(wrong)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def one_rank():
    """A world of this one process at TP 1 for a benchmark, torn down after it; yields
    ``(device, dtype, name)``: the device, what the benchmarks compute in there (bf16 on CUDA,
    fp32 on the CPU) and the device's name."""
    initialize_distributed()
    try:
        parallel_state.initialize_model_parallel(1)
        device = get_device()
        cuda = device.type == "cuda"
        yield (device, torch.bfloat16 if cuda else torch.float32,
               torch.cuda.get_device_name(device) if cuda else "CPU")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def timed_steps(step, device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """(median seconds per step, last loss) of ``step()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times, loss = [], float("nan")
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), loss


def bench_mp(cfg, batch: dict, device, warmup: int, iters: int):
    set_random_seed(cfg.training.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    params = sum(p.numel() for p in model[0].parameters())

    def step() -> float:
        out = train_step(gpt_step.forward_step, iter([batch]), model, optimizer, scheduler,
                         num_microbatches=1, seq_length=cfg.model.seq_length,
                         micro_batch_size=cfg.training.micro_batch_size)
        return out.losses["lm loss"]

    return params, *timed_steps(step, device, warmup, iters)


def bench_plain(cfg, batch: dict, device, warmup: int, iters: int, compiled: bool = False):
    torch.manual_seed(cfg.training.seed)
    model = PlainGPT(cfg.model).to(device)
    if compiled:  # each block, as compile_layers does for mp
        for block in model.blocks:
            block.compile()
    params = sum(p.numel() for p in model.parameters())
    tr = cfg.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=(tr.adam_beta1,
                                  tr.adam_beta2), eps=tr.adam_eps, weight_decay=tr.weight_decay,
                                  fused=True)
    dtype = cfg.model.params_dtype
    autocast = nullcontext() if dtype == torch.float32 else \
        torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(batch["tokens"], batch["labels"])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    return params, *timed_steps(step, device, warmup, iters)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run(cfg, args: argparse.Namespace) -> None:
    """Both benchmarks on the same batch, then the table."""
    device = get_device()
    m = cfg.model
    text = torch.randint(0, m.vocab_size, (args.micro_batch_size, m.seq_length + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"tokens": text[:, :-1], "labels": text[:, 1:],
             "loss_mask": torch.ones(text.size(0), m.seq_length, device=device),
             "position_ids": torch.arange(m.seq_length, device=device).repeat(text.size(0), 1)}
    peak = peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{os.path.basename(args.config)}: l={m.num_layers} h={m.hidden_size} "
          f"a={m.num_attention_heads} s={m.seq_length} V={m.padded_vocab_size} | micro-batch "
          f"{args.micro_batch_size} | {m.precision}, fp8 {m.fp8} | recompute "
          f"{m.recompute_granularity} | dropout {m.hidden_dropout}/{m.attention_dropout} | "
          f"mp fusions: bias-dropout-add {m.bias_dropout_fusion}, bias-activation "
          f"{m.bias_activation_fusion}, loss {m.cross_entropy_loss_fusion} | compile_layers "
          f"{m.compile_layers} | {name} (dense bf16 peak {peak or '-'} TFLOP/s)", flush=True)
    tokens = args.micro_batch_size * m.seq_length
    # mp does the config's recompute; the reference never recomputes (its count = model FLOPs)
    flops = {"mp": num_floating_point_operations(m, args.micro_batch_size),
             "plain": num_floating_point_operations(m, args.micro_batch_size, recompute=False)}
    rows = {}
    plain = ("plain", "plain PyTorch, compiled", functools.partial(bench_plain, compiled=True)) \
        if args.compile_reference else ("plain", "plain PyTorch (nanoGPT)", bench_plain)
    for key, label, bench in (("mp", "mp GPTModel, TP=1", bench_mp), plain):
        _free(device)
        params, seconds, loss = bench(cfg, batch, device, args.warmup, args.iters)
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows[key] = (label, params, seconds, loss, memory)
        _free(device)
    print(f"{'model':<26}{'params':>10}{'ms/iter':>10}{'tokens/s':>11}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'peak mem':>11}{'loss':>8}")
    for key, (label, params, seconds, loss, memory) in rows.items():
        mfu = "-" if peak is None else f"{100 * flops['plain'] / seconds / 1e12 / peak:.1f}%"
        mem = "-" if memory is None else f"{memory / 2**30:.1f} GiB"
        print(f"{label:<26}{params / 1e6:>9.1f}M{1000 * seconds:>10.1f}{tokens / seconds:>11.0f}"
              f"{flops[key] / seconds / 1e12:>9.2f}{mfu:>7}{mem:>11}{loss:>8.3f}")
    ratio = rows["plain"][2] / rows["mp"][2]
    print(f"mp throughput / plain PyTorch: {ratio:.3f} (mp.jit fusions compiled: "
          f"{jit.compiles_on(device)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "gpt3-1.3b.yaml"))
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile-reference", action="store_true",
                        help="torch.compile each block of the plain-PyTorch model")
    args, overrides = parser.parse_known_args()
    mbs = str(args.micro_batch_size)
    cfg = load_config(args.config, [*overrides, "--tensor-model-parallel-size", "1",
                                    "--pipeline-model-parallel-size", "1",
                                    "--micro-batch-size", mbs, "--global-batch-size", mbs],
                      world_size=1)
    check_plain_architecture(cfg.model)
    with one_rank():
        run(cfg, args)


if __name__ == "__main__":
    main()
