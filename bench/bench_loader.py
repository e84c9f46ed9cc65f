"""Is loading or the model the limit? Images/s of the image-folder loader against the stage-1
training step of ``photos-64``.

The loader reads a folder of 256x256 JPEG photos (crops of the photos in scikit-image's wheel
when it is installed, else smooth random images), resizes them to 64x64 (with the random crop
and flip of training) and batches them through a DataLoader with 0, 1 and 2 worker processes.
The training step is the ``photos-64`` model's forward, backward and Adam step on batches of
random images. Prints a Markdown table and one JSON object.

    .venv/bin/python bench/bench_loader.py [--images 256] [--batches 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae2.config import VQVAERunConfig, load_config
from vqvae2.data import batch_loader, open_dataset
from vqvae2.loop import EpochBatchSampler, make_optimizer
from vqvae2.vqvae import VQVAE2

SIDE = 256  # pixels of the JPEG files
QUALITY = 90  # JPEG quality


def photo_sources() -> list[np.ndarray]:
    """(H, W, 3) uint8 photos to crop from."""
    try:
        import skimage.data as photos

        names = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "retina", "rocket")
        return [getattr(photos, name)()[..., :3] for name in names]
    except ImportError:
        rng = np.random.default_rng(0)
        smooth = [rng.integers(0, 255, (8, 8, 3)).astype(np.uint8) for _ in range(6)]
        return [np.asarray(Image.fromarray(s).resize((600, 600), Image.BICUBIC)) for s in smooth]


def write_jpegs(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    sources = photo_sources()
    for index in range(count):
        source = sources[index % len(sources)]
        y = int(rng.integers(0, source.shape[0] - SIDE + 1))
        x = int(rng.integers(0, source.shape[1] - SIDE + 1))
        crop = np.ascontiguousarray(source[y : y + SIDE, x : x + SIDE])
        Image.fromarray(crop).save(folder / f"{index:05d}.jpg", quality=QUALITY)


def loader_images_per_second(
    folder: Path, config: VQVAERunConfig, workers: int, batches: int
) -> float:
    data = config.data.__class__(
        val_fraction=0.0, test_fraction=0.0, random_flip=True, random_crop=True
    )
    dataset = open_dataset(folder, "train", config.model.image_size, 3, data)
    batch = config.train.batch_size
    sampler = EpochBatchSampler(len(dataset), batch, 0, 0, batches + 2, keyed=True)
    loader = batch_loader(dataset, sampler, workers)
    iterator = iter(loader)
    for _ in range(2):  # warm-up: worker start, first files
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
        assert images.dtype == torch.uint8
    return batches * batch / (time.perf_counter() - start)


def train_images_per_second(config: VQVAERunConfig, steps: int) -> float:
    torch.manual_seed(0)
    model = VQVAE2(config.model).train()
    optimizer = make_optimizer(model, config.train)
    batch = config.train.batch_size
    images = torch.rand(batch, 3, config.model.image_size, config.model.image_size) * 2 - 1

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(images).loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256, help="JPEG files in the folder")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(VQVAERunConfig, "photos-64")
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        write_jpegs(folder, args.images)
        for workers in (0, 1, 2):
            key = f"loader, {workers} worker process{'es' if workers != 1 else ''}"
            results[key] = loader_images_per_second(folder, config, workers, args.batches)
    results["stage-1 training step, photos-64"] = train_images_per_second(config, args.steps)
    print(f"| what (batch {config.train.batch_size}, 64x64) | images/s |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
