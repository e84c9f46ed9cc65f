"""The code store: the codes of a dataset split, every level, written once by ``extract-codes``
and read at random by the priors (Razavi et al. 2019, Algorithm 2, lines 1-7).

One store is a folder of memory-mapped ``.npy`` files, so it can grow to millions of code maps
without being held in memory::

    RUN_DIR/codes/train/top.npy        (N, h_top, w_top) uint16 codes (int32 when K > 65,536)
                        bottom.npy     (N, h_bottom, w_bottom)
                        labels.npy     (N,) int64 class labels
                        augmentations.npy  (N,) int16 transform index (augmented stores only)
                        meta.json      format, version, levels, sizes, K, classes, ...

An extraction fills ``RUN_DIR/codes/.train.tmp`` shard by shard (a shard: a range of rows), and
records each finished shard with a digest of its rows; a rerun after a kill keeps the recorded
shards whose rows still match their digest and encodes the rest. Only the finished store gets
``meta.json`` and its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

CODE_STORE_FORMAT = "vqvae2-codes"
CODE_STORE_VERSION = 1
STORE_META = "meta.json"
# In the temporary folder of a store being written: what its rows are made from, and one record
# per finished shard.
STORE_PROGRESS = "progress.json"
SHARD_RECORDS = "shards"


def _write_json_atomically(path: Path, value: dict) -> None:
    """Write ``value`` as JSON to ``path`` by a rename: a kill leaves the old file or the new."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def _read_json(path: Path) -> object:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 2**16 else np.dtype(np.int32)


class CodeStoreWriter:
    """Writes the codes of every level and the labels of one split into memory-mapped ``.npy``
    files, so the store can grow to millions of entries without being held in memory.

    Files go to a temporary folder that ``close`` renames into place: a killed extraction leaves
    no half-written store behind, and the next one continues it (``shard_done``,
    ``finish_shard``). Several processes can fill one store: one creates it, the others
    ``attach`` to the same temporary folder and write their own rows.
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
        source: dict | None = None,
    ) -> None:
        """``augmentations``: names of the transforms whose codes the store holds (index 0 the
        identity); when given, every row also records its transform index. ``source``: what
        the rows are made from besides the metadata (the weights, the data, the batching); the
        unfinished store of an earlier extraction is kept when its metadata and source equal
        these, and discarded otherwise (``self.previous`` says which: "none", "kept" or why it
        was discarded)."""
        self.directory = Path(directory)
        self.tmp = self.directory.with_name(f".{self.directory.name}.tmp")
        self.meta = {
            "format": CODE_STORE_FORMAT,
            "format_version": CODE_STORE_VERSION,
            "count": count,
            "levels": list(level_names),
            "code_sizes": list(code_sizes),
            "codebook_size": codebook_size,
            **({"augmentations": list(augmentations)} if augmentations else {}),
            **(extra or {}),
        }
        # JSON's view of it (tuples become lists), to compare with the one on disk.
        progress = json.loads(json.dumps({"meta": self.meta, "source": source or {}}))
        self.previous = self._previous(progress)
        if self.previous == "kept":
            try:
                self._open(level_names, "r+")
                return
            except (OSError, ValueError):
                self.previous = "its files are unreadable"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        (self.tmp / SHARD_RECORDS).mkdir()
        dtype = _code_dtype(codebook_size)
        for name, side in zip(level_names, code_sizes, strict=True):
            np.lib.format.open_memmap(self.tmp / f"{name}.npy", "w+", dtype, (count, side, side))
        np.lib.format.open_memmap(self.tmp / "labels.npy", "w+", np.int64, (count,))
        if augmentations:
            np.lib.format.open_memmap(self.tmp / "augmentations.npy", "w+", np.int16, (count,))
        # Written last: an unfinished store without it has no usable rows.
        _write_json_atomically(self.tmp / STORE_PROGRESS, progress)
        self._open(level_names, "r+")

    def _previous(self, progress: dict) -> str:
        """What became of an unfinished store: "none" (there is none), "kept" (it matches
        ``progress``) or why it is discarded."""
        if not self.tmp.exists():
            return "none"
        found = _read_json(self.tmp / STORE_PROGRESS)
        if not isinstance(found, dict):
            return "it has no readable progress record"
        if found == progress:
            return "kept"
        differ = [
            key
            for part in ("meta", "source")
            for key in sorted(set(progress[part]) | set(found.get(part) or {}))
            if progress[part].get(key) != (found.get(part) or {}).get(key)
        ]
        if not differ:
            return "its progress record differs"
        return f"it was made with another {', '.join(differ)}"

    def _open(self, level_names: Sequence[str], mode: str) -> None:
        self.codes = [np.load(self.tmp / f"{name}.npy", mmap_mode=mode) for name in level_names]
        self.labels = np.load(self.tmp / "labels.npy", mmap_mode=mode)
        augmentations = self.tmp / "augmentations.npy"
        self.augmentations = (
            np.load(augmentations, mmap_mode=mode) if augmentations.is_file() else None
        )

    @classmethod
    def attach(cls, directory: str | Path, level_names: Sequence[str]) -> CodeStoreWriter:
        """Open the store another process is creating at ``directory``, to write rows into it.

        Only the creator calls ``close``; an attached writer calls ``flush``.
        """
        writer = cls.__new__(cls)
        writer.directory = Path(directory)
        writer.tmp = writer.directory.with_name(f".{writer.directory.name}.tmp")
        writer._open(level_names, "r+")
        writer.meta = {}
        writer.previous = "attached"
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
        for array in self._arrays():
            array.flush()

    def _arrays(self) -> list[np.ndarray]:
        arrays = [*self.codes, self.labels]
        return arrays if self.augmentations is None else [*arrays, self.augmentations]

    def _digest(self, rows: range) -> str:
        """SHA-256 of rows ``rows`` of every file of the store."""
        digest = hashlib.sha256()
        for array in self._arrays():
            digest.update(np.ascontiguousarray(array[rows.start : rows.stop]).tobytes())
        return digest.hexdigest()

    def _record_path(self, rows: range) -> Path:
        return self.tmp / SHARD_RECORDS / f"{rows.start}-{rows.stop}.json"

    def shard_done(self, rows: range) -> bool:
        """Whether rows ``rows`` were finished by an earlier process (of this extraction or of
        a killed one) and still hold what it recorded."""
        record = _read_json(self._record_path(rows))
        return isinstance(record, dict) and record.get("sha256") == self._digest(rows)

    def finish_shard(self, rows: range) -> None:
        """Record rows ``rows`` as finished, after they reached the files."""
        self.flush()
        _write_json_atomically(self._record_path(rows), {"sha256": self._digest(rows)})

    def close(self) -> Path:
        """Give the finished store its ``meta.json`` and, by a rename, its final name."""
        self.flush()
        # Without its progress record an unfinished store is discarded by the next extraction.
        (self.tmp / STORE_PROGRESS).unlink()
        shutil.rmtree(self.tmp / SHARD_RECORDS)
        (self.tmp / STORE_META).write_text(json.dumps(self.meta, indent=2))
        if self.directory.exists():
            shutil.rmtree(self.directory)
        os.replace(self.tmp, self.directory)
        return self.directory


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list_of(kind: type):
    return lambda value: isinstance(value, list) and all(isinstance(v, kind) for v in value)


# What a store's meta.json must hold besides its format: (key, check, what it must be).
STORE_FIELDS = (
    ("count", _is_integer, "an integer"),
    ("levels", _is_list_of(str), "a list of level names"),
    ("code_sizes", _is_list_of(int), "a list of code map sides"),
    ("codebook_size", _is_integer, "an integer"),
)


def _check_store_meta(meta: dict, path: Path) -> None:
    """Raise a ``ValueError`` naming ``path`` unless the store metadata has every field."""
    for key, valid, what in STORE_FIELDS:
        if key not in meta:
            raise ValueError(f"{path} lacks '{key}'")
        if not valid(meta[key]):
            raise ValueError(f"{path}: '{key}' must be {what}, got {meta[key]!r}")
    if len(meta["levels"]) != len(meta["code_sizes"]):
        raise ValueError(f"{path}: 'levels' and 'code_sizes' differ in length")


class CodeDataset(Dataset):
    """Random access to a split of extracted codes: items are (codes per level, label).

    Raises:
        ValueError: the store is missing, of another format, empty, truncated or inconsistent.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / STORE_META
        if not meta_path.is_file():
            raise ValueError(
                f"no extracted codes in {self.directory}; run `vqvae2 extract-codes` first"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {meta_path}: {error}") from None
        if (
            not isinstance(meta, dict)
            or meta.get("format") != CODE_STORE_FORMAT
            or meta.get("format_version") != CODE_STORE_VERSION
        ):
            raise ValueError(
                f"{self.directory} is not a vqvae2 code store of version {CODE_STORE_VERSION}"
            )
        _check_store_meta(meta, meta_path)
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
        # A corrupt store would otherwise fail deep in an embedding lookup.
        if any(int(level.min()) < 0 or int(level.max()) >= self.codebook_size for level in codes):
            raise ValueError(
                f"the code store {self.directory} holds codes beyond its codebook of "
                f"{self.codebook_size}; extract the codes again"
            )
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
