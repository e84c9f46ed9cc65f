"""Evaluation of a trained run: the paper's Tables 1-2 and Fig. 7 (Razavi et al. 2019, Section 5).

``evaluate_run`` measures, in one call and in named steps:

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

Fig. 7's pool, metric sets and metrics are in ``vqvae2.rejection_sweep``, Table 2's classifier
in ``vqvae2.cas``, the metric arithmetic in ``vqvae2.metrics``, the rejection rules in
``vqvae2.sampling`` and the report files in ``vqvae2.report``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from .cas import accuracy_pair, classification_accuracy_score
from .checkpoint import read_checkpoint
from .classifier import Classifier
from .config import (
    ClassifierRunConfig,
    EvaluateConfig,
    RuntimeConfig,
    config_from_dict,
)
from .data import open_dataset
from .distributed import DistributedContext, runtime_context, runtime_device
from .fingerprint import report_fingerprint
from .fit import train_classifier
from .inception import load_inception
from .measure import SplitMeasure, class_logits, extract_features, measure_split
from .pixelsnail import PixelSNAIL
from .rejection_sweep import draw_pool, rejection_rows, score_pool
from .report import REPORT_FINGERPRINT, write_report
from .run import (
    CLASSIFIER_KIND,
    Run,
    classifier_from_checkpoint,
    has_checkpoint,
    load_classifier,
)
from .sampling import candidates_needed
from .vqvae import VQVAE2

SPLITS = ("train", "val", "test")

# ----------------------------------------------------------------------------------------------
# Building blocks


def proportional_counts(histogram: list[int], total: int) -> list[int]:
    """Split ``total`` over classes in proportion to ``histogram`` (largest remainders)."""
    whole = sum(histogram)
    shares = [total * count / whole for count in histogram]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def _nll_row(train: float, val: float) -> dict[str, float]:
    bits = 1 / math.log(2)
    return {
        "train_nll_nats": train,
        "train_nll_bits": train * bits,
        "val_nll_nats": val,
        "val_nll_bits": val * bits,
        "gap_nats": val - train,
    }


# ----------------------------------------------------------------------------------------------
# The steps of the evaluation


@dataclass
class _Models:
    """The run's models and data, loaded and checked before any long work starts."""

    vqvae: VQVAE2
    priors: list[PixelSNAIL]
    scorer: Classifier  # the run's classifier: rejection scores and Table 2's real-data rows
    scorer_step: int
    scorer_config: ClassifierRunConfig
    network: nn.Module | None  # the feature network of FID, KID, IS, precision/recall
    feature_source: dict[str, Any]
    splits: dict[str, Any]  # "train" / "val" / "test" -> dataset

    @property
    def num_classes(self) -> int:
        return self.priors[0].config.num_classes


def _load_models(
    run: Run,
    data_path: str | Path,
    device: torch.device,
    inception_weights: str | Path | None,
    feature_classifier: str | Path | None,
) -> _Models:
    """Load the run and its data and check that they fit together."""
    vqvae, priors = run.load_hierarchy(device)
    model_config = vqvae.config
    num_classes = priors[0].config.num_classes
    if num_classes == 0:
        raise ValueError("evaluate needs class-conditional priors (for CAS and rejection sampling)")
    scorer_checkpoint = read_checkpoint(run.path, CLASSIFIER_KIND)
    scorer = classifier_from_checkpoint(scorer_checkpoint, map_location=device)
    shape = (model_config.in_channels, model_config.image_size)
    if (scorer.config.in_channels, scorer.config.image_size) != shape:
        raise ValueError(
            f"the run's classifier takes {scorer.config.image_size}px images with "
            f"{scorer.config.in_channels} channel(s), the VQ-VAE makes {model_config.image_size}px "
            f"with {model_config.in_channels}"
        )
    if scorer.config.num_classes != num_classes:
        raise ValueError(
            f"the run's classifier knows {scorer.config.num_classes} classes, the priors "
            f"{num_classes}"
        )
    data_config = run.config.data
    splits = {
        split: open_dataset(
            data_path, split, model_config.image_size, model_config.in_channels, data_config
        )
        for split in SPLITS
    }
    for split, dataset in splits.items():
        if int(dataset.labels.max()) >= num_classes:
            raise ValueError(
                f"the {split} split of {data_path} has labels up to {int(dataset.labels.max())}, "
                f"the priors know {num_classes} classes"
            )
    network, feature_source = None, {}
    if inception_weights is not None:
        network = load_inception(inception_weights).to(device)
        feature_source = {"network": "InceptionV3 (FID weights)", "path": str(inception_weights)}
    elif feature_classifier is not None:
        network = load_classifier(feature_classifier, map_location=device)
        if (network.config.in_channels, network.config.image_size) != shape:
            raise ValueError(
                f"the classifier in {feature_classifier} takes other images than the run"
            )
        feature_source = {"network": "classifier", "path": str(feature_classifier)}
    return _Models(
        vqvae=vqvae,
        priors=priors,
        scorer=scorer,
        scorer_step=scorer_checkpoint.step,
        scorer_config=config_from_dict(ClassifierRunConfig, scorer_checkpoint.config),
        network=network,
        feature_source=feature_source,
        splits=splits,
    )


def _independent_classifier(
    run: Run, data_path: str | Path, models: _Models, device: torch.device, progress: bool
) -> None:
    """The default feature network: a second classifier, the run's recipe with the next seed,
    so the network that measures the samples is not the one that rejected them. It is trained
    once into ``RUN_DIR/feature-classifier`` (under torchrun by every process, data-parallel)
    and reused by later evaluations."""
    folder = run.feature_classifier_dir
    seed = models.scorer_config.train.seed + 1
    models.feature_source = {
        "network": f"classifier (a second one, the run's recipe with seed {seed}; "
        "not the rejection scorer)",
        "path": str(folder),
    }
    if has_checkpoint(folder):
        models.network = load_classifier(folder, map_location=device)
        return
    config = models.scorer_config
    config = replace(config, train=replace(config.train, seed=seed))
    result = train_classifier(
        config, data_path, folder, progress=progress, runtime=RuntimeConfig(device=str(device))
    )
    models.network = result.model.eval()
    models.feature_source["trained_by_this_evaluation"] = True


@dataclass
class _Counts:
    """How many samples each part of the evaluation draws, per class."""

    metric: list[int]  # each rate's metric set (the test split's class balance)
    cas: list[int]  # the CAS classifier's training samples (the train split's balance)
    pool: list[int]  # drawn once: enough for both, and for the highest rejection rate
    kid_subset_size: int
    cas_steps: int


def _plan(models: _Models, config: EvaluateConfig) -> _Counts:
    """The sample counts, checked against what each metric needs."""
    splits, num_classes = models.splits, models.num_classes
    histogram = {
        split: torch.bincount(splits[split].labels, minlength=num_classes).tolist()
        for split in ("train", "test")
    }
    cas_total = config.cas_samples or len(splits["train"])
    if cas_total < models.scorer_config.train.batch_size:
        raise ValueError(
            f"{cas_total} CAS samples are too few: the classifier trains on batches of "
            f"{models.scorer_config.train.batch_size}"
        )
    test_size = len(splits["test"])
    if test_size <= config.nearest_k:
        raise ValueError(
            f"the test split has {test_size} images, too few for precision/recall with "
            f"k={config.nearest_k}"
        )
    metric = proportional_counts(histogram["test"], config.num_samples)
    cas = proportional_counts(histogram["train"], cas_total)
    return _Counts(
        metric=metric,
        cas=cas,
        pool=[
            max(c, candidates_needed(m, max(config.fractions)))
            for c, m in zip(cas, metric, strict=True)
        ],
        kid_subset_size=min(config.kid_subset_size, config.num_samples, test_size),
        cas_steps=config.cas_steps or models.scorer_step,
    )


def _table1(
    models: _Models, config: EvaluateConfig, progress: bool
) -> tuple[dict[str, Any], SplitMeasure]:
    """Table 1 (prior NLL, VQ-VAE MSE) and the test split's images and reconstructions.

    Train figures use a fixed random subset of the train split as large as the validation
    split, chosen as train-prior chooses its subset.
    """
    splits, vqvae, priors = models.splits, models.vqvae, models.priors
    order = np.random.default_rng(config.seed).permutation(len(splits["train"]))
    train_subset = np.sort(order[: len(splits["val"])]).tolist()
    measures = {}
    for split, dataset, title in (
        ("train", Subset(splits["train"], train_subset), "table 1: train"),
        ("val", splits["val"], "table 1: validation"),
        ("test", splits["test"], "test reconstructions"),
    ):
        measures[split] = measure_split(
            vqvae, priors, dataset, config.batch_size, split == "test", progress, title
        )
    table1 = {
        "priors": {
            name: _nll_row(measures["train"].nll_nats[name], measures["val"].nll_nats[name])
            for name in vqvae.config.level_names
        },
        "vqvae": {f"{split}_mse": measures[split].mse for split in ("train", "val", "test")},
        "train_subset_size": len(train_subset),
        "val_size": len(splits["val"]),
        "test_size": len(splits["test"]),
    }
    return table1, measures["test"]


def _reference_features(
    models: _Models, test: SplitMeasure, config: EvaluateConfig, progress: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Features and logits of the real test images, their reconstructions and a random subset
    of the real train images (reference seed: seed + 2)."""
    train = models.splits["train"]
    order = np.random.default_rng(config.seed + 2).permutation(len(train))
    train_images, _ = train.__getitems__(np.sort(order[: config.num_samples]).tolist())
    features, logits = {}, {}
    for name, images in (
        ("test", test.images),
        ("reconstructions", test.reconstructions),
        ("train", train_images),
    ):
        features[name], logits[name] = extract_features(
            models.network, images, config.batch_size, progress, f"features: {name}"
        )
    return features, logits


def _table2(
    models: _Models,
    pool: Tensor,
    pool_labels: Tensor,
    test: SplitMeasure,
    config: EvaluateConfig,
    counts: _Counts,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """Table 2: CAS on unrejected samples, with the real train split's size and class balance,
    beside the run's classifier trained on real images."""
    cas_indices = torch.cat(
        [
            torch.nonzero(pool_labels == label).squeeze(1)[:count]
            for label, count in enumerate(counts.cas)
        ]
    )
    test_sets = {
        "test": (test.images, test.labels),
        "test_reconstructions": (test.reconstructions, test.labels),
    }
    scorer_config = models.scorer_config
    cas_config = replace(
        scorer_config, train=replace(scorer_config.train, max_steps=counts.cas_steps)
    )
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
        name: accuracy_pair(class_logits(models.scorer, images, config.batch_size), labels)
        for name, (images, labels) in test_sets.items()
    }
    return {
        "samples": cas["test"],
        "samples_after_reconstructing": cas["test_reconstructions"],
        "real": real["test"],
        "real_after_reconstructing": real["test_reconstructions"],
        "cas_samples": len(cas_indices),
        "cas_steps": counts.cas_steps,
        "real_classifier_steps": models.scorer_step,
        "real_train_size": len(models.splits["train"]),
    }


# ----------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_run(
    run: Run,
    data_path: str | Path,
    out_dir: str | Path,
    config: EvaluateConfig | None = None,
    *,
    inception_weights: str | Path | None = None,
    feature_classifier: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    runtime: RuntimeConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run (VQ-VAE, every prior, classifier) and write the report.

    Under torchrun the processes split the sample pool and train the CAS classifier
    data-parallel; rank 0 writes the report.

    Args:
        run: the run (``Run.open``), with ``vqvae/``, ``prior-<level>/`` for every level and
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
        runtime: its ``device`` is where the networks run (default: this process's device,
            CUDA when available; the sample pool then depends on it, as a seed draws other
            codes on a GPU).

    Returns:
        The report (also written as ``report.json``).

    Raises:
        ValueError: a missing model, a weights file of another network, counts too small for a
            metric, data that does not fit the run.
    """
    config = config or EvaluateConfig()
    out_dir = Path(out_dir)
    context = runtime_context()
    device = context.device if runtime is None else runtime_device(runtime)
    progress = progress and context.is_main
    lap = _Laps()
    # Load and check everything first: bad input fails before the long parts.
    models = _load_models(run, data_path, device, inception_weights, feature_classifier)
    counts = _plan(models, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    if models.network is None:
        _independent_classifier(run, data_path, models, device, progress)
        lap("feature_classifier")

    table1, test = _table1(models, config, progress)
    lap("table1_and_reconstructions")
    pool, pool_labels = _draw_pool(models, counts, config, progress, context)
    lap("sampling")

    scored = score_pool(
        models.scorer, models.network, pool, pool_labels, config, counts.metric, progress
    )
    references = _reference_features(models, test, config, progress)
    lap("scoring_and_features")
    rows, reference_rows = rejection_rows(scored, references, config, counts.kid_subset_size)
    lap("metrics")
    table2 = _table2(models, pool, pool_labels, test, config, counts, device, progress)
    lap("cas")
    report = _assemble_report(
        run.path, data_path, command, config, models, counts, table1, table2, rows, reference_rows
    )
    report["features"]["dimensions"] = int(references[0]["test"].shape[1])
    report["timings_seconds"] = lap.with_total()
    if context.is_main:
        grids = (pool, pool_labels, scored.selections, config.fractions, models.num_classes)
        write_report(report, out_dir, *grids)
    return report


def _draw_pool(
    models: _Models,
    counts: _Counts,
    config: EvaluateConfig,
    progress: bool,
    context: DistributedContext,
) -> tuple[Tensor, Tensor]:
    """The sample pool, (P, C, H, W) uint8, and its (P,) requested labels: ``counts.pool``
    samples of each class, in class order."""
    pool_labels = torch.cat(
        [torch.full((count,), label, dtype=torch.long) for label, count in enumerate(counts.pool)]
    )
    pool = draw_pool(
        models.vqvae,
        models.priors,
        pool_labels,
        config.batch_size,
        config.temperature,
        config.seed,
        progress,
        context,
    )
    return pool, pool_labels


class _Laps:
    """Wall time of the evaluation's parts: ``lap(name)`` ends the part called ``name``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = self.last = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name], self.last = now - self.last, now

    def with_total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.monotonic() - self.start}


def _assemble_report(
    run_dir: Path,
    data_path: str | Path,
    command: str | None,
    config: EvaluateConfig,
    models: _Models,
    counts: _Counts,
    table1: dict[str, Any],
    table2: dict[str, Any],
    rows: list[dict[str, Any]],
    references: dict[str, Any],
) -> dict[str, Any]:
    """The report as plain JSON data: settings, seeds, counts, the tables and a verdict."""
    base, rejected = rows[0], rows[1:]
    return {
        "run_dir": str(run_dir),
        "data": str(data_path),
        "command": command,
        "config": {
            **{key: getattr(config, key) for key in config.__dataclass_fields__},
            "reject_fractions": list(config.fractions),
        },
        "seeds": {
            "sampling": config.seed,
            "metric_set_selection": config.seed + 1,
            "real_train_reference_subset": config.seed + 2,
            "table1_train_subset": config.seed,
            "metrics_random_splits": config.seed,
            "cas_classifier": models.scorer_config.train.seed,
        },
        "features": dict(models.feature_source),
        REPORT_FINGERPRINT: report_fingerprint(models.vqvae, models.priors, models.scorer),
        "rejection_scorer": str(run_dir / CLASSIFIER_KIND),
        "counts": {
            "pool_per_class": counts.pool,
            "metric_set_per_class": counts.metric,
            "cas_per_class": counts.cas,
            "kid_subset_size": counts.kid_subset_size,
        },
        "table1": table1,
        "table2": table2,
        "rejection": rows,
        "references": references,
        "verdict": {
            "fid_improved_at_every_rate": all(row["fid"] < base["fid"] for row in rejected),
            "precision_improved_at_every_rate": all(
                row["precision"] > base["precision"] for row in rejected
            ),
        },
    }
