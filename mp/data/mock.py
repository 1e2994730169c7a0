"""``MockGPTDataset``: random tokens in `GPTDataset`'s item format (Megatron's ``--mock-data``).

For trying a model or a cluster without a corpus or a tokenizer on the machine: sample ``i``
is ``seq_length + 1`` tokens drawn uniformly from ``[0, vocab_size)`` by a generator seeded
with ``(seed, i)``, so every rank and every run sees the same samples. There is nothing to
learn beyond the uniform distribution: the loss starts near ``ln(vocab_size)`` and stays
there, which makes it a throughput and memory check, not a convergence one.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class MockGPTDataset(Dataset):
    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """``tokens``, ``labels`` (the tokens shifted by one), ``loss_mask`` (ones) and
        ``position_ids``, each ``[seq_length]``."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} is outside 0..{self.num_samples - 1}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=generator)
        return {"tokens": text[:-1], "labels": text[1:],
                "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
                "position_ids": torch.arange(self.seq_length, dtype=torch.int64)}
