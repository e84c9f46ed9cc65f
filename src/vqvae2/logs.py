"""What a training run logs: the CSV of figures every trainer writes (``metrics.csv``) and, when
asked (``--tensorboard``), the same figures and image grids as TensorBoard event files.

TensorBoard is optional (``pip install vqvae2[tensorboard]``); the CSV is always written.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

METRICS_COLUMNS = ["step", "elapsed_seconds", "split", "metric", "value"]
TENSORBOARD_DIR = "tensorboard"  # beside metrics.csv


class MetricsLog:
    """Append-only CSV of (step, elapsed_seconds, split, metric, value) rows, mirrored to
    TensorBoard (scalars tagged ``split/metric``, and images) when ``tensorboard_dir`` is given.

    ``resume_step``: rows and events logged after this step (by a run killed before its next
    checkpoint) are dropped, so a resumed run does not log those steps twice, and so is a row
    cut short; a new run (0) starts an empty log, whatever a process killed before its first
    checkpoint left there.
    ``enabled=False`` (processes other than rank 0) writes nothing.
    """

    def __init__(
        self,
        path: Path,
        resume_step: int = 0,
        enabled: bool = True,
        tensorboard_dir: Path | None = None,
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.tensorboard: Any = None
        if not enabled:
            return
        with naming_file(path):
            if path.exists():
                kept = [row for row in read_metrics(path) if _whole(row, resume_step)]
                tmp = path.with_name(f".{path.name}.tmp")
                try:
                    with open(tmp, "w", newline="") as handle:
                        writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
                        writer.writeheader()
                        writer.writerows(kept)
                    os.replace(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            if not path.exists():
                with open(path, "w", newline="") as handle:
                    csv.writer(handle).writerow(METRICS_COLUMNS)
        if tensorboard_dir is not None:
            self.tensorboard = _summary_writer(tensorboard_dir, resume_step)

    def write(self, step: int, elapsed: float, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with naming_file(self.path), open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            for name, value in values.items():
                writer.writerow([step, f"{elapsed:.1f}", split, name, repr(float(value))])
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{split}/{name}", float(value), step)
            self.tensorboard.flush()

    def image(self, step: int, tag: str, image: Tensor) -> None:
        """A uint8 (C, H, W) picture (a grid) for TensorBoard; nothing without TensorBoard."""
        if self.enabled and self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, step, dataformats="CHW")
            self.tensorboard.flush()

    @property
    def wants_images(self) -> bool:
        """Whether ``image`` keeps anything (so callers can skip drawing pictures)."""
        return self.enabled and self.tensorboard is not None

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


@contextmanager
def naming_file(path: Path) -> Iterator[None]:
    """An ``OSError`` inside the block (a full disk, whose error names no file when it comes
    from a flush) becomes one naming ``path``."""
    try:
        yield
    except OSError as error:
        raise OSError(f"cannot write {path}: {error.strerror or error}") from error


def _whole(row: dict[str, str | None], resume_step: int) -> bool:
    """A complete row (not cut short by a full disk or a crash) of a step up to
    ``resume_step``."""
    if any(not row.get(column) for column in METRICS_COLUMNS):
        return False
    return row["step"].isdigit() and int(row["step"]) <= resume_step


def _summary_writer(directory: Path, resume_step: int) -> Any:
    """TensorBoard's writer; events past ``resume_step`` from an earlier process are purged."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "--tensorboard needs the tensorboard package: pip install 'vqvae2[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(directory), purge_step=resume_step + 1)


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of a run's ``metrics.csv`` as dicts."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
