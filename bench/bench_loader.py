"""Is loading or the model the limit? Images/s of the image loaders against training steps.

Default: a folder of 256x256 JPEG photos (crops of the photos in scikit-image's wheel when it
is installed, else smooth random images), resized to 64x64 (with the random crop and flip of
training) and batched through a DataLoader with 0, 1 and 2 worker processes, against the
stage-1 training step of ``photos-64`` (forward, backward and Adam on random images).

``--paper``: the same JPEG folder against its tar shards (``vqvae2.write_shards``), each read as
the ``imagenet-256`` preset reads it (256x256, batches of 128) in one loader process, the two
interleaved over ``--rounds`` rounds; beside them the floating-point operations of one
``imagenet-256`` stage-1 training step per image (``torch.utils.flop_counter``), from which the
loader processes one GPU needs follow at an assumed achieved rate (``--gpu-tflops``).

Prints a Markdown table and one JSON object.

    .venv/bin/python bench/bench_loader.py [--images 256] [--batches 40] [--threads 2]
    .venv/bin/python bench/bench_loader.py --paper [--images 512] [--batches 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae2.batches import EpochBatchSampler
from vqvae2.config import DataConfig, VQVAERunConfig, load_config
from vqvae2.data import batch_loader, open_dataset
from vqvae2.optimizer import make_optimizer
from vqvae2.shards import write_shards
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
    source: Path,
    image_size: int,
    batch: int,
    data: DataConfig,
    workers: int,
    batches: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Training images/s of ``source`` read at ``image_size`` in batches of ``batch``, timed by
    ``clock`` (``time.process_time`` with no workers: per second of this process's CPU)."""
    dataset = open_dataset(source, "train", image_size, 3, data)
    sampler = EpochBatchSampler(len(dataset), batch, 0, 0, batches + 2, keyed=True)
    loader = batch_loader(dataset, sampler, workers)
    iterator = iter(loader)
    for _ in range(2):  # warm-up: worker start, first files
        next(iterator)
    start = clock()
    for _ in range(batches):
        images, _ = next(iterator)
        assert images.dtype == torch.uint8
    return batches * batch / (clock() - start)


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


def step_flops_per_image(config: VQVAERunConfig, batch: int = 2) -> float:
    """Floating-point operations of one stage-1 training step (forward and backward) per
    image, counted by ``torch.utils.flop_counter`` (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = VQVAE2(config.model).train()
    side = config.model.image_size
    images = torch.rand(batch, config.model.in_channels, side, side) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        model(images).loss.backward()
    return counter.get_total_flops() / batch


def photos_64(args: argparse.Namespace) -> dict[str, float]:
    config = load_config(VQVAERunConfig, "photos-64")
    data = DataConfig(val_fraction=0.0, test_fraction=0.0, random_flip=True, random_crop=True)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        write_jpegs(folder, args.images)
        for workers in (0, 1, 2):
            key = f"loader, {workers} worker process{'es' if workers != 1 else ''}"
            batch = config.train.batch_size
            results[key] = loader_images_per_second(
                folder, config.model.image_size, batch, data, workers, args.batches
            )
    results["stage-1 training step, photos-64"] = train_images_per_second(config, args.steps)
    print(f"| what (batch {config.train.batch_size}, 64x64) | images/s |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} |")
    return results


def paper_sources(args: argparse.Namespace) -> dict[str, float]:
    """JPEG folder against its shards at 256x256, one loader process, rounds interleaved; each
    rate per second of wall time and per second of the process's CPU time (the rate of one
    core of its own, which a machine whose cores other jobs share still measures)."""
    config = load_config(VQVAERunConfig, "imagenet-256")
    data = DataConfig(val_fraction=0.0, test_fraction=0.0)  # the preset: no flips or crops
    side, batch = config.model.image_size, config.train.batch_size
    clocks = {"wall": time.perf_counter, "CPU": time.process_time}
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        folder, shards = Path(work) / "jpeg", Path(work) / "shards"
        folder.mkdir()
        write_jpegs(folder, args.images)
        write_shards(folder, shards, images_per_shard=max(1, args.images // 4))
        for _ in range(args.rounds):
            for name, source in (("JPEG folder", folder), ("tar shards", shards)):
                for clock_name, clock in clocks.items():
                    rate = loader_images_per_second(
                        source, side, batch, data, 0, args.batches, clock
                    )
                    rates.setdefault(f"{name}, per {clock_name} second", []).append(rate)
    photos = "scikit-image photos" if importlib.util.find_spec("skimage") else "random images"
    print(f"{args.images} JPEG files of {SIDE}x{SIDE} (crops of {photos}), quality {QUALITY}")
    flops = step_flops_per_image(config)
    gpu_images = args.gpu_tflops * 1e12 / flops
    print(f"| what ({side}x{side}, batch {batch}) | images/s per process | processes per GPU |")
    print("|---|---|---|")
    results = {}
    for name, values in rates.items():
        results[name] = median = float(np.median(values))
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} (rounds: {runs}) | {median:.0f} | {gpu_images / median:.1f} |")
    print(
        f"stage-1 step: {flops / 1e9:.1f} GFLOP per image; at {args.gpu_tflops:g} TFLOP/s "
        f"{gpu_images:.0f} images/s = {gpu_images / batch:.2f} steps/s of {batch}"
    )
    results["stage-1 step GFLOP per image"] = flops / 1e9
    results["GPU images/s at the assumed rate"] = gpu_images
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256, help="JPEG files in the folder")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper", action="store_true", help="256x256: JPEG folder vs shards")
    parser.add_argument("--rounds", type=int, default=3, help="--paper: interleaved rounds")
    parser.add_argument(
        "--gpu-tflops", type=float, default=200.0, help="--paper: assumed achieved TFLOP/s"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = paper_sources(args) if args.paper else photos_64(args)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
