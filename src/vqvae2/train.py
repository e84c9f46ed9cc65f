"""The trainers of VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019).

- ``train_vqvae``: stage 1 (Algorithm 1): Adam on reconstruction MSE plus commitment loss, EMA
  codebooks, validation with reconstruction grids.
- ``extract_codes`` (defined in ``vqvae2.extract``): encode the dataset once into code stores
  (Algorithm 2, lines 1-7).
- ``train_prior``: the PixelSNAIL prior of one level on the stored codes (Algorithm 2, 8-9).
- ``train_classifier`` (defined in ``vqvae2.fit``): the classifier of rejection sampling and of
  the evaluation.

Each trainer builds its data and model and writes one step function; ``vqvae2.loop`` runs the
session around it (resume, schedule, log, validation, checkpoints, time limits, DDP).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .batches import check_batch_fits, micro_batch_size
from .checkpoint import Checkpoint, RunFacts
from .codes import CodeDataset, PriorTrainingCodes
from .config import PriorRunConfig, RuntimeConfig, VQVAERunConfig
from .data import (
    DEFAULT_DATA_PATH,
    batch_loader,
    float_to_uint8,
    open_dataset,
)
from .distributed import runtime_context
from .extract import extract_codes  # noqa: F401  (the stages in one place)
from .fit import train_classifier  # noqa: F401
from .loop import (
    StepModule,
    StepOutput,
    TrainingSession,
    TrainResult,
    image_keys,
    micro_batches,
    resume_or_start,
    training_lock,
)
from .measure import (
    measure_nll,
    measure_reconstruction,
    prior_inputs,
    reconstruction_grid,
)
from .metrics import squared_error_01
from .model_configs import prior_for_data
from .pixelsnail import PixelSNAIL
from .random_state import seed_own_dropout
from .report import make_grid, save_png
from .run import (
    AUGMENTED_CODES,
    RECONSTRUCTIONS_DIR,
    VQVAE_KIND,
    Run,
    prior_kind,
)
from .sampling import sample_level_cached
from .schedule import Clock
from .vqvae import VQVAE2

logger = logging.getLogger("vqvae2.train")

# ----------------------------------------------------------------------------------------------
# Stage 1 (Algorithm 1)


def train_vqvae(
    config: VQVAERunConfig | None,
    data_path: str | Path | None,
    run_dir: str | Path,
    *,
    max_minutes: float | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    preset: str | None = None,
    runtime: RuntimeConfig | None = None,
    now: Clock = time.monotonic,
) -> TrainResult:
    """Train stage 1 and write checkpoints, metrics, grids and the resolved config to ``run_dir``.

    Under torchrun every process calls this; rank 0 alone writes files and measures.

    Args:
        config: the run config; on resume None (the saved one) or a config of which only the
            run length counts (``train.max_steps``, ``train.schedule_minutes``).
        data_path: image source (see ``vqvae2.data.open_dataset``); None: on resume the one
            the run trained on, else (or when none was recorded) the default Fashion-MNIST
            files.
        run_dir: output folder; must not hold a run unless ``resume``, nor be in the hands of
            another trainer (``RUN_DIR/vqvae/.lock``, see ``loop.training_lock``).
        max_minutes: stop (after checkpointing) once this much wall time has passed.
        resume: continue the run in ``run_dir`` from its latest checkpoint.
        max_steps: with ``resume``, the run's new length (default: the config's).
        progress: show a progress bar on stderr.
        preset: name of the preset the config came from; later commands pick matching prior
            and classifier presets by it.
        runtime: device, precision, compile and memory-layout choices (defaults: CPU or
            cuda:LOCAL_RANK, float32, eager).
        now: the clock of the time limits (tests pass a fake one).

    Returns:
        Final validation ``mse``/``psnr`` and per level ``usage_*``/``perplexity_*``.
    """
    runtime = runtime or RuntimeConfig()
    context = runtime_context(runtime)
    run_dir = Path(run_dir)
    with training_lock(run_dir / VQVAE_KIND, context, resume):
        config, checkpoint = resume_or_start(
            run_dir / VQVAE_KIND,
            VQVAE_KIND,
            VQVAERunConfig,
            config,
            resume,
            f"{run_dir} already holds a trained VQ-VAE; pass --resume or another --out",
            max_steps,
        )
        model_config, train_config = config.model, config.train
        micro_batch_size(train_config, context)  # the batch must split evenly: checked first
        data_path, train_set, val_set = _vqvae_data(data_path, config, checkpoint)
        check_batch_fits(len(train_set), train_config.batch_size)
        torch.manual_seed(train_config.seed)
        model = VQVAE2(
            model_config,
            reduce_fn=context.all_reduce_sum,
            gather_fn=context.all_gather_cat,
            seed=train_config.seed,
        )
        if checkpoint is not None:
            preset = checkpoint.facts.preset
        session = TrainingSession(
            model,
            config,
            context,
            runtime,
            kind=VQVAE_KIND,
            checkpoint_dir=run_dir / VQVAE_KIND,
            log_dir=run_dir,
            checkpoint=checkpoint,
            max_minutes=max_minutes,
            progress=progress,
            facts=RunFacts(data_path=str(Path(data_path).resolve()), preset=preset),
            postfix="mse",
            now=now,
        )
        validate = _vqvae_validation(model, val_set, session, run_dir)
        loader = batch_loader(train_set, session.batch_sampler(train_set), config.data.num_workers)
        session.run(loader, _vqvae_step(model, session, config), validate)
        return session.finish(lambda: validate(final=True), split="val")


def _vqvae_data(
    data_path: str | Path | None, config: VQVAERunConfig, checkpoint: Checkpoint | None
) -> tuple[str | Path, Dataset, Dataset]:
    """The image source of stage 1 (``data_path``; None: the one recorded in ``checkpoint``,
    else the default) and its train and validation splits."""
    if data_path is None:
        recorded = None if checkpoint is None else checkpoint.facts.data_path
        data_path = recorded or DEFAULT_DATA_PATH
    model_config = config.model
    train_set, val_set = (
        open_dataset(
            data_path,
            split,
            model_config.image_size,
            model_config.in_channels,
            config.data,
            config.train.seed,
        )
        for split in ("train", "val")
    )
    return data_path, train_set, val_set


def _vqvae_validation(model: VQVAE2, val_set: Dataset, session: TrainingSession, run_dir: Path):
    """Validation of stage 1: reconstruction metrics on ``train.val_batches`` batches (the whole
    split when ``final``) and a reconstruction grid per pass, the last one also as
    ``RUN_DIR/reconstructions.png``."""
    train = session.train
    shown = min(train.grid_images, len(val_set))
    grid_images = torch.stack([val_set[i][0] for i in range(shown)])

    def validate(final: bool = False) -> dict[str, float]:
        grid = reconstruction_grid(model, grid_images)
        save_png(grid, run_dir / RECONSTRUCTIONS_DIR / f"step-{session.step:08d}.png")
        session.log.image(
            session.step, "reconstructions (rows: originals, all levels, top ...)", grid
        )
        if final:
            save_png(grid, run_dir / f"{RECONSTRUCTIONS_DIR}.png")
        return measure_reconstruction(model, val_set, None if final else train.val_batches)

    return validate


def _vqvae_step(model: VQVAE2, session: TrainingSession, config: VQVAERunConfig):
    """The forward and backward passes of one stage-1 step over a batch (B, C, H, W); with
    ``model.level_dropout`` each image's levels are dropped as drawn from its key."""
    train, step_module = config.train, session.step_module
    accumulating = train.grad_accum_steps > 1
    dropping = config.model.level_dropout > 0

    def step(batch: tuple[Tensor, Tensor]) -> StepOutput:
        images = batch[0]
        total = torch.zeros((), device=step_module.context.device)
        # Micro-batches see the same codebooks, which then move once for the whole batch.
        with model.deferred_codebook_updates() if accumulating else nullcontext():
            for rows, last in micro_batches(step_module, train):
                micro_images = step_module.images_to_device(images[rows])
                inputs = [micro_images]
                if dropping:  # level dropout's choice for each image, (B,)
                    keys = image_keys(session, rows)
                    inputs.append(step_module.to_device(model.draw_kept_levels(keys, train.seed)))
                with step_module.sync_gradients(last), step_module.autocast():
                    output = step_module.forward(*inputs)
                    loss = output.loss / train.grad_accum_steps
                loss.backward()
                total += loss.detach()

        def figures() -> dict[str, float]:
            """Figures of rank 0's last micro-batch; the MSE measured as validation's."""
            squared_error = squared_error_01(output.reconstruction.detach(), micro_images)
            values = {
                "loss": output.loss.item(),
                "mse": float(squared_error.sum()) / micro_images.numel(),
                "commitment": output.commitment_loss.item(),
            }
            if config.model.prefix_decoder_weight > 0:
                values["prefix_mse"] = output.prefix_loss.item()
            for name, perplexity, usage in zip(
                config.model.level_names, output.perplexity, output.usage, strict=True
            ):
                values[f"perplexity_{name}"] = float(perplexity)
                values[f"batch_usage_{name}"] = float(usage)
            return values

        return StepOutput(total, figures)

    return step


# ----------------------------------------------------------------------------------------------
# Stage 2: priors (Algorithm 2, lines 8-9)


def _nll_summary(prefix: str, nats: float) -> dict[str, float]:
    return {f"{prefix}_nll_nats": nats, f"{prefix}_nll_bits": nats / math.log(2)}


def _code_stores(
    run: Run, use_augmented: bool
) -> tuple[CodeDataset, CodeDataset, PriorTrainingCodes]:
    """The train and validation code stores of a run, checked against its VQ-VAE, and what a
    prior trains on (the train codes plus, when asked and present, the augmented codes)."""
    vqvae_config = run.config.model
    train_codes = CodeDataset(run.codes_dir / "train")
    val_codes = CodeDataset(run.codes_dir / "val")
    for store in (train_codes, val_codes):
        if (
            store.codebook_size != vqvae_config.codebook_size
            or tuple(store.code_sizes) != vqvae_config.latent_sizes
        ):
            raise ValueError(
                f"the codes in {store.directory} were not made by this VQ-VAE; extract them again"
            )
    augmented_dir = run.codes_dir / AUGMENTED_CODES
    augmented = (
        CodeDataset(augmented_dir)
        if use_augmented and (augmented_dir / "meta.json").is_file()
        else None
    )
    return train_codes, val_codes, PriorTrainingCodes(train_codes, augmented)


def _prior_fitting_data(
    run: Run, index: int, config: PriorRunConfig, new: bool, codes: PriorTrainingCodes
) -> PriorRunConfig:
    """A new prior's config with its data fields set from the VQ-VAE and the codes
    (``model_configs.prior_for_data``); a resumed prior's, checked to fit the codes still."""
    prior = config.prior
    if not new:
        if prior.num_augmentations != codes.num_augmentations:
            raise ValueError(
                f"this prior was started on codes with {prior.num_augmentations} transforms "
                f"but {run.codes_dir} now holds {codes.num_augmentations}; "
                "extract the codes as before or train a new prior"
            )
        return config
    vqvae = run.config.model
    num_classes = codes.plain.num_classes if config.class_conditional else 0
    from_data = {
        "code_size": vqvae.latent_sizes[index],
        "codebook_size": vqvae.codebook_size,
        "condition_sizes": tuple(vqvae.latent_sizes[:index]),
        "num_classes": num_classes if num_classes > 1 else 0,
        "num_augmentations": codes.num_augmentations,
    }
    return replace(config, prior=prior_for_data(prior, from_data))


def train_prior(
    run: Run,
    level: str,
    config: PriorRunConfig | None,
    *,
    max_minutes: float | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    runtime: RuntimeConfig | None = None,
    now: Clock = time.monotonic,
) -> TrainResult:
    """Fit the prior of one level on the extracted codes (``extract_codes`` first).

    The prior's data fields (code size, codebook size, upper levels, classes, transforms) come
    from the VQ-VAE and the code store; its checkpoints go to ``RUN_DIR/prior-<level>``, which
    no other trainer may be writing (``loop.training_lock``). Under torchrun every process calls
    this; rank 0 alone writes files and measures. On resume ``config`` may be None (the saved
    one) and ``max_steps`` the run's new length; as ``train_vqvae``.

    Returns:
        Final ``train_nll_nats``/``bits`` and ``val_nll_nats``/``bits`` (nats/bits per code).
    """
    runtime = runtime or RuntimeConfig()
    context = runtime_context(runtime)
    index = run.level_index(level)
    kind, kind_dir = prior_kind(level), run.prior_dir(level)
    with training_lock(kind_dir, context, resume):
        config, checkpoint = resume_or_start(
            kind_dir,
            kind,
            PriorRunConfig,
            config,
            resume,
            f"{kind_dir} already holds a trained prior; pass --resume",
            max_steps,
        )
        train_codes, val_codes, training_codes = _code_stores(run, config.augmented_codes)
        config = _prior_fitting_data(run, index, config, checkpoint is None, training_codes)
        micro_batch_size(config.train, context)  # the batch must split evenly: checked first
        check_batch_fits(len(training_codes), config.train.batch_size)
        torch.manual_seed(config.train.seed)
        prior = PixelSNAIL(config.prior)
        session = TrainingSession(
            prior,
            config,
            context,
            runtime,
            kind=kind,
            checkpoint_dir=kind_dir,
            log_dir=kind_dir,
            checkpoint=checkpoint,
            max_minutes=max_minutes,
            progress=progress,
            facts=RunFacts(level=level),
            postfix="batch_nll_nats",
            now=now,
        )
        seed_own_dropout(config.train, context)
        validate = _prior_validation(prior, run, val_codes, index, session)
        loader = batch_loader(training_codes, session.batch_sampler(training_codes))
        session.run(loader, _prior_step(prior, session.step_module, config, index), validate)
        return session.finish(
            lambda: _final_nll(prior, train_codes, val_codes, index, config.train.seed)
        )


def _prior_validation(
    prior: PixelSNAIL, run: Run, val_codes: CodeDataset, index: int, session: TrainingSession
):
    """Validation of a prior: its NLL on ``train.val_batches`` batches of the validation codes
    and, when the log takes images, a grid of what it draws in context (the run's VQ-VAE is
    loaded once, here, to decode it)."""
    vqvae = run.load_vqvae() if session.log.wants_images else None  # for sample grids

    def validate() -> dict[str, float]:
        if vqvae is not None:
            grid = _prior_sample_grid(prior, vqvae, val_codes, index, session.step)
            session.log.image(session.step, "samples (rows: real codes, this level sampled)", grid)
        return _nll_summary("val", measure_nll(prior, val_codes, index, session.train.val_batches))

    return validate


SAMPLE_GRID_COLUMNS = 8  # validation code maps whose level is resampled in a prior's grid


@torch.no_grad()
def _prior_sample_grid(
    prior: PixelSNAIL, vqvae: VQVAE2, val_codes: CodeDataset, level: int, step: int
) -> Tensor:
    """A picture of what a prior draws in context: the first validation code maps decoded as
    they are (top row) and with this level's codes drawn by the prior given the real levels
    above and the class, the real levels below kept (bottom row). uint8 (C, H', W')."""
    device = next(prior.parameters()).device
    count = min(SAMPLE_GRID_COLUMNS, len(val_codes))
    codes, labels = val_codes.__getitems__(list(range(count)))
    codes, labels = [c.to(device) for c in codes], labels.to(device)
    generator = torch.Generator(device=device).manual_seed(step)
    _, labels_in, upper = prior_inputs(prior, codes, labels, level)
    drawn = sample_level_cached(prior, count, labels_in, upper, generator=generator)
    mixed = [*codes[:level], drawn, *codes[level + 1 :]]
    vqvae = vqvae.to(device)
    rows = torch.cat([vqvae.decode_codes(codes), vqvae.decode_codes(mixed)])
    return make_grid(float_to_uint8(rows.cpu()), columns=count)


def _final_nll(
    prior: PixelSNAIL, train_codes: CodeDataset, val_codes: CodeDataset, level: int, seed: int
) -> dict[str, float]:
    """Train and validation NLL of a trained prior. The train figure comes from a fixed random
    subset as large as the validation split: the same precision as the validation figure,
    without a pass over millions of training codes."""
    order = np.random.default_rng(seed).permutation(len(train_codes))
    train_sample = Subset(train_codes, np.sort(order[: len(val_codes)]).tolist())
    return {
        **_nll_summary("train", measure_nll(prior, train_sample, level)),
        **_nll_summary("val", measure_nll(prior, val_codes, level)),
    }


def _prior_step(prior: PixelSNAIL, step_module: StepModule, config: PriorRunConfig, level: int):
    """The forward and backward passes of one prior step over a batch of (codes per level,
    labels, transform indices)."""
    train = config.train
    augmentation_conditional = config.prior.num_augmentations > 0

    def step(batch: tuple[list[Tensor], Tensor, Tensor]) -> StepOutput:
        level_codes, labels, augmentations = batch
        total = torch.zeros((), device=step_module.context.device)
        for rows, last in micro_batches(step_module, train):
            micro_codes = [step_module.to_device(codes[rows]) for codes in level_codes]
            micro_labels = step_module.to_device(labels[rows])
            micro_augmentations = (
                step_module.to_device(augmentations[rows]) if augmentation_conditional else None
            )
            with step_module.sync_gradients(last), step_module.autocast():
                output = step_module.forward(
                    *prior_inputs(prior, micro_codes, micro_labels, level), micro_augmentations
                )
                loss = output.loss / train.grad_accum_steps
            loss.backward()
            total += loss.detach()
        return StepOutput(total, lambda: _nll_summary("batch", output.loss.item()))

    return step


# ----------------------------------------------------------------------------------------------
# What the training commands print


def vqvae_summary(result: TrainResult) -> tuple[dict[str, Any], str]:
    """What ``vqvae2 train-vqvae`` prints: the final metrics as a record, and as text."""
    metrics = result.metrics
    usage = ", ".join(
        f"{key.removeprefix('usage_')} {value:.1%}"
        for key, value in metrics.items()
        if key.startswith("usage_")
    )
    text = (
        f"trained {result.step} steps; validation MSE {metrics['mse']:.5f} "
        f"(PSNR {metrics['psnr']:.2f} dB), codes in use: {usage}\nrun folder: {result.run_dir}"
    )
    return {"run_dir": str(result.run_dir), "step": result.step, **metrics}, text


def prior_summary(level: str, result: TrainResult) -> tuple[dict[str, Any], str]:
    """What ``vqvae2 train-prior`` prints: the final NLL as a record, and as text."""
    metrics = result.metrics
    text = (
        f"{level} prior, {result.step} steps: NLL train {metrics['train_nll_nats']:.4f} "
        f"nats/code ({metrics['train_nll_bits']:.4f} bits), validation "
        f"{metrics['val_nll_nats']:.4f} nats/code ({metrics['val_nll_bits']:.4f} bits)"
    )
    return {"level": level, "step": result.step, **metrics}, text
