"""The codec's speed with today's cached sampler against a git revision's, in one run.

``codec.encode_batch`` and ``codec.decode_batch`` run the priors' cached sampler position by
position over a coding batch of 16 images; this times both on the
``fashion-mnist-32`` presets (VQ-VAE, top prior 4x4, bottom prior 8x8 given the top, 10
classes) with random weights (speed does not depend on training) and random images, once with
today's ``IncrementalSampler`` and once with the revision's
(``bench_sampling.load_baseline``) swapped into the codec, interleaved, best of
``--repeats``. Both must give the same payloads' codes back, and the payloads must be equal
byte for byte (the same probabilities). Prints one JSON object.

    PYTHONPATH=src .venv/bin/python bench/bench_codec_sampler.py --baseline-rev 84fb6b9
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_sampling import load_baseline

from vqvae2 import codec
from vqvae2.config import PriorRunConfig, VQVAERunConfig, load_config
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler
from vqvae2.vqvae import VQVAE2

CLASSES = 10


def build_models() -> tuple[VQVAE2, list[PixelSNAIL]]:
    torch.manual_seed(0)
    model = load_config(VQVAERunConfig, "fashion-mnist-32").model
    vqvae = VQVAE2(model).eval()
    sides = [model.image_size // factor for factor in (8, 4)]  # top, bottom
    priors = []
    for level, name in enumerate(["prior-top-fashion-mnist-32", "prior-bottom-fashion-mnist-32"]):
        config = load_config(PriorRunConfig, name).prior
        config = type(config)(
            **{
                **config.__dict__,
                "code_size": sides[level],
                "condition_sizes": tuple(sides[:level]),
                "num_classes": CLASSES,
                "codebook_size": model.codebook_size,
                "dropout": 0.0,
            }
        )
        priors.append(PixelSNAIL(config).eval())
    return vqvae, priors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vqvae, priors = build_models()
    size = vqvae.config.image_size
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, vqvae.config.in_channels, size, size), generator=generator)
    labels = torch.randint(0, CLASSES, (16,), generator=generator)
    baseline = load_baseline(args.baseline_rev).IncrementalSampler
    samplers = {"today": IncrementalSampler, "baseline": baseline}
    seconds = {key: {"compress": float("inf"), "decompress": float("inf")} for key in samplers}
    decoded, payloads = {}, {}
    for _ in range(args.repeats):
        for key, sampler_class in samplers.items():
            codec.IncrementalSampler = sampler_class
            start = time.perf_counter()
            encoded = codec.encode_batch(vqvae, priors, images, labels)
            payloads[key] = [e.payload for e in encoded]
            middle = time.perf_counter()
            decoded[key] = codec.decode_batch(priors, [e.payload for e in encoded], labels)
            end = time.perf_counter()
            seconds[key]["compress"] = min(seconds[key]["compress"], middle - start)
            seconds[key]["decompress"] = min(seconds[key]["decompress"], end - middle)
            for level, codes in enumerate(decoded[key]):
                assert torch.equal(codes, torch.stack([e.codes[level] for e in encoded]))
    codec.IncrementalSampler = IncrementalSampler
    assert payloads["today"] == payloads["baseline"], "the payloads differ"
    result = {"baseline_rev": args.baseline_rev, "batch": 16, "threads": args.threads}
    for key in samplers:
        for step in ("compress", "decompress"):
            result[f"{key}_{step}_images_per_s"] = round(16 / seconds[key][step], 1)
    for step in ("compress", "decompress"):
        result[f"{step}_speedup"] = round(seconds["baseline"][step] / seconds["today"][step], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
