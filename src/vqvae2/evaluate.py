"""Evaluation of a trained run: the paper's Tables 1-2 and Fig. 7 (Razavi et al. 2019, Section 5),
and classifier-based rejection sampling from a run (Section 3.3).

``evaluate_run`` measures, in one call:

- Table 1: train and validation NLL of every prior (nats and bits per code) and the VQ-VAE's
  train / validation / test MSE;
- Table 2: the Classification Accuracy Score (Ravuri & Vinyals 2019): a classifier trained only
  on samples, tested on the real test set and on VQ-VAE reconstructions of it, beside the run's
  classifier trained on real data;
- Fig. 7: FID (samples vs the real test set), FID* (samples vs reconstructions of the test set),
  KID, Inception Score and precision/recall (k = 3) without rejection and at each rejection rate.

Sampling scheme: one pool of class-conditional samples is drawn once and every image in it is
scored by the run's classifier (the probability of the requested class). Rejection rate F keeps
the best-scored ceil((1 - F) n_c) of the n_c pool samples of each class c; the metric set at F is
a random subset of those with the same size and class balance at every F (the test set's), so the
metrics at different rates compare equal-sized sets. The pool is large enough for the highest
rate, and its first samples of each class (no rejection) also train the CAS classifier.

Feature networks: by default a second classifier of the run's recipe, trained with another seed
(penultimate-layer features for FID, KID and precision/recall; its class logits for IS), so that
the network that computes the metrics is not the one that chose the samples. Those numbers rank
models of this project but are **not comparable with published FID/IS values**, which use
InceptionV3. Given the standard FID weights file, ``vqvae2.inception`` provides InceptionV3
instead; any other classifier checkpoint can be named too.

This module does I/O (checkpoints, the report files); the metric arithmetic is in
``vqvae2.metrics`` and the rejection rules in ``vqvae2.sampling``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from .checkpoint import load_classifier, load_run_config, read_checkpoint
from .classifier import Classifier
from .config import (
    ClassifierRunConfig,
    EvaluateConfig,
    RuntimeConfig,
    VQVAERunConfig,
    config_from_dict,
)
from .data import float_to_uint8, make_grid, open_dataset, save_png, uint8_to_float
from .distributed import DistributedContext, runtime_context
from .inception import load_inception
from .metrics import (
    frechet_distance,
    inception_score,
    kernel_distance,
    precision_recall,
    squared_error_01,
    top_k_accuracy,
)
from .pixelsnail import PixelSNAIL
from .sampling import (
    SamplerName,
    generate,
    generate_with_rejection,
    reject_fraction_per_class,
    requested_labels,
)
from .train import (
    CLASSIFIER_KIND,
    SEED_STRIDE,
    eval_loader,
    load_hierarchy,
    train_classifier,
)
from .vqvae import VQVAE2

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
FID_PLOT = "fid-vs-inception-score.png"
PRECISION_RECALL_PLOT = "precision-vs-recall.png"
TOP_K = 5  # Table 2 reports top-1 and top-5 accuracy
GRID_COLUMNS = 10  # samples per class in the report's sample grids
MAX_CANDIDATES_PER_SAMPLE = 100  # default cap of threshold rejection sampling


# ----------------------------------------------------------------------------------------------
# Rejection sampling from a run (Section 3.3)


@dataclass
class RejectionSampleResult:
    images: Tensor  # (N, C, H, W) uint8, the kept samples
    labels: Tensor  # (N,) int64 requested classes, in blocks as asked
    scores: Tensor  # (N,) float classifier probability of the requested class
    candidates: int  # samples drawn in all


def sample_with_rejection(
    run_dir: str | Path,
    count: int,
    classes: list[int] | None = None,
    *,
    reject_fraction: float | None = None,
    accept_threshold: float | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    max_candidates: int | None = None,
    progress: bool = True,
    sampler: SamplerName = "cached",
    device: str | torch.device = "cpu",
) -> RejectionSampleResult:
    """Draw ``count`` class-conditional images from a run, filtered by the run's classifier.

    Labels are laid out as by ``sample_from_run`` (equal blocks of ``classes``, all classes when
    none are given). Give exactly one of ``reject_fraction`` (drop the worst-scored share of each
    class's candidates) and ``accept_threshold`` (keep candidates whose requested-class
    probability reaches it). ``max_candidates`` caps the samples drawn (default: 100 per image
    asked for); threshold sampling that cannot fill its quota within it raises ``ValueError``.
    The models and the generator run on ``device``; the results are on the CPU.
    """
    if count < 1:
        raise ValueError(f"the number of samples must be >= 1, got {count}")
    run_dir = Path(run_dir)
    vqvae, priors = load_hierarchy(run_dir, device)
    num_classes = priors[0].config.num_classes
    if num_classes == 0:
        raise ValueError("rejection sampling needs class-conditional priors; this run has none")
    classifier = load_classifier(run_dir, map_location=device)
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


# ----------------------------------------------------------------------------------------------
# Building blocks of the evaluation


@torch.no_grad()
def extract_features(
    network: nn.Module,
    images: Tensor,
    batch_size: int,
    progress: bool = False,
    description: str = "features",
) -> tuple[Tensor, Tensor]:
    """Features and class logits of uint8 images from a feature network in eval mode.

    Args:
        network: a ``Classifier`` or ``InceptionV3``: (B, C, H, W) [-1, 1] -> ``.features``
            (B, F) and ``.logits`` (B, K).
        images: (N, C, H, W) uint8.

    Returns:
        features (N, F) float32 and logits (N, K) float32, on the CPU (the network runs on its
        own device).
    """
    network.eval()
    device = next(network.parameters()).device
    features, logits = [], []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        output = network(uint8_to_float(images[start : start + batch_size].to(device)))
        features.append(output.features.float().cpu())
        logits.append(output.logits.float().cpu())
    return torch.cat(features), torch.cat(logits)


@torch.no_grad()
def class_logits(classifier: Classifier, images: Tensor, batch_size: int) -> Tensor:
    """(N, C, H, W) uint8 images -> (N, K) float32 logits of ``classifier`` (eval mode), on
    the CPU."""
    return extract_features(classifier, images, batch_size)[1]


def accuracy_pair(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (Table 2's columns) of (N, K) logits for (N,) labels."""
    return {
        "top1": top_k_accuracy(logits, labels, 1),
        f"top{TOP_K}": top_k_accuracy(logits, labels, min(TOP_K, logits.shape[1])),
    }


def classification_accuracy_score(
    train_images: Tensor,
    train_labels: Tensor,
    test_sets: dict[str, tuple[Tensor, Tensor]],
    config: ClassifierRunConfig,
    *,
    progress: bool = True,
    batch_size: int = 256,
    runtime: RuntimeConfig | None = None,
) -> dict[str, dict[str, float]]:
    """Classification Accuracy Score (Ravuri & Vinyals 2019): train a classifier only on
    ``train_images`` (samples) with the recipe of ``config``, test it on each of ``test_sets``.

    The classifier is trained by ``train_classifier`` itself (same augmentation, schedule and
    seed as a classifier trained on real data), so real images in place of samples give that
    classifier's accuracy exactly.

    Args:
        train_images: (N, C, H, W) uint8; N must be at least ``config.train.batch_size``.
        train_labels: (N,) int64 in [0, config.model.num_classes).
        test_sets: name -> ((M, C, H, W) uint8 images, (M,) int64 labels); at least one.
        config: the classifier run config (its ``model.num_classes`` is set from the labels).
        runtime: where and how the classifier trains (default: ``train_classifier``'s).

    Returns:
        name -> ``{"top1": ..., "top5": ...}`` accuracies in [0, 1].
    """
    if not test_sets:
        raise ValueError("classification_accuracy_score needs at least one test set")
    if len(train_images) < config.train.batch_size:
        raise ValueError(
            f"{len(train_images)} samples are too few to train the CAS classifier: it needs at "
            f"least one batch of {config.train.batch_size}"
        )

    def as_arrays(images: Tensor) -> np.ndarray:
        return images.permute(0, 2, 3, 1).numpy()  # (N, C, H, W) -> (N, H, W, C) as .npz wants

    first_images, first_labels = next(iter(test_sets.values()))
    with tempfile.TemporaryDirectory(prefix="vqvae2-cas-") as work:
        data = Path(work) / "cas-data.npz"
        np.savez(
            data,
            train_images=as_arrays(train_images),
            train_labels=train_labels.numpy(),
            val_images=as_arrays(first_images),
            val_labels=first_labels.numpy(),
            test_images=as_arrays(first_images),
            test_labels=first_labels.numpy(),
        )
        # Under torchrun the classifier trains data-parallel; every process gets the model.
        result = train_classifier(
            config, data, Path(work) / "classifier", progress=progress, runtime=runtime
        )
        classifier = result.model
    return {
        name: accuracy_pair(class_logits(classifier, images, batch_size), labels)
        for name, (images, labels) in test_sets.items()
    }


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
    batch_size: int,
    keep_images: bool = False,
    progress: bool = False,
    description: str = "measure",
) -> SplitMeasure:
    """Encode a split with the VQ-VAE; its reconstruction MSE and each prior's NLL of its codes.

    The codes are those ``extract-codes`` stores (the encoder is deterministic), so the NLL equals
    what ``train-prior`` reports on the same images. The models run on the VQ-VAE's device; kept
    images are on the CPU.
    """
    vqvae.eval()
    device = next(vqvae.parameters()).device
    for prior in priors:
        prior.eval()
    names = vqvae.config.level_names
    squared, values, codes_seen = 0.0, 0, 0
    nats = dict.fromkeys(names, 0.0)
    images_kept, reconstructions_kept, labels_seen = [], [], []
    batches = eval_loader(dataset, batch_size)
    for images, labels in tqdm(batches, desc=description, disable=not progress, leave=False):
        images_on_device = images.to(device)
        codes = vqvae.encode(images_on_device)  # per level (B, h, w)
        reconstruction = vqvae.decode_codes(codes)  # (B, C, H, W)
        squared += float(squared_error_01(reconstruction, images_on_device).sum())
        values += images.numel()
        for level, (name, prior) in enumerate(zip(names, priors, strict=True)):
            output = prior(
                codes[level],
                labels.to(device) if prior.config.num_classes > 0 else None,
                codes[:level] if prior.config.condition_sizes else None,
            )
            nats[name] += float(output.loss) * codes[level].numel()
        codes_seen += codes[0].shape[0]
        labels_seen.append(labels)
        if keep_images:
            images_kept.append(float_to_uint8(images))
            reconstructions_kept.append(float_to_uint8(reconstruction.cpu()))
    per_level = {
        name: nats[name] / (codes_seen * vqvae.config.latent_sizes[i] ** 2)
        for i, name in enumerate(names)
    }
    return SplitMeasure(
        mse=squared / max(values, 1),
        nll_nats=per_level,
        images=torch.cat(images_kept) if keep_images else None,
        reconstructions=torch.cat(reconstructions_kept) if keep_images else None,
        labels=torch.cat(labels_seen),
    )


def proportional_counts(histogram: list[int], total: int) -> list[int]:
    """Split ``total`` over classes in proportion to ``histogram`` (largest remainders)."""
    whole = sum(histogram)
    shares = [total * count / whole for count in histogram]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def pool_batches(count: int, batch_size: int, context: DistributedContext) -> list[int]:
    """Start rows of the pool batches this process draws: every ``world_size``-th batch."""
    return list(range(context.rank * batch_size, count, context.world_size * batch_size))


@torch.no_grad()
def draw_pool(
    vqvae: VQVAE2,
    priors: list[PixelSNAIL],
    labels: Tensor,
    batch_size: int,
    temperature: float,
    seed: int,
    progress: bool,
    context: DistributedContext | None = None,
) -> Tensor:
    """Samples for (N,) requested ``labels``, in batches -> (N, C, H, W) uint8.

    Under torchrun each process draws every ``world_size``-th batch with its own generator
    (seeded ``seed`` on rank 0, so one process reproduces the single-process pool) and the
    batches are gathered, in order, on every process.
    """
    context = context or DistributedContext()
    device = next(vqvae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed + SEED_STRIDE * context.rank)
    starts = pool_batches(len(labels), batch_size, context)
    drawn = {}
    with tqdm(
        total=len(labels), desc="sample", disable=not (progress and context.is_main), unit="img"
    ) as bar:
        for start in starts:
            chunk = labels[start : start + batch_size]
            batch, _ = generate(vqvae, priors, len(chunk), chunk, temperature, generator)
            drawn[start] = float_to_uint8(batch.cpu())
            bar.update(len(chunk) * context.world_size)
    if context.enabled:
        gathered: list[dict[int, Tensor] | None] = [None] * context.world_size
        dist.all_gather_object(gathered, drawn)
        drawn = {start: images for part in gathered for start, images in part.items()}
    return torch.cat([drawn[start] for start in sorted(drawn)])


def _sample_metrics(
    reference: dict[str, Tensor],
    features: Tensor,
    logits: Tensor,
    config: EvaluateConfig,
    kid_subset_size: int,
    with_star: bool = True,
) -> dict[str, float | None]:
    """FID (and FID* against reconstructions), KID, IS and precision/recall of one image set."""
    values: dict[str, float | None] = {
        "fid": frechet_distance(reference["test"], features),
    }
    if with_star:
        values["fid_star"] = frechet_distance(reference["reconstructions"], features)
    kid_mean, kid_std = kernel_distance(
        reference["test"], features, config.kid_subsets, kid_subset_size, config.seed
    )
    score, score_std = inception_score(logits, config.inception_score_splits, config.seed)
    values.update(
        kid=kid_mean,
        kid_std=kid_std,
        inception_score=score,
        inception_score_std=None if math.isnan(score_std) else score_std,
    )
    values.update(precision_recall(reference["test"], features, config.nearest_k)._asdict())
    return values


def _nll_row(train: float, val: float) -> dict[str, float]:
    bits = 1 / math.log(2)
    return {
        "train_nll_nats": train,
        "train_nll_bits": train * bits,
        "val_nll_nats": val,
        "val_nll_bits": val * bits,
        "gap_nats": val - train,
    }


FEATURE_CLASSIFIER_DIR = "feature-classifier"  # RUN_DIR/feature-classifier


def _independent_classifier(
    run_dir: Path,
    data_path: str | Path,
    scorer_config: ClassifierRunConfig,
    device: torch.device,
    progress: bool,
) -> tuple[Classifier, dict[str, Any]]:
    """The default feature network: a second classifier, the run's recipe with the next seed,
    so the network that measures the samples is not the one that rejected them. It is trained
    once into ``RUN_DIR/feature-classifier`` (under torchrun by every process, data-parallel)
    and reused by later evaluations."""
    folder = run_dir / FEATURE_CLASSIFIER_DIR
    source = {
        "network": "classifier (a second one, the run's recipe with seed "
        f"{scorer_config.train.seed + 1}; not the rejection scorer)",
        "path": str(folder),
    }
    if (folder / "latest").is_file():
        return load_classifier(folder, map_location=device), source
    config = replace(
        scorer_config, train=replace(scorer_config.train, seed=scorer_config.train.seed + 1)
    )
    result = train_classifier(
        config, data_path, folder, progress=progress, runtime=RuntimeConfig(device=str(device))
    )
    assert isinstance(result.model, Classifier)
    return result.model.eval(), {**source, "trained_by_this_evaluation": True}


# ----------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_run(
    run_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    config: EvaluateConfig | None = None,
    *,
    inception_weights: str | Path | None = None,
    feature_classifier: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run (VQ-VAE, every prior, classifier) and write the report.

    Under torchrun the processes split the sample pool and train the CAS classifier
    data-parallel; rank 0 writes the report.

    Args:
        run_dir: run folder with ``vqvae/``, ``prior-<level>/`` for every level and
            ``classifier/`` (the rejection scorer and the real-data row of Table 2).
        data_path: the image source the run was trained on (test split: the real images).
        out_dir: report folder: ``report.json``, ``report.md``, the two Fig. 7 plots and a
            sample grid per rejection rate.
        config: sample counts, rejection rates, metric settings and seed.
        inception_weights: the FID InceptionV3 weights file; features then come from it.
        feature_classifier: a classifier checkpoint folder to take features from (ignored with
            ``inception_weights``). Default: ``RUN_DIR/feature-classifier``, a second classifier
            of the run's recipe with another seed, trained here when missing, so that the
            network that measures the samples is not the one that rejected them.
        progress: progress bars on stderr.
        command: the command line, recorded in the report.
        device: where the networks run (default: this process's device, CUDA when available;
            the sample pool then depends on it, as a seed draws other codes on a GPU).

    Returns:
        The report (also written as ``report.json``).

    Raises:
        ValueError: a missing model, a weights file of another network, counts too small for a
            metric, data that does not fit the run.
    """
    config = config or EvaluateConfig()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    context = runtime_context()
    device = context.device if device is None else torch.device(device)
    progress = progress and context.is_main
    started = time.monotonic()
    timings: dict[str, float] = {}

    # Load and check everything first: bad input fails before the long parts.
    vqvae, priors = load_hierarchy(run_dir, device)
    vqvae_config = vqvae.config
    num_classes = priors[0].config.num_classes
    if num_classes == 0:
        raise ValueError("evaluate needs class-conditional priors (for CAS and rejection sampling)")
    classifier_checkpoint = read_checkpoint(run_dir, CLASSIFIER_KIND)
    scorer = load_classifier(run_dir, map_location=device)
    classifier_config = config_from_dict(ClassifierRunConfig, classifier_checkpoint.config)
    expected_shape = (vqvae_config.in_channels, vqvae_config.image_size)
    if (scorer.config.in_channels, scorer.config.image_size) != expected_shape:
        raise ValueError(
            f"the run's classifier takes {scorer.config.image_size}px images with "
            f"{scorer.config.in_channels} channel(s), the VQ-VAE makes {vqvae_config.image_size}px "
            f"with {vqvae_config.in_channels}"
        )
    if scorer.config.num_classes != num_classes:
        raise ValueError(
            f"the run's classifier knows {scorer.config.num_classes} classes, the priors "
            f"{num_classes}"
        )
    if inception_weights is not None:
        network: nn.Module = load_inception(inception_weights).to(device)
        feature_source = {"network": "InceptionV3 (FID weights)", "path": str(inception_weights)}
    elif feature_classifier is not None:
        network = load_classifier(feature_classifier, map_location=device)
        if (network.config.in_channels, network.config.image_size) != expected_shape:
            raise ValueError(
                f"the classifier in {feature_classifier} takes other images than the run"
            )
        feature_source = {"network": "classifier", "path": str(feature_classifier)}
    else:
        network, feature_source = _independent_classifier(
            run_dir, data_path, classifier_config, device, progress
        )
    data_config = load_run_config(run_dir, "vqvae", VQVAERunConfig).data
    splits = {
        split: open_dataset(
            data_path, split, vqvae_config.image_size, vqvae_config.in_channels, data_config
        )
        for split in ("train", "val", "test")
    }
    for split, dataset in splits.items():
        if int(dataset.labels.max()) >= num_classes:
            raise ValueError(
                f"the {split} split of {data_path} has labels up to {int(dataset.labels.max())}, "
                f"the priors know {num_classes} classes"
            )
    fractions = config.fractions
    histogram = {
        split: torch.bincount(splits[split].labels, minlength=num_classes).tolist()
        for split in ("train", "test")
    }
    cas_total = config.cas_samples or len(splits["train"])
    if cas_total < classifier_config.train.batch_size:
        raise ValueError(
            f"{cas_total} CAS samples are too few: the classifier trains on batches of "
            f"{classifier_config.train.batch_size}"
        )
    test_size = len(splits["test"])
    kid_subset_size = min(config.kid_subset_size, config.num_samples, test_size)
    if test_size <= config.nearest_k:
        raise ValueError(
            f"the test split has {test_size} images, too few for precision/recall with "
            f"k={config.nearest_k}"
        )
    metric_counts = proportional_counts(histogram["test"], config.num_samples)
    cas_counts = proportional_counts(histogram["train"], cas_total)
    pool_counts = [
        max(cas, math.ceil(metric / (1.0 - max(fractions))))
        for cas, metric in zip(cas_counts, metric_counts, strict=True)
    ]
    cas_steps = config.cas_steps or classifier_checkpoint.step
    cas_config = config_from_dict(
        ClassifierRunConfig,
        {
            **classifier_checkpoint.config,
            "train": {**classifier_checkpoint.config["train"], "max_steps": cas_steps},
        },
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    # Table 1: prior NLL and VQ-VAE MSE. Train figures use a fixed random subset of the train
    # split as large as the validation split, chosen as train-prior chooses its subset.
    clock = time.monotonic()
    train_subset = np.sort(
        np.random.default_rng(config.seed).permutation(len(splits["train"]))[: len(splits["val"])]
    )
    train_measure = measure_split(
        vqvae,
        priors,
        Subset(splits["train"], train_subset.tolist()),
        config.batch_size,
        progress=progress,
        description="table 1: train",
    )
    val_measure = measure_split(
        vqvae,
        priors,
        splits["val"],
        config.batch_size,
        progress=progress,
        description="table 1: validation",
    )
    test_measure = measure_split(
        vqvae,
        priors,
        splits["test"],
        config.batch_size,
        keep_images=True,
        progress=progress,
        description="test reconstructions",
    )
    assert test_measure.images is not None and test_measure.reconstructions is not None
    table1 = {
        "priors": {
            name: _nll_row(train_measure.nll_nats[name], val_measure.nll_nats[name])
            for name in vqvae_config.level_names
        },
        "vqvae": {
            "train_mse": train_measure.mse,
            "val_mse": val_measure.mse,
            "test_mse": test_measure.mse,
        },
        "train_subset_size": len(train_subset),
        "val_size": len(splits["val"]),
        "test_size": test_size,
    }
    timings["table1_and_reconstructions"] = time.monotonic() - clock

    # The sample pool, drawn once and scored once.
    clock = time.monotonic()
    pool_labels = torch.cat(
        [torch.full((count,), label, dtype=torch.long) for label, count in enumerate(pool_counts)]
    )
    pool = draw_pool(
        vqvae,
        priors,
        pool_labels,
        config.batch_size,
        config.temperature,
        config.seed,
        progress,
        context,
    )
    timings["sampling"] = time.monotonic() - clock
    clock = time.monotonic()
    pool_logits = class_logits(scorer, pool, config.batch_size)  # (P, K)
    scores = torch.softmax(pool_logits, dim=-1).gather(1, pool_labels[:, None]).squeeze(1)  # (P,)
    agreement = pool_logits.argmax(-1) == pool_labels  # (P,)

    # One metric set per rejection rate: the kept share of each class, subsampled to the
    # metric counts (selection seed: seed + 1).
    selector = torch.Generator().manual_seed(config.seed + 1)
    selections = []
    for fraction in fractions:
        kept = reject_fraction_per_class(scores, pool_labels, fraction)
        chosen = []
        for label, count in enumerate(metric_counts):
            members = kept[pool_labels[kept] == label]
            chosen.append(members[torch.randperm(len(members), generator=selector)[:count]])
        selections.append(torch.sort(torch.cat(chosen)).values)
    needed = torch.unique(torch.cat(selections))
    position = torch.full((len(pool),), -1, dtype=torch.long)
    position[needed] = torch.arange(len(needed))

    reference_indices = np.sort(
        np.random.default_rng(config.seed + 2).permutation(len(splits["train"]))[
            : config.num_samples
        ]
    )
    reference_images, _ = splits["train"].__getitems__(reference_indices.tolist())
    sample_features, sample_logits = extract_features(
        network, pool[needed], config.batch_size, progress, "features: samples"
    )
    reference = {}
    reference_logits = {}
    for name, images in (
        ("test", test_measure.images),
        ("reconstructions", test_measure.reconstructions),
        ("train", float_to_uint8(reference_images)),
    ):
        reference[name], reference_logits[name] = extract_features(
            network, images, config.batch_size, progress, f"features: {name}"
        )
    timings["scoring_and_features"] = time.monotonic() - clock

    clock = time.monotonic()
    rows = []
    bar = tqdm(total=len(fractions) + 2, desc="metrics", disable=not progress, leave=False)
    for fraction, selection in zip(fractions, selections, strict=True):
        rows_features = sample_features[position[selection]]
        rows_logits = sample_logits[position[selection]]
        row: dict[str, Any] = {
            "reject_fraction": fraction,
            "samples": len(selection),
            "mean_score": float(scores[selection].mean()),
            "class_agreement": float(agreement[selection].float().mean()),
        }
        row.update(_sample_metrics(reference, rows_features, rows_logits, config, kid_subset_size))
        rows.append(row)
        bar.update(1)
    references: dict[str, Any] = {
        "train_images": _sample_metrics(
            reference,
            reference["train"],
            reference_logits["train"],
            config,
            min(kid_subset_size, len(reference["train"])),
        )
    }
    bar.update(1)
    references["test_reconstructions"] = _sample_metrics(
        reference,
        reference["reconstructions"],
        reference_logits["reconstructions"],
        config,
        kid_subset_size,
        with_star=False,
    )
    references["test_images_inception_score"] = inception_score(
        reference_logits["test"], config.inception_score_splits, config.seed
    )[0]
    bar.update(1)
    bar.close()
    timings["metrics"] = time.monotonic() - clock

    # Table 2: CAS on unrejected samples, with the real train split's size and class balance.
    clock = time.monotonic()
    cas_indices = torch.cat(
        [
            torch.nonzero(pool_labels == label).squeeze(1)[:count]
            for label, count in enumerate(cas_counts)
        ]
    )
    test_sets = {
        "test": (test_measure.images, test_measure.labels),
        "test_reconstructions": (test_measure.reconstructions, test_measure.labels),
    }
    cas = classification_accuracy_score(
        pool[cas_indices],
        pool_labels[cas_indices],
        test_sets,
        cas_config,
        progress=progress,
        batch_size=config.batch_size,
        runtime=RuntimeConfig(device=str(device)),
    )
    real = {
        name: accuracy_pair(class_logits(scorer, images, config.batch_size), labels)
        for name, (images, labels) in test_sets.items()
    }
    table2 = {
        "samples": cas["test"],
        "samples_after_reconstructing": cas["test_reconstructions"],
        "real": real["test"],
        "real_after_reconstructing": real["test_reconstructions"],
        "cas_samples": len(cas_indices),
        "cas_steps": cas_steps,
        "real_classifier_steps": classifier_checkpoint.step,
        "real_train_size": len(splits["train"]),
    }
    timings["cas"] = time.monotonic() - clock

    base = rows[0]
    rejected = rows[1:]
    verdict = {
        "fid_improved_at_every_rate": all(row["fid"] < base["fid"] for row in rejected),
        "precision_improved_at_every_rate": all(
            row["precision"] > base["precision"] for row in rejected
        ),
    }
    timings["total"] = time.monotonic() - started
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": str(data_path),
        "command": command,
        "config": {
            **{key: getattr(config, key) for key in config.__dataclass_fields__},
            "reject_fractions": list(fractions),
        },
        "seeds": {
            "sampling": config.seed,
            "metric_set_selection": config.seed + 1,
            "real_train_reference_subset": config.seed + 2,
            "table1_train_subset": config.seed,
            "metrics_random_splits": config.seed,
            "cas_classifier": cas_config.train.seed,
        },
        "features": {**feature_source, "dimensions": int(reference["test"].shape[1])},
        "rejection_scorer": str(run_dir / CLASSIFIER_KIND),
        "counts": {
            "pool_per_class": pool_counts,
            "metric_set_per_class": metric_counts,
            "cas_per_class": cas_counts,
            "kid_subset_size": kid_subset_size,
        },
        "table1": table1,
        "table2": table2,
        "rejection": rows,
        "references": references,
        "verdict": verdict,
        "timings_seconds": timings,
    }
    if context.is_main:
        _write_report(report, out_dir, pool, pool_labels, selections, fractions, num_classes)
    return report


# ----------------------------------------------------------------------------------------------
# Report files


def _grid_for(pool: Tensor, labels: Tensor, selection: Tensor, num_classes: int) -> Tensor:
    """One row per class of the first ``GRID_COLUMNS`` selected samples -> uint8 grid."""
    rows = []
    for label in range(num_classes):
        members = selection[labels[selection] == label][:GRID_COLUMNS]
        row = pool[members]
        if len(row) < GRID_COLUMNS:  # pad a short class with black tiles
            row = torch.cat(
                [row, torch.zeros(GRID_COLUMNS - len(row), *pool.shape[1:], dtype=pool.dtype)]
            )
        rows.append(row)
    return make_grid(torch.cat(rows), columns=GRID_COLUMNS)


def _plot(rows: list[dict[str, Any]], references: dict[str, Any], out_dir: Path) -> None:
    """Fig. 7 analogues: FID / FID* against IS, precision against recall, per rejection rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['reject_fraction']:.0%}" for row in rows]
    figure, axes = plt.subplots(figsize=(5, 4))
    scores = [row["inception_score"] for row in rows]
    axes.plot(scores, [row["fid"] for row in rows], "o-", label="FID (vs test images)")
    axes.plot(scores, [row["fid_star"] for row in rows], "s--", label="FID* (vs reconstructions)")
    for label, score, row in zip(labels, scores, rows, strict=True):
        axes.annotate(label, (score, row["fid"]), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("Inception Score (higher is better)")
    axes.set_ylabel("FID (lower is better)")
    axes.set_title("Rejection rate vs FID / IS (Fig. 7a)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / FID_PLOT, dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot([r["recall"] for r in rows], [r["precision"] for r in rows], "o-", label="samples")
    for label, row in zip(labels, rows, strict=True):
        axes.annotate(
            label, (row["recall"], row["precision"]), textcoords="offset points", xytext=(4, 4)
        )
    train = references["train_images"]
    axes.plot([train["recall"]], [train["precision"]], "k*", label="real train images")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title("Rejection rate vs precision / recall (Fig. 7b)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / PRECISION_RECALL_PLOT, dpi=100)
    plt.close(figure)


def _format(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: Tables 1 and 2, the rejection table, references, verdict."""
    lines = ["# Evaluation report", ""]
    if report.get("command"):
        lines += ["```bash", report["command"], "```", ""]
    features = report["features"]
    seeds = ", ".join(
        f"{name.replace('_', ' ')} {value}" for name, value in report["seeds"].items()
    )
    lines += [
        f"Run: `{report['run_dir']}`; data: `{report['data']}`. Feature network: "
        f"{features['network']} ({features['dimensions']} features, `{features['path']}`). "
        f"Rejection scorer: the run's classifier. Seeds: {seeds}.",
        "",
    ]
    if not features["network"].startswith("InceptionV3"):
        lines += [
            "FID, KID and IS below use a classifier trained on this dataset, not InceptionV3: "
            "they compare runs of this project and are **not comparable with published values**.",
            "",
        ]
    table1 = report["table1"]
    lines += [
        "## Table 1: NLL and MSE",
        "",
        "| | train NLL nats/code (bits) | validation NLL nats/code (bits) | validation - train |",
        "|---|---|---|---|",
    ]
    for name, row in table1["priors"].items():
        lines.append(
            f"| {name} prior | {row['train_nll_nats']:.4f} ({row['train_nll_bits']:.4f}) | "
            f"{row['val_nll_nats']:.4f} ({row['val_nll_bits']:.4f}) | {row['gap_nats']:.4f} |"
        )
    vq = table1["vqvae"]
    lines += [
        "",
        "| VQ-VAE MSE ([0, 1] pixels) | train | validation | test |",
        "|---|---|---|---|",
        f"| | {vq['train_mse']:.5f} | {vq['val_mse']:.5f} | {vq['test_mse']:.5f} |",
        "",
        f"Train figures: a fixed random subset of {table1['train_subset_size']} train images (as "
        f"many as the validation split); validation {table1['val_size']}, test "
        f"{table1['test_size']} images.",
        "",
    ]
    table2 = report["table2"]
    lines += [
        "## Table 2: Classification Accuracy Score",
        "",
        "| classifier trained on | tested on | top-1 | top-5 |",
        "|---|---|---|---|",
        f"| {table2['cas_samples']} samples (no rejection), {table2['cas_steps']} steps | real test "
        f"images | {table2['samples']['top1']:.2%} | {table2['samples']['top5']:.2%} |",
        f"| the same classifier | VQ-VAE reconstructions of the test images ('after "
        f"reconstructing') | {table2['samples_after_reconstructing']['top1']:.2%} | "
        f"{table2['samples_after_reconstructing']['top5']:.2%} |",
        f"| {table2['real_train_size']} real train images (the run's classifier, "
        f"{table2['real_classifier_steps']} steps) | real test images | {table2['real']['top1']:.2%} "
        f"| {table2['real']['top5']:.2%} |",
        f"| the same classifier | VQ-VAE reconstructions of the test images | "
        f"{table2['real_after_reconstructing']['top1']:.2%} | "
        f"{table2['real_after_reconstructing']['top5']:.2%} |",
        "",
        "## Fig. 7: rejection sampling",
        "",
        "| rejected | samples | mean p(class) | classifier agrees | FID | FID* | KID | IS | "
        "precision | recall | density | coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rejection"]:
        lines.append(
            f"| {row['reject_fraction']:.0%} | {row['samples']} | {row['mean_score']:.3f} | "
            f"{row['class_agreement']:.1%} | {_format(row['fid'])} | {_format(row['fid_star'])} | "
            f"{_format(row['kid'], 4)} | {_format(row['inception_score'])} | "
            f"{row['precision']:.3f} | {row['recall']:.3f} | {row['density']:.3f} | "
            f"{row['coverage']:.3f} |"
        )
    references = report["references"]
    for name, title in (
        ("train_images", "real train images (as many as the samples)"),
        ("test_reconstructions", "VQ-VAE reconstructions of the test images"),
    ):
        row = references[name]
        lines.append(
            f"| *{title}* | | | | {_format(row['fid'])} | {_format(row.get('fid_star'))} | "
            f"{_format(row['kid'], 4)} | {_format(row['inception_score'])} | "
            f"{row['precision']:.3f} | {row['recall']:.3f} | {row['density']:.3f} | "
            f"{row['coverage']:.3f} |"
        )
    counts = report["counts"]
    lines += [
        "",
        f"FID, KID and precision/recall compare with the {table1['test_size']} real test images, "
        "FID* with their VQ-VAE reconstructions. IS of the real test images: "
        f"{references['test_images_inception_score']:.3f}. Each rate's set has the test split's "
        f"class balance ({counts['metric_set_per_class']} per class), drawn at random from the "
        f"kept share of one pool of {sum(counts['pool_per_class'])} samples "
        f"({counts['pool_per_class']} per class), each scored once by the run's classifier. "
        f"Precision/recall: k = {report['config']['nearest_k']}; KID: "
        f"{report['config']['kid_subsets']} subsets of {counts['kid_subset_size']}.",
        "",
        f"![FID vs IS]({FID_PLOT}) ![precision vs recall]({PRECISION_RECALL_PLOT})",
        "",
        "## Verdict",
        "",
    ]
    base = report["rejection"][0]
    worst = report["rejection"][1:]
    verdict = report["verdict"]
    if worst:
        last = worst[-1]
        lines.append(
            f"- FID: {base['fid']:.3f} without rejection, {last['fid']:.3f} rejecting "
            f"{last['reject_fraction']:.0%}; "
            + (
                "rejection **improved** FID at every rate."
                if verdict["fid_improved_at_every_rate"]
                else "rejection did **not** improve FID at every rate."
            )
        )
        lines.append(
            f"- Precision: {base['precision']:.3f} without rejection, {last['precision']:.3f} "
            f"rejecting {last['reject_fraction']:.0%}; "
            + (
                "rejection **improved** precision at every rate."
                if verdict["precision_improved_at_every_rate"]
                else "rejection did **not** improve precision at every rate."
            )
        )
    else:
        lines.append("- Only the no-rejection rate was measured.")
    timings = report["timings_seconds"]
    parts = ", ".join(
        f"{name.replace('_', ' ')} {seconds:.0f} s"
        for name, seconds in timings.items()
        if name != "total"
    )
    lines += ["", f"Wall time: {timings['total'] / 60:.1f} min ({parts}).", ""]
    return "\n".join(lines)


def _write_report(
    report: dict[str, Any],
    out_dir: Path,
    pool: Tensor,
    pool_labels: Tensor,
    selections: list[Tensor],
    fractions: tuple[float, ...],
    num_classes: int,
) -> None:
    for fraction, selection in zip(fractions, selections, strict=True):
        save_png(
            _grid_for(pool, pool_labels, selection, num_classes),
            out_dir / f"samples-reject-{fraction:.2f}.png",
        )
    _plot(report["rejection"], report["references"], out_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / REPORT_MARKDOWN).write_text(render_markdown(report))
