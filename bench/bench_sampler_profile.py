"""Where one position of the cached sampler goes: operator profile, weights read, draw costs.

For one prior of ``bench_sampler_steps.py`` (random weights), this prints:
  * the float32 weights one position's step multiplies (the horizontal stream, attention, output
    stack and output layer), in MB: what a position reads from memory at least once;
  * a ``torch.profiler`` table of ``--positions`` positions (``logits_at`` and ``set_codes``,
    row advances included; the step eager, or the fixed-shape step compiled, after a warm-up
    that compiles it) and the microseconds per position under the profiler;
  * without the profiler, the microseconds of the step alone (the logits at one position,
    called again and again there: its writes to the state are the same each time);
  * microseconds per draw at the batch: ``torch.multinomial`` as the samplers draw, the
    exponentials alone it takes from the generator, and a Gumbel race from uniforms (the same
    distribution, other numbers) for comparison.

    PYTHONPATH=src .venv/bin/python bench/bench_sampler_profile.py --priors small --level top \
        --side 16 --batch 4 --step compiled
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from bench_sampler_steps import SHAPES, prior_config
from torch.profiler import profile

from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler, _compiled_step


def step_weights(prior: PixelSNAIL) -> int:
    """Float weights one position's step multiplies (biases excluded)."""
    count = prior.horizontal_input.conv.weight.numel()
    for block in prior.blocks:
        count += block.horizontal.conv.weight.numel() + block.horizontal_gates.weight.numel()
    for attention in prior.attention.values():
        count += sum(
            layer.weight.numel()
            for layer in (attention.query, attention.key, attention.value, attention.output)
        )
    for block in prior.output_stack:
        count += block.first.weight.numel() + block.second.weight.numel()
    return count + prior.output.weight.numel()


def microseconds(function, calls: int = 500) -> float:
    for _ in range(20):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def draw_costs(batch: int, codebook_size: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, codebook_size)

    def gumbel_race() -> torch.Tensor:
        uniforms = torch.rand(batch, codebook_size, generator=generator)
        return (logits - uniforms.log_().neg_().log_()).argmax(dim=-1)

    return {
        "multinomial of the softmax": microseconds(
            lambda: torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ),
        "its exponentials alone": microseconds(
            lambda: torch.empty(batch, codebook_size).exponential_(generator=generator)
        ),
        "Gumbel race from uniforms": microseconds(gumbel_race),
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", choices=sorted(SHAPES), default="small")
    parser.add_argument("--level", choices=("top", "bottom"), default="top")
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--step", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prior = PixelSNAIL(prior_config(args.priors, args.level, args.side)).eval()
    upper = [torch.randint(0, 512, (args.batch, s, s)) for s in prior.config.condition_sizes]
    state = IncrementalSampler(
        prior, args.batch, prior.condition_per_image(None, upper or None), args.step
    )
    codes = torch.randint(0, 512, (args.batch, args.side, args.side))
    positions = [divmod(p, args.side) for p in range(args.positions + 8)]
    for row, col in positions[:8]:  # warm-up (compiles the compiled step)
        state.logits_at(row, col)
        state.set_codes(row, col, codes[:, row, col])
    with profile() as profiled:
        start = time.perf_counter()
        for row, col in positions[8:]:
            state.logits_at(row, col)
            state.set_codes(row, col, codes[:, row, col])
        seconds = time.perf_counter() - start
    print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(
        f"{args.priors} {args.level} {args.side}x{args.side}, batch {args.batch}, {args.step}: "
        f"{seconds / args.positions * 1e6:.0f} us per position under the profiler "
        f"(logits_at and set_codes, row advances included); weights per position "
        f"{step_weights(prior) * 4 / 1e6:.2f} MB ({step_weights(prior):,} float32)"
    )
    position = args.positions + 8  # the next position, its row and column
    row, col = divmod(position, args.side)
    if args.step == "compiled":
        step = partial(_compiled_step(), state, state.positions[position])
    else:
        step = partial(state._logits_eager, position, col)
    print(f"the step alone at ({row}, {col}): {microseconds(step):.0f} us per call")
    for name, cost in draw_costs(args.batch, prior.config.codebook_size).items():
        print(f"draw at batch {args.batch}, K = {prior.config.codebook_size}: {name} {cost:.1f} us")


if __name__ == "__main__":
    main()
