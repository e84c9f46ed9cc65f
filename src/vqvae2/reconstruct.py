"""Stage-1 reconstructions of a run: the per-level grid of the paper's Fig. 3 (originals,
reconstructions, then decodes from the top level alone, the top two levels, ...) and the
reconstruction error of a split or of image files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._helpers import evaluating
from .config import VQVAERunConfig
from .data import (
    TensorImageDataset,
    float_to_uint8,
    load_image_files,
    open_dataset,
    uint8_to_float,
)
from .measure import measure_levels, measure_reconstruction
from .report import make_grid, save_png
from .run import VQVAE_KIND, load_run_config, load_vqvae
from .vqvae import VQVAE2


@torch.no_grad()
def reconstruction_grid(model: VQVAE2, images: Tensor) -> Tensor:
    """Rows: originals, full reconstructions, then decodes from the top level alone, top two, ...

    Args:
        images: (N, C, H, W) uint8.

    Returns:
        uint8 (C, H', W') grid with N columns (the per-level rows show what each level adds,
        like the paper's Fig. 3).
    """
    with evaluating(model):
        images = uint8_to_float(images.to(next(model.parameters()).device))
        codes = model.encode(images)
        rows = [images, model.decode_codes(codes)]
        for kept in range(1, model.config.num_levels):
            rows.append(model.decode_codes(codes, keep_levels=range(kept)))
    stacked = float_to_uint8(torch.cat(rows).cpu())  # (rows * N, C, H, W)
    return make_grid(stacked, columns=len(images))


def spread_indices(size: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(size)``, first and last included: a grid
    then shows every part of a split, not only its first class when images come sorted."""
    if count <= 1:
        return [0][:count]
    return [round(i * (size - 1) / (count - 1)) for i in range(count)]


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
        grid_images: columns of the grid when using a dataset split (spread over it).

    Returns:
        ``mse``/``psnr`` ([0, 1] pixels), per level ``usage_*``/``perplexity_*``, ``images``,
        ``grid`` (path), and ``levels``: what each level carries (``measure_levels``).
    """
    model = load_vqvae(run_dir, map_location=device)
    config = model.config
    if image_files:
        images = load_image_files(image_files, config.image_size, config.in_channels)
        labels = torch.zeros(len(images), dtype=torch.long)
        dataset = TensorImageDataset(images, labels, ["0"])
    else:
        if data_path is None:
            raise ValueError("give --data PATH or image files to reconstruct")
        data_config = load_run_config(run_dir, VQVAE_KIND, VQVAERunConfig).data
        dataset = open_dataset(data_path, split, config.image_size, config.in_channels, data_config)
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
