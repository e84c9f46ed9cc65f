"""One pass over a data split with trained models: the measurements that training, sampling and
the evaluation share.

- stage 1: reconstruction MSE/PSNR and per-level code usage and perplexity;
- priors: negative log-likelihood of a split's codes in nats per code (paper Table 1);
- classifiers: accuracy, class agreement of samples, features and logits for the metrics;
- the whole hierarchy at once: encode a split, its MSE and every prior's NLL of its codes.

Every function runs its models in eval mode without gradients and gives each model back the
mode it found; models run on their own device and results come back to the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ._helpers import evaluating
from .classifier import Classifier
from .data import eval_loader, float_to_uint8, uint8_to_float
from .metrics import (
    code_histogram,
    codebook_perplexity,
    codebook_usage,
    psnr_from_mse,
    squared_error_01,
)
from .pixelsnail import PixelSNAIL
from .report import make_grid
from .vqvae import VQVAE2

EVAL_BATCH_SIZE = 256  # images or code maps per call when measuring a split


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def measure_reconstruction(
    model: VQVAE2, dataset: Dataset, max_batches: int | None = None, num_workers: int = 0
) -> dict[str, Any]:
    """Reconstruction error and codebook usage of ``model`` over a dataset split.

    Returns:
        ``mse`` and ``psnr`` on [0, 1] pixels (reconstructions clamped to the image range), and
        per level (``usage_top`` ...) the fraction of codes in use over the split and the code
        perplexity (``perplexity_top`` ...).
    """
    config = model.config
    device = _device(model)
    histograms = [torch.zeros(config.codebook_size, dtype=torch.long) for _ in config.level_names]
    squared_error, values = 0.0, 0
    with evaluating(model):
        for batch, (images, _) in enumerate(eval_loader(dataset, EVAL_BATCH_SIZE, num_workers)):
            if max_batches is not None and batch >= max_batches:
                break
            images = uint8_to_float(images.to(device))
            output = model(images)
            squared_error += float(squared_error_01(output.reconstruction, images).sum())
            values += images.numel()
            for histogram, codes in zip(histograms, output.codes, strict=True):
                histogram += code_histogram(codes.cpu(), config.codebook_size)
    mse = squared_error / max(values, 1)
    result: dict[str, Any] = {"mse": mse, "psnr": psnr_from_mse(mse)}
    for name, histogram in zip(config.level_names, histograms, strict=True):
        result[f"usage_{name}"] = codebook_usage(histogram)
        result[f"perplexity_{name}"] = codebook_perplexity(histogram)
    return result


def prior_inputs(
    prior: PixelSNAIL, level_codes: list[Tensor], labels: Tensor, level: int
) -> tuple[Tensor, Tensor | None, list[Tensor] | None]:
    """(codes, labels, upper codes) for the prior of ``level`` from a batch of every level's
    codes (each (B, h_l, w_l) int64, top first) and labels (B,)."""
    config = prior.config
    return (
        level_codes[level],
        labels if config.num_classes > 0 else None,
        level_codes[:level] if config.condition_sizes else None,
    )


@torch.no_grad()
def measure_nll(
    prior: PixelSNAIL, codes: Dataset, level: int, max_batches: int | None = None
) -> float:
    """Mean negative log-likelihood of a code store's codes of ``level``, in nats per code.

    Args:
        codes: a ``CodeDataset`` (or a subset of one): items are (codes per level, label).
        level: index of the prior's level, top = 0.
    """
    device = _device(prior)
    total, count = 0.0, 0
    with evaluating(prior):
        for batch, (level_codes, labels) in enumerate(eval_loader(codes, EVAL_BATCH_SIZE)):
            if max_batches is not None and batch >= max_batches:
                break
            level_codes = [codes_of_level.to(device) for codes_of_level in level_codes]
            output = prior(*prior_inputs(prior, level_codes, labels.to(device), level))
            total += float(output.loss) * level_codes[level].numel()
            count += level_codes[level].numel()
    return total / max(count, 1)


@torch.no_grad()
def measure_accuracy(classifier: Classifier, dataset: Dataset, num_workers: int = 0) -> float:
    """Top-1 accuracy of ``classifier`` on a dataset of (image, label) pairs."""
    correct, total = 0, 0
    device = _device(classifier)
    with evaluating(classifier):
        for images, labels in eval_loader(dataset, EVAL_BATCH_SIZE, num_workers):
            predictions = classifier(uint8_to_float(images.to(device))).logits.argmax(-1).cpu()
            correct += int((predictions == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


@torch.no_grad()
def extract_features(
    network: nn.Module,
    images: Tensor,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = False,
    description: str = "features",
) -> tuple[Tensor, Tensor]:
    """Features and class logits of uint8 images from a feature network.

    Args:
        network: a ``Classifier`` or ``InceptionV3``: (B, C, H, W) [-1, 1] -> ``.features``
            (B, F) and ``.logits`` (B, K).
        images: (N, C, H, W) uint8.

    Returns:
        features (N, F) float32 and logits (N, K) float32, on the CPU.
    """
    device = _device(network)
    features, logits = [], []
    starts = range(0, len(images), batch_size)
    with evaluating(network):
        for start in tqdm(starts, desc=description, disable=not progress, leave=False):
            output = network(uint8_to_float(images[start : start + batch_size].to(device)))
            features.append(output.features.float().cpu())
            logits.append(output.logits.float().cpu())
    return torch.cat(features), torch.cat(logits)


def class_logits(
    classifier: Classifier, images: Tensor, batch_size: int = EVAL_BATCH_SIZE
) -> Tensor:
    """(N, C, H, W) uint8 images -> (N, K) float32 logits of ``classifier``, on the CPU."""
    return extract_features(classifier, images, batch_size)[1]


def class_agreement(classifier: Classifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of uint8 images (N, C, H, W) that ``classifier`` assigns to their (N,) labels."""
    predictions = class_logits(classifier, images).argmax(-1)
    return float((predictions == labels.cpu()).float().mean())


@dataclass
class SplitMeasure:
    """Reconstruction error and prior likelihood over one data split."""

    mse: float  # mean squared error on [0, 1] pixels
    nll_nats: dict[str, float]  # level name -> mean NLL in nats per code
    images: Tensor | None  # (N, C, H, W) uint8 originals, when kept
    reconstructions: Tensor | None  # (N, C, H, W) uint8, when kept
    labels: Tensor  # (N,) int64


@torch.no_grad()
def measure_split(
    vqvae: VQVAE2,
    priors: list[PixelSNAIL],
    dataset: Dataset,
    batch_size: int = EVAL_BATCH_SIZE,
    keep_images: bool = False,
    progress: bool = False,
    description: str = "measure",
) -> SplitMeasure:
    """Encode a split with the VQ-VAE; its reconstruction MSE and each prior's NLL of its codes.

    The codes are those ``extract-codes`` stores (the encoder is deterministic), so the NLL equals
    what ``train-prior`` reports on the same images. The models run on the VQ-VAE's device.
    """
    device = _device(vqvae)
    names = vqvae.config.level_names
    squared, values, maps = 0.0, 0, 0
    nats = dict.fromkeys(names, 0.0)
    images_kept, reconstructions_kept, labels_seen = [], [], []
    batches = eval_loader(dataset, batch_size)
    with evaluating(vqvae, *priors):
        for images, labels in tqdm(batches, desc=description, disable=not progress, leave=False):
            images_on_device = uint8_to_float(images.to(device))
            codes = vqvae.encode(images_on_device)  # per level (B, h, w)
            reconstruction = vqvae.decode_codes(codes)  # (B, C, H, W)
            squared += float(squared_error_01(reconstruction, images_on_device).sum())
            values += images.numel()
            for level, (name, prior) in enumerate(zip(names, priors, strict=True)):
                output = prior(*prior_inputs(prior, codes, labels.to(device), level))
                nats[name] += float(output.loss) * codes[level].numel()
            maps += len(labels)
            labels_seen.append(labels)
            if keep_images:
                images_kept.append(images)
                reconstructions_kept.append(float_to_uint8(reconstruction.cpu()))
    per_level = {
        name: nats[name] / (maps * vqvae.config.latent_sizes[i] ** 2)
        for i, name in enumerate(names)
    }
    return SplitMeasure(
        mse=squared / max(values, 1),
        nll_nats=per_level,
        images=torch.cat(images_kept) if keep_images else None,
        reconstructions=torch.cat(reconstructions_kept) if keep_images else None,
        labels=torch.cat(labels_seen),
    )


# ----------------------------------------------------------------------------------------------
# What each level carries (Section 3.1, Fig. 3)


def low_pass(images: Tensor, side: int) -> Tensor:
    """(B, C, H, W) -> the same images keeping only what a side x side grid holds: averaged
    over side x side cells, then brought back to H x W bilinearly."""
    coarse = torch.nn.functional.adaptive_avg_pool2d(images, side)  # (B, C, side, side)
    return torch.nn.functional.interpolate(
        coarse, size=images.shape[-2:], mode="bilinear", align_corners=False
    )


def _squared_01(a: Tensor, b: Tensor) -> float:
    """Summed squared difference on the [0, 1] pixel scale of two [-1, 1] tensors (a clamped)."""
    return float(squared_error_01(a, b).sum())


@torch.no_grad()
def measure_levels(
    model: VQVAE2,
    dataset: Dataset,
    batch_size: int = EVAL_BATCH_SIZE,
    usage: dict[str, Any] | None = None,
) -> dict:
    """What each level of the hierarchy carries over a split (the question of Fig. 3).

    ``usage`` is ``measure_reconstruction``'s result on the same split, when already at hand.

    Returns:
        ``levels``: per level name, the code ``perplexity`` and its ``bits`` (log2), and how
        much the reconstruction changes when that level's codes are swapped with another
        image's (``swap_mse`` on [0, 1] pixels) and the share of that change's energy that
        the top map's resolution holds (``swap_coarse_share``: near 1 for global content,
        small for local detail). ``prefixes``: for the top level alone, the top two, ... the
        decode's ``psnr_vs_low_pass`` (the image low-passed to the last kept level's map size)
        and ``psnr_vs_mean_image`` (the split's mean image), in dB.
    """
    config = model.config
    device = _device(model)
    names, sides = config.level_names, config.latent_sizes
    usage = usage or measure_reconstruction(model, dataset)
    with evaluating(model):
        mean_image = _mean_image(dataset, batch_size, device)  # (C, H, W)
        swap = {name: [0.0, 0.0, 0.0] for name in names}  # change, its coarse part, values
        prefix = {k: [0.0, 0.0, 0] for k in range(1, config.num_levels)}  # vs low pass, vs mean
        for images, _ in eval_loader(dataset, batch_size):
            images = uint8_to_float(images.to(device))
            codes = model.encode(images)
            full = model.decode_codes(codes)
            for level, name in enumerate(names):
                partner = [c.roll(1, dims=0) if i == level else c for i, c in enumerate(codes)]
                change = (model.decode_codes(partner).clamp(-1, 1) - full.clamp(-1, 1)) / 2
                swap[name][0] += float(change.pow(2).sum())
                swap[name][1] += float(low_pass(change, sides[0]).pow(2).sum())
                swap[name][2] += change.numel()
            for kept in prefix:
                partial = model.decode_codes(codes, keep_levels=range(kept))
                prefix[kept][0] += _squared_01(partial, low_pass(images, sides[kept - 1]))
                prefix[kept][1] += _squared_01(partial, mean_image.expand_as(images))
                prefix[kept][2] += images.numel()
    levels = {
        name: {
            "perplexity": usage[f"perplexity_{name}"],
            "bits": math.log2(usage[f"perplexity_{name}"]),
            "swap_mse": swap[name][0] / swap[name][2],
            "swap_coarse_share": swap[name][1] / max(swap[name][0], 1e-12),
        }
        for name in names
    }
    prefixes = {
        "+".join(names[:kept]): {
            "psnr_vs_low_pass": psnr_from_mse(low / count),
            "psnr_vs_mean_image": psnr_from_mse(mean / count),
            "low_pass_side": sides[kept - 1],
        }
        for kept, (low, mean, count) in prefix.items()
    }
    return {"levels": levels, "prefixes": prefixes, "mse": usage["mse"], "psnr": usage["psnr"]}


def _mean_image(dataset: Dataset, batch_size: int, device: torch.device) -> Tensor:
    """The mean image of a split, (C, H, W) float in [-1, 1]."""
    total, count = None, 0
    for images, _ in eval_loader(dataset, batch_size):
        summed = uint8_to_float(images.to(device)).sum(0)
        total = summed if total is None else total + summed
        count += len(images)
    return total / count


@torch.no_grad()
def reconstruction_grid(model: VQVAE2, images: Tensor) -> Tensor:
    """Rows: originals, full reconstructions, then decodes from the top level alone, top two, ...

    Args:
        images: (N, C, H, W) uint8.

    Returns:
        uint8 (C, H', W') grid with N columns (the per-level rows show what each level adds,
        like the paper's Fig. 3).
    """
    with evaluating(model):
        images = uint8_to_float(images.to(next(model.parameters()).device))
        codes = model.encode(images)
        rows = [images, model.decode_codes(codes)]
        for kept in range(1, model.config.num_levels):
            rows.append(model.decode_codes(codes, keep_levels=range(kept)))
    stacked = float_to_uint8(torch.cat(rows).cpu())  # (rows * N, C, H, W)
    return make_grid(stacked, columns=len(images))
