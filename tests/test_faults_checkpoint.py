"""Faults at the checkpoint files: a full disk during a write, corrupt or foreign checkpoints and
code stores, and proof that nothing is unpickled (docs/faults.md)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import vqvae2.checkpoint as checkpoint_module
from vqvae2.checkpoint import LATEST, MODEL_WEIGHTS, OPTIMIZER_WEIGHTS, read_checkpoint
from vqvae2.cli import main
from vqvae2.codes import CodeStoreWriter

from .conftest import TINY_CLI, one_line_error, train_tiny_run

VAL_RARELY = ("train.val_every=1000",)  # no validation in these short runs
TINY = [*TINY_CLI, *VAL_RARELY]
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


def test_a_disk_full_from_the_start_of_a_resume_is_one_line_naming_the_file(
    small_disk, npz_data, capsys
):
    """Not a byte left: the first write of the resumed run that needs room (its log; the
    config is rewritten in the pages it had) fails with one line naming the file, and the
    checkpoint stays as it was."""
    if small_disk is None:
        pytest.skip("no tmpfs can be mounted here (needs root); the write-hook tests cover this")
    run = small_disk / "run"
    assert train(npz_data, run, 2) == 0
    stats = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(bytes(stats.f_bavail * stats.f_frsize))
    capsys.readouterr()
    line = one_line_error(capsys, train(npz_data, run, 4, resume=True))
    assert line == f"cannot write {run / 'metrics.csv'}: No space left on device"
    assert read_checkpoint(run, "vqvae", with_optimizer=True).step == 2


def test_a_log_or_config_write_that_fails_is_one_line_naming_the_file(
    tmp_path, npz_data, capsys, monkeypatch
):
    """A full disk at an append to metrics.csv or at config.yaml (errors that name no file):
    one line naming it."""
    import builtins

    import vqvae2.logs
    import vqvae2.loop

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_for_a_full_disk(file, mode="r", *args, **kwargs):
        if "a" in mode:
            raise full
        return builtins.open(file, mode, *args, **kwargs)

    def save_yaml_on_a_full_disk(config, path):
        raise full

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(vqvae2.logs, "open", open_for_a_full_disk, raising=False)
        line = one_line_error(capsys, train(npz_data, run, 2))
    assert line == f"cannot write {run / 'metrics.csv'}: No space left on device"
    monkeypatch.setattr(vqvae2.loop, "save_yaml", save_yaml_on_a_full_disk)
    line = one_line_error(capsys, train(npz_data, tmp_path / "other", 2))
    assert line == f"cannot write {tmp_path / 'other' / 'config.yaml'}: No space left on device"


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


def test_every_file_and_folder_of_a_checkpoint_reaches_the_disk_before_it_is_named(
    tmp_path, npz_data, monkeypatch
):
    """What a machine crash (not a kill) could lose: the weights, the metadata and the step
    folder's entries are flushed before the folder is renamed into place, and the checkpoint
    folder's entries (the rename, ``latest``) after."""
    synced: list[str] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return fsync(descriptor)

    renamed_at: dict[str, int] = {}

    def recording_replace(source, target):
        renamed_at[Path(target).name] = len(synced)
        return replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    run = tmp_path / "run"
    assert train(npz_data, run, 2) == 0
    kind_dir, tmp = run / "vqvae", run / "vqvae" / ".step-00000002.tmp"
    before_rename = set(synced[: renamed_at["step-00000002"]])
    assert {
        str(tmp / MODEL_WEIGHTS),
        str(tmp / OPTIMIZER_WEIGHTS),
        str(tmp / ".meta.json.tmp"),
        str(tmp),
    } <= before_rename
    assert str(kind_dir) in synced[renamed_at[LATEST] :]


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


# ----------------------------------------------------------------------------------------------
# Corrupt and foreign checkpoints and code stores


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    """A tiny run: stage 1 (2 steps), its codes and a top prior (2 steps)."""
    root = tmp_path_factory.mktemp("complete")
    top = dict(prior_steps=2, prior_levels=("top",))
    return train_tiny_run(root, vqvae_steps=2, **top, overrides=VAL_RARELY, preset="tiny")


def edit_meta(step_dir: Path, change) -> None:
    meta = json.loads((step_dir / "meta.json").read_text())
    change(meta)
    (step_dir / "meta.json").write_text(json.dumps(meta))


def edit_weights(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


VQ = "vqvae/step-00000002"
PRIOR = "prior-top/step-00000002"
STORE = "codes/train"
RECONSTRUCT = ["reconstruct", "RUN", "--data", "DATA", "--out", "RUN/grid.png"]
RESUME_VQVAE = ["train-vqvae", "--data", "DATA", "--out", "RUN", "--resume", "--max-steps", "3"]
RESUME_PRIOR = ["train-prior", "RUN", "--level", "top", "--resume", "--max-steps", "3"]
NEW_PRIOR = ["train-prior", "RUN", "--level", "bottom", "--max-steps", "1"]


def _meta_key_removed(key):
    return lambda run: edit_meta(run / VQ, lambda meta: meta.pop(key))


def _pickled_npy(path: Path) -> None:
    np.save(path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)


CORRUPTIONS = {
    "another format version": (
        lambda run: edit_meta(run / VQ, lambda meta: meta.update(format_version=99)),
        RECONSTRUCT,
        f"{VQ} has checkpoint format version 99, this vqvae2 reads versions 1, 2",
    ),
    "another model kind": (
        lambda run: shutil.copytree(run / PRIOR, run / VQ, dirs_exist_ok=True),
        RECONSTRUCT,
        f"{VQ} holds a 'prior-top' model, expected 'vqvae'",
    ),
    "not a checkpoint's metadata": (
        lambda run: (run / VQ / "meta.json").write_text('{"hello": 1}'),
        RECONSTRUCT,
        f"{VQ} is not a vqvae2 checkpoint",
    ),
    "metadata that is not JSON": (
        lambda run: (run / VQ / "meta.json").write_text("{not json"),
        RECONSTRUCT,
        f"cannot read {VQ}/meta.json: Expecting property name",
    ),
    "metadata without the step": (
        _meta_key_removed("step"),
        RECONSTRUCT,
        f"{VQ}/meta.json lacks 'step'",
    ),
    "metadata without the config": (
        _meta_key_removed("config"),
        RECONSTRUCT,
        f"{VQ}/meta.json lacks 'config'",
    ),
    "a config with an unknown key": (
        lambda run: edit_meta(run / VQ, lambda meta: meta["config"]["model"].update(colour=3)),
        RECONSTRUCT,
        "unknown config key 'model.colour'",
    ),
    "truncated weights": (
        lambda run: truncate(run / VQ / MODEL_WEIGHTS),
        RECONSTRUCT,
        f"cannot read {VQ}/{MODEL_WEIGHTS}: ",
    ),
    "a pickle in place of the weights": (
        lambda run: torch.save({"x": torch.zeros(2)}, run / VQ / MODEL_WEIGHTS),
        RECONSTRUCT,
        f"cannot read {VQ}/{MODEL_WEIGHTS}: ",
    ),
    "an extra tensor": (
        lambda run: edit_weights(
            run / VQ / MODEL_WEIGHTS, lambda t: t.update({"extra.weight": torch.zeros(2)})
        ),
        RECONSTRUCT,
        f"weights in {VQ} do not fit the model: unexpected ['extra.weight']",
    ),
    "a missing tensor": (
        lambda run: edit_weights(run / VQ / MODEL_WEIGHTS, lambda t: t.pop(sorted(t)[0])),
        RECONSTRUCT,
        f"weights in {VQ} do not fit the model: missing [",
    ),
    "a tensor of another shape": (
        lambda run: edit_weights(
            run / VQ / MODEL_WEIGHTS,
            lambda t: t.update({name: torch.zeros(3) for name in sorted(t)[:1]}),
        ),
        RECONSTRUCT,
        "has shape (3,), expected",
    ),
    "latest naming a missing step": (
        lambda run: (run / "vqvae" / LATEST).write_text("step-00000099\n"),
        RECONSTRUCT,
        "vqvae/step-00000099 named by",
    ),
    "truncated optimiser state": (
        lambda run: truncate(run / VQ / OPTIMIZER_WEIGHTS),
        RESUME_VQVAE,
        f"cannot read {VQ}/{OPTIMIZER_WEIGHTS}: ",
    ),
    "optimiser state missing a tensor": (
        lambda run: edit_weights(run / VQ / OPTIMIZER_WEIGHTS, lambda t: t.pop(sorted(t)[0])),
        RESUME_VQVAE,
        f"the optimiser state in {VQ} does not fit the model: ",
    ),
    "optimiser state of another shape": (
        lambda run: edit_weights(
            run / PRIOR / OPTIMIZER_WEIGHTS,
            lambda t: t.update({name: torch.zeros(3) for name in sorted(t) if "exp_avg" in name}),
        ),
        RESUME_PRIOR,
        f"the optimiser state in {PRIOR} does not fit the model: ",
    ),
    "a code store of another format version": (
        lambda run: edit_meta(run / STORE, lambda meta: meta.update(format_version=2)),
        NEW_PRIOR,
        f"{STORE} is not a vqvae2 code store of version 1",
    ),
    "a code store's metadata without its levels": (
        lambda run: edit_meta(run / STORE, lambda meta: meta.pop("levels")),
        NEW_PRIOR,
        f"{STORE}/meta.json lacks 'levels'",
    ),
    "a truncated code file": (
        lambda run: truncate(run / STORE / "top.npy"),
        NEW_PRIOR,
        f"the code store {STORE} is truncated or corrupt",
    ),
    "a pickled code file": (
        lambda run: _pickled_npy(run / STORE / "labels.npy"),
        NEW_PRIOR,
        f"the code store {STORE} is truncated or corrupt: ",
    ),
    "codes of another VQ-VAE": (
        lambda run: _foreign_store(run / STORE),
        NEW_PRIOR,
        f"the codes in {STORE} were not made by this VQ-VAE; extract them again",
    ),
    "codes beyond the codebook": (
        lambda run: _codes_beyond_codebook(run / STORE),
        NEW_PRIOR,
        f"the code store {STORE} holds codes beyond its codebook of 16",
    ),
}


def _foreign_store(directory: Path) -> None:
    """A consistent store of 3x3 and 5x5 code maps in place of the run's 2x2 and 4x4 ones."""
    count = json.loads((directory / "meta.json").read_text())["count"]
    shutil.rmtree(directory)
    writer = CodeStoreWriter(directory, count, ["top", "bottom"], [3, 5], 16, {"num_classes": 3})
    writer.close()


def _codes_beyond_codebook(directory: Path) -> None:
    codes = np.load(directory / "bottom.npy")
    codes[:, 0, 0] = 16  # K = 16: codes are 0..15
    np.save(directory / "bottom.npy", codes)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_or_foreign_file_is_one_line_naming_it(complete_run, tmp_path, capsys, case):
    corrupt, command, fragment = CORRUPTIONS[case]
    source, data = complete_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    corrupt(run)
    argv = [str(data) if w == "DATA" else w.replace("RUN", str(run)) for w in command]
    capsys.readouterr()
    line = one_line_error(capsys, main([*argv, "--quiet"] if argv[0] != "reconstruct" else argv))
    assert (
        fragment.replace(VQ, str(run / VQ))
        .replace(PRIOR, str(run / PRIOR))
        .replace(STORE, str(run / STORE))
        in line
    ), line


def test_no_code_path_unpickles(complete_run, tmp_path, monkeypatch):
    """With every unpickler refusing to run (pickle's, torch.load, numpy's allow_pickle), the
    commands that read checkpoints, optimiser states and code stores all still work."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for owner, name in (
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ):
        monkeypatch.setattr(owner, name, refuse)
    numpy_load = np.load

    def load_without_pickle(*args, allow_pickle=False, **kwargs):
        assert not allow_pickle, "something asked numpy to unpickle"
        return numpy_load(*args, allow_pickle=False, **kwargs)

    monkeypatch.setattr(np, "load", load_without_pickle)
    source, data = complete_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    commands = [
        ["reconstruct", str(run), "--data", str(data), "--out", str(tmp_path / "grid.png")],
        ["train-vqvae", "--data", str(data), "--out", str(run), "--resume", "--max-steps", "3"],
        ["extract-codes", str(run), "--data", str(data), "--quiet"],
        ["train-prior", str(run), "--level", "top", "--resume", "--max-steps", "3", "--quiet"],
    ]
    for command in commands:
        assert main(command) == 0, command
    assert read_checkpoint(run / "prior-top", "prior-top", with_optimizer=True).step == 3
