"""Data-parallel training under torchrun (gloo, CPU): processes agree bit for bit, agree with one
process on the same global batch to float precision, and checkpoints move between world sizes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqvae2.checkpoint import read_checkpoint
from vqvae2.config import PriorRunConfig, load_config
from vqvae2.logs import read_metrics
from vqvae2.run import Run, load_prior
from vqvae2.train import train_prior

from .conftest import (
    FASHION_MNIST,
    REAL_DATA,
    assert_states_close,
    rewind,
    torchrun,
    write_npz,
)
from .ddp_worker import PRIOR_OVERRIDES, run

pytestmark = pytest.mark.slow  # every test here starts torchrun or waits for a fixture that does

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 6
RESUME_FROM = 4  # a checkpoint is written every 2 steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Six steps of stage 1 under 2 processes and under 1, same global batch."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_npz(root / "blobs.npz", count=64)
    torchrun(2, WORKER, "vqvae", data, root / "two", STEPS)
    run("vqvae", data, root / "one", STEPS)
    return root, data


def test_two_processes_hold_bit_identical_weights_and_codebooks(runs):
    root, _ = runs
    rank0 = load_file(str(root / "two" / "vqvae-rank0-of-2.safetensors"))
    rank1 = load_file(str(root / "two" / "vqvae-rank1-of-2.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # The dead-code restarts ran (and picked the same replacements on both processes).
    restarts = [
        json.loads((root / "two" / f"vqvae-rank{r}-of-2.restarts.json").read_text()) for r in (0, 1)
    ]
    assert restarts[0] == restarts[1] > 0


def test_a_time_budget_ends_every_process_at_the_same_step_and_rate(tmp_path):
    """The budget's clock is agreed over processes: same steps, same rates, same weights. Rank 0
    gains 1 s and rank 1 2 s per step: the slower decides, so the 12-second budget ends both
    after 6 steps (rank 0 alone would take 12) and step s (0-based) has the rate
    1e-3 (1 - 2 s / 12)."""
    data = write_npz(tmp_path / "blobs.npz", count=64)
    torchrun(2, WORKER, "vqvae-budget", data, tmp_path / "two", 100000)
    assert_states_close(
        tmp_path / "two" / "vqvae-budget-rank0-of-2.safetensors",
        tmp_path / "two" / "vqvae-budget-rank1-of-2.safetensors",
        atol=0.0,
    )
    assert (tmp_path / "two" / "vqvae" / "latest").read_text().strip() == "step-00000006"
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.csv") if r["metric"] == "lr"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # Logged and checkpointed on the run's clock, the slowest process's (rank 1: 2 s a step).
    assert [r["elapsed_seconds"] for r in rows] == ["2.0", "4.0", "6.0", "8.0", "10.0", "12.0"]
    assert read_checkpoint(tmp_path / "two", "vqvae").extra["elapsed_seconds"] == 12.0
    rates = [float(r["value"]) for r in rows]
    assert rates == pytest.approx([1e-3 * (1 - s / 6) for s in range(6)], rel=1e-12)
    # Resumed, the run finds its budget spent and takes no more steps.
    torchrun(2, WORKER, "vqvae-budget", data, tmp_path / "two", 100000, "--resume")
    assert (tmp_path / "two" / "vqvae" / "latest").read_text().strip() == "step-00000006"
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.csv") if r["metric"] == "lr"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]


def test_two_processes_match_one_process_on_the_same_global_batch(runs):
    root, _ = runs
    assert_states_close(
        root / "two" / "vqvae-rank0-of-2.safetensors",
        root / "one" / "vqvae-rank0-of-1.safetensors",
        atol=1e-5,
    )


def test_checkpoint_of_two_processes_resumes_in_one_and_back(runs):
    root, data = runs
    two_to_one = rewind(root / "two", root / "two-to-one", "vqvae", RESUME_FROM)
    run("vqvae", data, two_to_one, STEPS, resume=True)
    one_to_two = rewind(root / "one", root / "one-to-two", "vqvae", RESUME_FROM)
    torchrun(2, WORKER, "vqvae", data, one_to_two, STEPS, "--resume")
    reference = root / "one" / "vqvae-rank0-of-1.safetensors"
    assert_states_close(two_to_one / "vqvae-rank0-of-1.safetensors", reference, atol=1e-5)
    assert_states_close(one_to_two / "vqvae-rank0-of-2.safetensors", reference, atol=1e-5)
    assert_states_close(
        one_to_two / "vqvae-rank0-of-2.safetensors",
        one_to_two / "vqvae-rank1-of-2.safetensors",
        atol=0.0,
    )


@pytest.fixture(scope="module")
def prior_runs(runs):
    """Four steps of the top prior (codes extracted first, with mirrored copies) under 2
    processes and under 1."""
    root, data = runs
    two = shutil.copytree(root / "one", root / "prior-two")
    one = shutil.copytree(root / "one", root / "prior-one")
    torchrun(2, WORKER, "prior", data, two, 4)
    run("prior", data, one, 4)
    return two, one


def test_prior_and_code_extraction_under_two_processes_match_one(prior_runs):
    two, one = prior_runs
    stores = [
        (split, name)
        for split in ("train", "val", "train-augmented")
        for name in ("top.npy", "bottom.npy", "labels.npy")
    ]
    for split, name in [*stores, ("train-augmented", "augmentations.npy")]:
        assert (two / "codes" / split / name).read_bytes() == (
            one / "codes" / split / name
        ).read_bytes(), f"{split}/{name}"
    assert load_prior(two, "top").config.num_augmentations == 2  # identity and mirror
    assert_states_close(
        two / "prior-rank0-of-2.safetensors", two / "prior-rank1-of-2.safetensors", atol=0.0
    )
    assert_states_close(
        two / "prior-rank0-of-2.safetensors", one / "prior-rank0-of-1.safetensors", atol=1e-5
    )


def test_gradient_accumulation_matches_the_whole_batch(prior_runs):
    """Two micro-batches of 4 give the step of one batch of 8 (the prior has no EMA state)."""
    _, one = prior_runs
    accumulated = one.parent / "prior-accumulated"
    shutil.copytree(one, accumulated, ignore=shutil.ignore_patterns("prior-top"))
    config = load_config(
        PriorRunConfig,
        "prior-top-tiny",
        [*PRIOR_OVERRIDES, "train.max_steps=4", "train.grad_accum_steps=2"],
    )
    result = train_prior(Run.open(accumulated), "top", config, progress=False)
    save_file(
        {k: v.contiguous() for k, v in result.model.state_dict().items()},
        str(accumulated / "accumulated.safetensors"),
    )
    assert_states_close(
        accumulated / "accumulated.safetensors", one / "prior-rank0-of-1.safetensors", atol=1e-5
    )


CLASSIFIER_STEPS = 3


def test_classifier_under_two_processes_matches_one(tmp_path):
    """Batch norm under DDP normalises with the global batch's statistics and keeps equal
    running statistics on every process, and each image's augmentation comes from its key:
    two processes train the classifier as one process does, to float rounding that Adam then
    amplifies (measured 1e-7 after one step, 1.5e-5 after three; one process on 1 and on 2
    threads ends 1e-4 apart after eight). The code before gave 3e-2 and ranks 1.5e-2 apart."""
    data = write_npz(tmp_path / "blobs32.npz", count=96, size=32)
    torchrun(2, WORKER, "classifier", data, tmp_path / "two", CLASSIFIER_STEPS)
    run("classifier", data, tmp_path / "one", CLASSIFIER_STEPS)
    two = [tmp_path / "two" / f"classifier-rank{rank}-of-2.safetensors" for rank in (0, 1)]
    assert_states_close(two[0], two[1], atol=0.0)
    assert_states_close(two[0], tmp_path / "one" / "classifier-rank0-of-1.safetensors", atol=1e-4)
    state = load_file(str(two[0]))
    assert int(state["stages.1.num_batches_tracked"]) == CLASSIFIER_STEPS
    assert float((state["stages.1.running_var"] - 1).abs().max()) > 1e-2  # they did move


FASHION_STEPS = 12


@pytest.fixture(scope="module")
def fashion_runs(tmp_path_factory):
    """Twelve steps of stage 1 of fashion-mnist-32 on the real files under 1, 2 and 3
    processes, same global batch."""
    root = tmp_path_factory.mktemp("ddp-fashion")
    run("fashion", FASHION_MNIST, root / "1", FASHION_STEPS)
    for processes in (2, 3):
        torchrun(processes, WORKER, "fashion", FASHION_MNIST, root / str(processes), FASHION_STEPS)
    return root


def real_data(test):
    """Give ``test`` the marks of the tests on the real Fashion-MNIST files."""
    for mark in REAL_DATA:
        test = mark(test)
    return test


@pytest.mark.parametrize("processes", [2, 3])
@real_data
def test_fashion_mnist_under_many_processes_matches_one_process(fashion_runs, processes):
    """The preset's model on real images, where the first batch's encoder outputs crowd
    together: every code choice of 2 and 3 processes is the one process's (equal counters
    ``steps_unused``), and weights, codebooks and EMA sums agree to float rounding (measured:
    2e-7 for weights and codebooks, 5e-6 for the EMA sums, whose entries reach 60)."""
    one = fashion_runs / "1" / "fashion-rank0-of-1.safetensors"
    many = [
        fashion_runs / str(processes) / f"fashion-rank{rank}-of-{processes}.safetensors"
        for rank in range(processes)
    ]
    assert_states_close(many[0], many[-1], atol=0.0)
    assert_states_close(many[0], one, atol=1e-5)
    # The top level's 384 rows a batch seed 384 of its 512 codes; the others were never used.
    unused = load_file(str(one))["quantizers.0.steps_unused"]
    assert int((unused == FASHION_STEPS).sum()) >= 512 - 384


def test_torchrun_cli_reports_once_from_rank_zero(runs, tmp_path):
    """`torchrun -m vqvae2 train-vqvae ...` works unchanged; only rank 0 prints its summary."""
    _, data = runs
    stdout = torchrun(
        2,
        "-m",
        "vqvae2",
        "train-vqvae",
        "--config",
        "tiny",
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--max-steps",
        "2",
        "--quiet",
        "--json",
        "model.image_size=16",
        "train.batch_size=8",
    )
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 2
    assert (tmp_path / "run" / "vqvae" / "step-00000002" / "model.safetensors").is_file()
