"""Readers while a trainer writes: loading, sampling and compressing from a run whose trainer
checkpoints every step and prunes old step folders (keep=2) must never fail or mix two steps.

The race needs a trainer to save twice while a reader is between resolving ``latest`` and
opening the weights, which is rare; to hit it every time, a reader thread's weights read
(``checkpoint.load_file``) first waits until the trainer has saved ``KEEP`` more checkpoints."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vqvae2 import checkpoint, loop
from vqvae2.checkpoint import read_checkpoint, read_meta, save_checkpoint
from vqvae2.compress import compress_files
from vqvae2.config import PriorRunConfig, VQVAERunConfig, load_config
from vqvae2.run import Run, load_hierarchy
from vqvae2.sample import sample_from_run
from vqvae2.train import extract_codes, train_prior
from vqvae2.vqvae import VQVAE2

from .conftest import tiny_config, write_npz

KEEP = 2
WAIT_SECONDS = 2.0  # the longest a read waits for saves


class Saves:
    """Counts checkpoints saved; a reader thread's weights read waits for ``KEEP`` more."""

    def __init__(self) -> None:
        self.count = 0
        self.finished = False  # no more saves come: reads wait no longer
        self.changed = threading.Condition()

    def saved(self) -> None:
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def finish(self) -> None:
        with self.changed:
            self.finished = True
            self.changed.notify_all()

    def wait_for_more(self, more: int) -> None:
        with self.changed:
            target = self.count + more
            self.changed.wait_for(
                lambda: self.count >= target or self.finished, timeout=WAIT_SECONDS
            )


@pytest.fixture
def saves(monkeypatch) -> Saves:
    """The trainer's saves counted (through ``loop``'s ``save_checkpoint``, or ``saves.saved``
    called by the test), and every weights read of a thread other than the trainer's delayed
    until ``KEEP`` more checkpoints are saved: the step folder it resolved is then pruned
    unless the reader holds it."""
    counter = Saves()
    read, save = checkpoint.load_file, loop.save_checkpoint

    def late_read(path, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            counter.wait_for_more(KEEP)
        return read(path, *args, **kwargs)

    def counted_save(*args, **kwargs):
        saved = save(*args, **kwargs)
        counter.saved()
        return saved

    monkeypatch.setattr(checkpoint, "load_file", late_read)
    monkeypatch.setattr(loop, "save_checkpoint", counted_save)
    return counter


class Readers:
    """A thread that calls ``read`` until stopped, keeping every error and each result."""

    def __init__(self, read) -> None:
        self.read, self.results, self.errors = read, [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.results.append(self.read())
            except Exception as error:  # noqa: BLE001  (every failure is the finding)
                self.errors.append(f"{type(error).__name__}: {error}")

    def __enter__(self) -> Readers:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def marked_model(step: int) -> nn.Module:
    """A small module whose every weight equals ``step``: a read shows which step it holds."""
    model = nn.Linear(64, 64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float(step))
    return model


def test_readers_get_whole_checkpoints_while_a_trainer_saves_and_prunes(tmp_path, saves):
    kind_dir = tmp_path / "prior-top"
    config = VQVAERunConfig(model=tiny_config())
    save_checkpoint(kind_dir, "prior-top", 1, config, marked_model(1), keep=KEEP)

    def read() -> tuple[int, float, int]:
        loaded = read_checkpoint(tmp_path, "prior-top")
        step_dir, meta = read_meta(tmp_path, "prior-top")
        return loaded.step, float(loaded.model_state["weight"][0, 0]), meta["step"]

    steps = 25
    with Readers(read) as readers:
        for step in range(2, steps + 1):
            save_checkpoint(kind_dir, "prior-top", step, config, marked_model(step), keep=KEEP)
            saves.saved()
            time.sleep(0.002)  # a trainer's step between saves
        saves.finish()
    assert readers.errors == [], readers.errors[:3]
    assert len(readers.results) >= 5
    for step, weight, _ in readers.results:
        assert weight == step  # metadata and weights of one step, never two
    assert max(step for _, _, step in readers.results) > 2
    # A folder a reader held was skipped by the pruning; the next save deletes it.
    save_checkpoint(kind_dir, "prior-top", steps + 1, config, marked_model(steps + 1), keep=KEEP)
    assert sorted(path.name for path in kind_dir.glob("step-*")) == [
        f"step-{steps:08d}",
        f"step-{steps + 1:08d}",
    ]


def test_a_step_folder_named_by_latest_but_gone_is_still_an_error(tmp_path):
    kind_dir = tmp_path / "prior-top"
    config = VQVAERunConfig(model=tiny_config())
    save_checkpoint(kind_dir, "prior-top", 1, config, marked_model(1))
    (kind_dir / "latest").write_text("step-00000007\n")  # no trainer moves it on
    with pytest.raises(ValueError, match="step-00000007 named by .* is missing or incomplete"):
        read_checkpoint(tmp_path, "prior-top")


@pytest.fixture(scope="module")
def run_with_priors(tmp_path_factory) -> Path:
    """A tiny run: a randomly initialised 16x16 VQ-VAE, its codes, and both priors trained for
    two steps."""
    root = tmp_path_factory.mktemp("readers")
    data = write_npz(root / "blobs.npz")
    run = root / "run"
    config = load_config(VQVAERunConfig, "tiny", ["model.image_size=16"])
    save_checkpoint(
        run / "vqvae", "vqvae", 1, config, VQVAE2(config.model), extra={"data_path": str(data)}
    )
    extract_codes(Run.open(run), data, progress=False)
    for level in ("top", "bottom"):
        prior = load_config(PriorRunConfig, f"prior-{level}-tiny", ["train.max_steps=2"])
        train_prior(Run.open(run), level, prior, progress=False)
    return run


@pytest.mark.slow
def test_sample_and_compress_while_the_top_prior_checkpoints_every_step(
    run_with_priors, tmp_path, saves
):
    from .test_codec import blob_images, write_pngs

    run = run_with_priors
    images = write_pngs(tmp_path / "images", blob_images(2))
    calls = iter(range(1_000_000))

    def read() -> int:
        call = next(calls)
        if call % 3 == 0:
            sampled = sample_from_run(Run.open(run), 2, progress=False)
            assert sampled.images.shape == (2, 1, 16, 16)
        elif call % 3 == 1:
            compress_files(Run.open(run), images, tmp_path / f"c{call}", labels=[0, 1])
        else:
            load_hierarchy(run)
        return call

    steps = 40
    config = load_config(
        PriorRunConfig,
        "prior-top-tiny",
        [f"train.max_steps={2 + steps}", "train.checkpoint_every=1"],
    )
    with Readers(read) as readers:
        train_prior(Run.open(run), "top", config, resume=True, progress=False)
        saves.finish()
    assert readers.errors == [], readers.errors[:3]
    assert readers.results[:2] == [0, 1]  # a sample and a compression at least, both whole
    assert read_meta(run, "prior-top")[1]["step"] == 2 + steps
