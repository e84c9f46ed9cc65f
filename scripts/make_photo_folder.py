"""Make a folder of real colour photographs for the photos presets, from the photos that ship
inside scikit-image's wheel (no download): one class per photo, square patches cut on a grid.

Each photo is resized so its short side is ``--photo-side`` pixels. The top part of each photo
gives the training patches (``OUT/train/<photo>/``); the bottom ``--test-share`` of its height,
which no training patch overlaps, gives the test patches (``OUT/test/<photo>/``): held-out
regions of the same photos. The photos named by ``--unseen`` give no training or test patches
at all: their patches go to ``OUT/unseen/<photo>/``, images the model never saw, for
``vqvae2 reconstruct RUN --images OUT/unseen/*/*.png``.

    pip install 'vqvae2[photos]'      # scikit-image
    python scripts/make_photo_folder.py data/photos-64 --size 64
    python scripts/make_photo_folder.py data/photos-128 --size 128 --photo-side 512 --stride 32

Prints one JSON line: the patch counts per part and photo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

# The colour photographs of skimage.data that load offline (name -> loader attribute).
PHOTOS = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "hubble": "hubble_deep_field",
    "ihc": "immunohistochemistry",
    "motorcycle": "stereo_motorcycle",
    "retina": "retina",
    "rocket": "rocket",
}


def load_photo(name: str) -> Image.Image:
    """One of ``PHOTOS`` as an RGB PIL image."""
    import skimage.data

    pixels = getattr(skimage.data, PHOTOS[name])()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    return Image.fromarray(np.ascontiguousarray(pixels[..., :3]))


def patches(photo: Image.Image, size: int, stride: int, top: int, bottom: int) -> list[Image.Image]:
    """``size`` x ``size`` crops on a grid of ``stride`` whose rows lie in [top, bottom)."""
    width = photo.size[0]
    return [
        photo.crop((x, y, x + size, y + size))
        for y in range(top, bottom - size + 1, stride)
        for x in range(0, width - size + 1, stride)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (train/, test/, unseen/)")
    parser.add_argument("--size", type=int, default=64, help="patch side (default 64)")
    parser.add_argument("--photo-side", type=int, default=256, help="short side of each photo")
    parser.add_argument("--stride", type=int, default=16, help="grid step between patches")
    parser.add_argument("--test-share", type=float, default=0.25, help="bottom share for test")
    parser.add_argument("--unseen", nargs="*", default=["rocket"], help="photos kept out")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    counts: dict[str, dict[str, int]] = {}
    for name in PHOTOS:
        photo = load_photo(name)
        scale = args.photo_side / min(photo.size)
        photo = photo.resize(
            (round(photo.size[0] * scale), round(photo.size[1] * scale)), Image.Resampling.LANCZOS
        )
        height = photo.size[1]
        split_row = round(height * (1 - args.test_share))
        parts = (
            {"unseen": (0, height)}
            if name in args.unseen
            else {"train": (0, split_row), "test": (split_row, height)}
        )
        for part, (top, bottom) in parts.items():
            folder = args.out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            crops = patches(photo, args.size, args.stride, top, bottom)
            for index, crop in enumerate(crops):
                crop.save(folder / f"{name}-{index:05d}.png")
            counts.setdefault(part, {})[name] = len(crops)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
