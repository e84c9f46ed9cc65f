"""Known answers of the sample-quality metrics (FID, KID, IS, precision/recall, top-k accuracy)."""

from __future__ import annotations

import math

import pytest
import torch

from vqvae2.metrics import (
    frechet_distance,
    inception_score,
    kernel_distance,
    precision_recall,
    top_k_accuracy,
)


@pytest.fixture
def features() -> torch.Tensor:
    return torch.randn(1000, 6, dtype=torch.float64)


def test_fid_of_a_set_with_itself_is_zero(features):
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_shifted_set_is_the_squared_shift(features):
    # Same covariance, means apart by d: FID = ||d||^2 exactly.
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    expected = float(shift.pow(2).sum())
    assert frechet_distance(features, features + shift) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(features, features + shift / 2) == pytest.approx(expected / 4, rel=1e-6)


def test_fid_sees_a_change_of_spread(features):
    # N(0, I) vs N(0, 4I) in 6 dims: Tr(S1 + S2 - 2 sqrt(S1 S2)) = 6 * (1 + 4 - 4) = 6.
    assert frechet_distance(features, 2 * features) == pytest.approx(6.0, rel=0.1)


def test_kid_is_zero_for_the_same_set_and_grows_with_a_shift(features):
    same, _ = kernel_distance(features, features, subsets=5, subset_size=200, seed=0)
    shifted, _ = kernel_distance(features, features + 1, subsets=5, subset_size=200, seed=0)
    assert abs(same) < 0.05 and shifted > 1.0
    again = kernel_distance(features, features + 1, subsets=5, subset_size=200, seed=0)
    assert again[0] == shifted  # seeded subsets


def test_inception_score_known_answers():
    uniform = torch.zeros(100, 10)
    assert inception_score(uniform, splits=1, seed=0)[0] == pytest.approx(1.0)
    confident = 50 * torch.eye(10).repeat(20, 1)  # each class equally often, with certainty
    assert inception_score(confident, splits=1, seed=0)[0] == pytest.approx(10.0, rel=1e-6)
    one_class = 50 * torch.eye(10)[torch.zeros(200, dtype=torch.long)]  # certain, one class
    assert inception_score(one_class, splits=1, seed=0)[0] == pytest.approx(1.0)
    # Four splits of a seeded shuffle: with certain predictions each split's score is exp of
    # the entropy of its class frequencies; the mean and (unbiased) deviation over the splits.
    mean, std = inception_score(confident, splits=4, seed=0)
    torch.manual_seed(0)
    shuffled = (torch.arange(200) % 10)[torch.randperm(200)]
    scores = []
    for split in shuffled.chunk(4):
        frequencies = torch.bincount(split, minlength=10).double() / len(split)
        present = frequencies[frequencies > 0]
        scores.append(float(torch.exp(-(present * present.log()).sum())))
    by_hand = torch.tensor(scores, dtype=torch.float64)
    assert mean == pytest.approx(float(by_hand.mean()), rel=1e-9)
    assert std == pytest.approx(float(by_hand.std()), rel=1e-9)
    assert inception_score(confident, splits=4, seed=0) == (mean, std)


def test_seeded_metrics_leave_the_global_generator_alone(features):
    logits = torch.randn(40, 4)
    state = torch.get_rng_state()
    inception_score(logits, splits=4, seed=1)
    kernel_distance(features, features, subsets=2, subset_size=50, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_precision_and_recall_are_one_for_identical_sets(features):
    result = precision_recall(features, features.clone(), nearest_k=3)
    assert result.precision == 1.0 and result.recall == 1.0 and result.coverage == 1.0


def test_precision_and_recall_fall_for_disjoint_sets(features):
    result = precision_recall(features, features + 100, nearest_k=3)
    assert result.precision == 0.0 and result.recall == 0.0


def test_precision_and_recall_of_a_collapsed_set():
    # Samples on half of the real data: all inside the real manifold (precision 1), but they
    # cover only part of it (recall well below 1).
    real = torch.randn(600, 2, dtype=torch.float64)
    collapsed = real[real[:, 0] > 0.5]
    result = precision_recall(real, collapsed, nearest_k=3)
    assert result.precision == 1.0 and result.recall < 0.5


def test_metrics_refuse_too_few_rows(features):
    with pytest.raises(ValueError, match="too few"):
        precision_recall(features, features[:3], nearest_k=3)
    with pytest.raises(ValueError, match="too few"):
        frechet_distance(features, features[:1])
    with pytest.raises(ValueError, match="too few"):
        kernel_distance(features, features[:10], subsets=2, subset_size=20, seed=0)
    with pytest.raises(ValueError, match="too few"):
        inception_score(torch.zeros(3, 4), splits=10, seed=0)
    with pytest.raises(ValueError, match="feature widths differ"):
        frechet_distance(features, features[:, :3])


def test_top_k_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 1, 0])
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, labels, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must be"):
        top_k_accuracy(logits, labels, 4)
    assert math.isclose(top_k_accuracy(torch.eye(4), torch.arange(4), 1), 1.0)
