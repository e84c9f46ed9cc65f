"""Prior sampling speed: cached incremental sampler vs one forward pass, today's and a baseline's.

Two priors, scaled down from the paper's Table 3 so this CPU runs them in minutes:
  * top: 32x32 codes, K = 512, attention on (the paper's top-prior map size);
  * bottom: 32x32 codes conditioned on 16x16 top codes through a conditioning stack, no
    attention (the paper's bottom prior is 64x64 given 32x32; halved here).
Random weights (speed does not depend on training). Batch 16, dropout off.

With ``--baseline-rev REV`` the prior module of that git revision (``src/vqvae2/pixelsnail.py``)
is loaded into a throwaway module, given the same weights, and its forward pass and cached
sampler are timed in the same run, interleaved with today's (best of ``--repeats``); both
samplers must draw the same codes from the same generator.

The reference sampler runs the whole prior once per position; its time per position is the same
at every position, so it is timed over the first ``--reference-rows`` rows (0 skips it) and
scaled to the whole map (the scaled figure is labelled as such). Prints a Markdown table and one
JSON object.

    .venv/bin/python bench/bench_sampling.py [--baseline-rev 8c2b4e7] [--reference-rows 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import time
import types
from functools import partial
from pathlib import Path

import torch

from vqvae2.model_configs import PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler

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
REPOSITORY = Path(__file__).resolve().parents[1]


def load_baseline(revision: str) -> types.ModuleType:
    """The prior module (``pixelsnail.py``, with ``pixelsnail_sampler.py`` where the revision has
    it) of a git revision, as a throwaway module."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/vqvae2/pixelsnail.py"],
        cwd=REPOSITORY,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # Its relative imports (configs) resolve to today's package, whose config layout is its.
    source = source.replace("from .", "from vqvae2.")
    module = types.ModuleType(f"pixelsnail_{revision}")
    exec(compile(source, f"{revision}:src/vqvae2/pixelsnail.py", "exec"), module.__dict__)
    # Later revisions keep the incremental sampler in its own module: run it in the same
    # namespace, where the names it imports from the prior's module already are.
    sampler = subprocess.run(
        ["git", "show", f"{revision}:src/vqvae2/pixelsnail_sampler.py"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    if sampler.returncode == 0:
        lines = sampler.stdout.splitlines(keepends=True)
        source = "".join(line for line in lines if not line.startswith("from .pixelsnail import"))
        path = f"{revision}:src/vqvae2/pixelsnail_sampler.py"
        exec(compile(source, path, "exec"), module.__dict__)
    return module


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@torch.no_grad()
def sample_cached(sampler_class, prior, condition, seed: int) -> torch.Tensor:
    """``sample_level_cached``'s loop with a given sampler class: (B, H, W) codes."""
    side = prior.config.code_size
    generator = torch.Generator().manual_seed(seed)
    codes = torch.zeros(BATCH, side, side, dtype=torch.long)
    state = sampler_class(prior, BATCH, condition)
    for row in range(side):
        for column in range(side):
            probabilities = torch.softmax(state.logits_at(row, column).float(), dim=-1)
            codes[:, row, column] = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
            state.set_codes(row, column, codes[:, row, column])
    return codes


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


@torch.no_grad()
def measure(name: str, changes: dict, args, baseline) -> dict:
    torch.manual_seed(0)
    config = PixelSNAILConfig(**COMMON, **changes)
    prior = PixelSNAIL(config).eval()
    side = config.code_size
    upper = [torch.randint(0, 512, (BATCH, s, s)) for s in config.condition_sizes] or None
    condition = prior.condition(None, upper)
    codes = torch.randint(0, 512, (BATCH, side, side))
    variants = {"today": (prior, IncrementalSampler)}
    if baseline is not None:
        old = baseline.PixelSNAIL(config).eval()
        old.load_state_dict(prior.state_dict())
        variants["baseline"] = (old, baseline.IncrementalSampler)
    forward = {key: float("inf") for key in variants}
    cached = dict(forward)
    drawn = {}
    for model, _ in variants.values():
        model.logits(codes, condition)  # warm-up
    for _ in range(args.repeats):  # interleaved, best of the repeats
        for key, (model, sampler_class) in variants.items():
            for _ in range(3):
                seconds = timed(partial(model.logits, codes, condition))
                forward[key] = min(forward[key], seconds)
            start = time.perf_counter()
            drawn[key] = sample_cached(sampler_class, model, condition, seed=0)
            cached[key] = min(cached[key], time.perf_counter() - start)
    row = {"prior": name, "positions": side * side}
    for key in variants:
        row[f"{key}_forward_s"] = round(forward[key], 3)
        row[f"{key}_cached_s"] = round(cached[key], 2)
        row[f"{key}_cached_over_forward"] = round(cached[key] / forward[key], 2)
    if baseline is not None:
        row["same_codes"] = bool(torch.equal(drawn["today"], drawn["baseline"]))
    if args.reference_rows > 0:
        per_position = reference_seconds_per_position(prior, condition, args.reference_rows)
        row["reference_s_scaled"] = round(per_position * side * side, 1)
        row["reference_over_cached"] = round(per_position * side * side / cached["today"], 1)
    state = IncrementalSampler(prior, BATCH, condition)
    row["state_mib"] = round(state.state_bytes() / 2**20, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", help="git revision whose sampler to time alongside")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-rows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline_rev) if args.baseline_rev else None
    rows = [measure(name, changes, args, baseline) for name, changes in PRIORS.items()]
    print(
        "| prior (batch 16) | forward s | cached s | cached / forward | baseline forward s | "
        "baseline cached s | baseline cached / forward | same codes | reference s (scaled) | "
        "state MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prior']} | {r['today_forward_s']} | {r['today_cached_s']} | "
            f"{r['today_cached_over_forward']}x | {r.get('baseline_forward_s', '-')} | "
            f"{r.get('baseline_cached_s', '-')} | {r.get('baseline_cached_over_forward', '-')}x | "
            f"{r.get('same_codes', '-')} | {r.get('reference_s_scaled', '-')} | {r['state_mib']} |"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "threads": args.threads,
                "batch": BATCH,
                "baseline_rev": args.baseline_rev,
                "config": COMMON,
                "peak_rss_mib": round(peak, 1),
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
