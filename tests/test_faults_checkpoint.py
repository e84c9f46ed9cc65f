"""Faults at the checkpoint files: a full disk during a write, corrupt or foreign checkpoints and
code stores, and proof that nothing is unpickled (docs/faults.md)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

import vqvae2.checkpoint as checkpoint_module
from vqvae2.checkpoint import LATEST, MODEL_WEIGHTS, OPTIMIZER_WEIGHTS, read_checkpoint
from vqvae2.cli import main

from .conftest import one_line_error

TINY = ["--config", "tiny", "model.image_size=16", "--quiet", "train.val_every=1000"]
DISK_SIZE = "4m"  # the size-limited folder: room for the run and two checkpoints (~0.3 MB each)
ROOM_LEFT = 16 * 1024  # bytes left free: the log's rows fit, a checkpoint's weights do not


def train(data: Path, run: Path, steps: int, resume: bool = False) -> int:
    """``vqvae2 train-vqvae`` in this process, a checkpoint every 2 steps."""
    args = ["--resume", "--quiet"] if resume else [*TINY, "train.checkpoint_every=2"]
    return main(
        ["train-vqvae", "--data", str(data), "--out", str(run), "--max-steps", str(steps)] + args
    )


def latest_name(run: Path) -> str:
    return (run / "vqvae" / LATEST).read_text().strip()


def leftovers(run: Path) -> list[str]:
    """Temporary files and folders of unfinished writes in the checkpoint folder."""
    return sorted(p.name for p in (run / "vqvae").iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs at ``tmp_path/disk``, or None where this process may not mount one
    (not root, or no mount permission in a container)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_last(
    small_disk, npz_data, capsys
):
    """On a real full disk (a small tmpfs) the checkpoint write fails with one line naming the
    folder, the previous checkpoint stays loadable and named by ``latest``, no temporary folder
    is left, and the run resumes once there is room."""
    if small_disk is None:
        pytest.skip("no tmpfs can be mounted here (needs root); the write-hook tests cover this")
    run = small_disk / "run"
    assert train(npz_data, run, 2) == 0
    stats = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(bytes(stats.f_bavail * stats.f_frsize - ROOM_LEFT))
    capsys.readouterr()
    line = one_line_error(capsys, train(npz_data, run, 4, resume=True))
    assert line == (
        f"cannot write checkpoint step-00000004 in {run / 'vqvae'}: No space left on device; "
        "the checkpoint step-00000002 is kept"
    )
    assert latest_name(run) == "step-00000002"
    assert read_checkpoint(run, "vqvae", with_optimizer=True).step == 2
    assert leftovers(run) == []
    filler.unlink()
    assert train(npz_data, run, 4, resume=True) == 0
    assert latest_name(run) == "step-00000004"


def _fail_safetensors_write(suffix: str):
    """A ``save_file`` that fails as safetensors does on a full disk, for one file."""
    original = checkpoint_module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if filename.endswith(suffix):
            Path(filename).write_bytes(b"partial")  # as if some bytes went out first
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return original(tensors, filename, *args, **kwargs)

    return save_file


def _fail_fsync(name: str):
    """An ``os.fsync`` that fails with ENOSPC for the file named ``name`` (its written bytes
    never reach the disk)."""
    original = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(fd)

    return fsync


@pytest.mark.parametrize(
    "failing", [MODEL_WEIGHTS, OPTIMIZER_WEIGHTS, ".meta.json.tmp", ".latest.tmp"]
)
def test_a_write_that_fails_anywhere_in_a_checkpoint_keeps_the_last(
    tmp_path, npz_data, capsys, monkeypatch, failing
):
    """Where no tmpfs can be mounted: the write fails at each file of the checkpoint (weights,
    optimiser, metadata, ``latest``) as it does on a full disk; one line naming the folder, the
    previous checkpoint loadable and named by ``latest``, nothing half-written left."""
    run = tmp_path / "run"
    assert train(npz_data, run, 2) == 0
    if failing.endswith(".safetensors"):
        monkeypatch.setattr(checkpoint_module, "save_file", _fail_safetensors_write(failing))
    else:
        monkeypatch.setattr(os, "fsync", _fail_fsync(failing))
    capsys.readouterr()
    line = one_line_error(capsys, train(npz_data, run, 4, resume=True))
    assert line.startswith(f"cannot write checkpoint step-00000004 in {run / 'vqvae'}: ")
    assert "No space left on device" in line and line.endswith("step-00000002 is kept")
    assert latest_name(run) == "step-00000002"
    assert read_checkpoint(run, "vqvae", with_optimizer=True).step == 2
    assert leftovers(run) == []
    assert not (run / "vqvae" / "step-00000004").exists()


def test_the_checkpoint_latest_names_is_never_replaced_in_place(tmp_path, npz_data, monkeypatch):
    """A run ending on a periodic checkpoint, or resumed at its end, writes no second checkpoint
    of that step: replacing the folder ``latest`` names would leave a moment when it names
    nothing (a kill -9 trial found a run killed there unloadable)."""
    import vqvae2.loop

    written = []
    save = vqvae2.loop.save_checkpoint

    def counting_save(kind_dir, kind, step, *args, **kwargs):
        written.append(step)
        return save(kind_dir, kind, step, *args, **kwargs)

    monkeypatch.setattr(vqvae2.loop, "save_checkpoint", counting_save)
    run = tmp_path / "run"
    assert train(npz_data, run, 4) == 0
    assert written == [2, 4]
    assert train(npz_data, run, 4, resume=True) == 0
    assert written == [2, 4]
    checkpoint = read_checkpoint(run, "vqvae")
    with pytest.raises(ValueError, match="step-00000004 is the latest checkpoint"):
        save(run / "vqvae", "vqvae", 4, None, None)
    assert read_checkpoint(run, "vqvae").model_state.keys() == checkpoint.model_state.keys()
