"""Cost of the tensor-parallel layers at TP=1 against plain ``torch.nn.Linear``.

A 4-layer MLP (column -> row -> column -> row, GeLU between pairs) against the same shapes
built from ``nn.Linear``; forward + backward, both timed in the same run, interleaved, median
of the repeats. The TP=1 path should cost at most 3% more.

    python tools/bench_tp_overhead.py [--hidden 1024] [--tokens 2048] [--iters 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mp import parallel_state
from mp.device import get_device
from mp.initialize import initialize_distributed
from mp.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class TPMLP(nn.Module):
    def __init__(self, h: int, layers: int, dtype, device):
        super().__init__()
        kw = dict(params_dtype=dtype, device=device)
        self.pairs = nn.ModuleList(
            nn.ModuleList([ColumnParallelLinear(h, 4 * h, **kw),
                           RowParallelLinear(4 * h, h, input_is_parallel=True, **kw)])
            for _ in range(layers // 2))

    def forward(self, x):
        for up, down in self.pairs:
            x = down(F.gelu(up(x)[0]))[0]
        return x


class TorchMLP(nn.Module):
    def __init__(self, h: int, layers: int, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.pairs = nn.ModuleList(
            nn.ModuleList([nn.Linear(h, 4 * h, **kw), nn.Linear(4 * h, h, **kw)])
            for _ in range(layers // 2))

    def forward(self, x):
        for up, down in self.pairs:
            x = down(F.gelu(up(x)))
        return x


def _step_time(model, x, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    model(x).sum().backward()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    initialize_distributed()
    parallel_state.initialize_model_parallel(1)
    device = get_device()
    cuda = device.type == "cuda"
    hidden = args.hidden or (4096 if cuda else 512)
    tokens = args.tokens or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    models = {"torch nn.Linear": TorchMLP(hidden, args.layers, dtype, device),
              "mp TP=1": TPMLP(hidden, args.layers, dtype, device)}
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.iters + 5):
        for name, model in models.items():  # interleaved so drift hits both alike
            t = _step_time(model, x, device)
            if i >= 5:
                times[name].append(t)
    base = statistics.median(times["torch nn.Linear"])
    print(f"device={device} dtype={dtype} hidden={hidden} tokens={tokens} layers={args.layers} "
          f"iters={args.iters}")
    print(f"{'model':<18}{'median ms':>12}{'ratio':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<18}{med * 1e3:>12.3f}{med / base:>8.3f}")


if __name__ == "__main__":
    main()
