"""Opening a split of tar shards: from the shards' indexes against a pass over every tar header.

Writes ``--images`` small PNG files (8x8, three classes) as shards of ``--per-shard`` images
(``vqvae2.write_shards``, which also writes each shard's index into ``.index/``), then times
``open_dataset`` on the ``train`` split, interleaved over ``--rounds`` rounds: with the indexes,
and with ``.index/`` removed before each open (the header pass every open made before; the pass
writes the indexes again). Prints one JSON object: seconds per open (best of the rounds) and
microseconds per image.

    .venv/bin/python bench/bench_shard_open.py --images 20000 --per-shard 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from vqvae2 import write_shards
from vqvae2.config import DataConfig
from vqvae2.data import open_dataset
from vqvae2.shards import INDEX_FOLDER


def write_folder(root: Path, images: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 90, 140)).save(buffer, format="PNG")
    for index in range(images):
        folder = root / "train" / f"class{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:06d}.png").write_bytes(buffer.getvalue())


def timed_open(shards: Path) -> float:
    start = time.perf_counter()
    open_dataset(shards, "train", 8, 3, DataConfig(val_fraction=0, test_fraction=0))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        write_folder(root / "folder", args.images)
        write_shards(root / "folder", root / "shards", images_per_shard=args.per_shard)
        seconds = {"indexes": float("inf"), "header pass": float("inf")}
        for _ in range(args.rounds):
            seconds["indexes"] = min(seconds["indexes"], timed_open(root / "shards"))
            shutil.rmtree(root / "shards" / INDEX_FOLDER)
            seconds["header pass"] = min(seconds["header pass"], timed_open(root / "shards"))
    result = {"images": args.images, "images_per_shard": args.per_shard}
    for name, value in seconds.items():
        result[f"{name}: s per open"] = round(value, 3)
        result[f"{name}: us per image"] = round(value / args.images * 1e6, 1)
    result["header pass / indexes"] = round(seconds["header pass"] / seconds["indexes"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
