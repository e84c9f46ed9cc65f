"""Prior sampling speed: cached incremental sampler vs the reference sampler vs one forward pass.

Two priors, scaled down from the paper's Table 3 so this CPU runs them in minutes:
  * top: 32x32 codes, K = 512, attention on (the paper's top-prior map size);
  * bottom: 32x32 codes conditioned on 16x16 top codes through a conditioning stack, no
    attention (the paper's bottom prior is 64x64 given 32x32; halved here).
Random weights (speed does not depend on training). Batch 16, dropout off.

The reference sampler runs the whole prior once per position; its time per position is the same
at every position, so it is timed over the first ``--reference-rows`` rows and scaled to the whole
map (the scaled figure is labelled as such). Prints a Markdown table and one JSON object.

    .venv/bin/python bench/bench_sampling.py [--reference-rows 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from vqvae2.config import PixelSNAILConfig
from vqvae2.pixelsnail import IncrementalSampler, PixelSNAIL
from vqvae2.sampling import sample_level_cached

BATCH = 16
COMMON = dict(
    codebook_size=512,
    hidden_channels=128,
    residual_channels=256,
    num_layers=8,
    attention_heads=4,
    kernel_size=5,
    dropout=0.0,
    output_stack_layers=2,
    condition_channels=128,
)
PRIORS = {
    "top 32x32, attention": dict(code_size=32, attention_layers=2),
    "bottom 32x32 | top 16x16": dict(
        code_size=32, attention_layers=0, condition_sizes=(16,), condition_res_blocks=4
    ),
}


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@torch.no_grad()
def reference_seconds_per_position(prior, condition, rows: int) -> float:
    """Time of the reference sampler's work (one full forward pass per position) per position."""
    side = prior.config.code_size
    codes = torch.zeros(BATCH, side, side, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        for row in range(rows):
            for column in range(side):
                logits = prior.logits(codes, condition)[:, :, row, column]
                probabilities = torch.softmax(logits, dim=-1)
                codes[:, row, column] = torch.multinomial(probabilities, 1, generator=generator)[
                    :, 0
                ]

    return timed(run) / (rows * side)


def cache_bytes(prior: PixelSNAIL, condition) -> int:
    """Bytes of every tensor the incremental sampler allocates for one batch."""
    state = IncrementalSampler(prior, BATCH, condition)
    tensors = [
        state.embedded,
        state.input_from_above,
        *state.vertical,
        *state.horizontal,
        *state.blocks_from_above,
    ]
    tensors += [t for pair in state.attention_cache.values() for t in pair]
    tensors += [t for pair in state.conditions if pair is not None for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def measure(name: str, changes: dict, reference_rows: int) -> dict:
    torch.manual_seed(0)
    prior = PixelSNAIL(PixelSNAILConfig(**COMMON, **changes)).eval()
    side = prior.config.code_size
    upper = [torch.randint(0, 512, (BATCH, s, s)) for s in prior.config.condition_sizes] or None
    condition = prior.condition(None, upper)
    codes = torch.randint(0, 512, (BATCH, side, side))
    prior.logits(codes, condition)  # warm-up
    forward = min(timed(lambda: prior.logits(codes, condition)) for _ in range(3))
    cached = timed(
        lambda: sample_level_cached(
            prior, BATCH, None, upper, 1.0, torch.Generator().manual_seed(0)
        )
    )
    per_position = reference_seconds_per_position(prior, condition, reference_rows)
    reference = per_position * side * side
    return {
        "prior": name,
        "positions": side * side,
        "forward_s": round(forward, 3),
        "cached_s": round(cached, 2),
        "reference_s_scaled": round(reference, 1),
        "reference_rows_timed": reference_rows,
        "cached_over_forward": round(cached / forward, 2),
        "reference_over_cached": round(reference / cached, 1),
        "cache_mib": round(cache_bytes(prior, condition) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-rows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, changes, args.reference_rows) for name, changes in PRIORS.items()]
    print(
        "| prior (batch 16) | forward s | cached s | reference s (scaled) | cached / forward | "
        "reference / cached | cache MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prior']} | {r['forward_s']} | {r['cached_s']} | {r['reference_s_scaled']} | "
            f"{r['cached_over_forward']}x | {r['reference_over_cached']}x | {r['cache_mib']} |"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "threads": args.threads,
                "batch": BATCH,
                "config": COMMON,
                "peak_rss_mib": round(peak, 1),
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
