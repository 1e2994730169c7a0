"""Several datasets drawn in proportion to weights (``--data-path 0.3 a 0.7 b``).

Sample ``i`` of the blend is sample ``dataset_sample_index[i]`` of dataset
``dataset_index[i]``. The interleaving is deterministic and smooth: dataset ``d`` is due for
its ``k``-th sample at time ``(k + 1/2) / w_d`` and the blend takes samples in order of due time
(ties to the lower dataset id), so every prefix of ``n`` samples holds within about one sample
of ``w_d * n`` from each dataset. Megatron's compiled helper instead picks, sample by sample,
the dataset furthest behind its quota; the proportions are the same, the exact interleaving
differs, and this one is a single sort, so the indices are cheap to rebuild and not cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index int16 [size], dataset_sample_index int64 [size])`` for the normalized
    ``weights``."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights={weights.tolist()} must be non-negative with a positive sum")
    if weights.size >= np.iinfo(np.int16).max:
        raise ValueError(
            f"{weights.size} datasets: at most {np.iinfo(np.int16).max - 1} can be blended"
        )
    weights = weights / weights.sum()
    due, ids, ranks = [], [], []
    for d, w in enumerate(weights):
        if w == 0:
            continue
        count = int(np.floor(w * size + 0.5)) + 1  # more than any prefix of ``size`` can take
        k = np.arange(count, dtype=np.int64)
        due.append((k + 0.5) / w)
        ids.append(np.full(count, d, dtype=np.int16))
        ranks.append(k)
    order = np.argsort(np.concatenate(due), kind="stable")[:size]
    return np.concatenate(ids)[order], np.concatenate(ranks)[order]


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``; items are the
    underlying datasets' items."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, size)
        for d, dataset in enumerate(self.datasets):
            drawn = self.dataset_sample_index[self.dataset_index == d]
            if drawn.size and drawn.max() >= len(dataset):
                raise ValueError(
                    f"the blend draws {drawn.max() + 1} samples from dataset {d}, which has only "
                    f"{len(dataset)}"
                )

    def __len__(self) -> int:
        return self.dataset_index.shape[0]

    def __getitem__(self, idx: int):
        return self.datasets[self.dataset_index[idx]][int(self.dataset_sample_index[idx])]
