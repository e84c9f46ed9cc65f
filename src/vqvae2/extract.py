"""Stage 2's first step (Razavi et al. 2019, Algorithm 2, lines 1-7): encode the dataset once
with the trained VQ-VAE into code stores, one per split (and one of transformed training images
for distribution augmentation), in shards recorded as they finish so that a killed extraction,
run again, encodes only what is missing.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from .checkpoint import read_checkpoint
from .codes import CodeStoreWriter
from .config import RuntimeConfig
from .data import (
    apply_augmentation,
    augmentation_names,
    batch_loader,
    open_dataset,
    uint8_to_float,
)
from .distributed import DistributedContext, runtime_context
from .loop import training_lock
from .measure import (
    EVAL_BATCH_SIZE,
)
from .run import (
    AUGMENTED_CODES,
    VQVAE_KIND,
    Run,
    vqvae_from_checkpoint,
)
from .vqvae import VQVAE2

logger = logging.getLogger("vqvae2.extract")


# Images per shard of a code store: the unit an extraction records as finished, so a killed one
# redoes at most this many images per process; 16 evaluation batches.
EXTRACT_SHARD_SIZE = 16 * EVAL_BATCH_SIZE


@torch.no_grad()
def extract_codes(
    run: Run,
    data_path: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = True,
    runtime: RuntimeConfig | None = None,
    augment: Sequence[str] = (),
    shard_size: int | None = None,
) -> dict[str, Path]:
    """Encode dataset splits once with the trained VQ-VAE into ``RUN_DIR/codes/<split>``.

    With ``augment`` ("flip", "shift"), the codes of transformed training images go to a second
    store, ``RUN_DIR/codes/train-augmented``, one copy per transform, each row with its
    transform's index; priors trained on it are told which transform made each code map
    (distribution augmentation) and use the identity for evaluation and sampling. Without
    ``augment`` an earlier augmented store is removed, so priors never mix two VQ-VAEs' codes.

    Each store is written in shards of ``shard_size`` images (default ``EXTRACT_SHARD_SIZE``),
    each recorded when finished; under torchrun the processes take turns over the shards. An
    extraction killed mid-way and run again encodes only the shards it had not finished, into
    a store equal to an uninterrupted extraction's, unless the VQ-VAE weights, the data, the
    batch or shard size changed in between: then the unfinished store is discarded.

    Returns:
        The store folder of each split written.
    """
    shard_size = EXTRACT_SHARD_SIZE if shard_size is None else shard_size
    if shard_size < 1:
        raise ValueError(f"the shard size must be at least 1 image, got {shard_size}")
    context = runtime_context(runtime)
    names = augmentation_names(augment)  # checked before any work
    checkpoint = read_checkpoint(run.path, VQVAE_KIND)  # step and weights from one folder
    source = {
        "vqvae_sha256": _weights_digest(checkpoint.model_state),
        "data": str(Path(data_path).resolve()),
        "batch_size": batch_size,
        "shard_size": shard_size,
    }
    model = vqvae_from_checkpoint(checkpoint, map_location=context.device)
    stores = _stores_to_write(run, model, data_path, splits, names, checkpoint.step)
    with training_lock(run.codes_dir, context, resume=False, writer="extract-codes"):
        written = {
            store.name: _encode_into_store(
                model,
                store.dataset,
                run.codes_dir / store.name,
                store.transforms,
                store.recorded,
                store.extra,
                {**source, "split": store.split},
                context,
                batch_size,
                shard_size,
                run.config.data.num_workers,
                progress,
            )
            for store in stores
        }
        stale = run.codes_dir / AUGMENTED_CODES  # an earlier extraction's augmented store
        without_augmented = AUGMENTED_CODES not in written and "train" in splits
        if without_augmented and context.is_main and stale.exists():
            shutil.rmtree(stale)
    context.barrier()
    return written


class _Store(NamedTuple):
    """One code store an extraction writes."""

    name: str  # its folder under RUN_DIR/codes
    split: str  # the dataset split it encodes
    dataset: Dataset
    transforms: list[str]  # the transforms encoded, one copy of the split each
    recorded: tuple[str, ...]  # the transform names the store records (augmented store only)
    extra: dict  # metadata kept with the store


def _stores_to_write(
    run: Run,
    model: VQVAE2,
    data_path: str | Path,
    splits: tuple[str, ...],
    names: list[str],
    vqvae_step: int,
) -> list[_Store]:
    """Each split's store, and after the training split's the augmented store when ``names``
    holds transforms beyond the identity (the identity is the plain store)."""
    config, stores = model.config, []
    for split in splits:
        dataset = open_dataset(
            data_path, split, config.image_size, config.in_channels, run.config.data
        )
        extra = {"num_classes": dataset.num_classes, "vqvae_step": vqvae_step}
        stores.append(_Store(split, split, dataset, ["identity"], (), extra))
        if split == "train" and len(names) > 1:
            stores.append(_Store(AUGMENTED_CODES, split, dataset, names[1:], tuple(names), extra))
    return stores


def _weights_digest(state: dict[str, Tensor]) -> str:
    """SHA-256 of a model's tensors (names and bytes): which weights made a code store."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _encode_into_store(
    model: VQVAE2,
    dataset: Dataset,
    directory: Path,
    transforms: Sequence[str],
    recorded: Sequence[str],
    extra: dict,
    source: dict,
    context: DistributedContext,
    batch_size: int,
    shard_size: int,
    num_workers: int,
    progress: bool,
) -> Path:
    """Encode ``dataset`` once per transform into one code store, transform-major rows.

    ``recorded`` names every transform of an augmented store (its rows record their index in
    it); empty for a plain store. The rows go in shards of ``shard_size`` images of one copy,
    the processes taking turns; a shard an earlier (killed) extraction finished is kept.
    """
    rows = len(dataset) * len(transforms)
    source = {**source, "transforms": list(transforms)}
    writer = _open_store(model, directory, rows, recorded, extra, source, context)
    mine, to_do = _shards_to_do(writer, len(dataset), len(transforms), shard_size, context)
    kept = len(mine) - len(to_do)
    bar = tqdm(
        total=sum(len(images) for _, images in to_do),
        desc=f"extract-codes {directory.name}",
        disable=not (progress and context.is_main),
    )
    for copy_index, transform in enumerate(transforms):
        shard_images = [images for index, images in to_do if index == copy_index]
        if shard_images:
            transform_index = recorded.index(transform) if recorded else 0
            _encode_shards(
                model,
                dataset,
                copy_index,
                shard_images,
                (transform, transform_index),
                writer,
                context,
                batch_size,
                num_workers,
                bar,
            )
    bar.close()
    if kept and context.is_main:
        logger.info(
            "%s: kept %d of %d shards finished by an interrupted extraction, encoded %d",
            directory,
            kept,
            len(mine),
            len(mine) - kept,
        )
    context.barrier()  # every share is written before the store is closed
    if context.is_main:
        writer.close()
    context.barrier()
    return directory


def _shards_to_do(
    writer: CodeStoreWriter,
    dataset_size: int,
    copies: int,
    shard_size: int,
    context: DistributedContext,
) -> tuple[list[tuple[int, range]], list[tuple[int, range]]]:
    """This process's shards, (copy index, images of the dataset) each (the processes take
    turns), and those of them an earlier, killed extraction did not finish."""
    shards = [
        (copy_index, range(start, min(start + shard_size, dataset_size)))
        for copy_index in range(copies)
        for start in range(0, dataset_size, shard_size)
    ]
    mine = shards[context.rank :: context.world_size]
    to_do = [
        (copy_index, images)
        for copy_index, images in mine
        if not writer.shard_done(_store_rows(copy_index, images, dataset_size))
    ]
    return mine, to_do


def _open_store(
    model: VQVAE2,
    directory: Path,
    rows: int,
    recorded: Sequence[str],
    extra: dict,
    source: dict,
    context: DistributedContext,
) -> CodeStoreWriter:
    """The store's writer on every process: rank 0 creates it (keeping the shards of an
    interrupted extraction of the same ``source``, else discarding them with a warning), the
    others attach to it."""
    config = model.config
    if context.is_main:
        writer = CodeStoreWriter(
            directory,
            rows,
            config.level_names,
            config.latent_sizes,
            config.codebook_size,
            extra=extra,
            augmentations=recorded,
            source=source,
        )
        if writer.previous not in ("none", "kept"):
            logger.warning(
                "discarding the unfinished code store %s: %s", writer.tmp, writer.previous
            )
    context.barrier()  # the store's files exist before the other processes open them
    if not context.is_main:
        writer = CodeStoreWriter.attach(directory, config.level_names)
    return writer


def _encode_shards(
    model: VQVAE2,
    dataset: Dataset,
    copy_index: int,
    shard_images: list[range],
    transform: tuple[str, int],
    writer: CodeStoreWriter,
    context: DistributedContext,
    batch_size: int,
    num_workers: int,
    bar: tqdm,
) -> None:
    """Encode the images of each shard in ``shard_images`` under ``transform`` (name, index
    recorded) into their rows of copy ``copy_index``, recording each shard when finished."""
    name, index = transform
    batches = [
        list(images[start : start + batch_size])
        for images in shard_images
        for start in range(0, len(images), batch_size)
    ]
    loader = iter(batch_loader(dataset, batches, num_workers))
    for images in shard_images:  # the loader's batches, shard by shard
        rows = _store_rows(copy_index, images, len(dataset))
        start = rows.start
        while start < rows.stop:
            pixels, labels = next(loader)
            pixels = apply_augmentation(uint8_to_float(pixels.to(context.device)), name)
            writer.write(start, model.encode(pixels), labels, index)
            start += len(labels)
            bar.update(len(labels))
        writer.finish_shard(rows)


def _store_rows(copy_index: int, images: range, dataset_size: int) -> range:
    """The store rows of ``images`` of the dataset in copy ``copy_index`` (transform-major)."""
    offset = copy_index * dataset_size
    return range(offset + images.start, offset + images.stop)
