"""Paper-size training steps on one GPU: largest batch that fits, images/s and peak memory.

Cases: ``stage1`` is the `imagenet-256` VQ-VAE (Table 5) on 256x256 RGB images; ``prior-top``
is the `prior-top-imagenet-256` prior (Table 3: 32x32 codes, 512 hidden, 2048 residual, 20
layers, 4 attention layers, 20 output-stack layers), class-conditional over 1,000 classes.
For each case the batch doubles from 1 until the step runs out of memory; the largest batch
that ran is then timed (after warm-up steps). A step = forward, backward, fused Adam, with the
runtime options given (bf16 autocast by default). Prints a Markdown table and one JSON object.

    python bench/bench_gpu.py [--precision bf16] [--steps 10] [--max-batch 4096]

It needs CUDA for meaningful figures; ``--device cpu --max-batch 2 --steps 1`` checks the
plumbing anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from vqvae2.config import PriorRunConfig, RuntimeConfig, VQVAERunConfig, load_config
from vqvae2.distributed import runtime_context
from vqvae2.loop import make_optimizer, prepare_step_module
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.vqvae import VQVAE2

CASES = ("stage1", "prior-top")


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


def try_batch(case: str, batch: int, runtime: RuntimeConfig, steps: int) -> dict | None:
    """Images/s and peak memory at ``batch``, or None when it runs out of memory."""
    try:
        step, device = build(case, batch, runtime)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("float32", "bf16"), default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = parser.parse_args()
    runtime = RuntimeConfig(
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        channels_last=args.channels_last,
    )
    rows = [largest_batch(case, runtime, args.steps, args.max_batch) for case in args.cases]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print("| case | device | precision | batch | images/s | peak GiB |\n|---|---|---|---|---|---|")
    for row in rows:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        print(
            f"| {row['case']} | {name} | {args.precision} | {row['batch']} | "
            f"{row['images_per_second']:.1f} | {peak} |"
        )
    print(json.dumps({"device": name, "precision": args.precision, "results": rows}))


if __name__ == "__main__":
    main()
