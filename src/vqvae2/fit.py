"""The classifier's trainer (rejection sampling's scorer, the evaluation's feature network
and CAS classifier) on an image source or on datasets in memory.

It sits below the stage modules: ``train-classifier`` (``vqvae2.train``) and the evaluation
(``vqvae2.evaluate``) both call it, so the evaluation imports no stage trainer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .batches import check_batch_fits, micro_batch_size
from .checkpoint import Checkpoint, RunFacts
from .classifier import Classifier
from .config import ClassifierRunConfig, RuntimeConfig
from .data import DEFAULT_DATA_PATH, batch_loader, open_dataset, uint8_to_float
from .distributed import runtime_context
from .loop import (
    StepOutput,
    TrainingSession,
    TrainResult,
    image_keys,
    micro_batches,
    resume_or_start,
    training_lock,
)
from .measure import measure_accuracy
from .random_state import seed_own_dropout
from .run import CLASSIFIER_KIND
from .schedule import Clock

CLASSIFIER_SPLITS = ("train", "val", "test")


AUGMENT_SHIFT = 2  # pixels of random translation in classifier training


AUGMENT_STREAM = 2  # tags the augmentation's random stream (LEVEL_DROPOUT_STREAM is 1)


def augment(images: Tensor, keys: Sequence[int], seed: int) -> Tensor:
    """Random horizontal flips and shifts of up to ``AUGMENT_SHIFT`` pixels (replicated edges):
    (B, C, S, S) -> same. Image b's flip and offset are drawn from (``seed``, ``keys[b]``), its
    position in the run's sequence of training images, so they do not depend on which process
    holds it."""
    batch, _, size, _ = images.shape
    if len(keys) != batch:
        raise ValueError(f"augment needs one key per image: {batch} images, {len(keys)} keys")
    draws = [np.random.default_rng([seed, key, AUGMENT_STREAM]) for key in keys]
    flip = torch.tensor([bool(rng.random() < 0.5) for rng in draws])  # (B,)
    offsets = [rng.integers(0, 2 * AUGMENT_SHIFT + 1, 2).tolist() for rng in draws]  # (B, 2)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = torch.nn.functional.pad(images, (AUGMENT_SHIFT,) * 4, mode="replicate")
    return torch.stack(
        [padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets)]
    )


def _classifier_splits(
    data: str | Path | Mapping[str, Dataset], config: ClassifierRunConfig
) -> dict[str, Dataset]:
    """The train, val and test datasets: those given, or opened from the image source."""
    if isinstance(data, Mapping):
        missing = set(CLASSIFIER_SPLITS) - set(data)
        if missing:
            raise ValueError(
                f"the classifier's datasets lack the {', '.join(sorted(missing))} split"
            )
        return {split: data[split] for split in CLASSIFIER_SPLITS}
    model = config.model
    return {
        split: open_dataset(
            data, split, model.image_size, model.in_channels, config.data, config.train.seed
        )
        for split in CLASSIFIER_SPLITS
    }


def _classifier_data(
    data: str | Path | Mapping[str, Dataset] | None,
    config: ClassifierRunConfig,
    checkpoint: Checkpoint | None,
) -> tuple[str | Path | Mapping[str, Dataset], dict[str, Dataset], ClassifierRunConfig]:
    """The data to train on (``train_classifier``'s ``data``; None: the source recorded in
    ``checkpoint``, else the default), its splits, and ``config`` with ``model.num_classes``
    from the data on a new run."""
    if data is None:
        recorded = None if checkpoint is None else checkpoint.facts.data_path
        data = recorded or DEFAULT_DATA_PATH
    splits = _classifier_splits(data, config)
    if checkpoint is None:
        num_classes = splits["train"].num_classes
        if num_classes < 2:
            source = "the training set" if isinstance(data, Mapping) else data
            raise ValueError(f"{source} has {num_classes} class; a classifier needs at least 2")
        config = replace(config, model=replace(config.model, num_classes=num_classes))
    return data, splits, config


def train_classifier(
    config: ClassifierRunConfig | None,
    data: str | Path | Mapping[str, Dataset] | None,
    out_dir: str | Path,
    *,
    max_minutes: float | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    runtime: RuntimeConfig | None = None,
    now: Clock = time.monotonic,
) -> TrainResult:
    """Train the image classifier; checkpoints, metrics and config go to ``out_dir``, which no
    other trainer may be writing (``loop.training_lock``).

    Args:
        config: the run config; on resume None (the saved one) or one whose run length counts.
        data: an image source (``vqvae2.data.open_dataset``), or the "train", "val" and "test"
            datasets of (image (C, S, S) uint8, label) items with ``num_classes`` (the train
            set's random transform, if any, set by the caller). None: on resume the image
            source the classifier trained on, else (or when none was recorded) the default
            Fashion-MNIST files.
        out_dir: checkpoints, metrics and config.

    ``model.num_classes`` is taken from the data. Returns ``val_accuracy`` and
    ``test_accuracy`` (on rank 0; under torchrun every process calls this).
    """
    runtime = runtime or RuntimeConfig()
    context = runtime_context(runtime)
    out_dir = Path(out_dir)
    with training_lock(out_dir, context, resume):
        config, checkpoint = resume_or_start(
            out_dir,
            CLASSIFIER_KIND,
            ClassifierRunConfig,
            config,
            resume,
            f"{out_dir} already holds a trained classifier; pass --resume or another --out",
            max_steps,
        )
        data, splits, config = _classifier_data(data, config, checkpoint)
        micro_batch_size(config.train, context)  # the batch must split evenly: checked first
        check_batch_fits(len(splits["train"]), config.train.batch_size)
        torch.manual_seed(config.train.seed)
        classifier = Classifier(config.model)
        session = TrainingSession(
            classifier,
            config,
            context,
            runtime,
            kind=CLASSIFIER_KIND,
            checkpoint_dir=out_dir,
            log_dir=out_dir,
            checkpoint=checkpoint,
            max_minutes=max_minutes,
            progress=progress,
            facts=RunFacts(
                data_path=None if isinstance(data, Mapping) else str(Path(data).resolve())
            ),
            now=now,
        )
        seed_own_dropout(config.train, context)
        loader = batch_loader(
            splits["train"], session.batch_sampler(splits["train"]), config.data.num_workers
        )
        session.run(loader, _classifier_step(session, config))
        return session.finish(
            lambda: {
                "val_accuracy": measure_accuracy(classifier, splits["val"]),
                "test_accuracy": measure_accuracy(classifier, splits["test"]),
            }
        )


def _classifier_step(session: TrainingSession, config: ClassifierRunConfig):
    """The forward and backward passes of one classifier step over augmented (images, labels)."""
    train, step_module, context = config.train, session.step_module, session.context

    def step(batch: tuple[Tensor, Tensor]) -> StepOutput:
        images, labels = batch
        keys = image_keys(session, slice(0, len(labels)))
        images = augment(uint8_to_float(images), keys, train.seed)
        total = torch.zeros((), device=context.device)
        for rows, last in micro_batches(step_module, train):
            micro_images, micro_labels = (
                step_module.to_device(images[rows]),
                step_module.to_device(labels[rows]),
            )
            with step_module.sync_gradients(last), step_module.autocast():
                logits = step_module.forward(micro_images).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), micro_labels)
                scaled_loss = loss / train.grad_accum_steps
            scaled_loss.backward()
            total += scaled_loss.detach()
        return StepOutput(
            total,
            lambda: {
                "loss": loss.item(),
                "accuracy": float((logits.argmax(-1) == micro_labels).float().mean()),
            },
        )

    return step


def classifier_summary(result: TrainResult) -> tuple[dict[str, Any], str]:
    """What ``vqvae2 train-classifier`` prints: the final accuracy as a record, and as text."""
    metrics, out = result.metrics, result.run_dir
    text = (
        f"classifier, {result.step} steps: test accuracy {metrics['test_accuracy']:.2%} "
        f"(validation {metrics['val_accuracy']:.2%}); saved in {out}"
    )
    return {"out": str(out), "step": result.step, **metrics}, text
