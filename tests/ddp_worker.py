"""Run under torchrun by test_distributed.py: one training stage, then every process saves the
weights and buffers it holds, so the test can compare processes with each other and with a
single-process run.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/ddp_worker.py \
        STAGE DATA RUN_DIR STEPS [--resume]

STAGE is ``vqvae`` (train_vqvae on the tiny preset), ``fashion`` (train_vqvae on the
fashion-mnist-32 preset; DATA is then the Fashion-MNIST folder), ``vqvae-budget`` (the same on a linear
schedule that a 12-second ``train.schedule_minutes`` budget ends; STEPS is then only a cap; each
process runs on a fake clock that gains RANK + 1 seconds per optimiser step, so the slowest,
the last rank, decides), ``prior`` (extract_codes, then the top prior) or ``classifier``
(train_classifier on the tiny preset; DATA holds 32x32 images). Each process writes
``RUN_DIR/<stage>-rank<R>-of-<N>.safetensors``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from vqvae2.config import ClassifierRunConfig, PriorRunConfig, VQVAERunConfig, load_config
from vqvae2.distributed import shutdown
from vqvae2.quantize import VectorQuantizerEMA
from vqvae2.run import Run
from vqvae2.train import extract_codes, train_classifier, train_prior, train_vqvae

# Same global batch of 8 whatever the world size; restarts after 2 idle steps so that the
# dead-code path runs; level dropout on, drawn per image from its key, so one process and many
# drop the same levels of the same images and agree to float precision.
VQVAE_OVERRIDES = [
    "model.image_size=16",
    "model.level_dropout=0.5",
    "model.dead_code_after_steps=2",
    "train.batch_size=8",
    "train.val_every=1000",
    "train.checkpoint_every=2",
]
# Stage 1 of the fashion-mnist-32 preset (its model, quantizer and optimiser settings) on a
# global batch of 24, which 1, 2 and 3 processes split evenly. The step size is the preset's
# own over its first dozen steps (at most 2.5e-3 x 12 / 200 within its 200-step warm-up): a
# 12-step run would otherwise squeeze the warm-up into 6 steps up to 2.5e-3, where training
# multiplies float rounding up to tenfold a step (measured: 1 and 2 processes then end 3e-4
# apart with every code choice equal, as do one process on 1 and on 2 threads; 3 processes
# drift until code choices part at step 10).
FASHION_OVERRIDES = [
    "train.batch_size=24",
    "train.val_every=1000",
    "train.val_batches=1",
    "train.checkpoint_every=1000",
    "train.learning_rate=1.5e-4",
]
# The tiny classifier (dropout 0: its masks are each process's own) on a global batch of 16.
CLASSIFIER_OVERRIDES = ["train.batch_size=16", "train.checkpoint_every=1000"]
BUDGET_OVERRIDES = ["train.lr_schedule=linear", "train.schedule_minutes=0.2", "train.log_every=1"]
PRIOR_OVERRIDES = ["train.batch_size=8", "train.val_every=1000", "train.checkpoint_every=2"]


def count_restarts() -> list[int]:
    """Wrap the dead-code restart so that the codes it re-seeds are counted (one list entry)."""
    counter = [0]
    original = VectorQuantizerEMA._restart_dead_codes

    def counting(self, flat_inputs, min_distances):
        counter[0] += int((self.steps_unused >= self.dead_code_after_steps).sum())
        return original(self, flat_inputs, min_distances)

    VectorQuantizerEMA._restart_dead_codes = counting
    return counter


def step_clock(seconds_per_step: float):
    """A fake clock that gains ``seconds_per_step`` at each optimiser step."""
    seconds = [0.0]
    register_optimizer_step_post_hook(
        lambda *_: seconds.__setitem__(0, seconds[0] + seconds_per_step)
    )
    return lambda: seconds[0]


def run(stage: str, data: Path, run_dir: Path, steps: int, resume: bool = False) -> Path:
    """Train one stage in this process (one of a torchrun group, or alone); save its state,
    and for stage 1 the number of dead codes re-seeded, beside it."""
    restarts = [0]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if stage in ("vqvae", "vqvae-budget", "fashion"):
        overrides = [*VQVAE_OVERRIDES, f"train.max_steps={steps}"]
        preset, clock = "tiny", {}
        if stage == "fashion":
            overrides = [*FASHION_OVERRIDES, f"train.max_steps={steps}"]
            preset = "fashion-mnist-32"
        if stage == "vqvae-budget":
            overrides += BUDGET_OVERRIDES
            clock = {"now": step_clock(rank + 1.0)}
        config = load_config(VQVAERunConfig, preset, overrides)
        original = VectorQuantizerEMA._restart_dead_codes
        restarts = count_restarts()
        try:
            result = train_vqvae(config, data, run_dir, resume=resume, progress=False, **clock)
        finally:
            VectorQuantizerEMA._restart_dead_codes = original
    elif stage == "classifier":
        config = load_config(
            ClassifierRunConfig,
            "classifier-tiny",
            [*CLASSIFIER_OVERRIDES, f"train.max_steps={steps}"],
        )
        result = train_classifier(config, data, run_dir, resume=resume, progress=False)
    else:
        if not resume:
            extract_codes(Run.open(run_dir), data, progress=False, augment=["flip"])
        config = load_config(
            PriorRunConfig, "prior-top-tiny", [*PRIOR_OVERRIDES, f"train.max_steps={steps}"]
        )
        result = train_prior(Run.open(run_dir), "top", config, resume=resume, progress=False)
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    path = run_dir / f"{stage}-rank{rank}-of-{world}.safetensors"
    save_file(state, str(path))
    if stage not in ("prior", "classifier"):
        path.with_suffix(".restarts.json").write_text(json.dumps(restarts[0]))
    return path


def main() -> None:
    torch.set_num_threads(1)
    stage, data, run_dir, steps = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    run(stage, data, run_dir, int(steps), resume="--resume" in sys.argv[5:])
    shutdown()


if __name__ == "__main__":
    main()
