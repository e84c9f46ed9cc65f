"""Training logs: the CSV every trainer writes and the optional TensorBoard events."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vqvae2.codes import CodeDataset
from vqvae2.config import (
    ClassifierRunConfig,
    PriorRunConfig,
    RuntimeConfig,
    VQVAERunConfig,
    load_config,
)
from vqvae2.data import float_to_uint8
from vqvae2.logs import read_metrics
from vqvae2.report import make_grid
from vqvae2.run import Run, load_vqvae
from vqvae2.train import extract_codes, train_classifier, train_prior, train_vqvae

from .conftest import write_npz

TENSORBOARD = RuntimeConfig(tensorboard=True)


def events(folder) -> EventAccumulator:
    """TensorBoard's own reader over a run's event files."""
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_events_hold_the_csv_figures_and_the_grids(tmp_path):
    data = write_npz(tmp_path / "blobs.npz")
    run = tmp_path / "run"
    config = load_config(
        VQVAERunConfig,
        "tiny",
        ["model.image_size=16", "train.max_steps=4", "train.log_every=1", "train.val_every=2"],
    )
    train_vqvae(config, data, run, progress=False, runtime=TENSORBOARD)
    stage1 = events(run / "tensorboard")
    csv_rows = [row for row in read_metrics(run / "metrics.csv") if row["split"] == "train"]
    for name in ("loss", "mse", "perplexity_top", "batch_usage_bottom", "lr", "items_per_second"):
        scalars = stage1.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [1, 2, 3, 4], name
        logged = [float(r["value"]) for r in csv_rows if r["metric"] == name]
        assert [s.value for s in scalars] == pytest.approx(logged, rel=1e-6), name
    assert {"val/mse", "val/usage_top", "val/perplexity_bottom"} <= set(stage1.Tags()["scalars"])
    (grids,) = stage1.Tags()["images"]
    assert grids.startswith("reconstructions")
    # Two validations (step 2 and the final one at step 4): the 5 validation images in 16-pixel
    # tiles with 2-pixel padding, 3 rows (originals, all levels, the top level alone).
    pictures = stage1.Images(grids)
    assert [p.step for p in pictures] == [2, 4]
    assert (pictures[0].width, pictures[0].height) == (5 * 18 + 2, 3 * 18 + 2)

    extract_codes(Run.open(run), data, progress=False)
    prior_config = load_config(
        PriorRunConfig,
        "prior-bottom-tiny",
        ["train.max_steps=2", "train.val_every=1", "train.log_every=1"],
    )
    train_prior(Run.open(run), "bottom", prior_config, progress=False, runtime=TENSORBOARD)
    bottom = events(run / "prior-bottom" / "tensorboard")
    assert "train/batch_nll_nats" in bottom.Tags()["scalars"]
    assert "final/val_nll_nats" in bottom.Tags()["scalars"]
    (samples,) = bottom.Tags()["images"]
    picture = bottom.Images(samples)[0]  # the 5 validation maps: real row, resampled bottom
    assert picture.step == 1 and (picture.width, picture.height) == (5 * 18 + 2, 2 * 18 + 2)
    # Its top row decodes the validation codes as they are.
    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(picture.encoded_image_string))))
    codes, _ = CodeDataset(run / "codes" / "val").__getitems__(list(range(5)))
    with torch.no_grad():
        real = make_grid(float_to_uint8(load_vqvae(run).decode_codes(codes)), columns=5)
    assert torch.equal(pixels[: real.shape[1], :, 0], real[0])

    classifier_config = load_config(
        ClassifierRunConfig, "classifier-tiny", ["model.image_size=16", "train.max_steps=2"]
    )
    train_classifier(
        classifier_config, data, tmp_path / "classifier", progress=False, runtime=TENSORBOARD
    )
    classifier = events(tmp_path / "classifier" / "tensorboard")
    assert {"final/test_accuracy", "final/val_accuracy"} <= set(classifier.Tags()["scalars"])


def test_without_tensorboard_no_events_are_written(tmp_path):
    data = write_npz(tmp_path / "blobs.npz")
    config = load_config(VQVAERunConfig, "tiny", ["model.image_size=16", "train.max_steps=2"])
    train_vqvae(config, data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "metrics.csv").is_file()
