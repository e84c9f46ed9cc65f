"""Faults around a training run: a run started again after a kill before its first checkpoint,
non-finite losses, two trainers on one run folder (docs/faults.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vqvae2.checkpoint import LATEST, MODEL_WEIGHTS, OPTIMIZER_WEIGHTS, read_checkpoint
from vqvae2.cli import main
from vqvae2.distributed import DistributedContext
from vqvae2.logs import read_metrics
from vqvae2.loop import training_lock
from vqvae2.run import has_checkpoint

from .conftest import TINY_CLI, assert_states_close, metric_values, one_line_error

TINY = [*TINY_CLI, "train.val_every=1000"]  # no validation


def train_vqvae_cli(data: Path, run: Path, steps: int, *extra: str) -> int:
    """``vqvae2 train-vqvae`` in this process, logging every step, a checkpoint every 2."""
    return main(
        ["train-vqvae", *TINY, "--data", str(data), "--out", str(run), "--max-steps", str(steps)]
        + ["train.log_every=1", "train.checkpoint_every=2", *extra]
    )


def logged_steps(path: Path, metric: str = "loss") -> list[int]:
    """The steps of the training rows of ``metric`` in a metrics.csv, in file order."""
    return [
        int(row["step"])
        for row in read_metrics(path)
        if row["split"] == "train" and row["metric"] == metric
    ]


def test_a_run_started_again_after_a_kill_before_its_first_checkpoint_logs_only_itself(
    tmp_path, npz_data
):
    """A process killed before its first checkpoint leaves config.yaml and log rows but nothing
    to resume; the same command starts the run again with a log of its own steps only (a kill
    -9 trial found steps 1, 2 logged twice)."""
    run = tmp_path / "run"
    assert train_vqvae_cli(npz_data, run, 3) == 0
    shutil.rmtree(run / "vqvae")  # as if killed before its first checkpoint
    assert logged_steps(run / "metrics.csv") == [1, 2, 3]
    assert train_vqvae_cli(npz_data, run, 3) == 0
    assert logged_steps(run / "metrics.csv") == [1, 2, 3]


def nan_at_training_calls(monkeypatch, calls: set[int], where: str = "loss") -> None:
    """Make the VQ-VAE's training forward passes numbered ``calls`` (1 = the first of this
    process) non-finite: its loss (``where="loss"``), its input images (``"images"``, which
    also pour NaN into the EMA codebooks) or, under a finite loss, the gradient of its first
    parameter (``"gradient"``: inf, as a bf16 backward pass that overflows gives)."""
    from vqvae2.vqvae import VQVAE2

    forward = VQVAE2.forward
    count = [0]

    def poisoned_forward(self, images):
        if not self.training:
            return forward(self, images)
        count[0] += 1
        poisoned = count[0] in calls
        if poisoned and where == "images":
            images = images * float("nan")
        output = forward(self, images)
        if poisoned and where == "gradient":
            inf_gradient_once(next(self.parameters()))
            return output
        return output._replace(loss=output.loss * float("nan")) if poisoned else output

    monkeypatch.setattr(VQVAE2, "forward", poisoned_forward)


def inf_gradient_once(parameter) -> None:
    """The next gradient that reaches ``parameter`` becomes inf (before it is accumulated)."""
    fired = []

    def to_inf(gradient):
        if fired:
            return None
        fired.append(True)
        return torch.full_like(gradient, float("inf"))

    parameter.register_hook(to_inf)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_checkpoint(
    tmp_path, npz_data, capsys, monkeypatch
):
    """NaN at step 5: one line naming step 5 and the step-4 checkpoint, which stays latest and
    loadable; nothing is written after it, and the resumed run ends where an uninterrupted run
    does."""
    straight = tmp_path / "straight"
    assert train_vqvae_cli(npz_data, straight, 6) == 0
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        nan_at_training_calls(patch, {5})
        capsys.readouterr()
        line = one_line_error(capsys, train_vqvae_cli(npz_data, run, 6))
    assert line == (
        f"the loss is not finite at step 5: training stopped and the last checkpoint, "
        f"{run / 'vqvae' / 'step-00000004'}, is kept (train.nonfinite=skip skips such steps "
        "instead)"
    )
    assert sorted(p.name for p in (run / "vqvae").glob("step-*")) == [
        "step-00000002",
        "step-00000004",
    ]
    assert read_checkpoint(run, "vqvae", with_optimizer=True).step == 4
    assert (
        main(["train-vqvae", "--data", str(npz_data), "--out", str(run), "--resume", "--quiet"])
        == 0
    )
    for weights in (MODEL_WEIGHTS, OPTIMIZER_WEIGHTS):
        assert_states_close(
            run / "vqvae" / "step-00000006" / weights,
            straight / "vqvae" / "step-00000006" / weights,
            atol=0.0,
        )


def test_a_non_finite_loss_before_any_checkpoint_says_so(tmp_path, npz_data, capsys, monkeypatch):
    nan_at_training_calls(monkeypatch, {1})
    line = one_line_error(capsys, train_vqvae_cli(npz_data, tmp_path / "run", 4))
    assert line.startswith("the loss is not finite at step 1: training stopped and no checkpoint")
    assert not (tmp_path / "run" / "vqvae" / LATEST).exists()


def assert_skipped_step_changed_nothing(run: Path, two: Path) -> None:
    """Step 3's weights and optimiser state in ``run`` are exactly step 2's in ``two``."""
    for weights in (MODEL_WEIGHTS, OPTIMIZER_WEIGHTS):
        assert_states_close(
            run / "vqvae" / "step-00000003" / weights,
            two / "vqvae" / "step-00000002" / weights,
            atol=0.0,
        )


def test_skipped_non_finite_steps_change_nothing_and_are_counted(tmp_path, npz_data, monkeypatch):
    """With train.nonfinite=skip, NaN images at step 3 (NaN in the EMA codebooks too) leave
    the weights, buffers and optimiser state exactly as after step 2; the log counts the
    skipped step from step 3 on, and a resumed run keeps counting."""
    skip = "train.nonfinite=skip"
    two = tmp_path / "two"
    assert train_vqvae_cli(npz_data, two, 2, skip) == 0
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        nan_at_training_calls(patch, {3}, where="images")
        assert train_vqvae_cli(npz_data, run, 3, skip) == 0
    assert_skipped_step_changed_nothing(run, two)
    counted = metric_values(run / "metrics.csv", "train", "skipped_nonfinite")
    assert counted == {1: 0.0, 2: 0.0, 3: 1.0}
    with monkeypatch.context() as patch:
        nan_at_training_calls(patch, {2})  # step 5 of the resumed run
        resume = ["--data", str(npz_data), "--out", str(run), "--resume", "--quiet"]
        assert main(["train-vqvae", *resume, "--max-steps", "6"]) == 0
    counted = metric_values(run / "metrics.csv", "train", "skipped_nonfinite")
    assert counted == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 2.0, 6: 2.0}
    final = read_checkpoint(run, "vqvae")
    assert final.extra["skipped_nonfinite"] == 2
    assert all(
        bool(t.isfinite().all()) for t in final.model_state.values() if t.is_floating_point()
    )


@pytest.mark.slow  # starts a trainer process
def test_a_second_trainer_on_a_run_folder_is_refused_and_a_killed_one_holds_nothing(
    tmp_path, npz_data, capsys
):
    """While one train-vqvae process trains, a second one on the same run folder (resumed or
    new) ends with one line and writes nothing; once the first is killed with SIGKILL, --resume
    continues its run."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "vqvae2", "train-vqvae", *TINY, "--data", npz_data, "--out", run]
        + ["--max-steps", "100000", "train.checkpoint_every=2", "train.log_every=1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not has_checkpoint(run / "vqvae"):
            assert time.monotonic() < deadline and first.poll() is None, "the first never saved"
            time.sleep(0.05)
        capsys.readouterr()
        resume = ["train-vqvae", "--data", str(npz_data), "--out", str(run), "--resume", "--quiet"]
        line = one_line_error(capsys, main([*resume, "--max-steps", "100000"]))
        assert line == (
            f"another trainer is writing {run / 'vqvae'} (it holds {run / 'vqvae' / '.lock'}); "
            "wait for it to end or stop it"
        )
        line = one_line_error(capsys, train_vqvae_cli(npz_data, tmp_path / "run", 3))
        assert line.startswith("another trainer is writing")
        assert first.poll() is None  # the first trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = read_checkpoint(run, "vqvae").step
    assert main([*resume, "--max-steps", str(killed_at + 2)]) == 0
    assert read_checkpoint(run, "vqvae").step == killed_at + 2


def test_each_trainer_refuses_a_folder_another_trainer_holds(tmp_path, npz_data, capsys):
    """Stage 1, a prior and the classifier each take the lock of the folder they write; while
    another trainer holds it they end with one line having written nothing, and once it is let
    go they train."""
    run = tmp_path / "run"
    assert train_vqvae_cli(npz_data, run, 2) == 0
    assert main(["extract-codes", str(run), "--data", str(npz_data), "--quiet"]) == 0
    commands = {
        run / "vqvae": ["train-vqvae", "--data", str(npz_data), "--out", str(run), "--resume"]
        + ["--max-steps", "3"],
        run / "prior-top": ["train-prior", str(run), "--level", "top", "--max-steps", "1"],
        run / "classifier": ["train-classifier", "--run", str(run), "--data", str(npz_data)]
        + ["--max-steps", "1"],
    }
    for folder, command in commands.items():
        with training_lock(folder, DistributedContext(), resume=False):
            before = sorted(p.name for p in folder.iterdir())
            capsys.readouterr()
            line = one_line_error(capsys, main([*command, "--quiet"]))
            assert line.startswith(f"another trainer is writing {folder} "), line
            assert sorted(p.name for p in folder.iterdir()) == before
        assert main([*command, "--quiet"]) == 0, command


def test_extract_codes_refuses_code_stores_another_extraction_holds(tmp_path, npz_data, capsys):
    """Two extractions of one run would write the same shards: the second ends with one line
    having written nothing (before, both wrote the stores at once), and runs once the first is
    done."""
    run = tmp_path / "run"
    assert train_vqvae_cli(npz_data, run, 2) == 0
    codes = run / "codes"
    command = ["extract-codes", str(run), "--data", str(npz_data), "--quiet"]
    with training_lock(codes, DistributedContext(), resume=False, writer="extract-codes"):
        capsys.readouterr()
        line = one_line_error(capsys, main(command))
        assert line.startswith(f"another extract-codes is writing {codes} "), line
        assert sorted(p.name for p in codes.iterdir()) == [".lock"]
    assert main(command) == 0
    assert (codes / "train").is_dir() and (codes / "val").is_dir()


def test_a_torn_last_log_row_is_dropped_on_resume(tmp_path, npz_data):
    """A row cut short (a full disk or a crash in the middle of an append) does not survive a
    resume: the log keeps whole rows only."""
    run = tmp_path / "run"
    assert train_vqvae_cli(npz_data, run, 2) == 0
    with open(run / "metrics.csv", "a") as log:
        log.write("1")  # the start of a row of step 1x, cut after its first digit
    resume = ["--data", str(npz_data), "--out", str(run), "--resume", "--quiet"]
    assert main(["train-vqvae", *resume, "--max-steps", "3"]) == 0
    rows = read_metrics(run / "metrics.csv")
    assert all(None not in row.values() and "" not in row.values() for row in rows), rows[-3:]
    assert logged_steps(run / "metrics.csv") == [1, 2, 3]


def test_a_non_finite_gradient_under_a_finite_loss_stops_the_run(
    tmp_path, npz_data, capsys, monkeypatch
):
    """An inf gradient at step 3 (the loss finite) stops the run as a non-finite loss does:
    one line naming step 3, the step-2 checkpoint kept, nothing written after it."""
    run = tmp_path / "run"
    nan_at_training_calls(monkeypatch, {3}, where="gradient")
    line = one_line_error(capsys, train_vqvae_cli(npz_data, run, 4))
    assert line == (
        f"the gradients are not finite at step 3: training stopped and the last checkpoint, "
        f"{run / 'vqvae' / 'step-00000002'}, is kept (train.nonfinite=skip skips such steps "
        "instead)"
    )
    assert [p.name for p in (run / "vqvae").glob("step-*")] == ["step-00000002"]


def test_a_skipped_non_finite_gradient_changes_nothing(tmp_path, npz_data, monkeypatch):
    """With train.nonfinite=skip, an inf gradient under a finite loss at step 3 leaves the
    weights, buffers and optimiser state exactly as after step 2, and is counted."""
    skip = "train.nonfinite=skip"
    two = tmp_path / "two"
    assert train_vqvae_cli(npz_data, two, 2, skip) == 0
    run = tmp_path / "run"
    nan_at_training_calls(monkeypatch, {3}, where="gradient")
    assert train_vqvae_cli(npz_data, run, 3, skip) == 0
    assert_skipped_step_changed_nothing(run, two)
    assert metric_values(run / "metrics.csv", "train", "skipped_nonfinite")[3] == 1.0


def test_a_non_finite_gradient_stops_a_run_stepping_adam_in_backward(
    tmp_path, npz_data, capsys, monkeypatch
):
    """With train.optimizer_in_backward each gradient is checked as its parameter steps: an inf
    one at step 3 stops the run after that backward pass, and the step-2 checkpoint, all
    finite, stays the last."""
    run = tmp_path / "run"
    nan_at_training_calls(monkeypatch, {3}, where="gradient")
    code = train_vqvae_cli(npz_data, run, 4, "train.optimizer_in_backward=true")
    line = one_line_error(capsys, code)
    assert line == (
        f"the gradients are not finite at step 3: training stopped and the last checkpoint, "
        f"{run / 'vqvae' / 'step-00000002'}, is kept"
    )
    kept = read_checkpoint(run, "vqvae", with_optimizer=True)
    assert kept.step == 2
    assert all(t.isfinite().all() for t in kept.model_state.values() if t.is_floating_point())
