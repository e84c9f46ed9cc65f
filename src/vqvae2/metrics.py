"""Measurements for VQ-VAE-2: reconstruction error, codebook usage and perplexity, and the
sample-quality metrics of the paper's Section 5 (FID, Inception Score, precision/recall, CAS).

Pure functions on tensors; no I/O. Pixel errors are reported on the [0, 1] scale (the scale of the
issue's targets and of most papers), while models work on [-1, 1].

The sample metrics take features computed beforehand (by ``vqvae2.evaluate``: the project's
classifier or InceptionV3), so one pass of the feature network serves every metric and every
rejection rate. The arithmetic is done by maintained libraries, not here: torchmetrics for FID
(Heusel et al. 2017), KID (Binkowski et al. 2018) and IS (Salimans et al. 2016), ``prdc`` for
improved precision and recall (Kynkaanniemi et al. 2019) with density and coverage (Naeem et al.
2020). Where a library draws random subsets it uses the global torch generator, so those calls run
inside ``torch.random.fork_rng`` with an explicit seed: same seed, same number, and the caller's
random state is left untouched.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn


def squared_error_01(reconstruction: Tensor, images: Tensor) -> Tensor:
    """Per-image sum of squared errors on the [0, 1] scale.

    Args:
        reconstruction: (B, C, H, W) float in about [-1, 1]; clamped to [-1, 1] first.
        images: (B, C, H, W) float in [-1, 1].

    Returns:
        (B,) float64 sums over C, H, W.
    """
    difference = (reconstruction.clamp(-1, 1) - images) / 2  # [-1, 1] -> [0, 1] scale
    return difference.double().pow(2).flatten(1).sum(1)


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on a [0, peak] scale."""
    return math.inf if mse <= 0 else 10.0 * math.log10(peak**2 / mse)


def code_histogram(codes: Tensor, codebook_size: int) -> Tensor:
    """Counts of each code: codes int64 any shape in [0, K) -> (K,) int64."""
    return torch.bincount(codes.flatten(), minlength=codebook_size)


def codebook_usage(histogram: Tensor) -> float:
    """Fraction of the K codes used at least once, from a (K,) histogram."""
    return float((histogram > 0).float().mean())


def codebook_perplexity(histogram: Tensor) -> float:
    """exp(entropy) of the code distribution: K when uniform, 1 when collapsed to one code."""
    total = histogram.sum()
    if total == 0:
        return 0.0
    probabilities = histogram.double() / total
    entropy = -(probabilities * probabilities.clamp_min(1e-30).log()).sum()
    return float(entropy.exp())


# ----------------------------------------------------------------------------------------------
# Sample quality (Section 5.2-5.3): FID, KID, IS, precision/recall, classification accuracy


class _Precomputed(nn.Module):
    """Identity "feature extractor" handed to torchmetrics when the features are already computed.

    ``num_features`` tells torchmetrics the width without a dummy forward pass.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:  # (B, F) -> (B, F)
        return features


def _check_features(name: str, features: Tensor, minimum: int) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name} must be (N, F) features, got shape {tuple(features.shape)}")
    if len(features) < minimum:
        raise ValueError(f"{name}: {len(features)} rows are too few, this metric needs {minimum}")


def _check_pair(real: Tensor, fake: Tensor, minimum: int) -> None:
    _check_features("real features", real, minimum)
    _check_features("sample features", fake, minimum)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature widths differ: real {real.shape[1]}, samples {fake.shape[1]}")


def frechet_distance(real_features: Tensor, fake_features: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID when the features are
    InceptionV3 pool features; FID* in the paper when "real" are reconstructions).

    Args:
        real_features: (N, F) float, N >= 2.
        fake_features: (M, F) float, M >= 2.

    Returns:
        ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) >= 0 (float64 arithmetic).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_pair(real_features, fake_features, 2)
    metric = FrechetInceptionDistance(feature=_Precomputed(real_features.shape[1]))
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return max(float(metric.compute()), 0.0)  # rounding can leave -1e-13 for identical sets


def kernel_distance(
    real_features: Tensor,
    fake_features: Tensor,
    subsets: int,
    subset_size: int,
    seed: int,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel, averaged over
    random subsets.

    Args:
        real_features: (N, F) float.
        fake_features: (M, F) float; N and M must be >= ``subset_size``.
        subsets: number of random subsets.
        subset_size: rows per subset.
        seed: seeds the subset draws.

    Returns:
        (mean, standard deviation) over the subsets.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_pair(real_features, fake_features, subset_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features"
        metric = KernelInceptionDistance(
            feature=_Precomputed(real_features.shape[1]), subsets=subsets, subset_size=subset_size
        )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: Tensor, splits: int, seed: int) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of class logits, over ``splits`` random splits.

    1 when every image gets the same prediction; the number of classes when each image is
    classified with certainty and the classes are equally frequent.

    Args:
        logits: (N, K) float unnormalised class scores, N >= ``splits``.
        splits: number of splits the mean and standard deviation are taken over.
        seed: seeds the shuffle before splitting.

    Returns:
        (mean, standard deviation) over the splits (the deviation is NaN for one split).
    """
    from torchmetrics.image.inception import InceptionScore

    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    _check_features("logits", logits, splits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the deviation of one split
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class PrecisionRecall(NamedTuple):
    precision: float  # share of samples inside the real manifold (quality)
    recall: float  # share of real images inside the sample manifold (coverage of the data)
    density: float  # Naeem et al. 2020: like precision, counting overlapping real neighbourhoods
    coverage: float  # Naeem et al. 2020: share of real neighbourhoods holding a sample


def precision_recall(
    real_features: Tensor, fake_features: Tensor, nearest_k: int
) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019), plus density and coverage.

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour in the same set; precision is the share of samples inside the real manifold,
    recall the share of real points inside the sample manifold.

    Args:
        real_features: (N, F) float, N > ``nearest_k``.
        fake_features: (M, F) float, M > ``nearest_k``.
        nearest_k: k (3 in Kynkaanniemi et al. and the paper's Fig. 7b).
    """
    from prdc import compute_prdc

    if nearest_k < 1:
        raise ValueError(f"nearest_k must be >= 1, got {nearest_k}")
    _check_pair(real_features, fake_features, nearest_k + 1)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        values = compute_prdc(
            real_features.float().numpy(), fake_features.float().numpy(), nearest_k
        )
    return PrecisionRecall(**{name: float(values[name]) for name in PrecisionRecall._fields})


def top_k_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Share of rows whose label is among the k highest logits.

    Args:
        logits: (N, K) float.
        labels: (N,) int64 in [0, K).
        k: 1 <= k <= K.
    """
    from torchmetrics.functional.classification import multiclass_accuracy

    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    if len(logits) == 0:
        raise ValueError("top_k_accuracy needs at least one row")
    return float(
        multiclass_accuracy(logits, labels, num_classes=logits.shape[1], top_k=k, average="micro")
    )
