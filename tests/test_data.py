"""Image sources: IDX, image folders, .npz; splits; padding/resizing; bad input."""

from __future__ import annotations

import gzip
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from vqvae2.config import DataConfig
from vqvae2.data import open_dataset, split_indices
from vqvae2.images import pil_to_uint8
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
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8  # uint8 until the model
    assert label.dtype == torch.int64
    # 28 -> 32 pads two black pixels on each side.
    assert int(image[0, 0, 0]) == 0 and int(image[0, 2, 3]) == 255
    assert int(image[0, 2, 2]) == 0  # the black pixel at (0, 0) of the original
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
    assert bool((red[:, 0] == 255).all()) and bool((red[:, 2] == 0).all())
    assert set(labels.tolist()) == {0, 1}


def test_grey_folder_images_become_rgb_and_back(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "b.webp", lossless=True)
    config = DataConfig(val_fraction=0.0, test_fraction=0.0)
    rgb = open_dataset(tmp_path, "train", 8, 3, config)
    grey = open_dataset(tmp_path, "train", 8, 1, config)

    def pixels(dataset, index: int) -> list[int]:  # the channel values, the same everywhere
        image = dataset[index][0]
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


# ----------------------------------------------------------------------------------------------
# Folders of photos: split folders, sizes, random flips and crops


def gradient_photo(path, width: int, height: int) -> np.ndarray:
    """An RGB photo whose red channel rises left to right and green top to bottom."""
    xs = np.linspace(0, 255, width).round().astype(np.uint8)
    ys = np.linspace(0, 255, height).round().astype(np.uint8)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :, 0], pixels[:, :, 1] = xs[None, :], ys[:, None]
    Image.fromarray(pixels).save(path)
    return pixels


def test_split_folders_give_each_split_its_own_images_and_the_training_classes(tmp_path):
    for split, count in (("train", 6), ("test", 2)):
        for name in ("coffee", "astronaut"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                gradient_photo(folder / f"{i}.png", 30 + i, 20)
    config = DataConfig(val_fraction=1 / 3)
    train = open_dataset(tmp_path, "train", 8, 3, config)
    val = open_dataset(tmp_path, "val", 8, 3, config)
    test = open_dataset(tmp_path, "test", 8, 3, config)
    # Validation is carved from train/ (4 of 12); test is test/ itself, not carved.
    assert (len(train), len(val), len(test)) == (8, 4, 4)
    assert set(train.files).isdisjoint(val.files)
    assert all(path.parts[-3] == "test" for path in test.files)
    assert train.class_names == test.class_names == ["astronaut", "coffee"]
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1]
    (tmp_path / "test" / "rocket").mkdir()
    gradient_photo(tmp_path / "test" / "rocket" / "0.png", 20, 20)
    with pytest.raises(ValueError, match="class folder 'rocket' in .* is not one of"):
        open_dataset(tmp_path, "test", 8, 3, config)


def test_photos_are_resized_by_the_short_side_and_centre_cropped(tmp_path):
    pixels = gradient_photo(tmp_path / "wide.png", 64, 32)  # 2:1
    config = DataConfig(val_fraction=0.0, test_fraction=0.0)
    image = open_dataset(tmp_path, "train", 16, 3, config)[0][0]  # (3, 16, 16) uint8
    # 64x32 -> 32x16, centre crop: columns 8..23 of the halved photo, all rows.
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    halved_red = pixels[0, ::2, 0].astype(float)  # red at every other column, 0..254
    assert np.abs(image[0, 8, :].numpy() - halved_red[8:24]).max() <= 6
    assert int(image[1, 0, 8]) < 20 and int(image[1, 15, 8]) > 235  # green: the whole height
    small = tmp_path / "small"
    small.mkdir()
    gradient_photo(small / "tiny.png", 4, 4)
    assert open_dataset(small, "train", 16, 3, config)[0][0].shape == (3, 16, 16)  # upscaled


@pytest.mark.parametrize("crop", [False, True])
def test_random_flips_and_crops_are_drawn_per_key_and_only_for_training(tmp_path, crop):
    gradient_photo(tmp_path / "a.png", 40, 40)
    gradient_photo(tmp_path / "b.png", 48, 40)
    flips = DataConfig(val_fraction=0.0, test_fraction=0.0, random_flip=True, random_crop=crop)
    train = open_dataset(tmp_path, "train", 16, 3, flips, seed=3)
    plain = train.load_uint8(0)[0]  # an index without a key: the image as it is
    seen = {tuple(train.load_uint8((0, key))[0].flatten().tolist()) for key in range(24)}
    assert torch.equal(train.load_uint8((0, 5))[0], train.load_uint8((0, 5))[0])
    mirrored = [key for key in range(24) if bool(train.load_uint8((0, key))[0][0, 0, 0] > 128)]
    assert 4 <= len(mirrored) <= 20  # red falls left to right only in mirrored images
    if not crop:  # a flip or nothing: two distinct images, the plain one among them
        assert seen == {tuple(plain.flatten().tolist()), tuple(plain.flip(-1).flatten().tolist())}
    else:  # crops of a larger resize: many distinct images
        assert len(seen) > 6
    other_seed = open_dataset(tmp_path, "train", 16, 3, flips, seed=4)
    assert any(
        not torch.equal(train.load_uint8((0, k))[0], other_seed.load_uint8((0, k))[0])
        for k in range(8)
    )
    with_val = DataConfig(val_fraction=0.5, test_fraction=0.0, random_flip=True)
    assert open_dataset(tmp_path, "val", 16, 3, with_val).transform is None
    assert open_dataset(tmp_path, "train", 16, 3, DataConfig(val_fraction=0.0)).transform is None


def test_arrays_take_the_same_random_flips(tmp_path):
    images = np.zeros((4, 8, 8), np.uint8)
    images[:, :, :4] = 255  # white left half
    np.savez(tmp_path / "halves.npz", images=images)
    config = DataConfig(val_fraction=0.0, test_fraction=0.0, random_flip=True)
    train = open_dataset(tmp_path / "halves.npz", "train", 8, 1, config)
    batch, _ = train.__getitems__([(i % 4, key) for i, key in enumerate(range(16))])
    left_white = batch[:, 0, :, 0] == 255  # (16, 8)
    mirrored = ~left_white.all(1)
    assert 2 <= int(mirrored.sum()) <= 14 and bool((batch[mirrored, 0, :, 7] == 255).all())


def test_large_jpegs_decode_at_reduced_scale_to_nearly_the_same_pixels(tmp_path, monkeypatch):
    gradient_photo(tmp_path / "big.png", 800, 640)
    Image.open(tmp_path / "big.png").save(tmp_path / "big.jpg", quality=95)
    full = Image.open(tmp_path / "big.jpg")
    full.load()  # decoded in full: too late for a draft
    expected = pil_to_uint8(full, 64, 3).int()
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, *args: drafts.append(args) or original(self, *args),
    )
    with Image.open(tmp_path / "big.jpg") as image:
        fast = pil_to_uint8(image, 64, 3).int()
    assert drafts == [("RGB", (80, 64))]  # the size needed; the decoder picks 1/8 = 100x80
    assert int((fast - expected).abs().max()) <= 4


def grey_images(folder, values) -> None:
    """One 8x8 grey PNG per value, named by it, in ``folder`` (created)."""
    folder.mkdir(parents=True)
    for value in values:
        Image.new("L", (8, 8), value).save(folder / f"{value}.png")


def first_pixels(dataset) -> dict[str, list[int]]:
    """class name -> the sorted first pixel of its images."""
    images, labels = dataset.__getitems__(list(range(len(dataset))))
    return {
        name: sorted(images[labels == index, 0, 0, 0].tolist())
        for index, name in enumerate(dataset.class_names)
    }


ALL_TRAIN = DataConfig(val_fraction=0.0, test_fraction=0.0)


def test_symlinked_class_folders_and_image_files_are_followed(tmp_path):
    """A dataset kept elsewhere and linked in: class folders and single files."""
    grey_images(tmp_path / "store" / "cat", [10, 11])
    grey_images(tmp_path / "store" / "dog", [20, 21, 22])
    data = tmp_path / "data"
    (data / "bird").mkdir(parents=True)
    (data / "cat").symlink_to(tmp_path / "store" / "cat", target_is_directory=True)
    (data / "dog").symlink_to("../store/dog", target_is_directory=True)  # relative link
    (data / "bird" / "30.png").symlink_to(tmp_path / "store" / "cat" / "10.png")
    dataset = open_dataset(data, "train", 8, 1, ALL_TRAIN)
    assert first_pixels(dataset) == {"bird": [10], "cat": [10, 11], "dog": [20, 21, 22]}
    assert all(path.is_relative_to(data) for path in dataset.files)


def test_symlinked_split_folders_are_followed(tmp_path):
    """train/ and test/ linked to folders elsewhere, their class folders links too."""
    for split, values in (("train", [1, 2, 3]), ("test", [7])):
        for name, offset in (("cat", 10), ("dog", 20)):
            grey_images(tmp_path / "store" / split / name, [offset + v for v in values])
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(tmp_path / "store" / "train", target_is_directory=True)
    (tmp_path / "links").mkdir()  # test/ is a real folder of linked class folders elsewhere
    for name in ("cat", "dog"):
        (tmp_path / "links" / name).symlink_to(tmp_path / "store" / "test" / name)
    (data / "test").symlink_to(tmp_path / "links", target_is_directory=True)
    train = open_dataset(data, "train", 8, 1, ALL_TRAIN)
    test = open_dataset(data, "test", 8, 1, ALL_TRAIN)
    assert first_pixels(train) == {"cat": [11, 12, 13], "dog": [21, 22, 23]}
    assert first_pixels(test) == {"cat": [17], "dog": [27]}


def test_a_link_to_a_folder_that_holds_it_is_skipped_with_a_warning(tmp_path, caplog):
    """Links back up the tree (to the data folder, above it, or above a linked-in folder)
    would list the same images again without end: each is skipped, named in a warning."""
    grey_images(tmp_path / "store" / "dog", [20])
    data = tmp_path / "data"
    grey_images(data / "cat", [10])
    (data / "cat" / "back").symlink_to("..")  # the data folder itself
    (data / "cat" / "up").symlink_to("../..")  # above it: holds store/ and data/
    (data / "dog").symlink_to(tmp_path / "store" / "dog")
    (tmp_path / "store" / "dog" / "store").symlink_to("..")  # above the linked-in folder
    with caplog.at_level(logging.WARNING, logger="vqvae2.data"):
        dataset = open_dataset(data, "train", 8, 1, ALL_TRAIN)
    assert first_pixels(dataset) == {"cat": [10], "dog": [20]}
    skipped = sorted(
        message.split(":")[0] for message in caplog.messages if "a folder that holds it" in message
    )
    assert skipped == [
        f"skipping {data / 'cat' / 'back'}",
        f"skipping {data / 'cat' / 'up'}",
        f"skipping {data / 'dog' / 'store'}",
    ]


def test_a_sub_folder_that_cannot_be_listed_is_skipped_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    """As root ``chmod 000`` does not stop a listing, so the refusal is simulated."""
    grey_images(tmp_path / "cat", [10])
    grey_images(tmp_path / "dog", [20])
    real_scandir = os.scandir

    def refusing_scandir(path):
        if Path(path) == tmp_path / "dog":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with caplog.at_level(logging.WARNING, logger="vqvae2.data"):
        dataset = open_dataset(tmp_path, "train", 8, 1, ALL_TRAIN)
    assert first_pixels(dataset) == {"cat": [10]}
    assert f"skipping folder {tmp_path / 'dog'}: Permission denied" in caplog.messages
