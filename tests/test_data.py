"""Image sources: IDX, image folders, .npz; splits; padding/resizing; bad input."""

from __future__ import annotations

import gzip
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae2.config import DataConfig
from vqvae2.data import float_to_uint8, open_dataset, split_indices
from vqvae2.report import make_grid


def write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_pads_scales_and_splits(tmp_path, gz):
    suffix = ".gz" if gz else ""
    train = np.full((40, 28, 28), 255, np.uint8)
    train[:, 0, 0] = 0
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(40) % 10, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", train[:7], gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(7) % 10, gz)
    config = DataConfig(val_fraction=0.25)
    train_set = open_dataset(tmp_path, "train", 32, 1, config)
    val_set = open_dataset(tmp_path, "val", 32, 1, config)
    test_set = open_dataset(tmp_path, "test", 32, 1, config)
    assert (len(train_set), len(val_set), len(test_set)) == (30, 10, 7)
    image, label = train_set[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    # 28 -> 32 pads two black pixels on each side; white maps to 1, black to -1.
    assert float(image[0, 0, 0]) == -1.0 and float(image[0, 2, 3]) == 1.0
    assert float(image[0, 2, 2]) == -1.0  # the black pixel at (0, 0) of the original
    assert train_set.num_classes == 10
    images, labels = train_set.__getitems__([0, 1, 2])
    assert images.shape == (3, 1, 32, 32) and labels.shape == (3,)


def test_corrupt_idx_is_a_clear_error(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28)
    )
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + bytes(5)
    )
    with pytest.raises(ValueError, match="holds 0 bytes of data"):
        open_dataset(tmp_path, "train", 32, 1)


def test_splits_are_deterministic_and_disjoint():
    config = DataConfig(val_fraction=0.1, test_fraction=0.2, split_seed=3)
    parts = {s: split_indices(100, s, config, carve_test=True) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert len(set(np.concatenate(list(parts.values())))) == 100
    assert np.array_equal(parts["val"], split_indices(100, "val", config, carve_test=True))


def test_image_folder_with_classes_resizes_and_skips_corrupt_files(tmp_path, caplog):
    for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(6):
            Image.new("RGB", (40, 20), colour).save(folder / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    config = DataConfig(val_fraction=0.0, test_fraction=0.0)
    dataset = open_dataset(tmp_path, "train", 16, 3, config)
    assert len(dataset) == 13 and dataset.class_names == ["cat", "dog"]
    with caplog.at_level(logging.WARNING, logger="vqvae2.data"):
        images, labels = dataset.__getitems__(list(range(13)))
    assert images.shape == (13, 3, 16, 16)
    assert "broken.jpg" in caplog.text
    red = images[labels == 0]
    assert torch.allclose(red[:, 0], torch.ones(1)) and torch.allclose(red[:, 2], -torch.ones(1))
    assert set(labels.tolist()) == {0, 1}


def test_grey_folder_images_become_rgb_and_back(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "b.webp", lossless=True)
    config = DataConfig(val_fraction=0.0, test_fraction=0.0)
    rgb = open_dataset(tmp_path, "train", 8, 3, config)
    grey = open_dataset(tmp_path, "train", 8, 1, config)

    def pixels(dataset, index: int) -> list[int]:  # the channel values, the same everywhere
        image = float_to_uint8(dataset[index][0])
        assert image.shape[1:] == (8, 8)
        assert torch.equal(image, image[:, :1, :1].expand_as(image))
        return image[:, 0, 0].tolist()

    # Grey to RGB repeats the grey level; RGB to grey is the ITU-R 601-2 luma
    # 0.299 R + 0.587 G + 0.114 B = 124.2 -> 124.
    assert pixels(rgb, 0) == [128, 128, 128] and pixels(grey, 0) == [128]
    assert pixels(rgb, 1) == [200, 100, 50] and pixels(grey, 1) == [124]


def test_npz_with_and_without_splits(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (50, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "flat.npz", images=images, labels=np.arange(50) % 5)
    config = DataConfig(val_fraction=0.2, test_fraction=0.2)
    sizes = [
        len(open_dataset(tmp_path / "flat.npz", s, 16, 1, config)) for s in ("train", "val", "test")
    ]
    assert sizes == [30, 10, 10]
    np.savez(tmp_path / "split.npz", train_images=images, test_images=images[:5])
    assert len(open_dataset(tmp_path / "split.npz", "test", 16, 1, config)) == 5
    assert len(open_dataset(tmp_path / "split.npz", "train", 16, 1, config)) == 40
    assert len(open_dataset(tmp_path / "split.npz", "val", 16, 1, config)) == 10
    image, _ = open_dataset(tmp_path / "flat.npz", "train", 16, 1, config)[0]
    assert image.shape == (1, 16, 16)


def _missing(root):
    return root / "missing"


def _empty_folder(root):
    (root / "empty").mkdir()
    return root / "empty"


def _text_file(root):
    (root / "x.txt").write_text("hi")
    return root / "x.txt"


def _garbage_npz(root):
    (root / "bad.npz").write_bytes(b"garbage")
    return root / "bad.npz"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_missing, "does not exist"),
        (_empty_folder, "no images"),
        (_text_file, "not .npz"),
        (_garbage_npz, "cannot read"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        open_dataset(make(tmp_path), "train", 16, 1)


def test_make_grid_places_tiles():
    images = torch.stack([torch.full((1, 2, 2), v, dtype=torch.uint8) for v in (10, 20, 30)])
    grid = make_grid(images, columns=2, padding=1)
    assert grid.shape == (1, 7, 7)
    assert int(grid[0, 1, 1]) == 10 and int(grid[0, 1, 4]) == 20 and int(grid[0, 4, 1]) == 30
    assert int(grid[0, 4, 4]) == 0
