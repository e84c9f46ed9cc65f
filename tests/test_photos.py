"""A folder of small colour photos with class sub-folders through the whole CLI pipeline, at two
and at three levels: train-vqvae, extract-codes, every prior, train-classifier, sample,
evaluate and reconstruct with per-level rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae2.cli import main
from vqvae2.codes import CodeDataset
from vqvae2.config import VQVAERunConfig
from vqvae2.data import open_dataset, uint8_to_float
from vqvae2.run import load_run_config, load_vqvae

CLASSES = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 200)}


def write_photo_folder(root, size: int, per_class: int = 24) -> None:
    """Colour discs on noisy backgrounds, of three colours (classes), as PNG and JPEG files of
    several sizes in train/<class>/ and test/<class>/ (split folders)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 4)):
        for name, colour in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                side = size + int(rng.integers(0, size))  # any size, resized by the loader
                pixels = rng.integers(0, 60, (side, side + 3, 3)).astype(np.uint8)
                yy, xx = np.mgrid[0:side, 0 : side + 3]
                cy, cx = rng.integers(side // 4, 3 * side // 4, 2)
                pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (side // 4) ** 2] = colour
                suffix = ".jpg" if i % 3 == 0 else ".png"
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")


def json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(("levels", "size"), [(2, 16), (3, 32)])
def test_colour_photos_through_the_whole_pipeline(tmp_path, capsys, levels, size):
    data = tmp_path / "photos"
    write_photo_folder(data, size)
    run = tmp_path / "run"
    names = ("top", "bottom") if levels == 2 else ("top", "middle", "bottom")
    stage1 = ["--config", "tiny", f"model.image_size={size}", "model.in_channels=3"]
    stage1 += [f"model.num_levels={levels}", "data.random_flip=true", "data.random_crop=true"]
    commands = [
        ["train-vqvae", *stage1, "--data", str(data), "--out", str(run), "--max-steps", "4"],
        ["extract-codes", str(run), "--data", str(data)],
        *[["train-prior", str(run), "--level", name, "--max-steps", "3"] for name in names],
        ["train-classifier", "--run", str(run), "--data", str(data), "--max-steps", "3"],
    ]
    for command in commands:
        assert main([*command, "--quiet"]) == 0, command
    capsys.readouterr()

    # Codes of each level, extracted from the resized photos, decode to the forward pass.
    vqvae = load_vqvae(run)
    config = load_run_config(run, "vqvae", VQVAERunConfig)
    train = open_dataset(data, "train", size, 3, config.data)
    assert train.class_names == ["blue", "green", "red"] and len(train) == 68  # 72 - 4 for val
    store = CodeDataset(run / "codes" / "train")
    assert store.level_names == list(names) and store.num_classes == 3
    codes, labels = store.__getitems__([0, 5, 9])
    images, image_labels = train.__getitems__([0, 5, 9])
    with torch.no_grad():
        forward = vqvae(uint8_to_float(images)).reconstruction
        torch.testing.assert_close(vqvae.decode_codes(codes), forward, rtol=0, atol=1e-5)
    assert torch.equal(labels, image_labels)
    sides = [size // 4 // 2 ** (levels - 1 - i) for i in range(levels)]
    assert [tuple(c.shape[1:]) for c in codes] == [(s, s) for s in sides]

    # Class-conditional colour samples: one row per class in an RGB grid.
    grid = tmp_path / "samples.png"
    args = ["sample", str(run), "--n", "6", "--class", "0", "1", "2", "--out", str(grid)]
    assert main([*args, "--quiet", "--json"]) == 0
    summary = json_line(capsys)
    picture = Image.open(grid)
    assert picture.mode == "RGB" and picture.size == (2 * (size + 2) + 2, 3 * (size + 2) + 2)
    assert summary["samples"] == 6

    # The paper's Fig. 3 rows: originals, all levels, then the top level alone, the top two ...
    rows = tmp_path / "levels.png"
    assert main(["reconstruct", str(run), "--data", str(data), "--out", str(rows), "--json"]) == 0
    measured = json_line(capsys)
    picture = Image.open(rows)
    shown = min(16, measured["images"])
    assert measured["images"] == 18  # the test/ folder: 6 photos per class
    assert picture.mode == "RGB"
    assert picture.size == (shown * (size + 2) + 2, (levels + 1) * (size + 2) + 2)

    # Table 1: one NLL row per level.
    report_dir = tmp_path / "report"
    evaluate = ["evaluate", str(run), "--data", str(data), "--out", str(report_dir)]
    evaluate += ["--n-samples", "12", "--cas-samples", "16", "--cas-steps", "2"]
    evaluate += ["--reject-fractions", "0,0.5", "--quiet", "--json"]
    assert main(evaluate) == 0
    report = json_line(capsys)
    assert list(report["table1"]["priors"]) == list(names)
    for row in report["table1"]["priors"].values():
        assert row["val_nll_bits"] == pytest.approx(row["val_nll_nats"] / np.log(2))
    assert Image.open(report_dir / "samples-reject-0.00.png").mode == "RGB"
