"""Bad command-line arguments: one ``vqvae2: error:`` line each, before any long work starts
(no run folder written, no sampling, no training) (docs/faults.md)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from vqvae2.cli import main

from .conftest import TINY_CLI as TINY
from .conftest import one_line_error, train_tiny_run

FAST = 10.0  # seconds: a gross bound; that no work was done is checked by the files


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """A tiny run with every model sampling needs: stage 1, both priors, the classifier."""
    root = tmp_path_factory.mktemp("cli")
    steps = dict(vqvae_steps=2, prior_steps=1, classifier_steps=1)
    return train_tiny_run(root, **steps, preset="tiny")


def refused(capsys, argv: list) -> str:
    """Run the CLI, expect one error line quickly; the line without its prefix."""
    capsys.readouterr()
    started = time.monotonic()
    line = one_line_error(capsys, main([str(word) for word in argv]))
    assert time.monotonic() - started < FAST, line
    return line


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("a file, not a folder")
    return path


TRAINING = [
    (["--max-steps", "0"], "train.max_steps must be >= 1, got 0"),
    (["--max-steps", "-3"], "train.max_steps must be >= 1, got -3"),
    (["--max-minutes", "0"], "--max-minutes must be a positive number, got 0.0"),
    (["--max-minutes", "-1"], "--max-minutes must be a positive number, got -1.0"),
    (["--max-minutes", "nan"], "--max-minutes must be a positive number, got nan"),
    (["--seed", "-1"], "train.seed must be >= 0, got -1"),
    (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
    (["train.batch_size=500"], "the training split has 81 examples, fewer than one batch (500)"),
    (
        ["model.num_levels=1", "model.prefix_decoder_weight=0.5"],
        "model.prefix_decoder_weight=0.5 needs num_levels >= 2 (it weighs decoders of the top "
        "levels without the bottom), got num_levels=1",
    ),
]


@pytest.mark.parametrize(("args", "message"), TRAINING)
def test_bad_training_arguments_are_refused_before_training(
    tmp_path, npz_data, capsys, args, message
):
    run = tmp_path / "run"
    line = refused(capsys, ["train-vqvae", *TINY, "--data", npz_data, "--out", run, *args])
    assert line == message
    assert not (run / "config.yaml").exists() and not (run / "metrics.csv").exists()


def test_training_output_under_a_file_is_refused(tmp_path, npz_data, capsys, a_file):
    out = a_file / "run"
    line = refused(capsys, ["train-vqvae", *TINY, "--data", npz_data, "--out", out])
    assert line == f"--out {out}: {a_file} is not a folder"
    line = refused(capsys, ["train-classifier", "--data", npz_data, "--out", out])
    assert line == f"--out {out}: {a_file} is not a folder"


def test_a_bad_shard_size_is_refused_before_extraction(sampled_run, capsys):
    run, data = sampled_run
    store = (run / "codes" / "train" / "meta.json").stat().st_mtime_ns
    line = refused(capsys, ["extract-codes", run, "--data", data, "--shard-size", "0"])
    assert line == "the shard size must be at least 1 image, got 0"
    assert (run / "codes" / "train" / "meta.json").stat().st_mtime_ns == store


def test_bad_prior_arguments_are_refused(sampled_run, tmp_path, capsys):
    run, _ = sampled_run
    line = refused(capsys, ["train-prior", run, "--level", "top", "--max-steps", "0"])
    assert line == "train.max_steps must be >= 1, got 0"
    line = refused(capsys, ["train-prior", run, "--level", "middle"])
    assert line == f"the VQ-VAE in {run} has levels top, bottom; there is no 'middle' level"
    line = refused(
        capsys, ["train-prior", run, "--level", "top", "train.batch_size=500", "--resume"]
    )
    assert line == "--resume continues the saved config; drop --config and overrides"
    fresh = tmp_path / "run"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("prior-*"))
    line = refused(capsys, ["train-prior", fresh, "--level", "top", "train.batch_size=500"])
    assert line == "the training split has 81 examples, fewer than one batch (500)"
    assert sorted(p.name for p in (fresh / "prior-top").iterdir()) == [".lock"]


SAMPLING = [
    (["--n", "0"], "the number of samples must be >= 1, got 0"),
    (["--n", "-3"], "the number of samples must be >= 1, got -3"),
    (["--class", "99"], "class 99 is out of range: the priors know classes 0..2"),
    (["--class", "-1"], "class -1 is out of range: the priors know classes 0..2"),
    (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
    (["--temperature", "-1"], "--temperature must be a positive number, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a positive number, got nan"),
    (["--temperature", "inf"], "--temperature must be a positive number, got inf"),
    (
        ["--temperature", "1e-39"],
        "--temperature 1e-39 is below the smallest sampling temperature, 1.18e-38 "
        "(float32's smallest normal number)",
    ),
    (
        ["--temperature", "1", "0.9", "0.8"],
        "give one temperature for every level or one per level (2), got 3",
    ),
    (["--temperature", "1", "-2"], "--temperature must be a positive number, got -2.0"),
    (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["--top-k", "600"], "top_k 600 is more than the prior's 16 codes"),
    (["--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
    (["--reject-fraction", "1"], "the rejection fraction must be in [0, 1), got 1.0"),
    (["--reject-fraction", "-0.5"], "the rejection fraction must be in [0, 1), got -0.5"),
    (["--reject-fraction", "nan"], "the rejection fraction must be in [0, 1), got nan"),
    (["--accept-threshold", "1.5"], "the acceptance threshold must be in [0, 1], got 1.5"),
    (["--accept-threshold", "nan"], "the acceptance threshold must be in [0, 1], got nan"),
]
if not torch.cuda.is_available():  # with CUDA the run samples there, and this is no fault
    SAMPLING.append(
        (
            ["--sampler", "cached-cuda-graph"],
            "the cuda-graph step (sampler cached-cuda-graph) needs the prior on a CUDA device, "
            "not cpu",
        )
    )


@pytest.mark.parametrize(("args", "message"), SAMPLING)
def test_bad_sampling_arguments_are_refused_before_sampling(
    sampled_run, tmp_path, capsys, args, message
):
    run, _ = sampled_run
    out = tmp_path / "samples.png"
    line = refused(capsys, ["sample", run, "--n", "4", "--out", out, "--quiet", *args])
    assert line == message
    assert not out.exists()


def test_output_paths_that_cannot_be_written_are_refused_before_the_work(
    sampled_run, tmp_path, capsys, a_file
):
    """An output under a file, or a folder given where a file goes, is refused before any
    sampling or evaluation; a missing parent folder is created (as it always was)."""
    run, data = sampled_run
    sample = ["sample", run, "--n", "2", "--quiet"]
    under_file = a_file / "x.png"
    cases = [
        ([*sample, "--out", under_file], f"--out {under_file}: {a_file} is not a folder"),
        ([*sample, "--out", tmp_path], f"--out {tmp_path} is a folder"),
        (
            [*sample, "--out", tmp_path / "s.png", "--save-images", a_file],
            f"--save-images {a_file}: {a_file} is not a folder",
        ),
        (
            [*sample, "--out", tmp_path / "s.png", "--save-codes", a_file / "c.npz"],
            f"--save-codes {a_file / 'c.npz'}: {a_file} is not a folder",
        ),
        (
            ["reconstruct", run, "--data", data, "--out", under_file],
            f"--out {under_file}: {a_file} is not a folder",
        ),
        (
            ["evaluate", run, "--data", data, "--out", a_file / "report"],
            f"--out {a_file / 'report'}: {a_file} is not a folder",
        ),
    ]
    for argv, message in cases:
        assert refused(capsys, argv) == message, argv
    assert not (tmp_path / "s.png").exists()
    deep = tmp_path / "new" / "folders" / "s.png"
    assert main([str(w) for w in [*sample, "--out", deep]]) == 0
    assert deep.is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(sampled_run, tmp_path, capsys):
    run, _ = sampled_run
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "s.png"
    line = refused(capsys, ["sample", run, "--n", "2", "--quiet", "--out", out])
    assert line == f"--out {out}: cannot write in {locked}"


def test_bad_evaluation_counts_are_refused(sampled_run, tmp_path, capsys):
    run, data = sampled_run
    evaluate = ["evaluate", run, "--data", data, "--out", tmp_path / "report"]
    assert refused(capsys, [*evaluate, "--n-samples", "0"]) == (
        "evaluate.num_samples must be >= 2, got 0"
    )
    assert refused(capsys, [*evaluate, "--cas-steps", "-1"]) == (
        "evaluate.cas_steps must be >= 0, got -1"
    )
    assert refused(capsys, [*evaluate, "--reject-fractions", "0,1.5"]) == (
        "evaluate.reject_fractions must lie in [0, 1), got [0.0, 1.5]"
    )
    assert not (tmp_path / "report").exists()
