"""Faults around a training run: a run started again after a kill before its first checkpoint,
non-finite losses, two trainers on one run folder (docs/faults.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

from vqvae2.cli import main
from vqvae2.logs import read_metrics

TINY = ["--config", "tiny", "model.image_size=16", "--quiet", "train.val_every=1000"]


def train_vqvae_cli(data: Path, run: Path, steps: int, *extra: str) -> int:
    """``vqvae2 train-vqvae`` in this process, logging every step, a checkpoint every 2."""
    return main(
        ["train-vqvae", *TINY, "--data", str(data), "--out", str(run), "--max-steps", str(steps)]
        + ["train.log_every=1", "train.checkpoint_every=2", *extra]
    )


def logged_steps(path: Path, metric: str = "loss") -> list[int]:
    """The steps of the training rows of ``metric`` in a metrics.csv, in file order."""
    return [
        int(row["step"])
        for row in read_metrics(path)
        if row["split"] == "train" and row["metric"] == metric
    ]


def test_a_run_started_again_after_a_kill_before_its_first_checkpoint_logs_only_itself(
    tmp_path, npz_data
):
    """A process killed before its first checkpoint leaves config.yaml and log rows but nothing
    to resume; the same command starts the run again with a log of its own steps only (a kill
    -9 trial found steps 1, 2 logged twice)."""
    run = tmp_path / "run"
    assert train_vqvae_cli(npz_data, run, 3) == 0
    shutil.rmtree(run / "vqvae")  # as if killed before its first checkpoint
    assert logged_steps(run / "metrics.csv") == [1, 2, 3]
    assert train_vqvae_cli(npz_data, run, 3) == 0
    assert logged_steps(run / "metrics.csv") == [1, 2, 3]
