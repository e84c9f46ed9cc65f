"""Sampling from a trained run (Razavi et al. 2019, Algorithm 2, lines 10-13), with or without
classifier-based rejection (Section 3.3): load the run's models on a device, lay out the
requested classes, draw in batches with one seeded generator, and write grids and files.

The sampling itself is ``vqvae2.sampling`` (pure); this module adds the run folder and files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .config import RuntimeConfig
from .data import float_to_uint8
from .distributed import runtime_device
from .measure import class_agreement
from .report import make_grid, save_png
from .run import Run

if TYPE_CHECKING:
    from .export import PretrainedModels

    Models = Run | PretrainedModels  # a run folder, or a run's exported models
from .sampling import Controls, SamplerName, generate, generate_with_rejection, requested_labels

SAMPLE_BATCH_SIZE = 64


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) uint8
    codes: list[torch.Tensor]  # per level, top first, (N, h, w) int64
    labels: torch.Tensor | None  # (N,) int64 requested classes, or None (unconditional)


def sample_from_run(
    run: Models,
    count: int,
    classes: list[int] | None = None,
    temperature: Controls = 1.0,
    seed: int = 0,
    batch_size: int = SAMPLE_BATCH_SIZE,
    progress: bool = True,
    sampler: SamplerName = "cached",
    runtime: RuntimeConfig | None = None,
) -> SampleResult:
    """Draw ``count`` images from a trained run (or its exported models, ``load_pretrained``).

    With class-conditional priors, ``classes`` are spread over the samples in blocks, in the
    order given: each gets ``count // len(classes)`` samples and the first
    ``count % len(classes)`` one more (``requested_labels``); without ``classes``, all classes. Randomness comes from one generator seeded with ``seed`` on
    ``runtime.device`` (where the models run; default the CPU), so the same seed draws other
    images on another device.
    The results are on the CPU.
    """
    if count < 1:
        raise ValueError(f"the number of samples must be >= 1, got {count}")
    device = runtime_device(runtime)
    vqvae, priors = run.load_hierarchy(device)
    num_classes = priors[0].config.num_classes
    labels = None
    if num_classes > 0:
        labels = requested_labels(classes, count, num_classes)
    elif classes:
        raise ValueError("the priors of this run are not class-conditional; drop --class")
    generator = torch.Generator(device=device).manual_seed(seed)
    images, codes = [], []
    starts = range(0, count, batch_size)
    for start in tqdm(starts, desc="sample", disable=not progress):
        size = min(batch_size, count - start)
        batch_labels = None if labels is None else labels[start : start + size]
        batch_images, batch_codes = generate(
            vqvae, priors, size, batch_labels, temperature, generator, sampler
        )
        images.append(float_to_uint8(batch_images.cpu()))
        codes.append([level_codes.cpu() for level_codes in batch_codes])
    all_codes = [torch.cat([batch[level] for batch in codes]) for level in range(len(priors))]
    return SampleResult(images=torch.cat(images), codes=all_codes, labels=labels)


MAX_CANDIDATES_PER_SAMPLE = 100  # default cap of threshold rejection sampling


@dataclass
class RejectionSampleResult:
    images: Tensor  # (N, C, H, W) uint8, the kept samples
    labels: Tensor  # (N,) int64 requested classes, in blocks as asked
    scores: Tensor  # (N,) float classifier probability of the requested class
    candidates: int  # samples drawn in all


def sample_with_rejection(
    run: Models,
    count: int,
    classes: list[int] | None = None,
    *,
    reject_fraction: float | None = None,
    accept_threshold: float | None = None,
    temperature: Controls = 1.0,
    seed: int = 0,
    batch_size: int = SAMPLE_BATCH_SIZE,
    max_candidates: int | None = None,
    progress: bool = True,
    sampler: SamplerName = "cached",
    runtime: RuntimeConfig | None = None,
) -> RejectionSampleResult:
    """Draw ``count`` class-conditional images from a run, filtered by the run's classifier.

    Labels are laid out as by ``sample_from_run`` (equal blocks of ``classes``, all classes when
    none are given). Give exactly one of ``reject_fraction`` (drop the worst-scored share of each
    class's candidates) and ``accept_threshold`` (keep candidates whose requested-class
    probability reaches it). ``max_candidates`` caps the samples drawn (default: 100 per image
    asked for); threshold sampling that cannot fill its quota within it raises ``ValueError``.
    Only the candidates that can still be kept are held: ``count`` images plus one batch.
    The models and the generator run on ``runtime.device`` (default the CPU); the results are
    on the CPU.
    """
    if count < 1:
        raise ValueError(f"the number of samples must be >= 1, got {count}")
    device = runtime_device(runtime)
    vqvae, priors = run.load_hierarchy(device)
    num_classes = priors[0].config.num_classes
    if num_classes == 0:
        raise ValueError("rejection sampling needs class-conditional priors; this run has none")
    classifier = run.load_classifier(device)
    labels = requested_labels(classes, count, num_classes)
    limit = max_candidates if max_candidates is not None else MAX_CANDIDATES_PER_SAMPLE * count
    generator = torch.Generator(device=device).manual_seed(seed)
    with tqdm(total=None, desc="sample with rejection", disable=not progress, unit="img") as bar:
        output = generate_with_rejection(
            vqvae,
            priors,
            classifier,
            labels,
            reject_fraction=reject_fraction,
            accept_threshold=accept_threshold,
            max_candidates=limit,
            batch_size=batch_size,
            temperature=temperature,
            generator=generator,
            sampler=sampler,
            on_batch=bar.update,
        )
    return RejectionSampleResult(
        images=float_to_uint8(output.images),
        labels=output.labels,
        scores=output.scores,
        candidates=output.candidates,
    )


def write_samples(
    images: Tensor, grid_path: str | Path, columns: int, image_dir: str | Path | None = None
) -> None:
    """Write uint8 samples (N, C, H, W) as one grid of ``columns`` images a row and, with
    ``image_dir``, each as ``sample-00000.png`` ... in that folder."""
    save_png(make_grid(images, columns=max(1, columns)), grid_path)
    if image_dir is not None:
        for index, image in enumerate(images):
            save_png(image, Path(image_dir) / f"sample-{index:05d}.png")


def grid_columns(count: int, classes: list[int] | None) -> int:
    """Columns of a sample grid: one row per requested class, else a square-ish grid."""
    return count // len(classes) if classes else math.ceil(math.sqrt(count))


def write_codes(result: SampleResult, path: str | Path) -> None:
    """The codes of ``result`` as an .npz: ``codes_0`` (top) .. ``codes_L-1`` (N, h, w) int64,
    and ``labels`` (N,) when the samples were class-conditional."""
    arrays = {f"codes_{i}": codes.numpy() for i, codes in enumerate(result.codes)}
    if result.labels is not None:
        arrays["labels"] = result.labels.numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def write_scores(result: RejectionSampleResult, path: str | Path) -> None:
    """The requested classes (N,) and the classifier's probability of each (N,) as an .npz."""
    np.savez(path, labels=result.labels.numpy(), scores=result.scores.numpy())


def class_agreement_of(run: Models, result: SampleResult) -> float | None:
    """The share of class-conditional samples that the run's classifier assigns to the class
    they were drawn for; None without labels or without a classifier."""
    if result.labels is None or not run.has_classifier():
        return None
    return class_agreement(run.load_classifier(), result.images, result.labels)


def sample_summary(
    run: Models, result: SampleResult, grid: str | Path, settings: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """What ``vqvae2 sample`` prints: a record (the count, the grid, the draw's ``settings``,
    the run classifier's agreement with the requested classes when it has one) and its text."""
    record: dict[str, Any] = {"samples": len(result.images), "grid": str(grid), **settings}
    text = f"{len(result.images)} samples: {grid}"
    agreement = class_agreement_of(run, result)
    if agreement is not None:
        record["class_agreement"] = agreement
        text += f"\nthe run's classifier assigns the requested class to {agreement:.1%} of them"
    return record, text


def rejection_summary(
    result: RejectionSampleResult, grid: str | Path, settings: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """What ``vqvae2 sample --reject-fraction/--accept-threshold`` prints: a record (counts,
    the classifier's scores of the kept samples, the draw's ``settings``) and its text."""
    kept = len(result.images)
    record = {
        "samples": kept,
        "candidates": result.candidates,
        "accepted_fraction": kept / result.candidates,
        "mean_score": float(result.scores.mean()),
        "min_score": float(result.scores.min()),
        "grid": str(grid),
        **settings,
    }
    text = (
        f"{kept} samples kept of {result.candidates} drawn: {grid}\n"
        f"the run's classifier gives their requested class a mean probability of "
        f"{record['mean_score']:.3f} (lowest {record['min_score']:.3f})"
    )
    return record, text
