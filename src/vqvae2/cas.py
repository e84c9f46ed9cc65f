"""The Classification Accuracy Score of Table 2 (Ravuri & Vinyals 2019): a classifier trained
only on samples, with the recipe of a classifier trained on real data, tested on real images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import Tensor

from .config import ClassifierRunConfig, RuntimeConfig
from .data import TensorImageDataset, random_transform
from .fit import train_classifier
from .measure import class_logits
from .metrics import top_k_accuracy

TOP_K = 5  # Table 2 reports top-1 and top-5 accuracy


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

    The classifier is trained by ``train_classifier`` itself on the tensors (same augmentation,
    schedule and seed as a classifier trained on real data), so real images in place of samples
    give that classifier's accuracy exactly. Its checkpoints go to a temporary folder.

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

    first_images, first_labels = next(iter(test_sets.values()))
    train_set = _labelled_set(train_images, train_labels)
    train_set.transform = random_transform(config.data, config.train.seed)
    held_out = _labelled_set(first_images, first_labels)
    splits = {"train": train_set, "val": held_out, "test": held_out}
    with tempfile.TemporaryDirectory(prefix="vqvae2-cas-") as work:
        # Under torchrun the classifier trains data-parallel; every process gets the model.
        result = train_classifier(
            config, splits, Path(work) / "classifier", progress=progress, runtime=runtime
        )
        classifier = result.model
    return {
        name: accuracy_pair(class_logits(classifier, images, batch_size), labels)
        for name, (images, labels) in test_sets.items()
    }


def _labelled_set(images: Tensor, labels: Tensor) -> TensorImageDataset:
    """(N, C, H, W) uint8 images and (N,) labels as a dataset of classes 0 .. max label."""
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    return TensorImageDataset(images, labels, [str(i) for i in range(num_classes)])
