"""Training and evaluation entry points (the only place besides the CLI with side effects).

``train_vqvae`` is stage 1 (Algorithm 1): Adam on reconstruction MSE plus commitment loss, EMA
codebooks, periodic validation with reconstruction grids, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .checkpoint import (
    load_run_config,
    load_state_checked,
    load_vqvae,
    read_checkpoint,
    save_checkpoint,
)
from .config import VQVAERunConfig, config_from_dict, save_yaml
from .data import (
    TensorImageDataset,
    float_to_uint8,
    load_image_files,
    make_grid,
    open_dataset,
    save_png,
)
from .metrics import (
    code_histogram,
    codebook_perplexity,
    codebook_usage,
    psnr_from_mse,
    squared_error_01,
)
from .vqvae import VQVAE2

VQVAE_KIND = "vqvae"
METRICS_FILE = "metrics.csv"
EVAL_BATCH_SIZE = 256


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a fresh seeded permutation each epoch, starting from any global step.

    The batch at global step s depends only on (seed, s), so a resumed run sees exactly the
    batches an uninterrupted one would. Incomplete final batches of an epoch are dropped.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int, end_step: int):
        if size < batch_size:
            raise ValueError(
                f"the training split has {size} images, fewer than one batch ({batch_size})"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.batches_per_epoch = size // batch_size

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while step < self.end_step:
            epoch, position = divmod(step, self.batches_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            for index in range(position, self.batches_per_epoch):
                if step >= self.end_step:
                    return
                start = index * self.batch_size
                yield order[start : start + self.batch_size].tolist()
                step += 1


def _batch_as_is(batch: Any) -> Any:
    """Collate function for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def batch_loader(dataset: Dataset, batch_sampler: Sampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_batch_as_is
    )


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Sequential batches over a whole split (the last one may be short)."""
    indices = list(range(len(dataset)))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return batch_loader(dataset, batches, num_workers)


class MetricsLog:
    """Append-only CSV of (step, elapsed_seconds, split, metric, value) rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(["step", "elapsed_seconds", "split", "metric", "value"])

    def write(self, step: int, elapsed: float, split: str, values: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            for name, value in values.items():
                writer.writerow([step, f"{elapsed:.1f}", split, name, repr(float(value))])


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of a run's ``metrics.csv`` as dicts."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@torch.no_grad()
def evaluate_vqvae(
    model: VQVAE2, dataset: Dataset, max_batches: int | None = None, num_workers: int = 0
) -> dict[str, Any]:
    """Reconstruction error and codebook usage of ``model`` over a dataset split.

    Returns:
        ``mse`` and ``psnr`` on [0, 1] pixels, and per level (``usage_top`` ...) the fraction of
        codes in use over the split and the code perplexity.
    """
    was_training = model.training
    model.eval()
    config = model.config
    device = next(model.parameters()).device
    histograms = [torch.zeros(config.codebook_size, dtype=torch.long) for _ in config.level_names]
    squared_error, values = 0.0, 0
    for batch_index, (images, _) in enumerate(eval_loader(dataset, EVAL_BATCH_SIZE, num_workers)):
        if max_batches is not None and batch_index >= max_batches:
            break
        images = images.to(device)
        output = model(images)
        squared_error += float(squared_error_01(output.reconstruction, images).sum())
        values += images.numel()
        for histogram, codes in zip(histograms, output.codes, strict=True):
            histogram += code_histogram(codes.cpu(), config.codebook_size)
    model.train(was_training)
    mse = squared_error / max(values, 1)
    result: dict[str, Any] = {"mse": mse, "psnr": psnr_from_mse(mse)}
    for name, histogram in zip(config.level_names, histograms, strict=True):
        result[f"usage_{name}"] = codebook_usage(histogram)
        result[f"perplexity_{name}"] = codebook_perplexity(histogram)
    return result


@torch.no_grad()
def reconstruction_grid(model: VQVAE2, images: torch.Tensor) -> torch.Tensor:
    """Rows: originals, full reconstructions, then decodes from the top level alone, top two, ...

    Args:
        images: (N, C, H, W) float in [-1, 1].

    Returns:
        uint8 (C, H', W') grid with N columns (the per-level rows show what each level adds,
        like the paper's Fig. 3).
    """
    was_training = model.training
    model.eval()
    codes = model.encode(images)
    rows = [images, model.decode_codes(codes)]
    for kept in range(1, model.config.num_levels):
        rows.append(model.decode_codes(codes, keep_levels=range(kept)))
    model.train(was_training)
    stacked = float_to_uint8(torch.cat(rows).cpu())  # (rows * N, C, H, W)
    return make_grid(stacked, columns=len(images))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]  # final validation metrics


def _learning_rate(config: VQVAERunConfig, step: int) -> float:
    train = config.train
    if train.lr_schedule == "cosine":
        return (
            train.learning_rate * 0.5 * (1 + math.cos(math.pi * min(step / train.max_steps, 1.0)))
        )
    return train.learning_rate


def train_vqvae(
    config: VQVAERunConfig,
    data_path: str | Path,
    run_dir: str | Path,
    *,
    max_minutes: float | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train stage 1 and write checkpoints, metrics, grids and the resolved config to ``run_dir``.

    Args:
        config: the run config (ignored on resume except ``train.max_steps``: the saved one wins).
        data_path: image source (see ``vqvae2.data.open_dataset``).
        run_dir: output folder; must not hold a run unless ``resume``.
        max_minutes: stop (after checkpointing) once this much wall time has passed.
        resume: continue the run in ``run_dir`` from its latest checkpoint.
        progress: show a progress bar on stderr.
    """
    run_dir = Path(run_dir)
    kind_dir = run_dir / VQVAE_KIND
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(run_dir, VQVAE_KIND, with_optimizer=True)
        saved = config_from_dict(VQVAERunConfig, checkpoint.config)
        config = replace(saved, train=replace(saved.train, max_steps=config.train.max_steps))
    elif (kind_dir / "latest").exists():
        raise ValueError(
            f"{run_dir} already holds a trained VQ-VAE; pass --resume or another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(config, run_dir / "config.yaml")

    model_config, train_config = config.model, config.train
    train_set = open_dataset(
        data_path, "train", model_config.image_size, model_config.in_channels, config.data
    )
    val_set = open_dataset(
        data_path, "val", model_config.image_size, model_config.in_channels, config.data
    )

    torch.manual_seed(train_config.seed)
    model = VQVAE2(model_config)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=train_config.learning_rate,
        betas=(train_config.adam_beta1, train_config.adam_beta2),
    )
    step = 0
    elapsed_before = 0.0
    if checkpoint is not None:
        load_state_checked(model, checkpoint.model_state, checkpoint.path)
        if checkpoint.optimizer_state is not None:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        step = checkpoint.step
        elapsed_before = float(checkpoint.extra.get("elapsed_seconds", 0.0))
    model.train()

    grid_images = torch.stack(
        [val_set[i][0] for i in range(min(train_config.grid_images, len(val_set)))]
    )
    log = MetricsLog(run_dir / METRICS_FILE)
    sampler = EpochBatchSampler(
        len(train_set), train_config.batch_size, train_config.seed, step, train_config.max_steps
    )
    loader = batch_loader(train_set, sampler, config.data.num_workers)
    start = time.monotonic()
    deadline = None if max_minutes is None else start + 60.0 * max_minutes

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - start

    def checkpoint_now() -> None:
        save_checkpoint(
            kind_dir,
            VQVAE_KIND,
            step,
            config,
            model,
            optimizer,
            extra={"elapsed_seconds": elapsed(), "data_path": str(data_path)},
        )

    bar = tqdm(
        total=train_config.max_steps,
        initial=step,
        disable=not progress,
        desc="train-vqvae",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    for images, _ in loader:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        output = model(images)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if step % train_config.log_every == 0:
            values = {
                "loss": output.loss.item(),
                "mse": output.reconstruction_loss.item() / 4,  # [-1, 1] -> [0, 1] scale
                "commitment": output.commitment_loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
            }
            for name, perplexity, usage in zip(
                model_config.level_names, output.perplexity, output.usage, strict=True
            ):
                values[f"perplexity_{name}"] = float(perplexity)
                values[f"batch_usage_{name}"] = float(usage)
            log.write(step, elapsed(), "train", values)
            bar.set_postfix(mse=f"{values['mse']:.5f}", refresh=False)
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if step % train_config.val_every == 0 and step < train_config.max_steps and not out_of_time:
            metrics = evaluate_vqvae(model, val_set, train_config.val_batches)
            log.write(step, elapsed(), "val", metrics)
            save_png(
                reconstruction_grid(model, grid_images),
                run_dir / "reconstructions" / f"step-{step:08d}.png",
            )
        if step % train_config.checkpoint_every == 0 and not out_of_time:
            checkpoint_now()
        if out_of_time:
            break
    bar.close()

    metrics = evaluate_vqvae(model, val_set)
    log.write(step, elapsed(), "val", metrics)
    save_png(
        reconstruction_grid(model, grid_images),
        run_dir / "reconstructions" / f"step-{step:08d}.png",
    )
    save_png(reconstruction_grid(model, grid_images), run_dir / "reconstructions.png")
    checkpoint_now()
    return TrainResult(run_dir=run_dir, step=step, metrics=metrics)


def reconstruct(
    run_dir: str | Path,
    data_path: str | Path | None,
    split: str,
    out_png: str | Path,
    image_files: list[str] | None = None,
    grid_images: int = 16,
) -> dict[str, Any]:
    """Write an original / reconstruction / per-level grid and measure a split.

    Args:
        run_dir: stage-1 run folder (or checkpoint folder).
        data_path: image source whose ``split`` is measured; may be None with ``image_files``.
        split: ``train``, ``val`` or ``test``.
        out_png: grid output path.
        image_files: specific images to reconstruct (and measure) instead of a dataset split.
        grid_images: columns of the grid when using a dataset split.

    Returns:
        ``mse``/``psnr`` ([0, 1] pixels), per level ``usage_*``/``perplexity_*``, ``images``,
        ``grid`` (path).
    """
    model = load_vqvae(run_dir)
    config = model.config
    if image_files:
        images = load_image_files(image_files, config.image_size, config.in_channels)
        labels = torch.zeros(len(images), dtype=torch.long)
        dataset = TensorImageDataset(float_to_uint8(images), labels, ["0"])
    else:
        if data_path is None:
            raise ValueError("give --data PATH or image files to reconstruct")
        data_config = load_run_config(run_dir, VQVAE_KIND, VQVAERunConfig).data
        dataset = open_dataset(data_path, split, config.image_size, config.in_channels, data_config)
    metrics = evaluate_vqvae(model, dataset)
    count = min(grid_images, len(dataset)) if not image_files else len(dataset)
    shown = torch.stack([dataset[i][0] for i in range(count)])
    save_png(reconstruction_grid(model, shown), out_png)
    source = "files" if image_files else split
    return {**metrics, "images": len(dataset), "split": source, "grid": str(out_png)}
