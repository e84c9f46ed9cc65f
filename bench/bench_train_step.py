"""Training-step throughput before and after the speed work, side by side in one run.

Cases (random inputs; a step = forward, backward, optimizer step, EMA update included):
  * ``stage1-64``: the VQ-VAE at the paper's Table 5 widths (`imagenet-256` preset: 128 hidden,
    64 residual, 2 residual layers, K = 512, D = 64) on 64x64 RGB images, batch 16;
  * ``stage1-256``: the same model on 256x256 RGB images (the preset's size), batch 4;
  * ``prior-top``: the `prior-top-fashion-mnist-32` prior (4x4 codes, K = 512, 10 classes),
    batch 128;
  * ``prior-bottom``: the `prior-bottom-fashion-mnist-32` prior (8x8 codes given 4x4), batch 128.

Variants: ``before`` is the package as it was at a baseline commit (extracted with
``git archive`` into a temporary folder); ``after`` is the working tree, float32; ``after+nhwc``
adds channels-last and ``after+bf16`` bfloat16 autocast. Every measurement runs in its own
subprocess, rounds interleave the variants, and the median round is reported, so a busy
machine slows all variants alike. Prints a Markdown table and one JSON object.

    .venv/bin/python bench/bench_train_step.py [--baseline fb61d58] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("stage1-64", "stage1-256", "prior-top", "prior-bottom")
VARIANTS = ("before", "after", "after+nhwc", "after+bf16")


def build_step(case: str, variant: str):
    """(step function, items per step) for one case with whichever vqvae2 is importable."""
    import dataclasses

    import torch

    try:
        from vqvae2 import loop as training
    except ImportError:  # a baseline from before the training machinery had its own module
        from vqvae2 import train as training
    from vqvae2.config import PriorRunConfig, VQVAERunConfig, load_config

    torch.manual_seed(0)
    if case.startswith("stage1"):
        from vqvae2.vqvae import VQVAE2

        size = int(case.split("-")[1])
        config = load_config(VQVAERunConfig, "imagenet-256", [f"model.image_size={size}"])
        model = VQVAE2(config.model)
        batch = 16 if size == 64 else 4
        inputs = (torch.rand(batch, 3, size, size) * 2 - 1,)
    else:
        from vqvae2.pixelsnail import PixelSNAIL

        level = case.split("-")[1]
        config = load_config(PriorRunConfig, f"prior-{level}-fashion-mnist-32")
        side, upper = (4, ()) if level == "top" else (8, (4,))
        prior_config = dataclasses.replace(
            config.prior,
            code_size=side,
            codebook_size=512,
            condition_sizes=upper,
            num_classes=10 if config.class_conditional else 0,
        )
        model = PixelSNAIL(prior_config)
        batch = 128
        codes = torch.randint(0, 512, (batch, side, side))
        labels = torch.randint(0, 10, (batch,)) if prior_config.num_classes else None
        condition = [torch.randint(0, 512, (batch, s, s)) for s in upper] or None
        inputs = (codes, labels, condition)
    model.train()
    forward, autocast = model, nullcontext
    if variant != "before":
        from vqvae2.config import RuntimeConfig
        from vqvae2.distributed import DistributedContext

        runtime = RuntimeConfig(
            channels_last=variant == "after+nhwc",
            precision="bf16" if "bf16" in variant else "float32",
        )
        step_module = training.prepare_step_module(model, DistributedContext(), runtime)
        forward, autocast = step_module.forward, step_module.autocast
        inputs = tuple(
            step_module.to_device(x) if isinstance(x, torch.Tensor) else x for x in inputs
        )
    try:
        from vqvae2.optimizer import make_optimizer
    except ImportError:  # a baseline from before the optimiser had its own module
        make_optimizer = getattr(training, "make_optimizer", None) or training._adam
    optimizer = make_optimizer(model, config.train)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = forward(*inputs).loss
        loss.backward()
        optimizer.step()

    return step, batch


def worker(case: str, variant: str, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    step, batch = build_step(case, variant)
    for _ in range(2):  # warm-up: codebook initialisation, allocator, kernels
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    print(json.dumps({"items_per_second": batch * steps / seconds}))


def extract_baseline(commit: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "src/vqvae2"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def run_worker(case: str, variant: str, source: Path, steps: int, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--worker", case, variant, str(steps), str(threads)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"{case} {variant} failed:\n{finished.stderr[-2000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])["items_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="fb61d58", help="commit before the speed work")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--worker", nargs=4, metavar=("CASE", "VARIANT", "STEPS", "THREADS"))
    args = parser.parse_args()
    if args.worker:
        case, variant, steps, threads = args.worker
        worker(case, variant, int(steps), int(threads))
        return

    with tempfile.TemporaryDirectory() as tmp:
        sources = {"before": extract_baseline(args.baseline, Path(tmp))}
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for case in args.cases:
                for variant in VARIANTS:
                    source = sources.get(variant, REPO / "src")
                    speed = run_worker(case, variant, source, args.steps, args.threads)
                    results.setdefault((case, variant), []).append(speed)
    medians = {key: statistics.median(values) for key, values in results.items()}
    print("| case | " + " | ".join(VARIANTS) + " | after / before |")
    print("|---" * (len(VARIANTS) + 2) + "|")
    for case in args.cases:
        cells = [f"{medians[(case, v)]:.1f}" for v in VARIANTS]
        ratio = medians[(case, "after")] / medians[(case, "before")]
        print(f"| {case} | " + " | ".join(cells) + f" | **{ratio:.2f}x** |")
    print(
        json.dumps(
            {
                "baseline": args.baseline,
                "threads": args.threads,
                "rounds": args.rounds,
                "steps": args.steps,
                "items_per_second": {f"{c} {v}": r for (c, v), r in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
