"""Shared fixtures: seeded RNGs, deterministic float32 maths, tiny configs and tiny datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vqvae2.config import VQVAEConfig

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# Tiny test models run fastest on one thread, and a busy machine does not slow them further.
torch.set_num_threads(1)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def tiny_config(**changes) -> VQVAEConfig:
    """A 16x16 grey 2-level model with odd sizes (K = 13, D = 6) to catch transposed dims."""
    values = dict(
        image_size=16,
        in_channels=1,
        num_levels=2,
        hidden_channels=8,
        residual_channels=4,
        num_res_blocks=1,
        codebook_size=13,
        embedding_dim=6,
        dead_code_after_steps=0,
    )
    values.update(changes)
    return VQVAEConfig(**values)


def write_npz(path: Path, count: int = 96, size: int = 16, classes: int = 3) -> Path:
    """Blobs of three kinds (classes) as uint8 grey images in an .npz file."""
    rng = np.random.default_rng(0)
    labels = np.arange(count) % classes
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((count, size, size), np.uint8)
    for i, label in enumerate(labels):
        cy, cx = rng.integers(4, size - 4, 2)
        radius = 2 + label
        images[i] = np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2, 230, 20)
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture
def npz_data(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "blobs.npz")


def torchrun(processes: int, *args: object, timeout: float = 180) -> str:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N ARGS`` on the CPU (one
    thread per process); fails the test with the processes' output unless all exit 0.

    Returns:
        Their standard output.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished.stdout
