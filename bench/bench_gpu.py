"""Paper-size training steps and sampling on one GPU: largest batch that fits, images/s, peak memory.

Training cases: ``stage1`` is the `imagenet-256` VQ-VAE (Table 5) on 256x256 RGB images;
``prior-top`` is the `prior-top-imagenet-256` prior (Table 3: 32x32 codes, 512 hidden, 2048
residual, 20 layers, 4 attention layers, 20 output-stack layers), class-conditional over 1,000
classes. For each case the batch doubles from 1 until the step runs out of memory; the largest
batch that ran is then timed (after warm-up steps). A step = forward, backward, fused Adam, with
the runtime options given (bf16 autocast by default).

Sampling cases: ``sample-top`` and ``sample-bottom`` draw codes with the cached sampler
(``IncrementalSampler``, as ``sample_level_cached``) from the paper-size `prior-top-imagenet-256`
and `prior-bottom-imagenet-256` priors (the bottom one given random 32x32 top codes), random
weights, 1,000 classes. The batch doubles from 1 while the conditioning, the sampler state and
the first row fit; the largest batch that ran is then timed over ``--sample-rows`` rows (all by
default; fewer rows are scaled to the whole map, and the row says so). Prints a Markdown table
and one JSON object.

    python bench/bench_gpu.py [--precision bf16] [--steps 10] [--max-batch 4096]

It needs CUDA for meaningful figures; ``--device cpu --max-batch 1 --steps 1 --cases stage1``
and ``--device cpu --cases sample-top sample-bottom --max-sample-batch 1 --sample-rows 1``
check the plumbing anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable

import torch

from vqvae2.config import PriorRunConfig, RuntimeConfig, VQVAERunConfig, load_config
from vqvae2.distributed import runtime_context
from vqvae2.loop import prepare_step_module
from vqvae2.optimizer import make_optimizer
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler
from vqvae2.vqvae import VQVAE2

CASES = ("stage1", "prior-top")
# sampling case -> (prior preset, its map side, the upper levels' sides): ImageNet-256's levels
SAMPLE_CASES = {
    "sample-top": ("prior-top-imagenet-256", 32, ()),
    "sample-bottom": ("prior-bottom-imagenet-256", 64, (32,)),
}
CODEBOOK_SIZE, NUM_CLASSES = 512, 1000  # Table 5 codebook; ImageNet classes


def build(case: str, batch: int, runtime: RuntimeConfig):
    """A step function on ``batch`` random inputs for ``case``."""
    context = runtime_context(runtime)
    torch.manual_seed(0)
    if case == "stage1":
        config = load_config(VQVAERunConfig, "imagenet-256")
        model = VQVAE2(config.model)
        size = config.model.image_size
        inputs = (torch.rand(batch, 3, size, size) * 2 - 1,)
    else:
        config = load_config(PriorRunConfig, "prior-top-imagenet-256")
        prior_config = dataclasses.replace(
            config.prior, code_size=32, codebook_size=512, num_classes=1000
        )
        model = PixelSNAIL(prior_config)
        inputs = (torch.randint(0, 512, (batch, 32, 32)), torch.randint(0, 1000, (batch,)))
    step_module = prepare_step_module(model, context, runtime)
    inputs = tuple(step_module.to_device(x) for x in inputs)
    optimizer = make_optimizer(model, config.train)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with step_module.autocast():
            loss = step_module.forward(*inputs).loss
        loss.backward()
        optimizer.step()

    return step, context.device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_with_peak(
    device: torch.device, run: Callable[[], None], warm_up: Callable[[], None] = lambda: None
) -> tuple[float, float | None] | None:
    """Seconds of ``run()`` after ``warm_up()``, and the peak GiB of both on CUDA (None
    elsewhere); None when they run out of memory."""
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm_up()
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def try_batch(case: str, batch: int, runtime: RuntimeConfig, steps: int) -> dict | None:
    """Images/s and peak memory at ``batch``, or None when it runs out of memory."""
    try:
        step, device = build(case, batch, runtime)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None

    def repeat(times: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(times):
                step()

        return run

    measured = timed_with_peak(device, repeat(steps), warm_up=repeat(2))
    if measured is None:
        return None
    seconds, peak = measured
    return {"batch": batch, "images_per_second": batch * steps / seconds, "peak_gib": peak}


def largest_batch(case: str, runtime: RuntimeConfig, steps: int, max_batch: int) -> dict:
    best, batch = None, 1
    while batch <= max_batch:
        result = try_batch(case, batch, runtime, steps=1)
        if result is None:
            break
        best, batch = result, batch * 2
    if best is None:
        raise SystemExit(f"{case}: even a batch of 1 does not fit")
    return {"case": case, **try_batch(case, best["batch"], runtime, steps)}


def build_sampling_prior(case: str, device: torch.device) -> PixelSNAIL:
    """The paper-size prior of a sampling case, random weights, in eval mode on ``device``."""
    preset, side, upper = SAMPLE_CASES[case]
    config = dataclasses.replace(
        load_config(PriorRunConfig, preset).prior,
        code_size=side,
        condition_sizes=upper,
        codebook_size=CODEBOOK_SIZE,
        num_classes=NUM_CLASSES,
    )
    torch.manual_seed(0)
    return PixelSNAIL(config).to(device).eval()


@torch.no_grad()
def sample_rows(prior: PixelSNAIL, batch: int, rows: int, runtime: RuntimeConfig) -> None:
    """``sample_level_cached``'s work for the first ``rows`` rows of a batch of code maps."""
    device = next(prior.parameters()).device
    config = prior.config
    generator = torch.Generator(device).manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=generator)
    upper = [
        torch.randint(0, CODEBOOK_SIZE, (batch, s, s), device=device, generator=generator)
        for s in config.condition_sizes
    ]
    codes = torch.zeros(batch, config.code_size, config.code_size, dtype=torch.long, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=runtime.precision == "bf16"):
        state = IncrementalSampler(prior, batch, prior.condition(labels, upper or None))
        for row in range(rows):
            for column in range(config.code_size):
                probabilities = torch.softmax(state.logits_at(row, column).float(), dim=-1)
                codes[:, row, column] = torch.multinomial(probabilities, 1, generator=generator)[
                    :, 0
                ]
                state.set_codes(row, column, codes[:, row, column])


def try_sampling(prior: PixelSNAIL, batch: int, rows: int, runtime: RuntimeConfig) -> dict | None:
    """Seconds and peak memory of sampling ``rows`` rows at ``batch``, or None when out of memory."""
    device = next(prior.parameters()).device
    measured = timed_with_peak(device, lambda: sample_rows(prior, batch, rows, runtime))
    if measured is None:
        return None
    seconds, peak = measured
    return {"batch": batch, "seconds": seconds, "peak_gib": peak}


def largest_sampling_batch(
    case: str, runtime: RuntimeConfig, rows: int | None, max_batch: int
) -> dict:
    """Double the batch while one row fits; time the largest over ``rows`` rows (None: all)."""
    prior = build_sampling_prior(case, runtime_context(runtime).device)
    side = prior.config.code_size
    rows = side if rows is None else min(rows, side)
    best, batch = None, 1
    while batch <= max_batch:
        result = try_sampling(prior, batch, 1, runtime)
        if result is None:
            break
        best, batch = result, batch * 2
    if best is None:
        raise SystemExit(f"{case}: even a batch of 1 does not fit")
    timed = try_sampling(prior, best["batch"], rows, runtime)
    if timed is None:
        raise SystemExit(f"{case}: batch {best['batch']} fit one row but not {rows}")
    scale = side / rows  # rows cost the same, so a part of the map scales to the whole
    return {
        "case": case,
        "batch": best["batch"],
        "images_per_second": best["batch"] / (timed["seconds"] * scale),
        "peak_gib": timed["peak_gib"],
        "rows_timed": rows,
        "scaled_to_whole_map": rows < side,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("float32", "bf16"), default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--max-sample-batch", type=int, default=65536)
    parser.add_argument("--sample-rows", type=int, help="rows to time (default: the whole map)")
    parser.add_argument(
        "--cases", nargs="+", choices=CASES + tuple(SAMPLE_CASES), default=list(CASES)
    )
    args = parser.parse_args()
    runtime = RuntimeConfig(
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        channels_last=args.channels_last,
    )
    rows = [
        largest_sampling_batch(case, runtime, args.sample_rows, args.max_sample_batch)
        if case in SAMPLE_CASES
        else largest_batch(case, runtime, args.steps, args.max_batch)
        for case in args.cases
    ]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print("| case | device | precision | batch | images/s | peak GiB |\n|---|---|---|---|---|---|")
    for row in rows:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        scaled = (
            f" (from {row['rows_timed']} rows, scaled)" if row.get("scaled_to_whole_map") else ""
        )
        print(
            f"| {row['case']} | {name} | {args.precision} | {row['batch']} | "
            f"{row['images_per_second']:.2f}{scaled} | {peak} |"
        )
    print(json.dumps({"device": name, "precision": args.precision, "results": rows}))


if __name__ == "__main__":
    main()
