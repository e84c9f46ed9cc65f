"""The cached sampler's per-position step, eager against compiled, in multiples of one forward pass.

For each prior, map side and batch: one forward pass of the prior (best of 3), then
``sample_level_cached`` with the ``eager`` step and with the ``compiled`` step (``torch.compile``
of the fixed-shape step), interleaved, best of ``--repeats``; the compiled step's first run
(compiling included, or loading from inductor's on-disk cache) is reported apart. Both draw
from the same seed and must draw the same codes (``same codes``).

Priors (random weights, K = 512, dropout off):
  * ``bench``: the pair of ``bench_sampling.py`` (128 hidden / 256 residual channels, 8 blocks,
    5x5 kernels, 2 output-stack layers; the top with attention after 2 blocks, 4 heads; the
    bottom conditioned on a top map of half its side through a 4-block conditioning stack);
  * ``small``: 64 / 64 channels, 4 blocks, 5x5 kernels, 1 output-stack layer; the top with one
    attention layer of 2 heads, the bottom given a half-side top map through 2 conditioning
    blocks.

    .venv/bin/python bench/bench_sampler_steps.py --priors small --sides 16 --batches 1 4 16
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from vqvae2.model_configs import PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.sampling import sample_level_cached

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


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@torch.no_grad()
def measure(shape: str, level: str, side: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    prior = PixelSNAIL(prior_config(shape, level, side)).eval()
    upper = [torch.randint(0, 512, (batch, s, s)) for s in prior.config.condition_sizes] or None
    codes = torch.randint(0, 512, (batch, side, side))
    prior(codes, None, upper)  # warm-up
    forward = min(timed(partial(prior, codes, None, upper)) for _ in range(3))

    def sample(step: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return sample_level_cached(prior, batch, None, upper, 1.0, generator, step=step)

    first_compiled = timed(partial(sample, "compiled"))
    seconds = {"eager": float("inf"), "compiled": float("inf")}
    drawn = {}
    for _ in range(repeats):
        for step in seconds:
            start = time.perf_counter()
            drawn[step] = sample(step)
            seconds[step] = min(seconds[step], time.perf_counter() - start)
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
        "same_codes": bool(torch.equal(drawn["eager"], drawn["compiled"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", nargs="+", choices=sorted(SHAPES), default=["small"])
    parser.add_argument("--levels", nargs="+", choices=("top", "bottom"), default=["top", "bottom"])
    parser.add_argument("--sides", nargs="+", type=int, default=[16])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| prior | map | batch | forward s | eager s | eager / forward | compiled s | "
        "compiled / forward | eager / compiled | first compiled run s | same codes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.priors:
        for level in args.levels:
            for side in args.sides:
                for batch in args.batches:
                    r = measure(shape, level, side, batch, args.repeats)
                    rows.append(r)
                    print(
                        f"| {r['prior']} | {side}x{side} | {batch} | {r['forward_s']} | "
                        f"{r['eager_s']} | {r['eager_over_forward']}x | {r['compiled_s']} | "
                        f"{r['compiled_over_forward']}x | {r['eager_over_compiled']}x | "
                        f"{r['first_compiled_run_s']} | {'yes' if r['same_codes'] else 'no'} |",
                        flush=True,
                    )
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
