"""A rank's experts run one after another against one grouped GEMM per weight kind
(``--moe-grouped-gemm``), forward+backward.

    python tools/bench_moe_experts.py            # Mixtral 8x7B's experts (GPU), smaller on a CPU
    python tools/bench_moe_experts.py --experts 32 --ffn 1536 --hidden 2048 --tokens 32768

`mp.model.moe.experts.Experts` with ``E`` local experts, SwiGLU, no biases, in the model's
precision (bf16 on a GPU, fp32 on a CPU), on ``tokens`` rows routed unevenly (each expert's
share drawn from a Dirichlet distribution, so some take many more rows than others; the same
rows for both variants). Columns: median milliseconds of forward+backward
(``bench_gpt.timed_steps``) and the matrix products' rate, ``6 x 3 x rows x h x f`` FLOPs
(three weights, forward and two backward products each).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from bench_gpt import one_rank, timed_steps

from mp import parallel_state
from mp.model import TransformerConfig
from mp.model.moe import grouped_gemm
from mp.model.moe.experts import Experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--tokens", type=int, help="routed rows (tokens x top k)")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    with one_rank() as (device, _, name):
        cuda = device.type == "cuda"
        h = args.hidden or (4096 if cuda else 256)
        f = args.ffn or (14336 if cuda else 512)
        rows = args.tokens or (2 * 8192 if cuda else 2048)
        cfg = TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=8,
                                vocab_size=128, seq_length=128, num_moe_experts=args.experts,
                                moe_ffn_hidden_size=f, activation="swiglu",
                                add_bias_linear=False, moe_grouped_gemm=True,
                                precision="bf16" if cuda else "fp32")
        experts = Experts(cfg, parallel_state.get_tensor_model_parallel_group(), 0, 1)
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        shares = torch.distributions.Dirichlet(torch.ones(args.experts)).sample()
        counts = (shares * rows).floor().long()
        counts[0] += rows - counts.sum()
        counts = counts.tolist()
        x = torch.randn(rows, h, generator=g).to(device, cfg.params_dtype).requires_grad_()
        dy = torch.randn(rows, h, generator=g).to(device, cfg.params_dtype)
        usable = grouped_gemm.usable(x, experts.fc1_weight, experts.fc2_weight)
        print(f"{name} | {cfg.params_dtype} | {args.experts} experts, h={h}, f={f}, "
              f"{rows} rows (fewest {min(counts)}, most {max(counts)}) | grouped GEMM runs "
              f"here: {usable}", flush=True)
        flops = 6 * 3 * rows * h * f
        print("| variant | ms fwd+bwd | TFLOP/s |\n| --- | ---: | ---: |")
        for variant, grouped in (("loop", False), ("grouped GEMM", True)):
            if grouped and not usable:
                print(f"| {variant} | - | - |")
                continue
            experts.grouped = grouped

            def step() -> float:
                experts(x, counts).backward(dy)
                x.grad = None
                for p in experts.parameters():
                    p.grad = None
                return 0.0
            seconds, _ = timed_steps(step, device, warmup=2, iters=args.iters)
            print(f"| {variant} | {seconds * 1e3:.2f} | {flops / seconds / 1e12:.3g} |",
                  flush=True)


if __name__ == "__main__":
    main()
