"""The typed run: ``Run.open``, the run facts of checkpoint format 2, and old runs (format 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vqvae2.checkpoint import FORMAT_VERSION, RunFacts, read_checkpoint, read_meta
from vqvae2.run import Run
from vqvae2.sample import sample_from_run
from vqvae2.train import train_prior, train_vqvae

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def old_run(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run folder written by vqvae2 before format 2, and its data."""
    shutil.copytree(FIXTURES / "run-format-1", tmp_path / "run")
    return tmp_path / "run", FIXTURES / "run-format-1-blobs.npz"


def test_an_old_run_opens_with_its_facts(old_run):
    run_dir, _ = old_run
    assert read_meta(run_dir, "vqvae")[1]["format_version"] == 1
    run = Run.open(run_dir)
    assert run.data_path == Path("/tmp/i24old/blobs.npz") and run.preset == "tiny"
    assert run.level_names == ("top", "bottom") and run.num_classes == 3
    assert run.vqvae_step == 2 and run.config.model.hidden_channels == 8
    assert run.level_index("bottom") == 1 and run.prior_dir("top") == run_dir / "prior-top"
    assert read_checkpoint(run_dir, "prior-top").facts == RunFacts(level="top")
    with pytest.raises(ValueError, match="there is no 'middle' level"):
        run.load_prior("middle")


def test_an_old_run_samples(old_run):
    run = Run.open(old_run[0])
    result = sample_from_run(run, 4, classes=[0, 2], seed=1, progress=False)
    assert result.images.shape == (4, 1, 16, 16) and result.images.dtype == torch.uint8
    assert result.labels.tolist() == [0, 0, 2, 2]
    assert [codes.shape for codes in result.codes] == [(4, 2, 2), (4, 4, 4)]
    assert all(int(codes.max()) < 16 for codes in result.codes)


def test_an_old_run_resumes_into_the_new_format(old_run):
    """Resuming continues from the old checkpoints with the saved config (read there once) and
    writes format 2, the facts of format 1's ``extra`` carried into the ``run`` section."""
    run_dir, data = old_run
    result = train_prior(Run.open(run_dir), "top", None, resume=True, max_steps=3, progress=False)
    assert result.step == 3
    _, meta = read_meta(run_dir, "prior-top")
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["run"] == {"data_path": None, "preset": None, "level": "top"}
    assert set(meta["extra"]) == {"elapsed_seconds", "skipped_nonfinite"}
    assert meta["config"]["prior"]["hidden_channels"] == 8  # the saved config, not a preset's
    train_vqvae(None, data, run_dir, resume=True, max_steps=3, progress=False)
    run = Run.open(run_dir)
    assert run.vqvae_step == 3 and run.preset == "tiny"  # kept from format 1's extra
    assert run.data_path == data.resolve()


def test_malformed_run_facts_are_refused(old_run):
    run_dir, data = old_run
    train_vqvae(None, data, run_dir, resume=True, max_steps=3, progress=False)
    step_dir, _ = read_meta(run_dir, "vqvae")
    meta_path = step_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["run"]["preset"] = 7
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="each value of 'run' must be a string or null"):
        Run.open(run_dir)
    meta["run"] = {"colour": "red"}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'run' must be an object with keys"):
        Run.open(run_dir)


def test_a_new_run_needs_a_config(tmp_path, npz_data):
    with pytest.raises(ValueError, match="a new run needs a config"):
        train_vqvae(None, npz_data, tmp_path / "run", progress=False)


def test_a_prior_command_reads_the_run_s_metadata_once(tmp_path, npz_data, monkeypatch, capsys):
    """train-prior opens the run once (stage 1's metadata read once) and, resumed, reads the
    prior's own checkpoint once: the config it continues comes from there alone."""
    import vqvae2.checkpoint
    from vqvae2.cli import main

    run = tmp_path / "run"
    tiny = ["--config", "tiny", "model.image_size=16", "--quiet"]
    assert main(["train-vqvae", *tiny, "--data", str(npz_data), "--out", str(run)]) == 0
    assert main(["extract-codes", str(run), "--quiet"]) == 0
    reads: list[str] = []
    checked_meta = vqvae2.checkpoint._checked_meta

    def counted(step_dir, kind):
        reads.append(kind)
        return checked_meta(step_dir, kind)

    monkeypatch.setattr(vqvae2.checkpoint, "_checked_meta", counted)
    prior = ["train-prior", str(run), "--level", "top", "--quiet"]
    assert main([*prior, "--max-steps", "2"]) == 0
    assert reads == ["vqvae"]
    reads.clear()
    assert main([*prior, "--resume", "--max-steps", "3"]) == 0
    assert sorted(reads) == ["prior-top", "vqvae"]
