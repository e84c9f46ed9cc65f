"""The whole pipeline on the real Fashion-MNIST files, briefly (marker `realdata`): its own
module so that a parallel test run can place it beside tests/test_realdata.py."""

from __future__ import annotations

import json

import torch

from vqvae2.cli import main

from .conftest import FASHION_MNIST, REAL_DATA

pytestmark = REAL_DATA


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
