"""Blending several datasets by weight: proportions within 1% over 10k samples, smooth
prefixes, and samples traced back to the dataset whose tokens they hold."""

import numpy as np
import pytest
from test_data_gpt_dataset import make_dataset

from mp.data.blended_dataset import BlendedDataset, build_blending_indices
from mp.data.dataset_builder import build_gpt_datasets


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.5, 0.3], [1, 0, 3], [0.001, 0.999]])
def test_blending_indices_honour_weights(weights):
    size = 10_000
    dataset_index, sample_index = build_blending_indices(weights, size)
    w = np.asarray(weights, dtype=float) / sum(weights)
    counts = np.bincount(dataset_index, minlength=len(w))
    assert np.abs(counts / size - w).max() < 0.01
    # every prefix is within two samples of its quota
    seen = np.zeros((size, len(w)))
    seen[np.arange(size), dataset_index] = 1
    quota = np.arange(1, size + 1)[:, None] * w[None, :]
    assert np.abs(np.cumsum(seen, axis=0) - quota).max() <= 2
    # each dataset's samples are drawn in order 0, 1, 2, ...
    for d in range(len(w)):
        np.testing.assert_array_equal(sample_index[dataset_index == d], np.arange(counts[d]))


def test_blended_gpt_datasets_draw_by_weight(tmp_path):
    a = make_dataset(str(tmp_path / "a"), num_docs=40, seed=1, low=1, high=100)
    b = make_dataset(str(tmp_path / "b"), num_docs=40, seed=2, low=100, high=200)
    train, valid, _ = build_gpt_datasets(
        ["0.3", a.path_prefix, "0.7", b.path_prefix],
        "90,10,0",
        8,
        5,
        10_000,
        50,
        0,
        path_to_cache=str(tmp_path / "cache"),
    )
    assert isinstance(train, BlendedDataset) and (len(train), len(valid)) == (10_000, 50)
    from_a = 0
    for i in range(len(train)):
        tokens = train[i]["tokens"].numpy()
        content = tokens[tokens != 0]
        in_a, in_b = (content < 100).all(), (content >= 100).all()
        assert in_a != in_b  # each sample comes from exactly one of the two datasets
        from_a += int(in_a)
    assert abs(from_a / len(train) - 0.3) < 0.01


def test_unweighted_prefixes_blend_by_tokens(tmp_path):
    a = make_dataset(str(tmp_path / "a"), num_docs=20, seed=1)
    b = make_dataset(str(tmp_path / "b"), num_docs=60, seed=2)
    train, _, _ = build_gpt_datasets(
        [a.path_prefix, b.path_prefix], "1", 8, 5, 2000, 0, 0, path_to_cache=str(tmp_path / "cache")
    )
    share_a = np.mean(train.dataset_index == 0)
    tokens = [int(d.sequence_lengths.sum()) for d in (a, b)]
    assert share_a == pytest.approx(tokens[0] / sum(tokens), abs=0.01)


def test_blend_errors_name_the_problem():
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        build_blending_indices([0.5, -0.5], 10)
    with pytest.raises(ValueError, match="draws 8 samples from dataset 1, which has only 3"):
        BlendedDataset([list(range(10)), list(range(3))], [0.2, 0.8], 10)
