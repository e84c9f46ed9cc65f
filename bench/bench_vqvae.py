"""Stage-1 throughput: training, encoding and decoding images/s at 32x32 and 256x256.

Measures, side by side in one process, the `fashion-mnist-32` preset (32x32 grey) and the
`imagenet-256` preset (256x256 RGB, Table 5 widths) on random images. Prints a Markdown table
and one JSON object.

    .venv/bin/python bench/bench_vqvae.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vqvae2.config import VQVAERunConfig, load_config
from vqvae2.vqvae import VQVAE2

# (preset, training batch, encode/decode batch)
CASES = [("fashion-mnist-32", 64, 256), ("imagenet-256", 4, 8)]


def images_per_second(function, batch: int, repeats: int) -> float:
    """Median images/s of ``function`` over ``repeats`` timed calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    times.sort()
    return batch / times[len(times) // 2]


def measure(preset: str, train_batch: int, infer_batch: int, repeats: int) -> dict:
    config = load_config(VQVAERunConfig, preset)
    model_config = config.model
    torch.manual_seed(0)
    model = VQVAE2(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)
    shape = (model_config.in_channels, model_config.image_size, model_config.image_size)
    train_images = torch.rand(train_batch, *shape) * 2 - 1
    infer_images = torch.rand(infer_batch, *shape) * 2 - 1

    def train_step() -> None:
        output = model(train_images)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()

    model.train()
    train = images_per_second(train_step, train_batch, repeats)
    model.eval()
    with torch.no_grad():
        codes = model.encode(infer_images)
        encode = images_per_second(lambda: model.encode(infer_images), infer_batch, repeats)
        decode = images_per_second(lambda: model.decode_codes(codes), infer_batch, repeats)
    return {
        "preset": preset,
        "image_size": model_config.image_size,
        "train_batch": train_batch,
        "infer_batch": infer_batch,
        "train_images_per_s": round(train, 1),
        "encode_images_per_s": round(encode, 1),
        "decode_images_per_s": round(decode, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(*case, repeats=args.repeats) for case in CASES]
    print("| preset | image | train batch | train img/s | encode img/s | decode img/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['preset']} | {row['image_size']}x{row['image_size']} | {row['train_batch']} | "
            f"{row['train_images_per_s']} | {row['encode_images_per_s']} | {row['decode_images_per_s']} |"
        )
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "results": rows}))


if __name__ == "__main__":
    main()
