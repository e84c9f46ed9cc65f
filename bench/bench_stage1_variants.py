"""Training steps/s of stage-1 variants, side by side, for equal-minute comparisons.

Each variant is a preset's model with config overrides at a given batch size; all run the same
step (forward, backward, fused Adam step, EMA codebook update) on random images in
channels-last layout, in one process, rounds interleaved. Prints the median steps/s of each and
its ratio to the first variant, as a Markdown table. ``--set levels`` times the options of
docs/levels.md on a photos preset (``--preset photos-64`` or ``photos-128-3``).

    .venv/bin/python bench/bench_stage1_variants.py [--set recipe|levels] [--preset NAME]
        [--threads 1] [--rounds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import time

import torch

from vqvae2.config import VQVAERunConfig, load_config
from vqvae2.vqvae import VQVAE2

# (label, batch size, model overrides); the first is the reference of the ratios.
RECIPE_VARIANTS = [
    ("preset, batch 32", 32, []),
    ("model.decoder_fine_blocks=1", 32, ["model.decoder_fine_blocks=1"]),
    ("hidden 96 / residual 48", 32, ["model.hidden_channels=96", "model.residual_channels=48"]),
    ("batch 16", 16, []),
    ("batch 64", 64, []),
]
LEVEL_VARIANTS = [
    ("the paper's objective", 16, []),
    ("model.level_dropout=0.1", 16, ["model.level_dropout=0.1"]),
    ("model.prefix_decoder_weight=0.1", 16, ["model.prefix_decoder_weight=0.1"]),
]


def make_step(preset: str, overrides: list[str], batch: int):
    """A closure running one training step of ``preset``'s model with ``overrides``."""
    config = load_config(VQVAERunConfig, preset, overrides).model
    torch.manual_seed(0)
    model = VQVAE2(config).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    side = config.image_size
    images = torch.rand(batch, config.in_channels, side, side) * 2 - 1
    images = images.contiguous(memory_format=torch.channels_last)  # (B, C, H, W)

    kept_levels = model.draw_kept_levels(range(batch), seed=0) if config.level_dropout else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(images, kept_levels).loss.backward()
        optimizer.step()

    return step


def steps_per_second(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=["recipe", "levels"], default="recipe")
    parser.add_argument("--preset", help="default: fashion-mnist-32 (recipe), photos-64 (levels)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument("--steps", type=int, default=60, help="steps per timed round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = RECIPE_VARIANTS if args.set == "recipe" else LEVEL_VARIANTS
    preset = args.preset or ("fashion-mnist-32" if args.set == "recipe" else "photos-64")
    steps = {label: make_step(preset, changes, batch) for label, batch, changes in variants}
    for step in steps.values():  # warm-up
        steps_per_second(step, 5)
    rates: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, step in steps.items():
            rates[label].append(steps_per_second(step, args.steps))
    medians = {label: sorted(values)[len(values) // 2] for label, values in rates.items()}
    reference = medians[variants[0][0]]
    print("| variant | batch | steps/s | ratio |")
    print("|---|---|---|---|")
    for label, batch, _ in variants:
        print(f"| {label} | {batch} | {medians[label]:.2f} | {medians[label] / reference:.3f} |")


if __name__ == "__main__":
    main()
