"""Exact resume with random draws: a run stopped at a checkpoint and resumed ends with the weights
and optimiser state of the uninterrupted run, bit for bit, when dropout is on (a prior, the
classifier, stage 1's level dropout), and checkpoints hold each process's generator states
(docs/faults.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqvae2.checkpoint import (
    META,
    MODEL_WEIGHTS,
    OPTIMIZER_WEIGHTS,
    RANDOM_STATE,
    read_checkpoint,
)
from vqvae2.cli import main
from vqvae2.distributed import DistributedContext
from vqvae2.random_state import derived_random_seed, own_random_state, restore_random_state

from .conftest import TINY_CLI, rewind

STEPS, STOPPED_AT = 6, 4  # every run here: 6 steps, a checkpoint every 2, resumed from step 4
EVERY_STEP = ["--quiet", "train.checkpoint_every=2", "train.log_every=1", "train.val_every=3"]


def assert_bit_identical(first: Path, second: Path) -> None:
    """Two step folders hold the same weights and optimiser state, bit for bit."""
    for name in (MODEL_WEIGHTS, OPTIMIZER_WEIGHTS):
        ours, theirs = load_file(str(first / name)), load_file(str(second / name))
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key}"


def stopped_and_resumed(
    tmp_path: Path, fresh: list, resume: list, kind_dir: str, base: Path | None = None
) -> tuple[Path, Path]:
    """The final step folders of a run of ``STEPS`` steps and of the same run stopped after
    step ``STOPPED_AT`` and resumed (``RUN`` in the argv stands for the run folder)."""

    def argv(words: list, run: Path) -> list[str]:
        return [str(run) if word == "RUN" else str(word) for word in words]

    straight = tmp_path / "straight"
    if base is not None:
        shutil.copytree(base, straight)
    assert main(argv([*fresh, "--max-steps", str(STEPS), *EVERY_STEP], straight)) == 0
    resumed = rewind(straight, tmp_path / "resumed", kind_dir, STOPPED_AT)
    assert main(argv([*resume, "--resume", "--quiet"], resumed)) == 0
    last = f"step-{STEPS:08d}"
    return straight / kind_dir / last, resumed / kind_dir / last


def test_stage_one_with_level_dropout_resumes_bit_for_bit(tmp_path, npz_data):
    """Level dropout draws from the global generator: restored, the draws continue."""
    fresh = ["train-vqvae", "--config", "tiny", "model.image_size=16", "model.level_dropout=0.5"]
    data = ["--data", npz_data, "--out", "RUN"]
    straight, resumed = stopped_and_resumed(
        tmp_path, [*fresh, *data], ["train-vqvae", *data], "vqvae"
    )
    assert_bit_identical(resumed, straight)


def test_prior_with_dropout_resumes_bit_for_bit(tmp_path, npz_data):
    base = tmp_path / "base"
    stage_one = ["train-vqvae", *TINY_CLI]
    assert main([*stage_one, "--data", str(npz_data), "--out", str(base), "--max-steps", "2"]) == 0
    assert main(["extract-codes", str(base), "--data", str(npz_data), "--quiet"]) == 0
    prior = ["train-prior", "RUN", "--level", "top"]
    straight, resumed = stopped_and_resumed(
        tmp_path, [*prior, "prior.dropout=0.1"], prior, "prior-top", base=base
    )
    assert_bit_identical(resumed, straight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prior_with_dropout_resumes_bit_for_bit_on_cuda(tmp_path, npz_data):
    """On a GPU dropout draws from the CUDA generator, whose state is saved and restored too."""
    base = tmp_path / "base"
    stage_one = ["train-vqvae", *TINY_CLI]
    assert main([*stage_one, "--data", str(npz_data), "--out", str(base), "--max-steps", "2"]) == 0
    assert main(["extract-codes", str(base), "--data", str(npz_data), "--quiet"]) == 0
    prior = ["train-prior", "RUN", "--level", "top", "--device", "cuda"]
    straight, resumed = stopped_and_resumed(
        tmp_path, [*prior, "prior.dropout=0.1"], prior, "prior-top", base=base
    )
    assert "0/cuda" in load_file(str(straight / RANDOM_STATE))
    assert_bit_identical(resumed, straight)


def test_classifier_with_dropout_resumes_bit_for_bit(tmp_path, npz_data):
    command = ["train-classifier", "--data", npz_data, "--out", "RUN"]
    preset = ["--config", "classifier-tiny", "model.image_size=16", "model.dropout=0.3"]
    straight, resumed = stopped_and_resumed(tmp_path, [*command, *preset], command, ".")
    assert_bit_identical(resumed, straight)


def test_a_checkpoint_holds_the_generator_states_of_its_step(tmp_path, npz_data):
    """A one-process CPU run's checkpoint holds its CPU generator state as uint8 in
    random.safetensors, counted in meta.json: the state after the run's draws, not a fresh
    seed's."""
    run = tmp_path / "run"
    command = ["train-classifier", "--data", str(npz_data), "--out", str(run), "--quiet"]
    preset = ["--config", "classifier-tiny", "model.image_size=16", "train.checkpoint_every=2"]
    assert main([*command, *preset, "--max-steps", "2"]) == 0
    checkpoint = read_checkpoint(run, "classifier", with_optimizer=True)
    assert json.loads((checkpoint.path / META).read_text())["random_state_processes"] == 1
    assert list(checkpoint.random_state) == [0]
    assert list(checkpoint.random_state[0]) == ["cpu"]  # trained on the CPU
    saved = checkpoint.random_state[0]["cpu"]
    assert saved.dtype == torch.uint8 and torch.equal(
        saved, load_file(str(checkpoint.path / RANDOM_STATE))["0/cpu"]
    )
    # The state differs from a freshly seeded generator's (the run drew from it).
    assert not torch.equal(saved, torch.manual_seed(0).get_state())


def test_restoring_continues_the_saved_stream_and_another_world_size_derives_one():
    context = DistributedContext()
    torch.manual_seed(5)
    torch.rand(7)
    saved = {0: own_random_state(context)}
    expected = torch.rand(4)
    torch.manual_seed(123)
    assert restore_random_state(saved, context, seed=0, step=9)
    assert torch.equal(torch.rand(4), expected)
    # Saved by two processes, resumed by one (or saved by none): a stream seeded by (seed,
    # step, rank), which differs from step to step.
    for states in ({0: saved[0], 1: saved[0]}, None):
        assert not restore_random_state(states, context, seed=0, step=9)
        derived = torch.Generator().manual_seed(derived_random_seed(0, 9, 0))
        assert torch.equal(torch.rand(4), torch.rand(4, generator=derived))
    assert derived_random_seed(0, 9, 0) != derived_random_seed(0, 10, 0)
    assert derived_random_seed(0, 9, 0) != derived_random_seed(0, 9, 1)


def test_a_checkpoint_without_random_state_still_resumes(tmp_path, npz_data, caplog):
    """A checkpoint of an older vqvae2 (no random.safetensors) loads and resumes, saying that
    its dropout continues from a new stream."""
    run = tmp_path / "run"
    command = ["train-classifier", "--data", str(npz_data), "--out", str(run), "--quiet"]
    preset = ["--config", "classifier-tiny", "model.image_size=16", "model.dropout=0.3"]
    assert main([*command, *preset, "--max-steps", "2", "train.checkpoint_every=2"]) == 0
    step_dir = run / "step-00000002"
    (step_dir / RANDOM_STATE).unlink()
    meta = json.loads((step_dir / META).read_text())
    del meta["random_state_processes"]
    (step_dir / META).write_text(json.dumps(meta))
    assert read_checkpoint(run, "classifier", with_optimizer=True).random_state is None
    assert main([*command, "--resume", "--max-steps", "3"]) == 0
    assert read_checkpoint(run, "classifier", with_optimizer=True).step == 3
    assert "no random state (an older vqvae2 wrote it)" in caplog.text


def test_a_malformed_random_state_is_one_line(tmp_path, npz_data, capsys):
    run = tmp_path / "run"
    command = ["train-classifier", "--data", str(npz_data), "--out", str(run), "--quiet"]
    preset = ["--config", "classifier-tiny", "model.image_size=16"]
    assert main([*command, *preset, "--max-steps", "2", "train.checkpoint_every=2"]) == 0
    step_dir = run / "step-00000002"
    save_file({"0/cpu": torch.zeros(3, dtype=torch.float32)}, str(step_dir / RANDOM_STATE))
    capsys.readouterr()
    assert main([*command, "--resume", "--max-steps", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vqvae2: error: the random state in {step_dir} is malformed: entry '0/cpu'"
    )


def test_validation_leaves_the_training_stream_alone(tmp_path, npz_data):
    """Validation draws (its DataLoader takes a seed from the global generator) come from a
    fork: validating every step or never, a run with level dropout ends with the same weights."""
    finals = []
    for every in ("1", "1000"):
        run = tmp_path / f"val-every-{every}"
        command = ["train-vqvae", *TINY_CLI]
        options = ["model.level_dropout=0.5", f"train.val_every={every}", "--max-steps", "3"]
        assert main([*command, *options, "--data", str(npz_data), "--out", str(run)]) == 0
        finals.append(read_checkpoint(run, "vqvae").path)
    assert_bit_identical(*finals)


def test_a_state_written_on_cuda_resumed_on_the_cpu_is_not_called_exact():
    """The CPU stream continues, but a CUDA run drew its dropout on CUDA: the resume says it
    is not exact (so the session warns), where it said exact before."""
    context = DistributedContext()
    cpu_state = torch.get_rng_state()
    saved_on_cpu = {0: {"cpu": cpu_state.clone()}}
    saved_on_cuda = {0: {"cpu": cpu_state.clone(), "cuda": torch.zeros(16, dtype=torch.uint8)}}
    assert restore_random_state(saved_on_cpu, context, seed=0, step=3)
    assert not restore_random_state(saved_on_cuda, context, seed=0, step=3)
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the CPU stream is still continued
