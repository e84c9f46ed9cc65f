"""Measurements for VQ-VAE-2: reconstruction error, codebook usage and perplexity.

Pure functions on tensors; no I/O. Pixel errors are reported on the [0, 1] scale (the scale of the
issue's targets and of most papers), while models work on [-1, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
