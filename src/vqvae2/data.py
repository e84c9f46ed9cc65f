"""Image sources and transforms: MNIST-family IDX files, folders of images and ``.npz`` arrays,
the image transforms of distribution augmentation, and batch loaders over any dataset.

Every dataset yields images as float tensors in [-1, 1] of shape (C, S, S) with an int64 class
label, resized or padded to the configured square side S. Sources without a validation (or test)
split get a deterministic one, carved by a seeded permutation.
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

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
