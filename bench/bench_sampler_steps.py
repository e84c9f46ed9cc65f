"""The cached sampler's per-position step, eager against compiled, in multiples of one forward pass.

For each prior, map side and batch: one forward pass of the prior (best of 3), then
``sample_level_cached``'s loop with the ``eager`` step and with the ``compiled`` step
(``torch.compile`` of the fixed-shape step), and with ``--baseline-rev REV`` the incremental
sampler of that git revision (``bench_sampling.load_baseline``, on the same prior), interleaved, best of ``--repeats``. All three use today's draw. The compiled
step's first run (compiling included, or loading from inductor's on-disk cache) is reported
apart. All draw from the same seed and must draw the same codes (``same codes``).

With ``--breakdown`` it also times the parts of one eager run instead (``breakdown``): the
conditioning and state set-up, ``logits_at``, the draws, ``set_codes`` within a row and at a
row's end (where the vertical stream advances by the row), each in multiples of the forward pass.

Priors (random weights, K = 512, dropout off):
  * ``bench``: the pair of ``bench_sampling.py`` (128 hidden / 256 residual channels, 8 blocks,
    5x5 kernels, 2 output-stack layers; the top with attention after 2 blocks, 4 heads; the
    bottom conditioned on a top map of half its side through a 4-block conditioning stack);
  * ``small``: 64 / 64 channels, 4 blocks, 5x5 kernels, 1 output-stack layer; the top with one
    attention layer of 2 heads, the bottom given a half-side top map through 2 conditioning
    blocks.

    .venv/bin/python bench/bench_sampler_steps.py --priors small --sides 16 --batches 1 4 16 \
        --baseline-rev 84fb6b9
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from bench_sampling import load_baseline, timed

from vqvae2.model_configs import PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler
from vqvae2.sampling import _draw

SHAPES = {
    "bench": dict(
        hidden_channels=128,
        residual_channels=256,
        num_layers=8,
        output_stack_layers=2,
        condition_channels=128,
        attention_heads=4,
        attention_layers=2,
        condition_res_blocks=4,
    ),
    "small": dict(
        hidden_channels=64,
        residual_channels=64,
        num_layers=4,
        output_stack_layers=1,
        condition_channels=64,
        attention_heads=2,
        attention_layers=1,
        condition_res_blocks=2,
    ),
}


def prior_config(shape: str, level: str, side: int) -> PixelSNAILConfig:
    values = dict(SHAPES[shape], code_size=side, codebook_size=512, kernel_size=5, dropout=0.0)
    if level == "top":
        values["condition_res_blocks"] = 0
    else:
        values.update(attention_layers=0, condition_sizes=(side // 2,))
    return PixelSNAILConfig(**values)


@torch.no_grad()
def sample(prior, batch: int, upper, make_state) -> torch.Tensor:
    """``sample_level_cached``'s loop with a given state: (B, H, W) codes, seed 0."""
    side = prior.config.code_size
    generator = torch.Generator().manual_seed(0)
    codes = torch.zeros(batch, side, side, dtype=torch.long)
    state = make_state(prior, batch, prior.condition_per_image(None, upper))
    for row in range(side):
        for column in range(side):
            codes[:, row, column] = _draw(state.logits_at(row, column), 1.0, generator)
            state.set_codes(row, column, codes[:, row, column])
    return codes


@torch.no_grad()
def breakdown(prior, batch: int, upper, forward: float) -> dict:
    """Seconds of each part of one eager sampling run, over the forward pass's seconds."""
    side = prior.config.code_size
    generator = torch.Generator().manual_seed(0)
    codes = torch.zeros(batch, side, side, dtype=torch.long)
    parts = dict.fromkeys(["set_up", "logits", "draw", "set_codes", "row_advance"], 0.0)
    start = time.perf_counter()
    state = IncrementalSampler(prior, batch, prior.condition_per_image(None, upper))
    parts["set_up"] = time.perf_counter() - start
    for row in range(side):
        for column in range(side):
            start = time.perf_counter()
            logits = state.logits_at(row, column)
            drawn = time.perf_counter()
            codes[:, row, column] = _draw(logits, 1.0, generator)
            setting = time.perf_counter()
            state.set_codes(row, column, codes[:, row, column])
            part = "row_advance" if column == side - 1 else "set_codes"
            parts["logits"] += drawn - start
            parts["draw"] += setting - drawn
            parts[part] += time.perf_counter() - setting
    return {name: round(seconds / forward, 2) for name, seconds in parts.items()}


@torch.no_grad()
def measure(shape: str, level: str, side: int, batch: int, args, baseline) -> dict:
    torch.manual_seed(0)
    prior = PixelSNAIL(prior_config(shape, level, side)).eval()
    upper = [torch.randint(0, 512, (batch, s, s)) for s in prior.config.condition_sizes] or None
    codes = torch.randint(0, 512, (batch, side, side))
    prior(codes, None, upper)  # warm-up
    forward = min(timed(partial(prior, codes, None, upper)) for _ in range(3))
    states = {
        "eager": IncrementalSampler,
        "compiled": partial(IncrementalSampler, step="compiled"),
    }
    if baseline is not None:
        states["baseline"] = baseline
    if args.breakdown:
        parts = breakdown(prior, batch, upper, forward)
        return {"prior": f"{shape} {level}", "side": side, "batch": batch, **parts}
    first_compiled = timed(partial(sample, prior, batch, upper, states["compiled"]))
    seconds = dict.fromkeys(states, float("inf"))
    drawn = {}
    for _ in range(args.repeats):
        for name, make_state in states.items():
            start = time.perf_counter()
            drawn[name] = sample(prior, batch, upper, make_state)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    baseline_figures = {}
    if baseline is not None:
        baseline_figures = {
            "baseline_s": round(seconds["baseline"], 3),
            "baseline_over_forward": round(seconds["baseline"] / forward, 2),
            "baseline_over_eager": round(seconds["baseline"] / seconds["eager"], 2),
        }
    return {
        "prior": f"{shape} {level}",
        "side": side,
        "batch": batch,
        "forward_s": round(forward, 4),
        "eager_s": round(seconds["eager"], 3),
        "eager_over_forward": round(seconds["eager"] / forward, 2),
        "compiled_s": round(seconds["compiled"], 3),
        "compiled_over_forward": round(seconds["compiled"] / forward, 2),
        "eager_over_compiled": round(seconds["eager"] / seconds["compiled"], 2),
        "first_compiled_run_s": round(first_compiled, 1),
        **baseline_figures,
        "same_codes": all(torch.equal(drawn["eager"], codes) for codes in drawn.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", nargs="+", choices=sorted(SHAPES), default=["small"])
    parser.add_argument("--levels", nargs="+", choices=("top", "bottom"), default=["top", "bottom"])
    parser.add_argument("--sides", nargs="+", type=int, default=[16])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-rev", help="git revision whose sampler to time alongside")
    parser.add_argument("--breakdown", action="store_true", help="time one eager run's parts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline_rev).IncrementalSampler if args.baseline_rev else None
    print(
        "| prior | map | batch | forward s | eager s | eager / forward | compiled s | "
        "compiled / forward | eager / compiled | first compiled run s | baseline s | "
        "baseline / forward | baseline / eager | same codes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.priors:
        for level in args.levels:
            for side in args.sides:
                for batch in args.batches:
                    r = measure(shape, level, side, batch, args, baseline)
                    rows.append(r)
                    if args.breakdown:
                        print(json.dumps(r), flush=True)
                        continue
                    print(
                        f"| {r['prior']} | {side}x{side} | {batch} | {r['forward_s']} | "
                        f"{r['eager_s']} | {r['eager_over_forward']}x | {r['compiled_s']} | "
                        f"{r['compiled_over_forward']}x | {r['eager_over_compiled']}x | "
                        f"{r['first_compiled_run_s']} | {r.get('baseline_s', '-')} | "
                        f"{r.get('baseline_over_forward', '-')}x | "
                        f"{r.get('baseline_over_eager', '-')}x | "
                        f"{'yes' if r['same_codes'] else 'no'} |",
                        flush=True,
                    )
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
