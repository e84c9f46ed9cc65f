"""Self-describing checkpoints: safetensors weights + JSON metadata, written atomically, no pickle.

Layout of one model kind inside a run folder::

    RUN_DIR/vqvae/step-00001000/model.safetensors      weights and buffers
                                optimizer.safetensors  optimizer tensors (when saved)
                                random.safetensors     each process's generator states (when saved)
                                meta.json              format, kind, step, full run config,
                                                       run facts (``RunFacts``), ...
    RUN_DIR/vqvae/latest                               name of the newest complete step folder

A step folder is written under a temporary name and renamed into place, then ``latest`` is
replaced atomically; a run killed at any moment leaves the previous checkpoint loadable. A write
that fails (a full disk) removes what it had written and leaves ``latest`` as it was.

Readers may run while a trainer writes: a reader holds the step folder it reads (a shared
``flock`` on the folder, ``held_checkpoint_dir``) and the trainer's pruning of old step folders
skips a held one, deleting it at a later save instead. So every read comes whole from one step.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import config_to_dict

FORMAT_NAME = "vqvae2-checkpoint"
FORMAT_VERSION = 2  # 2: the run's facts in a typed "run" section, no longer in "extra"
READABLE_VERSIONS = (1, 2)
LATEST = "latest"
META = "meta.json"
MODEL_WEIGHTS = "model.safetensors"
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
RANDOM_STATE = "random.safetensors"  # uint8 generator states keyed "<rank>/<generator>"
# Times a reader resolves ``latest`` again when a trainer deleted the folder it named before the
# reader could hold it; each time means the trainer moved ``latest`` on meanwhile.
HOLD_ATTEMPTS = 100


@dataclass(frozen=True)
class RunFacts:
    """What a checkpoint states about its run besides its config: meta.json's ``run`` section
    (format 2; format 1 kept them in ``extra``, where ``run_facts`` still finds them)."""

    data_path: str | None = None  # the absolute image source the model trained on
    preset: str | None = None  # the preset stage 1's config came from
    level: str | None = None  # a prior's level ("top", "middle", "bottom")


def run_facts(meta: dict[str, Any], step_dir: Path) -> RunFacts:
    """The ``RunFacts`` of checked metadata; ``ValueError`` for a malformed ``run`` section."""
    names = RunFacts.__dataclass_fields__
    if meta["format_version"] == 1:  # the facts were free-form extras then
        extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
        section = {name: extra[name] for name in names if isinstance(extra.get(name), str)}
    else:
        section = meta.get("run", {})
        if not isinstance(section, dict) or not set(section) <= set(names):
            raise ValueError(f"{step_dir / META}: 'run' must be an object with keys {list(names)}")
        if any(value is not None and not isinstance(value, str) for value in section.values()):
            raise ValueError(f"{step_dir / META}: each value of 'run' must be a string or null")
    return RunFacts(**section)


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read back without running any code from it."""

    path: Path  # the step folder
    kind: str  # e.g. "vqvae"
    step: int
    config: dict[str, Any]  # the run config as plain data
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any]  # the training loop's bookkeeping (elapsed time, skipped steps)
    # Each training process's generator states, by rank: {"cpu": uint8 (n,), "cuda": ...}; read
    # with the optimiser state; None when the checkpoint holds none (written before they were).
    random_state: dict[int, dict[str, Tensor]] | None = None
    facts: RunFacts = RunFacts()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``: a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON data."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"{param_id}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.split("/", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _flatten_random_state(states: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """Generator states by rank -> safetensors entries "<rank>/<generator>" (uint8)."""
    return {
        f"{rank}/{name}": state.detach().cpu().contiguous()
        for rank, named in states.items()
        for name, state in named.items()
    }


def _unflatten_random_state(
    tensors: dict[str, Tensor], processes: Any, step_dir: Path
) -> dict[int, dict[str, Tensor]]:
    """The states of ranks 0 .. processes-1, each with its CPU state; ``ValueError`` otherwise."""
    states: dict[int, dict[str, Tensor]] = {}
    for key, state in tensors.items():
        rank, _, name = key.partition("/")
        if not rank.isdigit() or not name or state.dtype != torch.uint8 or state.dim() != 1:
            raise ValueError(f"the random state in {step_dir} is malformed: entry {key!r}")
        states.setdefault(int(rank), {})[name] = state
    ranks = sorted(states)
    if not isinstance(processes, int) or ranks != list(range(processes)):
        raise ValueError(
            f"the random state in {step_dir} is malformed: ranks {ranks}, "
            f"meta.json says {processes!r} processes"
        )
    if any("cpu" not in named for named in states.values()):
        raise ValueError(f"the random state in {step_dir} is malformed: a rank lacks 'cpu'")
    return states


def save_checkpoint(
    kind_dir: Path,
    kind: str,
    step: int,
    config: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    random_state: dict[int, dict[str, Tensor]] | None = None,
    facts: RunFacts | None = None,
) -> Path:
    """Atomically write a checkpoint of ``model`` (and optimizer) as ``kind_dir/step-NNNNNNNN``.

    Args:
        kind_dir: folder of this model kind inside the run folder, e.g. ``RUN_DIR/vqvae``.
        kind: model kind stored in the metadata and checked on load.
        step: optimisation steps done.
        config: the run config dataclass (saved whole, so loading needs no flags).
        model: module whose ``state_dict`` is saved.
        optimizer: saved too when given, for ``--resume``.
        extra: the training loop's JSON-serialisable bookkeeping.
        facts: what the checkpoint states about its run (data source, preset, level).
        random_state: each training process's generator states by rank (uint8 tensors, e.g.
            ``{"cpu": torch.get_rng_state()}``), saved for an exact ``--resume``.
        keep: step folders kept; older ones are deleted after ``latest`` moves, except one
            a reader holds (``held_checkpoint_dir``), which a later save deletes.

    Returns:
        The step folder written.

    Raises:
        OSError: the write failed (a full disk, a read-only folder): one line naming the folder
            and the checkpoint kept; nothing of the failed write is left behind.
        ValueError: ``latest`` already names this step: that folder is never replaced, since a
            process killed between removing it and renaming its successor into place would
            leave ``latest`` naming nothing.
    """
    kind_dir = Path(kind_dir)
    name = f"step-{step:08d}"
    final = kind_dir / name
    tmp = kind_dir / f".{name}.tmp"
    kept = latest_name(kind_dir)
    if kept == name:
        raise ValueError(f"{final} is the latest checkpoint; it is not written twice")
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "step": step,
        "config": config_to_dict(config),
        "run": asdict(facts or RunFacts()),
        "extra": extra or {},
        "torch_version": torch.__version__,
    }
    try:
        kind_dir.mkdir(parents=True, exist_ok=True)
        _write_step_folder(tmp, meta, model, optimizer, random_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(kind_dir / LATEST, name + "\n")
        _sync(kind_dir)
    except (OSError, SafetensorError) as error:
        # ``latest`` still names the checkpoint kept; what this write made goes.
        for leftover in (tmp, final):
            shutil.rmtree(leftover, ignore_errors=True)
        still = f"the checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
        raise OSError(
            f"cannot write checkpoint {name} in {kind_dir}: {_reason(error)}; {still}"
        ) from error
    steps = sorted(p for p in kind_dir.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old != final:
            _remove_unless_held(old)
    return final


def _write_step_folder(
    folder: Path,
    meta: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    random_state: dict[int, dict[str, Tensor]] | None,
) -> None:
    """Write a step folder's files into ``folder`` (made afresh), each flushed to the disk:
    the weights, the optimiser and random states when given, and ``meta`` (completed with
    what those add) last."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / MODEL_WEIGHTS))
    _sync(folder / MODEL_WEIGHTS)
    if optimizer is not None:
        tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(folder / OPTIMIZER_WEIGHTS))
        _sync(folder / OPTIMIZER_WEIGHTS)
        meta["optimizer"] = optimizer_meta
    if random_state is not None:
        save_file(_flatten_random_state(random_state), str(folder / RANDOM_STATE))
        _sync(folder / RANDOM_STATE)
        meta["random_state_processes"] = len(random_state)
    write_text_atomic(folder / META, json.dumps(meta, indent=2))
    _sync(folder)


def _remove_unless_held(step_dir: Path) -> None:
    """Delete an old step folder unless a reader holds it (``held_checkpoint_dir``); a held
    folder stays until a later save prunes it."""
    try:
        descriptor = os.open(step_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(step_dir, ignore_errors=True)
    except BlockingIOError:
        return
    finally:
        os.close(descriptor)  # releases the lock


def _sync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk: after a machine crash a renamed step
    folder then holds whole files, and ``latest`` names a folder that exists."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _reason(error: Exception) -> str:
    """Why a write failed, in the operating system's words where it gave them (safetensors
    wraps them in its own text: "... I/O error: No space left on device (os error 28)")."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    found = re.search(r"os error (\d+)", str(error))
    return os.strerror(int(found.group(1))) if found else str(error)


def latest_name(kind_dir: Path) -> str | None:
    """The step folder ``kind_dir/latest`` names, or None when there is none (or unreadable)."""
    try:
        return (Path(kind_dir) / LATEST).read_text().strip() or None
    except OSError:
        return None


def _step_dir_named(path: Path, kind: str) -> tuple[Path, Path | None]:
    """The step folder ``path`` names, unchecked, and the ``latest`` file that named it (None
    when ``path`` is a step folder itself)."""
    if not path.exists():
        raise ValueError(f"checkpoint path {path} does not exist")
    if (path / META).is_file():
        return path, None
    kind_dir = path / kind if (path / kind / LATEST).is_file() else path
    latest = kind_dir / LATEST
    try:
        name = latest.read_text().strip()
    except OSError:
        raise ValueError(
            f"no {kind} checkpoint in {path} (expected {path / kind / LATEST})"
        ) from None
    return kind_dir / name, latest


def resolve_checkpoint_dir(path: Path, kind: str) -> Path:
    """Step folder for ``path``: a run folder, a kind folder, or a step folder itself. A
    trainer may delete it at any moment; read it inside ``held_checkpoint_dir``."""
    path = Path(path)
    step_dir, latest = _step_dir_named(path, kind)
    if not (step_dir / META).is_file():
        raise ValueError(f"checkpoint {step_dir} named by {latest} is missing or incomplete")
    return step_dir


@contextmanager
def held_checkpoint_dir(path: Path, kind: str) -> Iterator[Path]:
    """The step folder ``path`` resolves to (as ``resolve_checkpoint_dir``), held for the block
    with a shared ``flock``: a trainer's pruning skips it, so its files stay while they are read.

    A trainer may delete the folder that ``latest`` named before the reader holds it; then
    ``latest`` has moved on and it is resolved again.

    Raises:
        ValueError: no checkpoint, or ``latest`` names a folder that is missing or incomplete.
    """
    path = Path(path)
    for _ in range(HOLD_ATTEMPTS):
        step_dir, latest = _step_dir_named(path, kind)
        try:
            descriptor = os.open(step_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            descriptor = None
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH)  # waits while a pruning deletes it
                if (step_dir / META).is_file():
                    yield step_dir
                    return
            finally:
                os.close(descriptor)  # releases the hold
        if latest is None:
            raise ValueError(f"checkpoint {step_dir} is missing or incomplete")
        if latest_name(latest.parent) == step_dir.name:  # not a trainer moving on: broken
            raise ValueError(f"checkpoint {step_dir} named by {latest} is missing or incomplete")
    raise ValueError(f"the checkpoint in {path} moved on {HOLD_ATTEMPTS} times while opened")


def _checked_meta(step_dir: Path, kind: str) -> dict[str, Any]:
    """The JSON metadata of a step folder, checked to be a ``kind`` checkpoint of this
    format."""
    try:
        meta = json.loads((step_dir / META).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {step_dir / META}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{step_dir} is not a vqvae2 checkpoint")
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(
            f"{step_dir} has checkpoint format version {version}, "
            f"this vqvae2 reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if meta.get("kind") != kind:
        raise ValueError(f"{step_dir} holds a '{meta.get('kind')}' model, expected '{kind}'")
    for key, json_type, name in (("step", int, "an integer"), ("config", dict, "an object")):
        if key not in meta:
            raise ValueError(f"{step_dir / META} lacks '{key}'")
        if not isinstance(meta[key], json_type) or isinstance(meta[key], bool):
            raise ValueError(f"{step_dir / META}: '{key}' must be {name}")
    return meta


def read_meta(path: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """Step folder and checked JSON metadata of the ``kind`` checkpoint at ``path``.

    Raises:
        ValueError: missing files, another format, version or model kind.
    """
    with held_checkpoint_dir(path, kind) as step_dir:
        return step_dir, _checked_meta(step_dir, kind)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file (no code runs from it); ``ValueError`` naming it when unreadable."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def read_checkpoint(path: Path, kind: str, with_optimizer: bool = False) -> Checkpoint:
    """Read and check a checkpoint of ``kind``, weights included (with ``with_optimizer``, the
    optimiser and random state too: what ``--resume`` needs).

    Raises:
        ValueError: as ``read_meta``, unreadable weights, malformed optimiser metadata or random
            state.
    """
    with held_checkpoint_dir(path, kind) as step_dir:
        return _read_checkpoint_at(step_dir, kind, with_optimizer)


def _read_checkpoint_at(step_dir: Path, kind: str, with_optimizer: bool) -> Checkpoint:
    meta = _checked_meta(step_dir, kind)
    model_state = _read_tensors(step_dir / MODEL_WEIGHTS)
    optimizer_state, random_state = None, None
    if with_optimizer and "random_state_processes" in meta:
        random_state = _unflatten_random_state(
            _read_tensors(step_dir / RANDOM_STATE), meta["random_state_processes"], step_dir
        )
    if with_optimizer and "optimizer" in meta:
        tensors = _read_tensors(step_dir / OPTIMIZER_WEIGHTS)
        try:
            optimizer_state = _unflatten_optimizer(tensors, meta["optimizer"])
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"the optimiser state in {step_dir} is malformed ({type(error).__name__}: {error})"
            ) from None
    return Checkpoint(
        path=step_dir,
        kind=kind,
        step=meta["step"],
        config=meta["config"],
        model_state=model_state,
        optimizer_state=optimizer_state,
        extra=meta.get("extra", {}),
        random_state=random_state,
        facts=run_facts(meta, step_dir),
    )
