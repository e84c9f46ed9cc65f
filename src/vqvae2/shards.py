"""Tar shards of an image folder, for data too big for loose files: writing them, and reading
them back as a dataset with random access.

``write_shards`` writes each split of an image folder (``data.py``'s layout: ``train/``,
``val/``, ``test/`` or one folder whose splits are carved; class = first sub-folder) into tar
files in the webdataset layout: per image ``KEY.<suffix>`` holding the file's bytes as they are
and ``KEY.cls`` holding its class index as ASCII digits. ``shards.json`` beside them names the
classes and each split's shards, so labels mean what they meant in the folder.

Reading keeps the trainers' exact resume: the global batch at step s depends only on
(seed, s) (``batches.EpochBatchSampler``), which needs random access by index. ``ShardDataset``
reads the tar headers of its shards once (member offsets and sizes, and the ``.cls`` labels),
then reads each image with one seek: every process and loader worker can read any image, and
the sampler's batches, split over ranks and then over workers, read each image of an epoch
once. What a pass over one shard's headers finds is kept in ``.index/<shard>.npz`` beside it
(written by ``write_shards``, or by the first reader where the folder is writable) and used
while the shard is the file it was made from (inode, size, times), so opening a split
reads one small file per shard instead of every tar header.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checkpoint import write_text_atomic
from .config import DataConfig
from .data import (
    IMAGE_SUFFIXES,
    LazyImageDataset,
    RandomTransform,
    _first_line,
    _image_files,
    _labelled,
    split_folders,
    split_indices,
)
from .images import pil_to_uint8

MANIFEST = "shards.json"  # the file that marks a folder of shards and names its classes
FORMAT = "vqvae2-shards"
VERSION = 1
DEFAULT_IMAGES_PER_SHARD = 1000  # about 100 MB of ImageNet JPEGs per shard
LABEL_SUFFIX = "cls"
PATTERN_CHARACTERS = "*?[{"
KEY_DIGITS = 8  # keys are the image's position in its split, zero-padded
INDEX_FOLDER = ".index"  # beside the shards: each shard's header pass (``_indexed_scan``)
INDEX_VERSION = 1  # of those files' layout

logger = logging.getLogger("vqvae2.shards")


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class WrittenShards:
    """What ``write_shards`` wrote: the manifest, each split's shard files and image count."""

    manifest: Path
    shards: dict[str, list[Path]]
    images: dict[str, int]
    class_names: list[str]

    def summary(self) -> str:
        """One line: the manifest, then each split's images and shards."""
        counts = ", ".join(
            f"{split} {self.images[split]} images in {len(paths)} shards"
            for split, paths in self.shards.items()
        )
        return f"wrote {self.manifest}: {counts}"


def _folder_sets(root: Path) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """The image files and labels of each split an image folder has (``train`` always: the
    whole folder when it has no split folders), as ``open_dataset`` reads them, and the class
    names."""
    own = split_folders(root)
    source = root / "train" if own else root
    files = _image_files(source)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {source}")
    labels, class_names = _labelled(source, files, None)
    sets = {"train": (files, labels)}
    for split in own[1:]:
        split_files = _image_files(root / split)
        sets[split] = (split_files, _labelled(root / split, split_files, class_names)[0])
    return sets, class_names


def _write_tar(path: Path, files: Sequence[Path], labels: Sequence[int], first_key: int) -> None:
    """One shard: ``KEY.<suffix>`` (the file's bytes) and ``KEY.cls`` per image, written to a
    temporary file and renamed, so a shard that exists is whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, (file, label) in enumerate(zip(files, labels, strict=True)):
                key = f"{first_key + offset:0{KEY_DIGITS}d}"
                _add_member(tar, f"{key}{file.suffix.lower()}", file.read_bytes())
                _add_member(tar, f"{key}.{LABEL_SUFFIX}", str(label).encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o444  # mtime 0: equal folders give equal shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    folder: str | Path, out: str | Path, images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
) -> WrittenShards:
    """Write the images of an image folder as tar shards, split by split, into ``out``.

    Shards are named ``SPLIT-000000.tar`` ... and hold ``images_per_shard`` images each (the
    last fewer), in the folder's order (sorted paths), so splits carved from them equal the
    folder's. ``out/shards.json`` is written last: a folder with it is complete, and ``--data
    OUT`` reads it like the image folder.

    Args:
        folder: an image folder as ``open_dataset`` reads it (``train/`` beside ``val/`` and/or
            ``test/``, or one folder; class = first sub-folder).
        out: folder to write; must not hold shards already.
        images_per_shard: images per tar file (>= 1).

    Returns:
        The manifest path, each split's shard paths and image count, the class names.

    Raises:
        ValueError: the folder holds no images, or ``out`` already holds shards.
    """
    folder, out = Path(folder), Path(out)
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist or is not a folder")
    if (out / MANIFEST).exists():
        raise ValueError(f"{out} already holds shards ({MANIFEST}); choose another folder")
    sets, class_names = _folder_sets(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for split, (files, labels) in sets.items():
        written[split] = []
        for start in range(0, len(files), images_per_shard):
            path = out / f"{split}-{start // images_per_shard:06d}.tar"
            stop = start + images_per_shard
            _write_tar(path, files[start:stop], labels[start:stop], start)
            _indexed_scan(path)  # its index, while the file is fresh in the page cache
            written[split].append(path)
    images = {split: len(files) for split, (files, _) in sets.items()}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "source": str(folder.resolve()),
        "class_names": class_names,
        "splits": {
            split: {"shards": [path.name for path in paths], "images": images[split]}
            for split, paths in written.items()
        },
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return WrittenShards(out / MANIFEST, written, images, class_names)


# ----------------------------------------------------------------------------------------------
# Finding shards


def is_shard_source(path: Path) -> bool:
    """Whether ``open_dataset`` reads ``path`` as shards: a folder with ``shards.json``, a
    ``.tar`` file, or a path that does not exist and holds a glob or brace pattern."""
    if path.is_dir():
        return (path / MANIFEST).is_file()
    if path.is_file():
        return path.suffix == ".tar"
    return any(character in str(path) for character in PATTERN_CHARACTERS)


_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar``, ``a-001.tar``, ``a-002.tar`` (numbers padded to
    the first one's width); ``{x,y}`` lists too; several braces expand left to right.

    Raises:
        ValueError: an unbalanced brace, a range that runs backwards, or a brace that is
            neither a range nor a list.
    """
    match = _BRACES.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"shard pattern {pattern} has an unbalanced brace")
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers is not None:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise ValueError(f"shard pattern {pattern}: the range {{{body}}} runs backwards")
        items = [f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(
            f"shard pattern {pattern}: {{{body}}} is neither a range {{A..B}} nor a list {{A,B}}"
        )
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for item in items for path in expand_braces(head + item + tail)]


def shard_files(pattern: str) -> list[Path]:
    """The tar files a shard pattern names, in its order (globs sorted).

    Raises:
        ValueError: a bad pattern, a named shard that does not exist, a shard named twice, or
            no shard at all.
    """
    paths: list[Path] = []
    for expanded in expand_braces(pattern):
        if any(character in expanded for character in "*?["):
            paths += [Path(found) for found in sorted(glob.glob(expanded)) if Path(found).is_file()]
        elif Path(expanded).is_file():
            paths.append(Path(expanded))
        else:
            raise ValueError(f"shard {expanded} of the pattern {pattern} does not exist")
    if not paths:
        raise ValueError(f"the shard pattern {pattern} matches no files")
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise ValueError(f"the shard pattern {pattern} names {path} twice")
        seen.add(path.resolve())
    return paths


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ShardIndex:
    """Where each image of a set of shards lies: ``shard`` (N,) int64 indexes ``shards``;
    ``offset`` and ``size`` (N,) int64 are its bytes in that tar file; ``labels`` (N,) int64
    (-1 where the image has no ``.cls``)."""

    shards: list[str]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    labels: np.ndarray

    def take(self, keep: np.ndarray) -> ShardIndex:
        """The images at positions ``keep`` (int (M,)), in that order."""
        return ShardIndex(
            self.shards, self.shard[keep], self.offset[keep], self.size[keep], self.labels[keep]
        )


_IMAGE_EXTENSIONS = {suffix.removeprefix(".") for suffix in IMAGE_SUFFIXES}


def _split_name(name: str) -> tuple[str, str]:
    """A member name -> (key, extension): the webdataset rule, the key ends at the first dot
    of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, extension.lower()


def _scan_shard(path: Path) -> tuple[list[int], list[int], list[int]]:
    """(offsets, sizes, labels) of the images in one tar file, in member order.

    Raises:
        ValueError: the file is not a readable tar (a cut-short one included: tarfile checks
            that each member's data is there), or a ``.cls`` member is not an integer.
    """
    try:
        with tarfile.open(path, "r:") as tar:
            images: dict[str, tuple[int, int]] = {}
            labels: dict[str, int] = {}
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, extension = _split_name(member.name)
                if extension in _IMAGE_EXTENSIONS and key not in images:
                    images[key] = (member.offset_data, member.size)
                elif extension == LABEL_SUFFIX:
                    labels[key] = _read_label(tar, member, path)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"shard {path} is not a readable tar file: {_first_line(error)}") from None
    offsets, sizes = zip(*images.values(), strict=True) if images else ((), ())
    return list(offsets), list(sizes), [labels.get(key, -1) for key in images]


def _indexed_scan(path: Path) -> tuple[list[int], list[int], list[int]]:
    """``_scan_shard(path)``, read from ``.index/<name>.npz`` beside the shard when that was made
    from this very file (``_file_stamp``); otherwise scanned and saved there (skipped, with a
    debug line, where the folder cannot be written)."""
    index_path = path.parent / INDEX_FOLDER / f"{path.name}.npz"
    stamp = _file_stamp(path)
    try:
        with np.load(index_path, allow_pickle=False) as saved:
            if np.array_equal(saved["stamp"], stamp):
                return saved["offset"].tolist(), saved["size"].tolist(), saved["label"].tolist()
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # no index yet, or an unreadable one: scan again
    offsets, sizes, labels = _scan_shard(path)
    try:
        index_path.parent.mkdir(exist_ok=True)
        descriptor, partial = tempfile.mkstemp(dir=index_path.parent, suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.savez(handle, stamp=stamp, offset=offsets, size=sizes, label=labels)
            os.replace(partial, index_path)  # whole or absent, whichever process writes it
        finally:
            Path(partial).unlink(missing_ok=True)  # left only when the write failed
    except OSError as error:
        logger.debug("no index kept for %s: %s", path, error)
    return offsets, sizes, labels


def _file_stamp(path: Path) -> np.ndarray:
    """(5,) int64 that change when the file at ``path`` is replaced or rewritten: the index
    format, the inode, the size, and the modification and status-change times (a copy that
    keeps the modification time, as ``cp -p`` or ``rsync -a`` make, still gets a new inode and
    status-change time, which no tool sets)."""
    status = path.stat()
    fields = (INDEX_VERSION, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    return np.array(fields, np.int64)


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    text = tar.extractfile(member).read().decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise ValueError(f"shard {path}: {member.name} holds {text[:20]!r}, not a class index")
    return int(text)


def index_shards(paths: Sequence[Path]) -> ShardIndex:
    """Read the tar headers of ``paths`` once: where each image lies, and its label.

    Raises:
        ValueError: a shard is unreadable, the shards hold no image, or some images have a
            ``.cls`` and others not.
    """
    shard, offset, size, labels = [], [], [], []
    for number, path in enumerate(paths):
        offsets, sizes, shard_labels = _indexed_scan(Path(path))
        shard += [number] * len(offsets)
        offset += offsets
        size += sizes
        labels += shard_labels
    if not offset:
        names = ", ".join(str(path) for path in paths[:3])
        raise ValueError(f"the shards {names}{' ...' if len(paths) > 3 else ''} hold no images")
    labels_array = np.asarray(labels, np.int64)
    if (labels_array < 0).any() and (labels_array >= 0).any():
        raise ValueError(f"some images in the shards {paths[0]} ... have a .cls label, others not")
    return ShardIndex(
        [str(path) for path in paths],
        np.asarray(shard, np.int64),
        np.asarray(offset, np.int64),
        np.asarray(size, np.int64),
        np.maximum(labels_array, 0),  # no labels at all: one class, as a folder without classes
    )


class ShardDataset(LazyImageDataset):
    """Images read from tar shards by index (``LazyImageDataset``; an undecodable image is kept
    in ``skipped`` by its position). No file stays open between reads, so loader workers share
    nothing.
    """

    log = logger

    def __init__(
        self,
        index: ShardIndex,
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        transform: RandomTransform | None = None,
    ) -> None:
        super().__init__(
            torch.from_numpy(index.labels), class_names, image_size, channels, transform
        )
        self.index = index

    def read_bytes(self, position: int) -> bytes:
        """The stored bytes of image ``position`` (the original file's)."""
        with open(self.index.shards[self.index.shard[position]], "rb") as shard:
            shard.seek(int(self.index.offset[position]))
            return shard.read(int(self.index.size[position]))

    def read(self, position: int, scale: float, place: tuple[float, float] | None) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(self.read_bytes(position))) as image:
                return pil_to_uint8(image, self.image_size, self.channels, scale, place)

    def describe(self, position: int) -> str:
        return f"at byte {self.index.offset[position]} of {self.index.shards[self.index.shard[position]]}"

    def nothing(self) -> str:
        return (
            f"none of the {len(self)} images in the shards {self.index.shards[0]} ... "
            "can be decoded: each was skipped with a warning"
        )


@dataclass(frozen=True)
class Manifest:
    """``shards.json``: the class names and each split's shard files."""

    folder: Path
    class_names: list[str]
    shards: dict[str, list[Path]]
    images: dict[str, int]


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a folder of shards.

    Raises:
        ValueError: it is not valid JSON, not a manifest of this format, or lists a shard that
            is missing.
    """
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{path} is not a {FORMAT} manifest of version {VERSION}")
        splits = data["splits"]
        shards = {split: [folder / name for name in splits[split]["shards"]] for split in splits}
        images = {split: int(splits[split]["images"]) for split in splits}
        class_names = [str(name) for name in data["class_names"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"cannot read the manifest {path}: {_first_line(error)}") from None
    if "train" not in shards:
        raise ValueError(f"the manifest {path} has no train split")
    for paths in shards.values():
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"shard {missing[0]} listed in {path} is missing")
    return Manifest(folder, class_names, shards, images)


def _manifest_beside(paths: Sequence[Path]) -> Manifest | None:
    """The manifest of the folder that holds all of ``paths``, if they share one that has it."""
    folders = {path.resolve().parent for path in paths}
    if len(folders) != 1 or not (next(iter(folders)) / MANIFEST).is_file():
        return None
    return read_manifest(next(iter(folders)))


def open_shards(
    path: Path, split: str, image_size: int, channels: int, config: DataConfig
) -> ShardDataset:
    """One split of a shard source (``is_shard_source``).

    A folder ``write_shards`` wrote keeps the image folder's splits: a split it holds is read
    from its own shards, others are carved from ``train`` as the folder's were. A pattern is
    one source whose splits are all carved (``split_indices``); its class names come from the
    manifest beside the shards when there is one, else are ``0`` .. ``K-1``.

    Returns:
        A dataset of (image (C, S, S) uint8, label () int64) pairs.

    Raises:
        ValueError: a bad pattern, missing or unreadable shards, or labels beyond the classes.
    """
    if path.is_dir():
        manifest = read_manifest(path)
        own = split in manifest.shards and split != "train"
        index = index_shards(manifest.shards[split if own else "train"])
        counted = manifest.images[split if own else "train"]
        if len(index.labels) != counted:
            raise ValueError(
                f"the {split if own else 'train'} shards in {path} hold {len(index.labels)} "
                f"images, its {MANIFEST} says {counted}"
            )
        carve_test = "test" not in manifest.shards
        class_names = manifest.class_names
    else:
        paths = shard_files(str(path))
        index = index_shards(paths)
        own, carve_test = False, True
        manifest = _manifest_beside(paths)
        num_classes = int(index.labels.max()) + 1
        class_names = manifest.class_names if manifest else [str(i) for i in range(num_classes)]
    if int(index.labels.max()) >= len(class_names):
        raise ValueError(
            f"the shards of {path} hold class {int(index.labels.max())}, beyond the "
            f"{len(class_names)} classes named"
        )
    if not own:
        index = index.take(split_indices(len(index.labels), split, config, carve_test))
    dataset = ShardDataset(index, class_names, image_size, channels)
    if len(dataset):
        dataset.load_uint8(0)  # a split with no decodable image fails now, not in training
    return dataset
