"""End-to-end checks on the real Fashion-MNIST files (marker `realdata`; `.ci/run` installs them)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vqvae2.cli import main
from vqvae2.config import VQVAERunConfig, load_config
from vqvae2.data import open_dataset

from .conftest import FASHION_MNIST

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realdata,
    pytest.mark.skipif(
        not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() and not os.environ.get("CI"),
        reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
    ),
]


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


def test_short_real_pipeline_through_sampling(tmp_path, capsys):
    """Stage 1, codes, both priors and class-conditional samples on real data, briefly."""
    run, data = str(tmp_path / "run"), str(FASHION_MNIST)
    small = ["model.hidden_channels=32", "model.residual_channels=16"]
    assert (
        main(["train-vqvae", "--data", data, "--out", run, "--max-steps", "200", "--quiet", *small])
        == 0
    )
    assert main(["extract-codes", run, "--data", data, "--quiet"]) == 0
    nll = {}
    for level in ("top", "bottom"):
        capsys.readouterr()
        args = ["train-prior", run, "--level", level, "--max-steps", "100", "--quiet", "--json"]
        assert main([*args, "prior.hidden_channels=32", "prior.residual_channels=32"]) == 0
        nll[level] = json.loads(capsys.readouterr().out)
    uniform = float(torch.log(torch.tensor(512.0)))  # 6.24 nats per code
    for level, report in nll.items():
        assert report["val_nll_nats"] < uniform - 1.0, (level, report)
    grid = tmp_path / "samples.png"
    assert (
        main(["sample", run, "--n", "20", "--class", "0", "9", "--out", str(grid), "--quiet"]) == 0
    )
    from PIL import Image

    assert Image.open(grid).size == (10 * 34 + 2, 2 * 34 + 2)  # 2 rows (classes) of 10
