"""Image datasets for VQ-VAE-2: MNIST-family IDX files, folders of images and ``.npz`` arrays.

Every dataset yields images as float tensors in [-1, 1] of shape (C, S, S) with an int64 class
label, resized or padded to the configured square side S. Sources without a validation (or test)
split get a deterministic one, carved by a seeded permutation.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .config import DataConfig

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_DATA_PATH = Path("/usr/share/datasets/fashion-mnist")
IDX_PREFIXES = {"train": "train", "test": "t10k"}

logger = logging.getLogger("vqvae2.data")


def uint8_to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], any shape."""
    return images.float() / 127.5 - 1.0


def float_to_uint8(images: Tensor) -> Tensor:
    """float [-1, 1] (clamped) -> uint8 [0, 255], any shape."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Pad an image that fits inside ``size`` x ``size`` (centred, black); else resize its
    shorter side to ``size`` and centre-crop."""
    width, height = image.size
    if width <= size and height <= size:
        canvas = Image.new(image.mode, (size, size))
        canvas.paste(image, ((size - width) // 2, (size - height) // 2))
        return canvas
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_uint8(image: Image.Image, size: int, channels: int) -> Tensor:
    """PIL image -> uint8 tensor (channels, size, size)."""
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(fit_square(image, size), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def fit_uint8_array(images: np.ndarray, size: int, channels: int) -> Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> (N, channels, size, size), padded or resized."""
    if images.ndim == 3:
        images = images[..., None]
    count, height, width, source_channels = images.shape
    if source_channels not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels, got {source_channels}")
    tensor = torch.from_numpy(images[..., :3].copy()).permute(0, 3, 1, 2)  # (N, C, H, W)
    if tensor.shape[1] != channels:  # grey <-> RGB
        if channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            tensor = (tensor.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
        else:
            tensor = tensor.expand(-1, 3, -1, -1)
    if height <= size and width <= size:
        top, left = (size - height) // 2, (size - width) // 2
        padded = torch.zeros(count, channels, size, size, dtype=torch.uint8)
        padded[:, :, top : top + height, left : left + width] = tensor
        return padded
    return torch.stack(
        [
            pil_to_uint8(Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()), size, channels)
            for img in tensor
        ]
    )


def split_indices(count: int, split: str, config: DataConfig, carve_test: bool) -> np.ndarray:
    """Deterministic indices of ``split`` among ``count`` items of a source with no such split.

    The permutation depends only on ``count`` and ``config.split_seed``: validation takes the
    first ``val_fraction``, test (when ``carve_test``) the next ``test_fraction``, train the rest.
    """
    order = np.random.default_rng(config.split_seed).permutation(count)
    num_val = int(round(count * config.val_fraction))
    num_test = int(round(count * config.test_fraction)) if carve_test else 0
    bounds = {
        "val": (0, num_val),
        "test": (num_val, num_val + num_test),
        "train": (num_val + num_test, count),
    }
    start, stop = bounds[split]
    return np.sort(order[start:stop])


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 (N, C, S, S) with int64 labels (N,)."""

    def __init__(self, images: Tensor, labels: Tensor, class_names: Sequence[str]) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return uint8_to_float(self.images[index]), self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """A whole batch at once: images (B, C, S, S) float in [-1, 1], labels (B,) int64."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return uint8_to_float(self.images[index]), self.labels[index]


class ImageFolderDataset(Dataset):
    """Image files read lazily; a file that cannot be decoded is logged and replaced by the next."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        class_names: Sequence[str],
        image_size: int,
        channels: int,
    ) -> None:
        self.files = list(files)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.class_names = list(class_names)
        self.image_size = image_size
        self.channels = channels
        self.skipped: set[Path] = set()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, index: int) -> tuple[Tensor, Tensor]:
        """Image ``index`` as uint8 (C, S, S); unreadable files fall through to the next one."""
        for offset in range(len(self.files)):
            position = (index + offset) % len(self.files)
            path = self.files[position]
            if path in self.skipped:
                continue
            try:
                with Image.open(path) as image:
                    image.load()
                    return pil_to_uint8(image, self.image_size, self.channels), self.labels[
                        position
                    ]
            except (
                OSError,
                ValueError,
                UnidentifiedImageError,
                Image.DecompressionBombError,
            ) as error:
                self.skipped.add(path)
                logger.warning("skipping unreadable image %s (%s)", path, error)
        raise ValueError("no readable images in the dataset")

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.load_uint8(index)
        return uint8_to_float(image), label

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        pairs = [self.load_uint8(int(i)) for i in indices]
        images = torch.stack([image for image, _ in pairs])  # (B, C, S, S)
        labels = torch.stack([label for _, label in pairs])  # (B,)
        return uint8_to_float(images), labels


# ----------------------------------------------------------------------------------------------
# Sources


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or raw) into a uint8 array."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"IDX file {path} holds {len(raw) - header} bytes of data, its header says {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, prefix: str, kind: str) -> Path | None:
    for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte",):
        for candidate in (root / f"{name}.gz", root / name):
            if candidate.is_file():
                return candidate
    return None


def is_idx_dir(path: Path) -> bool:
    return path.is_dir() and _find_idx(path, "train", "images") is not None


def _open_idx(
    root: Path, split: str, image_size: int, channels: int, config: DataConfig
) -> TensorImageDataset:
    source = "test" if split == "test" else "train"
    prefix = IDX_PREFIXES[source]
    images_path = _find_idx(root, prefix, "images")
    labels_path = _find_idx(root, prefix, "labels")
    if images_path is None or labels_path is None:
        raise ValueError(f"{root} has no {prefix}-images/labels IDX files for the {split} split")
    images = _read_idx(images_path)
    labels = _read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"IDX files in {root} disagree: images {images.shape}, labels {labels.shape}"
        )
    if source == "train":
        keep = split_indices(len(images), split, config, carve_test=False)
        images, labels = images[keep], labels[keep]
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    return TensorImageDataset(
        fit_uint8_array(images, image_size, channels),
        torch.from_numpy(labels.copy()),
        [str(i) for i in range(num_classes)],
    )


def _open_npz(
    path: Path, split: str, image_size: int, channels: int, config: DataConfig
) -> TensorImageDataset:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path} as .npz: {error}") from None
    with arrays:
        keys = set(arrays.files)
        if f"{split}_images" in keys or (split == "val" and "train_images" in keys):
            # Per-split arrays; validation is carved from train when the file has none.
            source = split if f"{split}_images" in keys else "train"
            carve = source == "train" and "val_images" not in keys
            prefix, carve_test = f"{source}_", False
        elif "images" in keys:
            prefix, carve, carve_test = "", True, True
        else:
            raise ValueError(
                f"{path} needs an 'images' array (or '{split}_images'); it has {sorted(keys)}"
            )
        images = arrays[f"{prefix}images"]
        labels = arrays[f"{prefix}labels"] if f"{prefix}labels" in keys else None
    keep = split_indices(len(images), split, config, carve_test) if carve else None
    if images.ndim not in (3, 4):
        raise ValueError(f"{path}: images must be (N, H, W) or (N, H, W, C), got {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"{path}: images must be uint8 or float in [0, 1], got {images.dtype}")
        images = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    labels = np.zeros(len(images), np.int64) if labels is None else labels.astype(np.int64)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    return TensorImageDataset(
        fit_uint8_array(images, image_size, channels),
        torch.from_numpy(labels),
        [str(i) for i in range(num_classes)],
    )


def _open_folder(
    root: Path, split: str, image_size: int, channels: int, config: DataConfig
) -> ImageFolderDataset:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    in_subfolders = all(len(p.relative_to(root).parts) > 1 for p in files)
    if in_subfolders:
        class_names = sorted({p.relative_to(root).parts[0] for p in files})
        class_of = {name: i for i, name in enumerate(class_names)}
        labels = [class_of[p.relative_to(root).parts[0]] for p in files]
    else:
        class_names, labels = ["0"], [0] * len(files)
    keep = split_indices(len(files), split, config, carve_test=True)
    if len(keep) == 0:
        raise ValueError(f"the {split} split of {root} is empty ({len(files)} images in all)")
    return ImageFolderDataset(
        [files[i] for i in keep], [labels[i] for i in keep], class_names, image_size, channels
    )


def open_dataset(
    path: str | Path,
    split: str,
    image_size: int,
    channels: int,
    config: DataConfig | None = None,
) -> TensorImageDataset | ImageFolderDataset:
    """Open one split of an image source.

    Args:
        path: a directory of IDX files (``train-images-idx3-ubyte[.gz]`` ...), a directory of
            images (recursive; class = first sub-folder when every image is in one), or a
            ``.npz`` file with ``images`` [+ ``labels``] or ``{train,val,test}_images`` arrays.
        split: ``train``, ``val`` or ``test``.
        image_size: side S of the square images returned.
        channels: 1 (grey) or 3 (RGB).
        config: split fractions and seed.

    Returns:
        A dataset of (image (C, S, S) float in [-1, 1], label () int64) pairs with
        ``num_classes`` and batched ``__getitems__``.

    Raises:
        ValueError: the path is missing or unreadable, or holds no images.
    """
    config = config or DataConfig()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist")
    try:
        if path.is_file():
            if path.suffix != ".npz":
                raise ValueError(f"data path {path} is a file but not .npz; give a folder or .npz")
            dataset = _open_npz(path, split, image_size, channels, config)
        elif is_idx_dir(path):
            dataset = _open_idx(path, split, image_size, channels, config)
        else:
            dataset = _open_folder(path, split, image_size, channels, config)
    except PermissionError as error:
        raise ValueError(f"cannot read data path {path}: {error.strerror}") from None
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {path} is empty")
    return dataset


# ----------------------------------------------------------------------------------------------
# Grids


def make_grid(images: Tensor, columns: int, padding: int = 2) -> Tensor:
    """Tile images into one picture.

    Args:
        images: (N, C, H, W) uint8.
        columns: images per row.
        padding: pixels of black between tiles.

    Returns:
        (C, rows * (H + padding) + padding, columns * (W + padding) + padding) uint8.
    """
    count, channels, height, width = images.shape
    rows = max(1, math.ceil(count / columns))
    grid = torch.zeros(
        channels,
        rows * (height + padding) + padding,
        columns * (width + padding) + padding,
        dtype=torch.uint8,
    )
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) image (C = 1 or 3) as PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
    return path


def load_image_files(paths: Sequence[str | Path], image_size: int, channels: int) -> Tensor:
    """Read image files into float (N, C, S, S) in [-1, 1].

    Raises:
        ValueError: naming the first file that is missing or cannot be decoded.
    """
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(pil_to_uint8(image, image_size, channels))
        except (OSError, ValueError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
    if not images:
        raise ValueError("no image files given")
    return uint8_to_float(torch.stack(images))


# ----------------------------------------------------------------------------------------------
# Extracted codes (Algorithm 2, lines 1-7)

CODE_STORE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Image transforms for distribution augmentation of the priors' training codes

AUGMENTATION_KINDS = ("flip", "shift")
SHIFTS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (dy, dx) pixels


def shift_image(images: Tensor, dy: int, dx: int) -> Tensor:
    """Translate (B, C, S, S) images by (dy, dx) pixels, repeating the edge pixels."""
    size = images.shape[-1]
    pad = max(abs(dy), abs(dx))
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="replicate")
    top, left = pad - dy, pad - dx
    return padded[..., top : top + size, left : left + size]


def augmentation_names(kinds: Sequence[str]) -> list[str]:
    """Transforms that ``kinds`` ("flip", "shift") ask for, identity first.

    "flip" adds the mirror image; "shift" four one-pixel translations; both add the
    translations of the mirror image too.
    """
    unknown = sorted(set(kinds) - set(AUGMENTATION_KINDS))
    if unknown:
        raise ValueError(
            f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(AUGMENTATION_KINDS)}"
        )
    bases = ["identity", "flip"] if "flip" in kinds else ["identity"]
    names = list(bases)
    if "shift" in kinds:
        names += [
            f"shift-{shift}" if base == "identity" else f"{base}+shift-{shift}"
            for base in bases
            for shift in SHIFTS
        ]
    return names


def apply_augmentation(images: Tensor, name: str) -> Tensor:
    """One transform of ``augmentation_names`` applied to (B, C, S, S) images."""
    for part in name.split("+"):
        if part == "flip":
            images = images.flip(-1)
        elif part.startswith("shift-"):
            images = shift_image(images, *SHIFTS[part.removeprefix("shift-")])
        elif part != "identity":
            raise ValueError(f"unknown augmentation '{name}'")
    return images


# ----------------------------------------------------------------------------------------------
# Code stores


def _code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 2**16 else np.dtype(np.int32)


class CodeStoreWriter:
    """Writes the codes of every level and the labels of one split into memory-mapped ``.npy``
    files, so the store can grow to millions of entries without being held in memory.

    Files go to a temporary folder that ``close`` renames into place: a killed extraction leaves
    no half-written store behind. Several processes can fill one store: one creates it, the
    others ``attach`` to the same temporary folder and write their own rows.
    """

    def __init__(
        self,
        directory: str | Path,
        count: int,
        level_names: Sequence[str],
        code_sizes: Sequence[int],
        codebook_size: int,
        extra: dict | None = None,
        augmentations: Sequence[str] = (),
    ) -> None:
        """``augmentations``: names of the transforms whose codes the store holds (index 0 the
        identity); when given, every row also records its transform index."""
        self.directory = Path(directory)
        self.tmp = self.directory.with_name(f".{self.directory.name}.tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        dtype = _code_dtype(codebook_size)
        self.codes = [
            np.lib.format.open_memmap(self.tmp / f"{name}.npy", "w+", dtype, (count, side, side))
            for name, side in zip(level_names, code_sizes, strict=True)
        ]
        self.labels = np.lib.format.open_memmap(self.tmp / "labels.npy", "w+", np.int64, (count,))
        self.augmentations = None
        if augmentations:
            self.augmentations = np.lib.format.open_memmap(
                self.tmp / "augmentations.npy", "w+", np.int16, (count,)
            )
        self.meta = {
            "format": "vqvae2-codes",
            "format_version": CODE_STORE_VERSION,
            "count": count,
            "levels": list(level_names),
            "code_sizes": list(code_sizes),
            "codebook_size": codebook_size,
            **({"augmentations": list(augmentations)} if augmentations else {}),
            **(extra or {}),
        }

    @classmethod
    def attach(cls, directory: str | Path, level_names: Sequence[str]) -> CodeStoreWriter:
        """Open the store another process is creating at ``directory``, to write rows into it.

        Only the creator calls ``close``; an attached writer calls ``flush``.
        """
        writer = cls.__new__(cls)
        writer.directory = Path(directory)
        writer.tmp = writer.directory.with_name(f".{writer.directory.name}.tmp")
        writer.codes = [np.load(writer.tmp / f"{name}.npy", mmap_mode="r+") for name in level_names]
        writer.labels = np.load(writer.tmp / "labels.npy", mmap_mode="r+")
        augmentations = writer.tmp / "augmentations.npy"
        writer.augmentations = (
            np.load(augmentations, mmap_mode="r+") if augmentations.is_file() else None
        )
        writer.meta = {}
        return writer

    def write(
        self, start: int, codes: Sequence[Tensor], labels: Tensor, augmentation: int = 0
    ) -> None:
        """Store a batch at rows ``start:start+B``: codes per level (B, h, w), labels (B,), and
        in a store of augmented codes the index of the transform that made them."""
        stop = start + len(labels)
        for store, level_codes in zip(self.codes, codes, strict=True):
            store[start:stop] = level_codes.cpu().numpy()
        self.labels[start:stop] = labels.cpu().numpy()
        if self.augmentations is not None:
            self.augmentations[start:stop] = augmentation

    def flush(self) -> None:
        arrays = [*self.codes, self.labels]
        if self.augmentations is not None:
            arrays.append(self.augmentations)
        for array in arrays:
            array.flush()

    def close(self) -> Path:
        self.flush()
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=2))
        if self.directory.exists():
            shutil.rmtree(self.directory)
        os.replace(self.tmp, self.directory)
        return self.directory


class CodeDataset(Dataset):
    """Random access to a split of extracted codes: items are (codes per level, label).

    Raises:
        ValueError: the store is missing, of another format, empty, truncated or inconsistent.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise ValueError(
                f"no extracted codes in {self.directory}; run `vqvae2 extract-codes` first"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {meta_path}: {error}") from None
        if meta.get("format") != "vqvae2-codes" or meta.get("format_version") != CODE_STORE_VERSION:
            raise ValueError(
                f"{self.directory} is not a vqvae2 code store of version {CODE_STORE_VERSION}"
            )
        self.meta = meta
        self.level_names: list[str] = meta["levels"]
        self.code_sizes: list[int] = meta["code_sizes"]
        self.codebook_size: int = meta["codebook_size"]
        count = meta["count"]
        if count < 1:
            raise ValueError(f"the code store {self.directory} is empty")
        try:
            self.codes = [
                np.load(self.directory / f"{name}.npy", mmap_mode="r") for name in self.level_names
            ]
            self.labels = np.load(self.directory / "labels.npy", mmap_mode="r")
        except (OSError, ValueError) as error:
            raise ValueError(
                f"the code store {self.directory} is truncated or corrupt: {error}"
            ) from None
        for name, array, side in zip(self.level_names, self.codes, self.code_sizes, strict=True):
            if array.shape != (count, side, side):
                raise ValueError(
                    f"the code store {self.directory} is inconsistent: {name} codes have shape "
                    f"{array.shape}, expected {(count, side, side)}"
                )
        if self.labels.shape != (count,):
            raise ValueError(
                f"the code store {self.directory} is inconsistent: labels {self.labels.shape}"
            )
        self.augmentation_names: list[str] = meta.get("augmentations", ["identity"])
        self.augmentations = None  # (N,) transform index per row; None: all the identity
        if "augmentations" in meta:
            try:
                self.augmentations = np.load(self.directory / "augmentations.npy", mmap_mode="r")
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"the code store {self.directory} is truncated or corrupt: {error}"
                ) from None
            if self.augmentations.shape != (count,):
                raise ValueError(
                    f"the code store {self.directory} is inconsistent: augmentation indices "
                    f"{self.augmentations.shape}"
                )

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[Tensor], Tensor]:
        codes, labels = self.__getitems__([index])
        return [level[0] for level in codes], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """Codes per level, top first, each (B, h, w) int64, and labels (B,) int64."""
        index = np.asarray(indices, dtype=np.int64)
        order = np.argsort(index)  # sorted reads are kinder to memory maps
        sorted_index = index[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        codes = [
            torch.from_numpy(array[sorted_index].astype(np.int64))[inverse] for array in self.codes
        ]
        labels = torch.from_numpy(self.labels[sorted_index].astype(np.int64))[inverse]
        return codes, labels

    def augmentation_indices(self, indices: Sequence[int]) -> Tensor:
        """(B,) int64 transform index of each row (0, the identity, in a plain store)."""
        if self.augmentations is None:
            return torch.zeros(len(indices), dtype=torch.long)
        index = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.augmentations[index].astype(np.int64))


class PriorTrainingCodes(Dataset):
    """The train codes a prior fits: the plain store, then (optionally) a store of the codes of
    transformed training images. Items are (codes per level, label, transform index).
    """

    def __init__(self, plain: CodeDataset, augmented: CodeDataset | None = None) -> None:
        self.plain = plain
        self.augmented = augmented
        if augmented is not None and (
            augmented.level_names != plain.level_names
            or augmented.code_sizes != plain.code_sizes
            or augmented.codebook_size != plain.codebook_size
            or augmented.meta.get("vqvae_step") != plain.meta.get("vqvae_step")
        ):
            raise ValueError(
                f"the augmented codes in {augmented.directory} do not match {plain.directory}; "
                "extract them again"
            )

    @property
    def num_augmentations(self) -> int:
        """Transforms incl. the identity; 0 without augmented codes (no conditioning needed)."""
        return 0 if self.augmented is None else len(self.augmented.augmentation_names)

    def __len__(self) -> int:
        return len(self.plain) + (0 if self.augmented is None else len(self.augmented))

    def __getitem__(self, index: int) -> tuple[list[Tensor], Tensor, Tensor]:
        codes, labels, augmentations = self.__getitems__([index])
        return [level[0] for level in codes], labels[0], augmentations[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[list[Tensor], Tensor, Tensor]:
        """Codes per level (B, h, w), labels (B,), transform indices (B,), all int64."""
        index = np.asarray(indices, dtype=np.int64)
        in_plain = index < len(self.plain)
        parts = [(np.flatnonzero(in_plain), self.plain, index[in_plain])]
        if self.augmented is not None:
            parts.append(
                (np.flatnonzero(~in_plain), self.augmented, index[~in_plain] - len(self.plain))
            )
        count = len(index)
        codes = [torch.empty(count, side, side, dtype=torch.long) for side in self.plain.code_sizes]
        labels = torch.empty(count, dtype=torch.long)
        augmentations = torch.zeros(count, dtype=torch.long)
        for positions, store, rows in parts:
            if len(rows) == 0:
                continue
            store_codes, store_labels = store.__getitems__(rows.tolist())
            for level, level_codes in zip(codes, store_codes, strict=True):
                level[positions] = level_codes
            labels[positions] = store_labels
            augmentations[positions] = store.augmentation_indices(rows.tolist())
        return codes, labels, augmentations
