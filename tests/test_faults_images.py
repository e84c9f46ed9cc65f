"""Image files a user meets in a folder: every Pillow mode, EXIF rotations, progressive JPEGs,
16-bit PNGs, and files that cannot be read; each is loaded to the pixel values stated here or
skipped, counted and warned about once (docs/faults.md)."""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from vqvae2.cli import main
from vqvae2.config import DataConfig
from vqvae2.data import ImageFolderDataset, load_image_files, open_dataset

from .conftest import one_line_error

ALL_TRAIN = DataConfig(val_fraction=0.0, test_fraction=0.0)
SIDE = 8  # the images below are 8x8 and loaded at 8x8: no resizing blurs the values
ZEROS = np.zeros((SIDE, SIDE), np.uint8)
Maker = Callable[[Path], Path]  # writes an image file at (a suffix of) the path given


def load(path: Path, channels: int) -> np.ndarray:
    """The image file as the loaders give it: uint8 (channels, SIDE, SIDE)."""
    return load_image_files([path], SIDE, channels)[0].numpy()


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): ``rows`` are the filtered
    scanlines (each starts with filter byte 0)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def uniform(mode: str, value, suffix: str = ".png", **save) -> Maker:
    """A maker of an 8x8 image of one value in ``mode``."""

    def make(path: Path) -> Path:
        path = path.with_suffix(suffix)
        Image.new(mode, (SIDE, SIDE), value).save(path, **save)
        return path

    return make


def array_image(array: np.ndarray, suffix: str) -> Maker:
    def make(path: Path) -> Path:
        path = path.with_suffix(suffix)
        Image.fromarray(array).save(path)
        return path

    return make


def palette(transparent: bool, suffix: str = ".png") -> Maker:
    """A P image: index 0 red, index 1 blue, left half 0, right half 1; with ``transparent``
    index 0 is fully transparent."""

    def make(path: Path) -> Path:
        image = Image.new("P", (SIDE, SIDE), 0)
        image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        image.paste(1, (SIDE // 2, 0, SIDE, SIDE))
        path = path.with_suffix(suffix)
        image.save(path, **({"transparency": 0} if transparent else {}))
        return path

    return make


def rgb16_png(path: Path) -> Path:
    pixel = struct.pack(">HHH", 65535, 32896, 0)
    rows = b"".join(b"\x00" + pixel * SIDE for _ in range(SIDE))
    path = path.with_suffix(".png")
    path.write_bytes(png_bytes(SIDE, SIDE, 16, 2, rows))
    return path


def half_left(value: int, right: int = 0) -> np.ndarray:
    """(SIDE, SIDE) with ``value`` in the left half and ``right`` in the right half."""
    array = np.full((SIDE, SIDE), right, np.uint8)
    array[:, : SIDE // 2] = value
    return array


def columns(values: list, dtype) -> np.ndarray:
    """(SIDE, SIDE): column j holds ``values[j]``."""
    return np.array(values, dtype)[None].repeat(SIDE, 0)


ramp16 = columns([0, 257, 32896, 65535, 1000, 40000, 12345, 65535], np.uint16)
ramp_int = columns([-5, 0, 257, 32896, 65535, 70000, 1000, 1 << 20], np.int32)
ramp_float = columns([0.0, 0.5, 1.0, 1.7, -0.2, 0.25, np.nan, 0.75], np.float32)

# (maker, grey result, RGB result): each result an (SIDE, SIDE) or (3, SIDE, SIDE) array or a
# constant, exactly as the loaders must give it.
EXACT = {
    "1 (bilevel)": (uniform("1", 1), 255, 255),
    "1 black": (uniform("1", 0, ".bmp"), 0, 0),
    "L": (uniform("L", 77), 77, 77),
    # Alpha is composited over black: colour * alpha / 255, 200 * 128 / 255 = 100.4 -> 100.
    "LA": (uniform("LA", (200, 128)), 100, 100),
    # Grey: the luma 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2.
    "RGB": (uniform("RGB", (200, 100, 50)), 124, np.array([200, 100, 50])[:, None, None]),
    "RGBA": (
        uniform("RGBA", (200, 100, 50, 51)),
        25,  # the luma of (40, 20, 10): 0.299 * 40 + 0.587 * 20 + 0.114 * 10 = 24.9
        np.array([40, 20, 10])[:, None, None],
    ),
    # Red and blue halves; their lumas are 76 and 29.
    "P": (palette(False), half_left(76, 29), np.stack([half_left(255), ZEROS, half_left(0, 255)])),
    "P with transparency": (
        palette(True),
        half_left(0, 29),
        np.stack([ZEROS, ZEROS, half_left(0, 255)]),
    ),
    "P with transparency (GIF)": (
        palette(True, ".gif"),
        half_left(0, 29),
        np.stack([ZEROS, ZEROS, half_left(0, 255)]),
    ),
    # 16-bit grey (a 16-bit PNG opens as I;16): [0, 65535] -> [0, 255], v / 257 rounded.
    "I;16 (16-bit grey PNG)": (
        array_image(ramp16, ".png"),
        columns([0, 1, 128, 255, 4, 156, 48, 255], np.uint8),
        None,
    ),
    # 32-bit integer grey: read as 16-bit too, values outside [0, 65535] clipped.
    "I (TIFF)": (
        array_image(ramp_int, ".tif"),
        columns([0, 0, 1, 128, 255, 255, 4, 255], np.uint8),
        None,
    ),
    # Float grey: [0, 1] -> [0, 255] like float .npz arrays; outside clipped; NaN -> 0.
    "F (TIFF)": (
        array_image(ramp_float, ".tiff"),
        columns([0, 128, 255, 255, 0, 64, 0, 191], np.uint8),
        None,
    ),
    # A 16-bit RGB PNG: Pillow keeps the high byte of each channel; grey the luma, 151.9.
    "16-bit RGB PNG": (rgb16_png, 151, np.array([255, 128, 0])[:, None, None]),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_every_pillow_mode_loads_to_the_stated_values(tmp_path, case):
    make, grey, rgb = EXACT[case]
    path = make(tmp_path / "image")
    got_grey, got_rgb = load(path, 1), load(path, 3)
    assert got_grey.shape == (1, SIDE, SIDE) and got_rgb.shape == (3, SIDE, SIDE)
    np.testing.assert_array_equal(got_grey[0], np.broadcast_to(grey, (SIDE, SIDE)))
    if rgb is None:  # grey sources: RGB repeats the grey level
        rgb = np.broadcast_to(got_grey, (3, SIDE, SIDE))
    np.testing.assert_array_equal(got_rgb, np.broadcast_to(rgb, (3, SIDE, SIDE)))


def test_cmyk_jpegs_load_as_their_colours(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)).save(path)  # pure red
    rgb = load(path, 3).astype(int)
    assert np.abs(rgb - np.array([255, 0, 0])[:, None, None]).max() <= 2
    assert abs(int(load(path, 1)[0, 0, 0]) - 76) <= 2  # the luma of red


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpegs_are_turned_upright(tmp_path, orientation):
    """A 16x8 photo stored with its white half on the left and an EXIF orientation tag loads
    as the camera saw it: 6 (rotate 90 clockwise) puts the white half on top, 8 (90
    anticlockwise) at the bottom, 3 (180) on the right."""
    stored = np.zeros((SIDE, 2 * SIDE), np.uint8)
    stored[:, :SIDE] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    white = load(path, 1)[0] > 128  # (SIDE, SIDE), the centre crop of the upright photo
    half = SIDE // 2
    expected = {
        3: np.s_[:, half:],  # 16x8 upright, centre columns 4..11: the right half white
        6: np.s_[:half, :],  # 8x16 upright, centre rows 4..11: the top half white
        8: np.s_[half:, :],
    }[orientation]
    want = np.zeros((SIDE, SIDE), bool)
    want[expected] = True
    np.testing.assert_array_equal(white, want)


def test_progressive_and_large_jpegs_decode_like_baseline_ones(tmp_path):
    """A progressive JPEG (decoded at a reduced scale when large) gives the gradient it holds."""
    xs = np.linspace(0, 255, 64)
    photo = np.stack(np.broadcast_arrays(xs[None, :], xs[:, None], 128 + 0 * xs[None, :]), -1)
    photo = photo.round().astype(np.uint8)  # (64, 64, 3): red left to right, green downwards
    for name, options in (("baseline.jpg", {}), ("progressive.jpg", {"progressive": True})):
        Image.fromarray(photo).save(tmp_path / name, quality=95, **options)
    baseline, progressive = (
        load_image_files([tmp_path / "baseline.jpg", tmp_path / "progressive.jpg"], 16, 3)
        .numpy()
        .astype(int)
    )
    expected = photo[2::4, 2::4].transpose(2, 0, 1).astype(int)  # 64 -> 16: every 4th pixel
    assert np.abs(progressive - expected).max() <= 8
    assert np.abs(progressive - baseline).max() <= 2


# ----------------------------------------------------------------------------------------------
# Files that cannot be read


def valid_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(SIDE, SIDE)).save(buffer, "PNG")
    return buffer.getvalue()


def valid_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(SIDE, SIDE)).save(buffer, "JPEG")
    return buffer.getvalue()


def broken_png_chunk() -> bytes:
    """A PNG whose IDAT length says 0: Pillow opens it and raises SyntaxError on decoding."""
    data = bytearray(valid_png())
    assert data[37:41] == b"IDAT"  # signature (8 bytes), IHDR (25), then IDAT's length
    data[36] = 0  # the low byte of the IDAT chunk's length
    return bytes(data)


UNREADABLE = {
    "empty.png": b"",
    "notes.png": b"these are my notes, not an image\n",
    "notes.jpg": b"also not a jpeg",
    "truncated.png": valid_png()[:50],
    "truncated.jpg": valid_jpeg()[: len(valid_jpeg()) // 2],
    "broken-chunk.png": broken_png_chunk(),
    # A PNG header claiming 100000 x 100000 pixels: over twice Pillow's MAX_IMAGE_PIXELS.
    "bomb.png": png_bytes(100_000, 100_000, 8, 0, b""),
}


def write_folder(root: Path, good: int = 3) -> list[Path]:
    """``good`` readable images and every unreadable file above in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(good):
        Image.new("L", (SIDE, SIDE), 10 * index).save(root / f"good-{index}.png")
    bad = []
    for name, data in UNREADABLE.items():
        (root / name).write_bytes(data)
        bad.append(root / name)
    return bad


def test_unreadable_files_are_skipped_counted_and_warned_about_once(tmp_path, caplog):
    with pytest.raises(SyntaxError), Image.open(io.BytesIO(broken_png_chunk())) as image:
        image.load()  # what the loader must catch besides OSError
    bad = write_folder(tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="vqvae2.data"):
        dataset = open_dataset(tmp_path / "images", "train", SIDE, 1, ALL_TRAIN)
        assert len(dataset) == 3 + len(bad)
        for _ in range(2):  # every position twice: each unreadable file met twice
            images, _ = dataset.__getitems__(list(range(len(dataset))))
    assert dataset.skipped == set(bad)
    assert sorted({int(v) for v in images[:, 0, 0, 0]}) == [0, 10, 20]  # only the good ones
    warned = [
        r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()
    ]
    assert len(warned) == len(bad)
    assert all(sum(f"image {path} (" in message for message in warned) == 1 for path in bad)


def test_a_file_truncated_anywhere_loads_or_is_skipped(tmp_path):
    """Every prefix of a PNG and a JPEG (20 cuts each): loaded or skipped, never an error."""
    root = tmp_path / "cuts"
    root.mkdir()
    Image.new("L", (SIDE, SIDE), 99).save(root / "whole.png")
    for name, data in (("cut.png", valid_png()), ("cut.jpg", valid_jpeg())):
        for cut in np.linspace(0, len(data) - 1, 20).astype(int):
            (root / f"{cut:04d}-{name}").write_bytes(data[:cut])
    dataset = open_dataset(root, "train", SIDE, 1, ALL_TRAIN)
    images, _ = dataset.__getitems__(list(range(len(dataset))))
    assert images.shape == (41, 1, SIDE, SIDE)
    assert 0 < len(dataset.skipped) <= 40


def test_decompression_bombs(tmp_path, monkeypatch):
    """Over twice Pillow's MAX_IMAGE_PIXELS (Pillow's error): skipped. Between once and twice
    (Pillow's warning; a 100-megapixel phone photo): loaded, without a warning per file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # band: 1,001 to 2,000 pixels
    root = tmp_path / "big"
    root.mkdir()
    Image.new("L", (40, 40), 200).save(root / "large.png")  # 1,600 pixels: loaded
    Image.new("L", (50, 50), 100).save(root / "bomb.png")  # 2,500 pixels: skipped
    Image.new("L", (30, 30), 50).save(root / "small.png")
    dataset = open_dataset(root, "train", SIDE, 1, ALL_TRAIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, _ = dataset.__getitems__(list(range(3)))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert dataset.skipped == {root / "bomb.png"}
    assert sorted(int(v) for v in images[:, 0, 0, 0]) == [50, 200, 200]


def test_symlink_loops_special_files_and_unreadable_files(tmp_path, monkeypatch):
    """A folder symlinked into itself is not followed (the listing ends), a symlink to itself,
    a dangling symlink, a directory and a FIFO named like images are not listed, and a file
    without read permission is skipped. As root, where chmod 000 does not stop a read, the
    refused read is simulated by making Pillow's open raise PermissionError for it."""
    root = tmp_path / "odd"
    (root / "class-a").mkdir(parents=True)
    Image.new("L", (SIDE, SIDE), 40).save(root / "class-a" / "good.png")
    Image.new("L", (SIDE, SIDE), 80).save(root / "class-a" / "locked.png")
    (root / "class-a" / "loop").symlink_to("..")
    (root / "class-a" / "self.png").symlink_to("self.png")
    (root / "class-a" / "dangling.png").symlink_to("missing.png")
    (root / "class-a" / "folder.png").mkdir()
    os.mkfifo(root / "class-a" / "pipe.png")
    locked = root / "class-a" / "locked.png"
    locked.chmod(0)
    if os.geteuid() == 0:
        real_open = Image.open

        def refusing_open(path, *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(Image, "open", refusing_open)
    dataset = open_dataset(root, "train", SIDE, 1, ALL_TRAIN)
    assert sorted(p.name for p in dataset.files) == ["good.png", "locked.png"]
    images, _ = dataset.__getitems__([0, 1])
    assert dataset.skipped == {locked}
    assert [int(v) for v in images[:, 0, 0, 0]] == [40, 40]


def test_a_folder_with_nothing_usable_fails_with_one_line_before_training(tmp_path, capsys):
    bad = write_folder(tmp_path / "images", good=0)
    run = tmp_path / "run"
    command = ["train-vqvae", "--config", "tiny", "--data", str(tmp_path / "images")]
    line = one_line_error(capsys, main([*command, "--out", str(run), "--quiet"]))
    training = len(bad) - 1  # one of the seven files is carved out as the test split
    assert line.startswith(f"none of the {training} image files can be read: each was skipped")
    assert not (run / "metrics.csv").exists() and not (run / "config.yaml").exists()
    with pytest.raises(ValueError, match="none of the 1 image files"):
        ImageFolderDataset([bad[0]], [0], ["0"], SIDE, 1).load_uint8(0)
