"""End-to-end checks on the real Fashion-MNIST files (marker `realdata`; `.ci/run` installs them)."""

from __future__ import annotations

import json

import torch

from vqvae2.cli import main
from vqvae2.config import VQVAERunConfig, load_config
from vqvae2.data import open_dataset

from .conftest import FASHION_MNIST, REAL_DATA

pytestmark = REAL_DATA


def test_fashion_mnist_splits_and_shapes():
    config = load_config(VQVAERunConfig, "fashion-mnist-32")
    splits = {
        s: open_dataset(FASHION_MNIST, s, 32, 1, config.data) for s in ("train", "val", "test")
    }
    assert {s: len(d) for s, d in splits.items()} == {"train": 57000, "val": 3000, "test": 10000}
    images, labels = splits["test"].__getitems__(list(range(500)))
    assert images.shape == (500, 1, 32, 32) and images.dtype == torch.uint8
    assert int(images.min()) == 0 and int(images.max()) == 255
    assert set(labels.tolist()) == set(range(10))
    # The 2-pixel padding is black.
    assert torch.all(images[:, :, :2, :] == 0) and torch.all(images[:, :, :, -2:] == 0)


def test_short_real_training_run_learns(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train-vqvae",
            "--config",
            "fashion-mnist-32",
            "--data",
            str(FASHION_MNIST),
            "--out",
            str(run),
            "--max-steps",
            "600",
            "--quiet",
            "--json",
            "model.hidden_channels=64",
            "model.residual_channels=32",
            "train.val_every=1000",
        ]
    )
    assert code == 0
    trained = json.loads(capsys.readouterr().out)
    code = main(
        [
            "reconstruct",  # --data defaults to the Fashion-MNIST files
            str(run),
            "--split",
            "test",
            "--out",
            str(tmp_path / "test.png"),
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 10000
    # Predicting the mean test image gives an MSE of about 0.066; 600 steps get far below it.
    assert report["mse"] < 0.012, report
    assert abs(report["mse"] - trained["mse"]) < 0.003  # validation and test agree
    assert report["usage_top"] > 0.5 and report["usage_bottom"] > 0.5, report
