"""Training and evaluation entry points (the only place besides the CLI with side effects).

``train_vqvae`` is stage 1 (Algorithm 1): Adam on reconstruction MSE plus commitment loss, EMA
codebooks, periodic validation with reconstruction grids, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import csv
import inspect
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from .checkpoint import (
    Checkpoint,
    load_prior,
    load_run_config,
    load_state_checked,
    load_vqvae,
    read_checkpoint,
    save_checkpoint,
)
from .classifier import Classifier
from .config import (
    ClassifierRunConfig,
    PixelSNAILConfig,
    PriorRunConfig,
    RuntimeConfig,
    TrainConfig,
    VQVAERunConfig,
    config_from_dict,
    save_yaml,
)
from .data import (
    CodeDataset,
    CodeStoreWriter,
    PriorTrainingCodes,
    TensorImageDataset,
    apply_augmentation,
    augmentation_names,
    float_to_uint8,
    load_image_files,
    make_grid,
    open_dataset,
    save_png,
    uint8_to_float,
)
from .distributed import DistributedContext, runtime_context
from .metrics import (
    code_histogram,
    codebook_perplexity,
    codebook_usage,
    psnr_from_mse,
    squared_error_01,
)
from .pixelsnail import PixelSNAIL
from .sampling import SamplerName, check_hierarchy, generate, requested_labels
from .vqvae import VQVAE2

VQVAE_KIND = "vqvae"
METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ["step", "elapsed_seconds", "split", "metric", "value"]
EVAL_BATCH_SIZE = 256
SEED_STRIDE = 1_000_003  # derived seeds: base * stride + offset (step, process rank)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a fresh seeded permutation each epoch, starting from any global step.

    The global batch at step s depends only on (seed, s), so a resumed run sees exactly the
    batches an uninterrupted one would, under any number of processes: process ``rank`` of
    ``world_size`` gets the rank-th contiguous slice of it. Incomplete final batches of an
    epoch are dropped.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if size < batch_size:
            raise ValueError(
                f"the training split has {size} images, fewer than one batch ({batch_size})"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.batches_per_epoch = size // batch_size
        self.per_process = batch_size // world_size
        self.offset = rank * self.per_process

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
                start = index * self.batch_size + self.offset
                yield order[start : start + self.per_process].tolist()
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
    """Append-only CSV of (step, elapsed_seconds, split, metric, value) rows.

    ``resume_step``: rows logged after this step (by a run killed before its next checkpoint)
    are dropped, so a resumed run does not log those steps twice. ``enabled=False`` (processes
    other than rank 0) writes nothing.
    """

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and path.exists():
            kept = [row for row in read_metrics(path) if int(row["step"]) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, path)
        if not path.exists():
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(METRICS_COLUMNS)

    def write(self, step: int, elapsed: float, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
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
    images = images.to(next(model.parameters()).device)
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
    metrics: dict[str, Any]  # final validation metrics (empty on processes other than rank 0)
    model: torch.nn.Module | None = None  # the trained module (not DDP-wrapped), on its device


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Adam:
    # The fused kernel updates every tensor in one pass: on the CPU the per-parameter loop of
    # the default implementation cost more than 3x as much (bench/README.md).
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.Adam(
        model.parameters(),
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        fused=fused or None,
    )


def _restore(model: torch.nn.Module, checkpoint: Checkpoint | None) -> tuple[int, float]:
    """Load a resumed run's weights (on the CPU); returns (step, elapsed seconds)."""
    if checkpoint is None:
        return 0, 0.0
    load_state_checked(model, checkpoint.model_state, checkpoint.path)
    return checkpoint.step, float(checkpoint.extra.get("elapsed_seconds", 0.0))


def _restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint | None) -> None:
    """Load a resumed run's optimizer state (moved to the parameters' device by PyTorch)."""
    if checkpoint is not None and checkpoint.optimizer_state is not None:
        optimizer.load_state_dict(checkpoint.optimizer_state)


class RunClock:
    """Wall time of a run across resumes, this process's ``--max-minutes`` deadline, and the
    run's ``train.schedule_minutes`` budget (which counts earlier processes too)."""

    def __init__(
        self, elapsed_before: float, max_minutes: float | None, budget_minutes: float = 0.0
    ) -> None:
        self.elapsed_before = elapsed_before
        self.start = time.monotonic()
        self.deadline = None if max_minutes is None else self.start + 60.0 * max_minutes
        self.budget = 60.0 * budget_minutes if budget_minutes > 0 else None  # seconds

    def elapsed(self) -> float:
        """Seconds of training so far, earlier processes of a resumed run included."""
        return self.elapsed_before + time.monotonic() - self.start

    def out_of_time(self) -> bool:
        past_deadline = self.deadline is not None and time.monotonic() >= self.deadline
        return past_deadline or (self.budget is not None and self.elapsed() >= self.budget)

    @property
    def limited(self) -> bool:
        return self.deadline is not None or self.budget is not None


def _progress_bar(train: TrainConfig, step: int, description: str, enabled: bool) -> tqdm:
    return tqdm(
        total=train.max_steps,
        initial=step,
        disable=not enabled,
        desc=description,
        dynamic_ncols=True,
        mininterval=1.0,
    )


def _learning_rate(train: TrainConfig, step: int, budget_spent: float = 0.0) -> float:
    """Step size for optimisation step ``step`` (0-based): optional linear warm-up, then the schedule.

    ``cosine`` and ``linear`` decay from ``learning_rate`` after the warm-up to 0 at ``max_steps``,
    or sooner when ``budget_spent`` (the fraction of ``schedule_minutes`` used) is further along.
    The warm-up is cut to ``max_steps // 2`` steps so that short runs of a preset still decay.
    """
    warmup = min(train.warmup_steps, train.max_steps // 2)
    if step < warmup:
        return train.learning_rate * (step + 1) / warmup
    progress = min(max((step - warmup) / (train.max_steps - warmup), budget_spent), 1.0)
    if train.lr_schedule == "cosine":
        return train.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
    if train.lr_schedule == "linear":
        return train.learning_rate * (1 - progress)
    return train.learning_rate


@dataclass
class StepModule:
    """What a training step calls: the model, on its device, DDP-wrapped and compiled as asked.

    ``model`` is the plain module (checkpoints, evaluation); ``forward`` is what the step calls.
    """

    model: torch.nn.Module
    forward: Any  # callable module: the model, its DDP wrapper, or a compiled version of either
    ddp: DistributedDataParallel | None
    context: DistributedContext
    runtime: RuntimeConfig

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast when asked (quantizer math opts out of it inside the quantizer)."""
        return torch.autocast(
            self.context.device.type,
            dtype=torch.bfloat16,
            enabled=self.runtime.precision == "bf16",
        )

    def sync_gradients(self, last_micro_batch: bool) -> AbstractContextManager:
        """DDP all-reduces gradients only after the last micro-batch of a step."""
        if self.ddp is None or last_micro_batch:
            return nullcontext()
        return self.ddp.no_sync()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a batch to this process's device (channels-last images when asked)."""
        tensor = tensor.to(self.context.device, non_blocking=True)
        if self.runtime.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor


def prepare_step_module(
    model: torch.nn.Module, context: DistributedContext, runtime: RuntimeConfig
) -> StepModule:
    """Put ``model`` on the device; wrap it in DDP under torchrun; compile it when asked."""
    model.to(context.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    forward: Any = model
    ddp = None
    if context.enabled:
        # Buffers (the EMA codebooks) are kept equal by the quantizer's own reductions, so
        # DDP's per-step broadcast of rank 0's buffers is not needed.
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        parameters = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = (
            {"forward_sync_buffers": False}  # newer PyTorch's name
            if "forward_sync_buffers" in parameters
            else {"broadcast_buffers": False}
        )
        ddp = DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)
        forward = ddp
    if runtime.compile:
        forward = torch.compile(forward)
    return StepModule(model=model, forward=forward, ddp=ddp, context=context, runtime=runtime)


def micro_batch_size(train: TrainConfig, context: DistributedContext) -> int:
    """Images per process and micro-batch; the global batch must split evenly."""
    parts = context.world_size * train.grad_accum_steps
    if train.batch_size % parts:
        raise ValueError(
            f"train.batch_size {train.batch_size} does not split evenly over "
            f"{context.world_size} process(es) x {train.grad_accum_steps} micro-batch(es)"
        )
    return train.batch_size // parts


def rank_batch_sampler(
    size: int, train: TrainConfig, step: int, context: DistributedContext
) -> EpochBatchSampler:
    """This process's slice of every global batch from ``step`` to ``train.max_steps``."""
    return EpochBatchSampler(
        size,
        train.batch_size,
        train.seed,
        step,
        train.max_steps,
        context.rank,
        context.world_size,
    )


def seed_own_dropout(train: TrainConfig, context: DistributedContext) -> None:
    """Under DDP every process draws its own dropout masks; one process keeps its stream."""
    if context.enabled:
        torch.manual_seed(train.seed * SEED_STRIDE + context.rank)


def _with_run_length(saved: Any, config: Any) -> Any:
    """A resumed run's saved config with this command's run length (steps and time budget)."""
    train = replace(
        saved.train,
        max_steps=config.train.max_steps,
        schedule_minutes=config.train.schedule_minutes,
    )
    return replace(saved, train=train)


def _out_of_time(clock: RunClock, context: DistributedContext) -> bool:
    """The --max-minutes deadline or the time budget, agreed by all processes so they stop at
    the same step."""
    return clock.limited and context.any(clock.out_of_time())


def _budget_spent(clock: RunClock, context: DistributedContext) -> float:
    """Fraction of the ``train.schedule_minutes`` budget used (0 without one), the same on every
    process so that all of them take the same step size."""
    if clock.budget is None:
        return 0.0
    return context.max(clock.elapsed()) / clock.budget


def _set_step_size(
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    step: int,
    clock: RunClock,
    context: DistributedContext,
) -> bool:
    """Give ``optimizer`` the step size of step ``step``; False (and nothing set) when the time
    budget is already spent, so that no step is taken."""
    budget_spent = _budget_spent(clock, context)
    if budget_spent >= 1.0:
        return False
    learning_rate = _learning_rate(train, step, budget_spent)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    return True


def train_vqvae(
    config: VQVAERunConfig,
    data_path: str | Path,
    run_dir: str | Path,
    *,
    max_minutes: float | None = None,
    resume: bool = False,
    progress: bool = True,
    preset: str | None = None,
    runtime: RuntimeConfig | None = None,
) -> TrainResult:
    """Train stage 1 and write checkpoints, metrics, grids and the resolved config to ``run_dir``.

    Under torchrun every process calls this; rank 0 alone writes files and measures.

    Args:
        config: the run config (on resume only its ``train.max_steps`` and
            ``train.schedule_minutes`` count: the saved run's config wins otherwise).
        data_path: image source (see ``vqvae2.data.open_dataset``).
        run_dir: output folder; must not hold a run unless ``resume``.
        max_minutes: stop (after checkpointing) once this much wall time has passed.
        resume: continue the run in ``run_dir`` from its latest checkpoint.
        progress: show a progress bar on stderr.
        preset: name of the preset the config came from; later commands pick matching prior
            and classifier presets by it.
        runtime: device, precision, compile and memory-layout choices (defaults: CPU or
            cuda:LOCAL_RANK, float32, eager).
    """
    runtime = runtime or RuntimeConfig()
    context = runtime_context(runtime)
    run_dir = Path(run_dir)
    kind_dir = run_dir / VQVAE_KIND
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(run_dir, VQVAE_KIND, with_optimizer=True)
        saved = config_from_dict(VQVAERunConfig, checkpoint.config)
        config = _with_run_length(saved, config)
    elif (kind_dir / "latest").exists():
        raise ValueError(
            f"{run_dir} already holds a trained VQ-VAE; pass --resume or another --out"
        )
    model_config, train_config = config.model, config.train
    micro_size = micro_batch_size(train_config, context)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, run_dir / "config.yaml")

    train_set = open_dataset(
        data_path, "train", model_config.image_size, model_config.in_channels, config.data
    )
    val_set = open_dataset(
        data_path, "val", model_config.image_size, model_config.in_channels, config.data
    )

    torch.manual_seed(train_config.seed)
    model = VQVAE2(
        model_config,
        reduce_fn=context.all_reduce_sum,
        gather_fn=context.all_gather_cat,
        seed=train_config.seed,
    )
    step, elapsed_before = _restore(model, checkpoint)
    step_module = prepare_step_module(model, context, runtime)
    optimizer = make_optimizer(model, train_config)
    _restore_optimizer(optimizer, checkpoint)
    if checkpoint is not None:
        preset = checkpoint.extra.get("preset", preset)
    model.train()

    grid_images = torch.stack(
        [val_set[i][0] for i in range(min(train_config.grid_images, len(val_set)))]
    )
    log = MetricsLog(
        run_dir / METRICS_FILE, resume_step=step if resume else None, enabled=context.is_main
    )
    sampler = rank_batch_sampler(len(train_set), train_config, step, context)
    loader = batch_loader(train_set, sampler, config.data.num_workers)
    clock = RunClock(elapsed_before, max_minutes, train_config.schedule_minutes)

    def checkpoint_now() -> None:
        save_checkpoint(
            kind_dir,
            VQVAE_KIND,
            step,
            config,
            model,
            optimizer,
            extra={
                "elapsed_seconds": clock.elapsed(),
                "data_path": str(data_path),
                "preset": preset,
            },
        )

    bar = _progress_bar(train_config, step, "train-vqvae", progress and context.is_main)
    for images, _ in loader:
        if not _set_step_size(optimizer, train_config, step, clock, context):
            break  # resumed with the time budget already spent
        optimizer.zero_grad(set_to_none=True)
        # Micro-batches see the same codebooks, which then move once for the whole batch.
        accumulating = train_config.grad_accum_steps > 1
        with model.deferred_codebook_updates() if accumulating else nullcontext():
            for micro in range(train_config.grad_accum_steps):
                micro_images = step_module.to_device(
                    images[micro * micro_size : (micro + 1) * micro_size]
                )
                last = micro == train_config.grad_accum_steps - 1
                with step_module.sync_gradients(last), step_module.autocast():
                    output = step_module.forward(micro_images)
                    loss = output.loss / train_config.grad_accum_steps
                loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if step % train_config.log_every == 0 and context.is_main:
            # Figures of rank 0's last micro-batch.
            # MSE measured as validation measures it (clamped, [0, 1] pixels), not the loss.
            squared_error = squared_error_01(output.reconstruction.detach(), micro_images)
            values = {
                "loss": output.loss.item(),
                "mse": float(squared_error.sum()) / micro_images.numel(),
                "commitment": output.commitment_loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
            }
            for name, perplexity, usage in zip(
                model_config.level_names, output.perplexity, output.usage, strict=True
            ):
                values[f"perplexity_{name}"] = float(perplexity)
                values[f"batch_usage_{name}"] = float(usage)
            log.write(step, clock.elapsed(), "train", values)
            bar.set_postfix(mse=f"{values['mse']:.5f}", refresh=False)
        out_of_time = _out_of_time(clock, context)
        if not context.is_main:
            if out_of_time:
                break
            continue
        if step % train_config.val_every == 0 and step < train_config.max_steps and not out_of_time:
            metrics = evaluate_vqvae(model, val_set, train_config.val_batches)
            log.write(step, clock.elapsed(), "val", metrics)
            save_png(
                reconstruction_grid(model, grid_images),
                run_dir / "reconstructions" / f"step-{step:08d}.png",
            )
        if step % train_config.checkpoint_every == 0 and not out_of_time:
            checkpoint_now()
        if out_of_time:
            break
    bar.close()
    model.eval()
    if not context.is_main:
        return TrainResult(run_dir=run_dir, step=step, metrics={}, model=model)

    metrics = evaluate_vqvae(model, val_set)
    log.write(step, clock.elapsed(), "val", metrics)
    grid = reconstruction_grid(model, grid_images)
    save_png(grid, run_dir / "reconstructions" / f"step-{step:08d}.png")
    save_png(grid, run_dir / "reconstructions.png")
    checkpoint_now()
    return TrainResult(run_dir=run_dir, step=step, metrics=metrics, model=model)


def reconstruct(
    run_dir: str | Path,
    data_path: str | Path | None,
    split: str,
    out_png: str | Path,
    image_files: list[str] | None = None,
    grid_images: int = 16,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Write an original / reconstruction / per-level grid and measure a split (on ``device``).

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
    model = load_vqvae(run_dir, map_location=device)
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


# ----------------------------------------------------------------------------------------------
# Stage 2: code extraction (Algorithm 2, lines 1-7)

CODES_DIR = "codes"
AUGMENTED_CODES = "train-augmented"  # store of the codes of transformed training images


@torch.no_grad()
def extract_codes(
    run_dir: str | Path,
    data_path: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = True,
    runtime: RuntimeConfig | None = None,
    augment: Sequence[str] = (),
) -> dict[str, Path]:
    """Encode dataset splits once with the trained VQ-VAE into ``RUN_DIR/codes/<split>``.

    With ``augment`` ("flip", "shift"), the codes of transformed training images go to a second
    store, ``RUN_DIR/codes/train-augmented``, one copy per transform, each row with its
    transform's index; priors trained on it are told which transform made each code map
    (distribution augmentation) and use the identity for evaluation and sampling. Without
    ``augment`` an earlier augmented store is removed, so priors never mix two VQ-VAEs' codes.

    Under torchrun each process encodes a contiguous share of every split into the same store.

    Returns:
        The store folder of each split written.
    """
    context = runtime_context(runtime)
    run_dir = Path(run_dir)
    names = augmentation_names(augment)  # checked before any work
    checkpoint_step = read_checkpoint(run_dir, VQVAE_KIND).step
    model = load_vqvae(run_dir, map_location=context.device)
    config = model.config
    data_config = load_run_config(run_dir, VQVAE_KIND, VQVAERunConfig).data
    written = {}
    for split in splits:
        dataset = open_dataset(data_path, split, config.image_size, config.in_channels, data_config)
        extra = {"num_classes": dataset.num_classes, "vqvae_step": checkpoint_step}
        stores = [(split, ["identity"], ())]  # (store, transforms encoded, names recorded)
        if split == "train" and len(names) > 1:  # the identity is the plain store
            stores.append((AUGMENTED_CODES, names[1:], names))
        for store_name, transforms, recorded in stores:
            written[store_name] = _encode_into_store(
                model,
                dataset,
                run_dir / CODES_DIR / store_name,
                transforms,
                recorded,
                extra,
                context,
                batch_size,
                data_config.num_workers,
                progress,
            )
    stale = run_dir / CODES_DIR / AUGMENTED_CODES
    if AUGMENTED_CODES not in written and "train" in splits and context.is_main and stale.exists():
        shutil.rmtree(stale)
    context.barrier()
    return written


def _encode_into_store(
    model: VQVAE2,
    dataset: Dataset,
    directory: Path,
    transforms: Sequence[str],
    recorded: Sequence[str],
    extra: dict,
    context: DistributedContext,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> Path:
    """Encode ``dataset`` once per transform into one code store, transform-major rows.

    ``recorded`` names every transform of an augmented store (its rows record their index in
    it); empty for a plain store. Each process encodes its contiguous share of every copy.
    """
    config = model.config
    if context.is_main:
        writer = CodeStoreWriter(
            directory,
            len(dataset) * len(transforms),
            config.level_names,
            config.latent_sizes,
            config.codebook_size,
            extra=extra,
            augmentations=recorded,
        )
    context.barrier()  # the store's files exist before the other processes open them
    if not context.is_main:
        writer = CodeStoreWriter.attach(directory, config.level_names)
    share = context.shard_range(len(dataset))
    for copy_index, transform in enumerate(transforms):
        transform_index = recorded.index(transform) if recorded else 0
        start = copy_index * len(dataset) + share.start
        batches = eval_loader(Subset(dataset, share), batch_size, num_workers)
        description = f"extract-codes {directory.name}" + (f" {transform}" if recorded else "")
        for images, labels in tqdm(
            batches, desc=description, disable=not (progress and context.is_main)
        ):
            images = apply_augmentation(images.to(context.device), transform)
            writer.write(start, model.encode(images), labels, transform_index)
            start += len(labels)
    writer.flush()
    context.barrier()  # every share is written before the store is closed
    if context.is_main:
        writer.close()
    context.barrier()
    return directory


# ----------------------------------------------------------------------------------------------
# Stage 2: priors (Algorithm 2, lines 8-9)


def prior_kind(level: str) -> str:
    return f"prior-{level}"


def level_index(run_dir: str | Path, level: str) -> int:
    """Index (top = 0) of ``level`` in the run's VQ-VAE; ``ValueError`` if it has no such level."""
    names = load_run_config(run_dir, VQVAE_KIND, VQVAERunConfig).model.level_names
    if level not in names:
        raise ValueError(
            f"the VQ-VAE in {run_dir} has levels {', '.join(names)}; there is no '{level}' level"
        )
    return names.index(level)


@torch.no_grad()
def evaluate_prior(
    prior: PixelSNAIL, codes: Dataset, level: int, max_batches: int | None = None
) -> float:
    """Mean negative log-likelihood of a split's codes in nats per code (eval mode)."""
    was_training = prior.training
    prior.eval()
    device = next(prior.parameters()).device
    total, count = 0.0, 0
    for batch_index, (level_codes, labels) in enumerate(eval_loader(codes, EVAL_BATCH_SIZE)):
        if max_batches is not None and batch_index >= max_batches:
            break
        level_codes = [level_code.to(device) for level_code in level_codes]
        output = prior(*_prior_inputs(prior, level_codes, labels.to(device), level))
        total += float(output.loss) * level_codes[level].numel()
        count += level_codes[level].numel()
    prior.train(was_training)
    return total / max(count, 1)


def _prior_inputs(
    prior: PixelSNAIL, level_codes: list[torch.Tensor], labels: torch.Tensor, level: int
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
    """(codes, labels, upper codes) for ``prior`` from a batch of every level's codes."""
    config = prior.config
    return (
        level_codes[level],
        labels if config.num_classes > 0 else None,
        level_codes[:level] if config.condition_sizes else None,
    )


def _nll_summary(prefix: str, nats: float) -> dict[str, float]:
    return {f"{prefix}_nll_nats": nats, f"{prefix}_nll_bits": nats / math.log(2)}


def _prior_for_data(prior: PixelSNAILConfig, from_data: dict[str, Any]) -> PixelSNAILConfig:
    """``prior`` with its data fields set from the data; a field set by hand to another value
    than both its default and the data's is refused rather than silently replaced."""
    defaults = PixelSNAILConfig()
    for name, value in from_data.items():
        given = getattr(prior, name)
        if given != getattr(defaults, name) and given != value:
            raise ValueError(
                f"prior.{name}={given} does not fit the data ({value}): it is set from the "
                "VQ-VAE and the extracted codes, leave it at its default"
            )
    return replace(prior, **from_data)


def train_prior(
    run_dir: str | Path,
    level: str,
    config: PriorRunConfig,
    *,
    max_minutes: float | None = None,
    resume: bool = False,
    progress: bool = True,
    runtime: RuntimeConfig | None = None,
) -> TrainResult:
    """Fit the prior of one level on the extracted codes (``extract_codes`` first).

    The prior's data fields (code size, codebook size, upper levels, classes) come from the
    VQ-VAE and the code store; its checkpoints go to ``RUN_DIR/prior-<level>``. Under torchrun
    every process calls this; rank 0 alone writes files and measures.

    Returns:
        Final ``train_nll_nats``/``bits`` and ``val_nll_nats``/``bits`` (nats/bits per code).
    """
    runtime = runtime or RuntimeConfig()
    context = runtime_context(runtime)
    run_dir = Path(run_dir)
    vqvae_config = load_run_config(run_dir, VQVAE_KIND, VQVAERunConfig).model
    index = level_index(run_dir, level)
    train_codes = CodeDataset(run_dir / CODES_DIR / "train")
    val_codes = CodeDataset(run_dir / CODES_DIR / "val")
    for store in (train_codes, val_codes):
        if (
            store.codebook_size != vqvae_config.codebook_size
            or tuple(store.code_sizes) != vqvae_config.latent_sizes
        ):
            raise ValueError(
                f"the codes in {store.directory} were not made by this VQ-VAE; extract them again"
            )

    augmented_dir = run_dir / CODES_DIR / AUGMENTED_CODES
    use_augmented = config.augmented_codes and (augmented_dir / "meta.json").is_file()
    training_codes = PriorTrainingCodes(
        train_codes, CodeDataset(augmented_dir) if use_augmented else None
    )

    kind = prior_kind(level)
    kind_dir = run_dir / kind
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(run_dir, kind, with_optimizer=True)
        saved = config_from_dict(PriorRunConfig, checkpoint.config)
        config = _with_run_length(saved, config)
    elif (kind_dir / "latest").exists():
        raise ValueError(f"{kind_dir} already holds a trained prior; pass --resume")
    else:
        num_classes = train_codes.num_classes if config.class_conditional else 0
        from_data = {
            "code_size": vqvae_config.latent_sizes[index],
            "codebook_size": vqvae_config.codebook_size,
            "condition_sizes": tuple(vqvae_config.latent_sizes[:index]),
            "num_classes": num_classes if num_classes > 1 else 0,
            "num_augmentations": training_codes.num_augmentations,
        }
        config = replace(config, prior=_prior_for_data(config.prior, from_data))
    if config.prior.num_augmentations != training_codes.num_augmentations:
        raise ValueError(
            f"this prior was started on codes with {config.prior.num_augmentations} transforms "
            f"but {run_dir / CODES_DIR} now holds {training_codes.num_augmentations}; "
            "extract the codes as before or train a new prior"
        )
    train_config = config.train
    micro_size = micro_batch_size(train_config, context)
    if context.is_main:
        kind_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, kind_dir / "config.yaml")

    torch.manual_seed(train_config.seed)
    prior = PixelSNAIL(config.prior)
    step, elapsed_before = _restore(prior, checkpoint)
    step_module = prepare_step_module(prior, context, runtime)
    optimizer = make_optimizer(prior, train_config)
    _restore_optimizer(optimizer, checkpoint)
    seed_own_dropout(train_config, context)
    prior.train()

    log = MetricsLog(
        kind_dir / METRICS_FILE, resume_step=step if resume else None, enabled=context.is_main
    )
    sampler = rank_batch_sampler(len(training_codes), train_config, step, context)
    clock = RunClock(elapsed_before, max_minutes, train_config.schedule_minutes)

    def checkpoint_now() -> None:
        save_checkpoint(
            kind_dir,
            kind,
            step,
            config,
            prior,
            optimizer,
            extra={"elapsed_seconds": clock.elapsed(), "level": level},
        )

    bar = _progress_bar(train_config, step, f"train-prior {level}", progress and context.is_main)
    augmentation_conditional = config.prior.num_augmentations > 0
    for level_codes, labels, augmentations in batch_loader(training_codes, sampler, num_workers=0):
        if not _set_step_size(optimizer, train_config, step, clock, context):
            break  # resumed with the time budget already spent
        optimizer.zero_grad(set_to_none=True)
        for micro in range(train_config.grad_accum_steps):
            part = slice(micro * micro_size, (micro + 1) * micro_size)
            micro_codes = [step_module.to_device(codes[part]) for codes in level_codes]
            micro_labels = step_module.to_device(labels[part])
            micro_augmentations = (
                step_module.to_device(augmentations[part]) if augmentation_conditional else None
            )
            last = micro == train_config.grad_accum_steps - 1
            with step_module.sync_gradients(last), step_module.autocast():
                output = step_module.forward(
                    *_prior_inputs(prior, micro_codes, micro_labels, index), micro_augmentations
                )
                loss = output.loss / train_config.grad_accum_steps
            loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if step % train_config.log_every == 0 and context.is_main:
            nats = output.loss.item()
            log.write(
                step,
                clock.elapsed(),
                "train",
                {**_nll_summary("batch", nats), "lr": optimizer.param_groups[0]["lr"]},
            )
            bar.set_postfix(nll=f"{nats:.3f}", refresh=False)
        out_of_time = _out_of_time(clock, context)
        if not context.is_main:
            if out_of_time:
                break
            continue
        if step % train_config.val_every == 0 and step < train_config.max_steps and not out_of_time:
            nats = evaluate_prior(prior, val_codes, index, train_config.val_batches)
            log.write(step, clock.elapsed(), "val", _nll_summary("val", nats))
        if step % train_config.checkpoint_every == 0 and not out_of_time:
            checkpoint_now()
        if out_of_time:
            break
    bar.close()
    prior.eval()
    if not context.is_main:
        return TrainResult(run_dir=kind_dir, step=step, metrics={}, model=prior)
    # Train NLL on a fixed random subset as large as the validation split: the same precision
    # as the validation figure, without a pass over millions of training codes.
    order = np.random.default_rng(train_config.seed).permutation(len(train_codes))
    train_sample = Subset(train_codes, np.sort(order[: len(val_codes)]).tolist())
    metrics = {
        **_nll_summary("train", evaluate_prior(prior, train_sample, index)),
        **_nll_summary("val", evaluate_prior(prior, val_codes, index)),
    }
    log.write(step, clock.elapsed(), "final", metrics)
    checkpoint_now()
    return TrainResult(run_dir=kind_dir, step=step, metrics=metrics, model=prior)


# ----------------------------------------------------------------------------------------------
# Classifier (for rejection sampling and the evaluation metrics)

CLASSIFIER_KIND = "classifier"
AUGMENT_SHIFT = 2  # pixels of random translation in classifier training


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to ``AUGMENT_SHIFT`` pixels: (B, C, S, S) -> same."""
    batch, _, size, _ = images.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = torch.nn.functional.pad(images, (AUGMENT_SHIFT,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * AUGMENT_SHIFT + 1, (batch, 2), generator=generator)
    return torch.stack(
        [padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets.tolist())]
    )


@torch.no_grad()
def evaluate_classifier(classifier: Classifier, dataset: Dataset, num_workers: int = 0) -> float:
    """Top-1 accuracy of ``classifier`` on a dataset of (image, label) pairs."""
    was_training = classifier.training
    classifier.eval()
    correct, total = 0, 0
    device = next(classifier.parameters()).device
    for images, labels in eval_loader(dataset, EVAL_BATCH_SIZE, num_workers):
        predictions = classifier(images.to(device)).logits.argmax(dim=-1).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    classifier.train(was_training)
    return correct / max(total, 1)


def train_classifier(
    config: ClassifierRunConfig,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    max_minutes: float | None = None,
    resume: bool = False,
    progress: bool = True,
    runtime: RuntimeConfig | None = None,
) -> TrainResult:
    """Train the image classifier; checkpoints, metrics and config go to ``out_dir``.

    ``model.num_classes`` is taken from the data. Returns ``val_accuracy`` and
    ``test_accuracy`` (on rank 0; under torchrun every process calls this).
    """
    runtime = runtime or RuntimeConfig()
    context = runtime_context(runtime)
    out_dir = Path(out_dir)
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(out_dir, CLASSIFIER_KIND, with_optimizer=True)
        saved = config_from_dict(ClassifierRunConfig, checkpoint.config)
        config = _with_run_length(saved, config)
    elif (out_dir / "latest").exists():
        raise ValueError(
            f"{out_dir} already holds a trained classifier; pass --resume or another --out"
        )
    model_config, train_config = config.model, config.train
    splits = {
        split: open_dataset(
            data_path, split, model_config.image_size, model_config.in_channels, config.data
        )
        for split in ("train", "val", "test")
    }
    if checkpoint is None:
        num_classes = splits["train"].num_classes
        if num_classes < 2:
            raise ValueError(f"{data_path} has {num_classes} class; a classifier needs at least 2")
        config = replace(config, model=replace(model_config, num_classes=num_classes))
        model_config = config.model
    micro_size = micro_batch_size(train_config, context)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, out_dir / "config.yaml")

    torch.manual_seed(train_config.seed)
    classifier = Classifier(model_config)
    step, elapsed_before = _restore(classifier, checkpoint)
    step_module = prepare_step_module(classifier, context, runtime)
    optimizer = make_optimizer(classifier, train_config)
    _restore_optimizer(optimizer, checkpoint)
    seed_own_dropout(train_config, context)
    classifier.train()

    log = MetricsLog(
        out_dir / METRICS_FILE, resume_step=step if resume else None, enabled=context.is_main
    )
    sampler = rank_batch_sampler(len(splits["train"]), train_config, step, context)
    clock = RunClock(elapsed_before, max_minutes, train_config.schedule_minutes)

    def checkpoint_now() -> None:
        save_checkpoint(
            out_dir,
            CLASSIFIER_KIND,
            step,
            config,
            classifier,
            optimizer,
            extra={"elapsed_seconds": clock.elapsed()},
        )

    bar = _progress_bar(train_config, step, "train-classifier", progress and context.is_main)
    for images, labels in batch_loader(splits["train"], sampler, config.data.num_workers):
        if not _set_step_size(optimizer, train_config, step, clock, context):
            break  # resumed with the time budget already spent
        seed = (train_config.seed * SEED_STRIDE + step) * context.world_size + context.rank
        images = augment(images, torch.Generator().manual_seed(seed))
        optimizer.zero_grad(set_to_none=True)
        for micro in range(train_config.grad_accum_steps):
            part = slice(micro * micro_size, (micro + 1) * micro_size)
            micro_images, micro_labels = (
                step_module.to_device(images[part]),
                step_module.to_device(labels[part]),
            )
            last = micro == train_config.grad_accum_steps - 1
            with step_module.sync_gradients(last), step_module.autocast():
                logits = step_module.forward(micro_images).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), micro_labels)
                scaled_loss = loss / train_config.grad_accum_steps
            scaled_loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if step % train_config.log_every == 0 and context.is_main:
            accuracy = float((logits.argmax(-1) == micro_labels).float().mean())
            log.write(step, clock.elapsed(), "train", {"loss": loss.item(), "accuracy": accuracy})
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        out_of_time = _out_of_time(clock, context)
        if context.is_main and step % train_config.checkpoint_every == 0 and not out_of_time:
            checkpoint_now()
        if out_of_time:
            break
    bar.close()
    classifier.eval()
    if not context.is_main:
        return TrainResult(run_dir=out_dir, step=step, metrics={}, model=classifier)
    metrics = {
        "val_accuracy": evaluate_classifier(classifier, splits["val"]),
        "test_accuracy": evaluate_classifier(classifier, splits["test"]),
    }
    log.write(step, clock.elapsed(), "final", metrics)
    checkpoint_now()
    return TrainResult(run_dir=out_dir, step=step, metrics=metrics, model=classifier)


# ----------------------------------------------------------------------------------------------
# Sampling from a trained run (Algorithm 2, lines 10-13)

SAMPLE_BATCH_SIZE = 64


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) uint8
    codes: list[torch.Tensor]  # per level, top first, (N, h, w) int64
    labels: torch.Tensor | None  # (N,) int64 requested classes, or None (unconditional)


def load_hierarchy(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[VQVAE2, list[PixelSNAIL]]:
    """The VQ-VAE and one trained prior per level (top first) of a run on ``device``, checked
    to fit."""
    run_dir = Path(run_dir)
    vqvae = load_vqvae(run_dir, map_location=device)
    priors = []
    for level in vqvae.config.level_names:
        if not (run_dir / prior_kind(level) / "latest").is_file():
            raise ValueError(
                f"{run_dir} has no trained {level} prior; run `vqvae2 train-prior {run_dir} --level {level}`"
            )
        priors.append(load_prior(run_dir, level, map_location=device))
    check_hierarchy(vqvae, priors)
    return vqvae, priors


def sample_from_run(
    run_dir: str | Path,
    count: int,
    classes: list[int] | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = SAMPLE_BATCH_SIZE,
    progress: bool = True,
    sampler: SamplerName = "cached",
    device: str | torch.device = "cpu",
) -> SampleResult:
    """Draw ``count`` images from a trained run.

    With class-conditional priors, ``classes`` are spread evenly over the samples in blocks
    (``count // len(classes)`` of each class, in the order given); without ``classes`` every
    class gets an equal share. Randomness comes from one generator seeded with ``seed`` on
    ``device`` (where the models run), so the same seed draws other images on another device.
    The results are on the CPU.
    """
    if count < 1:
        raise ValueError(f"the number of samples must be >= 1, got {count}")
    vqvae, priors = load_hierarchy(run_dir, device)
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


@torch.no_grad()
def class_agreement(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of uint8 images (N, C, H, W) that ``classifier`` assigns to their ``labels``."""
    classifier.eval()
    predictions = torch.cat(
        [
            classifier(uint8_to_float(images[start : start + EVAL_BATCH_SIZE])).logits.argmax(-1)
            for start in range(0, len(images), EVAL_BATCH_SIZE)
        ]
    )
    return float((predictions == labels).float().mean())
