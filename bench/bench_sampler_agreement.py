"""How often the cached sampler's draws part from the reference sampler's, at the paper's widths.

The cached sampler (``IncrementalSampler``: per-position matrix products, conditioning computed
one image at a time) and the reference sampler (one full forward pass per position, conv2d,
batched conditioning) compute the same logits up to float rounding. Both draw each code with
``torch.multinomial(probabilities, 1, generator)``, which for one sample is an exponential race:
code ``argmax_k p_k / E_k`` with ``E ~ Exp(1)``, K draws per row of the batch whatever the
probabilities (``test_bench_sampler_agreement.py`` pins this on this PyTorch). So from one seed
the two samplers consume the generator alike and draw the same codes until the first position
where the race's winner differs between their probabilities; from there on their prefixes
differ and so do their maps.

Teacher forcing measures that chance. One pass of the cached sampler draws a map (its own draws,
seeded) and keeps its logits at every position; one forward pass of the prior over that map
gives the reference sampler's logits at every position (the logits at (i, j) of a forward pass
depend only on the codes before (i, j), so they are what the reference sampler computes there:
bit for bit on a small prior, checked in the test). With a shared ``E``, two probability
vectors a and b pick the same code k with probability ``1 / sum_j max(a_j / a_k, b_j / b_k)``
(integrate over ``E_k``), so the draws part with probability

    P(differ) = 1 - sum_k 1 / sum_j max(a_j / a_k, b_j / b_k),

computed in float64 from each path's float32 probabilities (``softmax(logits / temperature)``,
as ``sampling._draw`` forms them). For comparison: an inverse-CDF draw from one shared uniform u
would part where u falls between the two CDFs, ``sum_k |CDF_a(k) - CDF_b(k)|`` (exact while
those intervals do not overlap, as for rounding-size differences).

Priors: the paper presets ``prior-top-imagenet-256`` (32x32, attention) and
``prior-bottom-imagenet-256`` (64x64 given random 32x32 top codes), 1,000 classes (random
labels), K = 512, random weights, eval mode, float32. Prints one JSON object per prior.

    PYTHONPATH=src .venv/bin/python bench/bench_sampler_agreement.py [--priors bottom top] \
        [--batch 2] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from torch import Tensor

from vqvae2.config import PriorRunConfig, load_config
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler
from vqvae2.sampling import _draw

# prior -> (preset, map side, upper levels' sides) as ImageNet-256 gives them (Table 3)
PRIORS = {
    "top": ("prior-top-imagenet-256", 32, ()),
    "bottom": ("prior-bottom-imagenet-256", 64, (32,)),
}
IMAGENET_CLASSES = 1000


def multinomial_divergence(a: Tensor, b: Tensor) -> Tensor:
    """Chance that ``torch.multinomial`` draws differ from one generator state, per row.

    Args:
        a, b: (N, K) probabilities (any positive scale; zeros allowed), float32 or float64.

    Returns:
        (N,) float64: ``1 - sum_k 1 / sum_j max(a_j / a_k, b_j / b_k)``, the k term 0 where
        a_k or b_k is 0 (that path never draws k).
    """
    a, b = a.double(), b.double()
    same = torch.zeros(len(a), dtype=torch.float64)
    for start in range(0, len(a), 16):  # 16 rows at a time: (16, K, K) float64
        rows_a, rows_b = a[start : start + 16], b[start : start + 16]
        drawn = (rows_a > 0) & (rows_b > 0)  # (n, K) codes both paths can draw
        ratio_a = rows_a[:, None, :] / rows_a.clamp_min(1e-300)[:, :, None]  # (n, k, j)
        ratio_b = rows_b[:, None, :] / rows_b.clamp_min(1e-300)[:, :, None]
        both = torch.maximum(ratio_a, ratio_b).sum(dim=-1)  # (n, K)
        same[start : start + 16] = torch.where(drawn, 1 / both, 0.0).sum(dim=-1)
    return (1 - same).clamp_min(0)


def inverse_cdf_divergence(a: Tensor, b: Tensor) -> Tensor:
    """(N, K) probabilities -> (N,) float64 ``sum_k |CDF_a(k) - CDF_b(k)|`` (rows normalised)."""
    a, b = a.double(), b.double()
    cdf_a = (a / a.sum(-1, keepdim=True)).cumsum(-1)
    cdf_b = (b / b.sum(-1, keepdim=True)).cumsum(-1)
    return (cdf_a - cdf_b).abs().sum(-1)


@torch.no_grad()
def teacher_forced_logits(
    prior: PixelSNAIL,
    labels: Tensor | None,
    upper: list[Tensor] | None,
    temperature: float,
    generator: torch.Generator,
    rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The cached sampler's draws and logits, and the reference logits on the same codes.

    Args:
        rows: the first ``rows`` rows of the map (None: all); later codes stay 0, which the
            logits of these rows do not read.

    Returns:
        codes (B, H, W) int64 (what ``sample_level_cached`` draws from this generator, in the
        first ``rows`` rows), cached and reference logits, each (B, K, rows, W) float32.
    """
    config = prior.config
    side, batch = config.code_size, len(labels) if labels is not None else len(upper[0])
    rows = side if rows is None else rows
    codes = torch.zeros(batch, side, side, dtype=torch.long)
    cached = torch.empty(batch, config.codebook_size, rows, side)  # (B, K, rows, W)
    state = IncrementalSampler(prior, batch, prior.condition_per_image(labels, upper))
    for row in range(rows):
        for column in range(side):
            cached[:, :, row, column] = state.logits_at(row, column)
            codes[:, row, column] = _draw(cached[:, :, row, column], temperature, generator)
            state.set_codes(row, column, codes[:, row, column])
    reference = prior.logits(codes, prior.condition(labels, upper))[:, :, :rows]  # (B, K, rows, W)
    return codes, cached, reference


def agreement(cached: Tensor, reference: Tensor, temperature: float, side: int) -> dict:
    """Per-position divergence figures of two (B, K, H, W) logit sets over the first H rows
    of (side x side) maps; per-map figures scale the mean to side * side positions."""
    batch, _, height, width = cached.shape

    def probabilities(logits: Tensor) -> Tensor:  # (B, K, H, W) -> (B * H * W, K) float32
        flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])  # (B * H * W, K)
        return torch.softmax(flat.float() / temperature, dim=-1)

    a, b = probabilities(reference), probabilities(cached)
    race = multinomial_divergence(a, b).view(batch, height * width)  # (B, rows * W)
    inverse = inverse_cdf_divergence(a, b)
    scale = side * side / (height * width)  # 1 when every row was measured
    return {
        "positions_measured_per_map": height * width,
        "positions_per_map": side * side,
        "max_abs_logit_difference": float((cached - reference).abs().max()),
        "logit_std": float(reference.std()),
        "multinomial_per_position_mean": float(race.mean()),
        "multinomial_per_position_max": float(race.max()),
        "multinomial_expected_per_map": float(race.sum(-1).mean() * scale),
        "inverse_cdf_per_position_mean": float(inverse.mean()),
        "inverse_cdf_per_position_max": float(inverse.max()),
        "inverse_cdf_expected_per_map": float(inverse.mean() * side * side),
    }


def measure(name: str, args) -> dict:
    preset, side, upper_sides = PRIORS[name]
    config = dataclasses.replace(
        load_config(PriorRunConfig, preset).prior,
        code_size=side,
        condition_sizes=upper_sides,
        num_classes=IMAGENET_CLASSES,
    )
    torch.manual_seed(args.seed)
    prior = PixelSNAIL(config).eval()
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, IMAGENET_CLASSES, (args.batch,), generator=generator)
    upper = [
        torch.randint(0, config.codebook_size, (args.batch, s, s), generator=generator)
        for s in upper_sides
    ] or None
    start = time.perf_counter()
    _, cached, reference = teacher_forced_logits(
        prior, labels, upper, args.temperature, generator, args.rows
    )
    row = {"prior": preset, "side": side, "batch": args.batch, "seed": args.seed}
    row |= agreement(cached, reference, args.temperature, side)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", nargs="+", choices=list(PRIORS), default=list(PRIORS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rows", type=int, help="measure the first ROWS rows only (all)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.priors:
        print(json.dumps(measure(name, args)), flush=True)


if __name__ == "__main__":
    main()
