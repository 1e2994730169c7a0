"""FLOPs of a training iteration, and the peak the device could have done.

Narayanan et al. 2021 (eq. 3) count, per token and layer of the forward pass, the matrix
multiplications: ``24 h^2`` in the linear layers (QKV ``6 h^2``, output projection ``2 h^2``,
MLP ``16 h^2``) and ``4 s h`` in attention (``Q K^T`` and ``softmax . V`` over the full
``s x s`` square), plus ``2 h V`` for the logits. Backward costs twice the forward; activation
recompute repeats the recomputed forward once more. Hence, for a batch of ``B`` sequences::

    no recompute:    72 B s l h^2 (1 + s / (6h) + V / (12 l h))
    full recompute:  96 B s l h^2 (1 + s / (6h) + V / (16 l h))

`num_floating_point_operations` counts the same way for any MLP width and activation (SwiGLU
has three ``h x ffn`` matrices instead of two), and for selective recompute (the matrix
products of the ``recompute_modules`` it reruns: the attention scores for ``core_attn``); for
a ``4h`` GeLU MLP it is exactly the formulas above. ``V`` is
the padded vocabulary (what the output layer computes). A layer with a sliding window of ``W``
keys (``window_size``) counts its ``4 s h`` times the share of the causal (query, key) pairs
the window keeps, ``sum_i min(i + 1, W + 1) / (s (s + 1) / 2)`` (1 for ``W >= s - 1``;
`mp.estimate.flops.window_share`). See docs/training.md.
"""

from __future__ import annotations

import re

import torch

from mp.estimate.flops import training_flops
from mp.model.config import TransformerConfig

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, matched as whole words against the device
# name, in order (so "H100 PCIe" is tested before "H100"; "L40" or "A10G" match nothing).
PEAK_TFLOPS = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 (no bf16)
)


def num_floating_point_operations(config: TransformerConfig, batch_size: int,
                                  recompute: bool = True) -> float:
    """FLOPs of one iteration (forward and backward) over ``batch_size`` sequences of
    ``config.seq_length`` tokens, on the whole model (all ranks together). ``recompute``
    counts the recomputed forward work of ``config.recompute_granularity``; without it the
    count is the model's own (what MFU divides). The count is the estimator's
    (`mp.estimate.flops.training_flops`), so logs and plans agree."""
    return training_flops(config, batch_size, "config" if recompute else None)


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of ``device`` in TFLOP/s; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if re.search(rf"\b{key}\b", name):
            return tflops
    return None
