"""Sampling controls on a trained run: class agreement and precision/recall per setting.

For each setting (temperature alone, lower temperatures, top-k, top-p) the same class-balanced
labels are drawn from the same seed, so the settings differ only in how each code is drawn.
Measured per setting, as ``vqvae2 evaluate`` measures them at rejection rate 0:

  * class agreement: the share of samples the run's classifier assigns to the requested class;
  * precision / recall, density / coverage (Kynkaanniemi et al. 2019; Naeem et al. 2020, k = 3)
    of the samples' features against the features of a fixed random subset of the test split.

Features come from ``RUN/feature-classifier`` when an evaluation trained it (the network that
does not score class agreement), else from the run's classifier (then stated in the output):
figures for ranking the settings against each other, not comparable with published values.
Prints a Markdown table and one JSON object.

    .venv/bin/python bench/bench_sampling_controls.py RUN --data /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vqvae2 import DrawControls, generate, load_classifier, load_prior, load_vqvae, open_dataset
from vqvae2.data import float_to_uint8
from vqvae2.measure import class_logits, extract_features
from vqvae2.metrics import precision_recall
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.run import FEATURE_CLASSIFIER_DIR, has_checkpoint
from vqvae2.sampling import Controls, requested_labels
from vqvae2.vqvae import VQVAE2

# name -> the controls of every level
SETTINGS: dict[str, Controls] = {
    "temperature 1.0": 1.0,
    "temperature 0.9": 0.9,
    "temperature 0.8": 0.8,
    "temperature 1.0 top, 0.8 bottom": (1.0, 0.8),
    "top-k 64": DrawControls(top_k=64),
    "top-k 32": DrawControls(top_k=32),
    "top-p 0.95": DrawControls(top_p=0.95),
    "top-p 0.9": DrawControls(top_p=0.9),
}
NEAREST_K = 3  # the evaluation's precision/recall k (Kynkaanniemi et al. 2019, the paper's Fig. 7b)


def draw(
    vqvae: VQVAE2,
    priors: list[PixelSNAIL],
    controls: Controls,
    labels: torch.Tensor,
    seed: int,
    batch: int,
) -> tuple[torch.Tensor, float]:
    """(N, C, H, W) uint8 samples of ``labels`` (N,) drawn under ``controls``, and seconds."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    images = [
        float_to_uint8(generate(vqvae, priors, len(chunk), chunk, controls, generator)[0])
        for chunk in labels.split(batch)
    ]
    return torch.cat(images), time.perf_counter() - start


def real_images(data: str, size: int, channels: int, count: int, seed: int) -> torch.Tensor:
    """(count, C, S, S) uint8: a fixed random subset of the test split."""
    test = open_dataset(data, "test", size, channels)
    order = np.random.default_rng(seed).permutation(len(test))
    images, _ = test.__getitems__(np.sort(order[:count]).tolist())
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--samples", type=int, default=500, help="samples per setting")
    parser.add_argument("--real", type=int, default=1000, help="test images of the reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    vqvae = load_vqvae(args.run)
    priors = [load_prior(args.run, level) for level in vqvae.config.level_names]
    scorer = load_classifier(args.run)
    evaluation_features = args.run / FEATURE_CLASSIFIER_DIR
    features_from = evaluation_features if has_checkpoint(evaluation_features) else args.run
    network = load_classifier(features_from)
    labels = requested_labels(None, args.samples, scorer.config.num_classes)
    config = vqvae.config
    real = real_images(args.data, config.image_size, config.in_channels, args.real, args.seed)
    real_features = extract_features(network, real)[0]

    rows = []
    for name, controls in SETTINGS.items():
        images, seconds = draw(vqvae, priors, controls, labels, args.seed, args.batch_size)
        agreement = float((class_logits(scorer, images).argmax(-1) == labels).float().mean())
        scores = precision_recall(real_features, extract_features(network, images)[0], NEAREST_K)
        rows.append(
            {"setting": name, "class_agreement": agreement, **scores._asdict(), "seconds": seconds}
        )
        print(json.dumps(rows[-1]), flush=True)

    print("\n| setting | class agreement | precision | recall | density | coverage |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['setting']} | {row['class_agreement']:.3f} | {row['precision']:.3f} | "
            f"{row['recall']:.3f} | {row['density']:.3f} | {row['coverage']:.3f} |"
        )
    print(
        json.dumps(
            {
                "run": str(args.run),
                "samples_per_setting": args.samples,
                "real_test_images": args.real,
                "seed": args.seed,
                "nearest_k": NEAREST_K,
                "features": str(features_from),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
