"""Image sources and transforms: MNIST-family IDX files, folders of images and ``.npz`` arrays,
the image transforms of distribution augmentation, and batch loaders over any dataset.

Every dataset yields images as uint8 tensors (C, S, S) with an int64 class label, resized or
padded to the configured square side S by ``images.py`` (one image at a time); the models take
them as floats in [-1, 1] (``uint8_to_float``). Sources without a validation (or test) split get
a deterministic one, carved by a seeded permutation.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

# The pixel conversions live in _helpers (the pure codec core needs them without this module's
# file readers); the trainers and commands import them from here.
from ._helpers import float_to_uint8 as float_to_uint8
from ._helpers import uint8_to_float as uint8_to_float
from .config import DataConfig
from .images import UNREADABLE, fit_uint8_array, read_image

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_DATA_PATH = Path("/usr/share/datasets/fashion-mnist")
IDX_PREFIXES = {"train": "train", "test": "t10k"}

logger = logging.getLogger("vqvae2.data")


@dataclass(frozen=True)
class RandomTransform:
    """The random flips and crops of training images (``data.random_flip`` /
    ``data.random_crop``). Each image's draw comes from (seed, key), where the key is its
    position in the run's sequence of training images: a resumed run and any number of loader
    processes see the same images."""

    seed: int
    flip: bool
    crop_scale: float  # > 1: resize the short side to size * crop_scale, crop at random

    def draw(self, key: int) -> tuple[bool, tuple[float, float] | None]:
        """(mirror?, crop place or None for the centre) of the image with ``key``."""
        values = np.random.default_rng([self.seed, key]).random(3)
        place = (float(values[1]), float(values[2])) if self.crop_scale > 1 else None
        return self.flip and bool(values[0] < 0.5), place


def random_transform(config: DataConfig, seed: int) -> RandomTransform | None:
    """The training images' random transform of ``config``, or None when it asks for none."""
    if not (config.random_flip or config.random_crop):
        return None
    scale = 1.0 + config.crop_margin if config.random_crop else 1.0
    return RandomTransform(seed=seed, flip=config.random_flip, crop_scale=scale)


Item = int | tuple[int, int]  # an index, or (index, key) for a randomly transformed image


def _index_and_key(item: Item) -> tuple[int, int | None]:
    return (int(item[0]), int(item[1])) if isinstance(item, tuple) else (int(item), None)


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
    """Images held in memory as uint8 (N, C, S, S) with int64 labels (N,).

    Items are (image (C, S, S) uint8, label () int64); a batch sampler may give (index, key)
    pairs, which apply ``transform`` (a crop of the image resized with a margin, a flip).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        class_names: Sequence[str],
        transform: RandomTransform | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: Item) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([item])
        return images[0], labels[0]

    def __getitems__(self, items: Sequence[Item]) -> tuple[Tensor, Tensor]:
        """A whole batch at once: images (B, C, S, S) uint8, labels (B,) int64."""
        indices, keys = zip(*map(_index_and_key, items), strict=True)
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        if self.transform is not None and keys[0] is not None:
            images = torch.stack(
                [self._transformed(image, key) for image, key in zip(images, keys, strict=True)]
            )
        return images, self.labels[index]

    def _transformed(self, image: Tensor, key: int) -> Tensor:
        """(C, S, S) uint8 -> the same shape, flipped and cropped as the key draws."""
        mirror, place = self.transform.draw(key)
        if place is not None:
            size = image.shape[-1]
            larger = round(size * self.transform.crop_scale)
            resized = torch.nn.functional.interpolate(
                image[None].float(), size=(larger, larger), mode="bilinear", antialias=True
            )[0]  # (C, S', S')
            left, top = round(place[0] * (larger - size)), round(place[1] * (larger - size))
            image = resized[:, top : top + size, left : left + size].round().clamp(0, 255)
            image = image.to(torch.uint8)
        return image.flip(-1) if mirror else image


class LazyImageDataset(Dataset):
    """Images read one at a time as they are asked for, resized by their short side and
    centre-cropped to S x S: the image folder's and the tar shards' datasets.

    Items are (image (C, S, S) uint8, label () int64); a batch sampler may give (index, key)
    pairs, which apply ``transform`` (a random crop of the image resized with a margin, a
    flip). An image that cannot be read or decoded is warned about once on ``log``, kept in
    ``skipped`` (by ``skip_key``) and replaced by the next readable one (in each loader
    process: with worker processes each keeps its own). A subclass reads image ``position``
    (``read``), names it in a warning (``describe``) and says what a dataset of which nothing
    can be read is (``nothing``).
    """

    log = logger

    def __init__(
        self,
        labels: Tensor,
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        transform: RandomTransform | None,
    ) -> None:
        self.labels = labels  # (N,) int64
        self.class_names = list(class_names)
        self.image_size = image_size
        self.channels = channels
        self.transform = transform
        self.skipped: set[Hashable] = set()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, position: int, scale: float, place: tuple[float, float] | None) -> Tensor:
        """Image ``position`` as uint8 (C, S, S) under the drawn crop's scale and place; raises
        one of ``UNREADABLE`` when it cannot be read or decoded."""
        raise NotImplementedError

    def skip_key(self, position: int) -> Hashable:
        """What ``skipped`` holds for an unreadable image ``position``."""
        return position

    def describe(self, position: int) -> str:
        """Image ``position`` as a warning names it."""
        raise NotImplementedError

    def nothing(self) -> str:
        """The error when no image of the dataset can be read."""
        raise NotImplementedError

    def load_uint8(self, item: Item) -> tuple[Tensor, Tensor]:
        """Image ``item`` as uint8 (C, S, S) with its label, the item's random transform
        applied; an unreadable image falls through to the next readable one.

        Raises:
            ValueError: ``nothing()``, when no image of the dataset can be read.
        """
        index, key = _index_and_key(item)
        mirror, place, scale = False, None, 1.0
        if self.transform is not None and key is not None:
            (mirror, place), scale = self.transform.draw(key), self.transform.crop_scale
        for step in range(len(self)):
            position = (index + step) % len(self)
            if self.skip_key(position) in self.skipped:
                continue
            try:
                pixels = self.read(position, scale, place)
            except UNREADABLE as error:
                self.skipped.add(self.skip_key(position))
                self.log.warning(
                    "skipping unreadable image %s (%s)", self.describe(position), _first_line(error)
                )
                continue
            return (pixels.flip(-1) if mirror else pixels), self.labels[position]
        raise ValueError(self.nothing())

    def __getitem__(self, item: Item) -> tuple[Tensor, Tensor]:
        return self.load_uint8(item)

    def __getitems__(self, items: Sequence[Item]) -> tuple[Tensor, Tensor]:
        """A whole batch at once: images (B, C, S, S) uint8, labels (B,) int64."""
        return stack_items([self.load_uint8(item) for item in items])


class ImageFolderDataset(LazyImageDataset):
    """Image files (``LazyImageDataset``), read with ``read_image``."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        transform: RandomTransform | None = None,
    ) -> None:
        super().__init__(
            torch.as_tensor(labels, dtype=torch.long), class_names, image_size, channels, transform
        )
        self.files = list(files)

    def read(self, position: int, scale: float, place: tuple[float, float] | None) -> Tensor:
        return read_image(self.files[position], self.image_size, self.channels, scale, place)

    def skip_key(self, position: int) -> Hashable:
        return self.files[position]

    def describe(self, position: int) -> str:
        return str(self.files[position])

    def nothing(self) -> str:
        return (
            f"none of the {len(self.files)} image files can be read: each was skipped "
            f"with a warning (the first: {self.files[0]})"
        )


def stack_items(pairs: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(image (C, S, S), label ()) pairs -> images (B, C, S, S), labels (B,)."""
    images = torch.stack([image for image, _ in pairs])  # (B, C, S, S)
    labels = torch.stack([label for _, label in pairs])  # (B,)
    return images, labels


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


def _image_files(root: Path) -> list[Path]:
    """The image files under ``root`` (recursive, sorted), named by their paths under ``root``.
    Symbolic links to files and folders are followed (a dataset kept elsewhere is usually
    linked in); a link to a folder that holds it (a loop) is skipped with a warning, and so is
    a sub-folder that cannot be listed."""
    files: list[Path] = []
    _collect_image_files(root, _folders_holding(root), files)
    return sorted(files)


def _folder_identity(folder: Path) -> tuple[int, int]:
    """(device, inode) of the folder a path leads to, links followed: equal for every path
    to the same folder."""
    status = folder.stat()
    return status.st_dev, status.st_ino


def _folders_holding(folder: Path) -> frozenset[tuple[int, int]]:
    """Identities of the folder a path leads to and of every folder above it on disk."""
    real = folder.resolve()
    return frozenset(_folder_identity(path) for path in (real, *real.parents))


def _collect_image_files(
    folder: Path, ancestors: frozenset[tuple[int, int]], files: list[Path]
) -> None:
    """Append the image files under ``folder`` to ``files``. ``ancestors`` holds the folders
    that hold ``folder`` (on disk and along the links followed to it): a link to one of them
    would list them again, without end."""
    with os.scandir(folder) as scan:
        names = sorted(entry.name for entry in scan)
    for name in names:
        path = folder / name
        try:
            # is_dir / is_file follow links; a link to nothing or to itself is neither.
            is_dir, is_file = path.is_dir(), path.is_file()
            identity = _folder_identity(path) if is_dir else None
            below = _folders_holding(path) if is_dir and path.is_symlink() else {identity}
        except OSError:
            continue
        if identity in ancestors:
            logger.warning(
                "skipping %s: a link to %s, a folder that holds it", path, path.resolve()
            )
        elif is_dir:
            try:
                _collect_image_files(path, ancestors | below, files)
            except PermissionError as error:
                logger.warning("skipping folder %s: %s", path, error.strerror)
        elif is_file and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)


def _labelled(
    root: Path, files: list[Path], class_names: list[str] | None
) -> tuple[list[int], list[str]]:
    """Labels of ``files`` under ``root`` (class = first sub-folder when every file is in one;
    one class otherwise) and the class names, which ``class_names`` fixes when given."""
    if not all(len(p.relative_to(root).parts) > 1 for p in files):
        return [0] * len(files), class_names or ["0"]
    folders = [p.relative_to(root).parts[0] for p in files]
    names = class_names or sorted(set(folders))
    unknown = sorted(set(folders) - set(names))
    if unknown:
        raise ValueError(
            f"class folder '{unknown[0]}' in {root} is not one of the training classes "
            f"({', '.join(names)})"
        )
    class_of = {name: i for i, name in enumerate(names)}
    return [class_of[folder] for folder in folders], names


def split_folders(root: Path) -> list[str]:
    """The splits of an image folder that have their own sub-folder: ``train`` first, then
    ``val`` and/or ``test``, when ``train/`` sits beside one of them; [] for a folder that is
    one source (all its splits carved)."""
    own = [name for name in SPLITS if (root / name).is_dir()]
    return own if "train" in own and len(own) > 1 else []


def _open_folder(
    root: Path, split: str, image_size: int, channels: int, config: DataConfig
) -> ImageFolderDataset:
    """One split of a folder of images. A folder with a ``train`` sub-folder beside ``val``
    and/or ``test`` ones takes each split from its own folder (a missing one is carved from
    train); any other folder is one source whose splits are carved."""
    own = split_folders(root)
    source = root / "train" if own else root
    files = _image_files(source)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {source}")
    labels, class_names = _labelled(source, files, None)
    if split in own and split != "train":
        files = _image_files(root / split)
        labels, _ = _labelled(root / split, files, class_names)
    else:
        keep = split_indices(len(files), split, config, carve_test="test" not in own)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    if not files:
        raise ValueError(f"the {split} split of {root} is empty")
    dataset = ImageFolderDataset(files, labels, class_names, image_size, channels)
    dataset.load_uint8(0)  # a split with no readable file fails now, not in training
    return dataset


def open_dataset(
    path: str | Path,
    split: str,
    image_size: int,
    channels: int,
    config: DataConfig | None = None,
    seed: int = 0,
) -> TensorImageDataset | ImageFolderDataset:
    """Open one split of an image source.

    Args:
        path: a directory of IDX files (``train-images-idx3-ubyte[.gz]`` ...), a directory of
            images (recursive; class = first sub-folder when every image is in one), or a
            ``.npz`` file with ``images`` [+ ``labels``] or ``{train,val,test}_images`` arrays.
            A folder with ``train/`` and ``val/`` and/or ``test/`` sub-folders takes each split
            from its own folder. Tar shards (``vqvae2.shards``): the folder ``write_shards``
            wrote (splits kept), or a shard pattern (``train-{000000..000009}.tar``, a glob, one
            ``.tar``), one source whose splits are carved.
        split: ``train``, ``val`` or ``test``.
        image_size: side S of the square images returned: arrays that fit are padded, other
            images resized by their short side and centre-cropped.
        channels: 1 (grey) or 3 (RGB).
        config: split fractions and seed, and the training images' random transform.
        seed: seeds the training split's random flips and crops (drawn per (seed, key) when a
            batch sampler gives (index, key) items; plain indices give the image as it is).

    Returns:
        A dataset of (image (C, S, S) uint8, label () int64) pairs with ``num_classes`` and
        batched ``__getitems__``.

    Raises:
        ValueError: the path is missing or unreadable, or holds no images.
    """
    config = config or DataConfig()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    path = Path(path)
    from .shards import is_shard_source, open_shards  # shards.py builds on this module

    if not path.exists() and not is_shard_source(path):
        raise ValueError(f"data path {path} does not exist")
    try:
        if is_shard_source(path):
            dataset = open_shards(path, split, image_size, channels, config)
        elif path.is_file():
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
    if split == "train":
        dataset.transform = random_transform(config, seed)
    return dataset


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_image_files(paths: Sequence[str | Path], image_size: int, channels: int) -> Tensor:
    """Read image files into uint8 (N, C, S, S), resized by the short side and centre-cropped.

    Raises:
        ValueError: naming the first file that is missing or cannot be decoded.
    """
    images = []
    for path in paths:
        try:
            images.append(read_image(Path(path), image_size, channels))
        except UNREADABLE as error:
            raise ValueError(f"cannot read image {path}: {_first_line(error)}") from None
    if not images:
        raise ValueError("no image files given")
    return torch.stack(images)


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
# Batches


def _batch_as_is(batch: Any) -> Any:
    """Collate function for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def batch_loader(
    dataset: Dataset, batch_sampler: Iterable[list[int]], num_workers: int = 0
) -> DataLoader:
    """Batches of ``dataset`` in the order of ``batch_sampler`` (lists of indices), each read
    with one ``__getitems__`` call, in ``num_workers`` worker processes (0: this process)."""
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_batch_as_is
    )


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Sequential batches over a whole split (the last one may be short)."""
    indices = list(range(len(dataset)))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return batch_loader(dataset, batches, num_workers)
