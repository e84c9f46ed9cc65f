"""Stage-1 reconstructions of a run: the per-level grid of the paper's Fig. 3 (originals,
reconstructions, then decodes from the top level alone, the top two levels, ...) and the
reconstruction error of a split or of image files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import RuntimeConfig
from .data import (
    TensorImageDataset,
    load_image_files,
    open_dataset,
)
from .distributed import runtime_device
from .measure import measure_levels, measure_reconstruction, reconstruction_grid
from .report import save_png
from .run import Run

if TYPE_CHECKING:
    from .export import PretrainedModels


def spread_indices(size: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(size)``, first and last included: a grid
    then shows every part of a split, not only its first class when images come sorted."""
    if count <= 1:
        return [0][:count]
    return [round(i * (size - 1) / (count - 1)) for i in range(count)]


def reconstruct(
    run: Run | PretrainedModels,
    data_path: str | Path | None,
    split: str,
    out_png: str | Path,
    image_files: list[str] | None = None,
    grid_images: int = 16,
    runtime: RuntimeConfig | None = None,
) -> dict[str, Any]:
    """Write an original / reconstruction / per-level grid and measure a split (on
    ``runtime.device``, default the CPU).

    Args:
        run: the run (``Run.open``), or its exported models (``load_pretrained``).
        data_path: image source whose ``split`` is measured; may be None with ``image_files``.
        split: ``train``, ``val`` or ``test``.
        out_png: grid output path.
        image_files: specific images to reconstruct (and measure) instead of a dataset split.
        grid_images: columns of the grid when using a dataset split (spread over it).

    Returns:
        ``mse``/``psnr`` ([0, 1] pixels), per level ``usage_*``/``perplexity_*``, ``images``,
        ``grid`` (path), and ``levels``: what each level carries (``measure_levels``).
    """
    model = run.load_vqvae(runtime_device(runtime))
    config = model.config
    if image_files:
        images = load_image_files(image_files, config.image_size, config.in_channels)
        labels = torch.zeros(len(images), dtype=torch.long)
        dataset = TensorImageDataset(images, labels, ["0"])
    else:
        if data_path is None:
            raise ValueError("give --data PATH or image files to reconstruct")
        dataset = open_dataset(
            data_path, split, config.image_size, config.in_channels, run.data_config
        )
    metrics = measure_reconstruction(model, dataset)
    levels = measure_levels(model, dataset, usage=metrics)
    count = min(grid_images, len(dataset)) if not image_files else len(dataset)
    shown = torch.stack([dataset[i][0] for i in spread_indices(len(dataset), count)])
    save_png(reconstruction_grid(model, shown), out_png)
    source = "files" if image_files else split
    return {
        **metrics,
        "images": len(dataset),
        "split": source,
        "grid": str(out_png),
        "levels": {key: levels[key] for key in ("levels", "prefixes")},
    }


def reconstruction_text(result: dict[str, Any]) -> str:
    """``reconstruct``'s result for people: the error, what each level carries, the grid."""
    lines = [
        f"{result['split']}: {result['images']} images, MSE {result['mse']:.5f}, "
        f"PSNR {result['psnr']:.2f} dB"
    ]
    for name, level in result["levels"]["levels"].items():
        lines.append(
            f"{name}: code perplexity {level['perplexity']:.1f} ({level['bits']:.2f} bits); "
            f"swapping its codes changes the output by MSE {level['swap_mse']:.5f}, "
            f"{level['swap_coarse_share']:.0%} of it at the top map's scale"
        )
    for name, prefix in result["levels"]["prefixes"].items():
        side = prefix["low_pass_side"]
        lines.append(
            f"decoded from {name} alone: PSNR {prefix['psnr_vs_low_pass']:.2f} dB against the "
            f"image low-passed to {side}x{side}, "
            f"{prefix['psnr_vs_mean_image']:.2f} dB against the mean image"
        )
    lines.append(f"grid: {result['grid']}")
    return "\n".join(lines)
