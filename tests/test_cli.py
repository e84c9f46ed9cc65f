"""The command line: help for every subcommand, one-line errors, an end-to-end run, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vqvae2.cli import build_parser, main

SUBCOMMANDS = [
    "train-vqvae",
    "reconstruct",
    "extract-codes",
    "train-prior",
    "train-classifier",
    "sample",
    "presets",
]
TINY = ["--config", "tiny", "model.image_size=16", "--quiet"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vqvae2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_works_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_every_subcommand_is_listed_in_top_level_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in SUBCOMMANDS)


def assert_one_line_error(capsys, code: int, fragment: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("vqvae2: error: ")
    assert fragment in err[-1]
    assert not any("Traceback" in line for line in err)


def test_missing_data_path_is_one_line(tmp_path, capsys):
    code = main(
        ["train-vqvae", *TINY, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]
    )
    assert_one_line_error(capsys, code, "does not exist")


def test_folder_without_images_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        ["train-vqvae", *TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]
    )
    assert_one_line_error(capsys, code, "no images")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.colour=3", "unknown config key 'model.colour'"),
        ("model.image_size=20", "multiple of the total downsampling"),
        ("model.codebook_size=1", "codebook_size must be >= 2"),
    ],
)
def test_bad_config_is_one_line(tmp_path, npz_data, capsys, override, fragment):
    code = main(
        ["train-vqvae", *TINY, override, "--data", str(npz_data), "--out", str(tmp_path / "r")]
    )
    assert_one_line_error(capsys, code, fragment)


def test_reconstruct_of_a_folder_without_a_model_is_one_line(tmp_path, capsys):
    tmp_path.joinpath("run").mkdir()
    code = main(["reconstruct", str(tmp_path / "run"), "--out", str(tmp_path / "g.png")])
    assert_one_line_error(capsys, code, "no vqvae checkpoint")


def test_train_then_reconstruct_end_to_end(tmp_path, npz_data):
    run = tmp_path / "run"
    trained = run_cli(
        "train-vqvae",
        *TINY,
        "--data",
        str(npz_data),
        "--out",
        str(run),
        "--max-steps",
        "6",
        "--json",
    )
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["step"] == 6 and 0 < summary["mse"] < 1
    recon = run_cli(
        "reconstruct", str(run), "--data", str(npz_data), "--out", str(tmp_path / "g.png"), "--json"
    )
    assert recon.returncode == 0, recon.stderr
    report = json.loads(recon.stdout)
    assert {"mse", "psnr", "usage_top", "usage_bottom"} <= set(report)
    assert (tmp_path / "g.png").stat().st_size > 0
    # Specific image files work too.
    from PIL import Image

    Image.new("L", (28, 28), 200).save(tmp_path / "one.png")
    files = run_cli(
        "reconstruct",
        str(run),
        "--images",
        str(tmp_path / "one.png"),
        "--out",
        str(tmp_path / "f.png"),
        "--json",
    )
    assert files.returncode == 0, files.stderr
    assert json.loads(files.stdout)["images"] == 1


def test_resume_keeps_the_saved_run_length(tmp_path, npz_data, capsys):
    """--resume continues the saved config, max_steps included, not the default preset's."""
    run = tmp_path / "run"
    data = ["--data", str(npz_data), "--out", str(run)]
    first = ["train-vqvae", *TINY, *data, "--max-steps", "3", "train.checkpoint_every=1"]
    assert main(first) == 0
    assert (run / "vqvae" / "step-00000002").is_dir()
    (run / "vqvae" / "latest").write_text("step-00000002\n")  # as if killed after step 2
    capsys.readouterr()
    assert main(["train-vqvae", *data, "--resume", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    assert main(["train-vqvae", *data, "--resume", "--quiet", "--json", "--max-steps", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 5


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, npz_data):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "vqvae2",
        "train-vqvae",
        *TINY,
        "--data",
        str(npz_data),
        "--out",
        str(run),
    ]
    process = subprocess.Popen(
        [*args, "--max-steps", "100000", "train.checkpoint_every=5", "train.log_every=1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while not (run / "vqvae" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = int((run / "vqvae" / "latest").read_text().strip().split("-")[1])
    assert killed_at >= 5
    resumed = run_cli(
        "train-vqvae",
        "--data",
        str(npz_data),
        "--out",
        str(run),
        "--resume",
        "--quiet",
        "--max-steps",
        str(killed_at + 3),
        "--json",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["step"] == killed_at + 3
    # Steps logged after the last checkpoint by the killed process are not logged twice.
    from vqvae2.loop import read_metrics

    keys = [(r["step"], r["split"], r["metric"]) for r in read_metrics(run / "metrics.csv")]
    assert len(keys) == len(set(keys))


def test_python_dash_m_matches_console_script():
    result = run_cli("presets")
    assert result.returncode == 0
    assert {"fashion-mnist-32", "imagenet-256", "ffhq-1024", "tiny"} <= set(result.stdout.split())


def test_whole_pipeline_end_to_end(tmp_path, npz_data, capsys):
    """train-vqvae -> extract-codes -> train-prior (each level) -> train-classifier -> sample."""
    run = tmp_path / "run"
    data = str(npz_data)
    steps = [
        ("train-vqvae", *TINY, "--data", data, "--out", str(run), "--max-steps", "2"),
        ("extract-codes", str(run), "--data", data, "--quiet"),
        ("train-prior", str(run), "--level", "top", "--max-steps", "2", "--quiet", "--json"),
        ("train-prior", str(run), "--level", "bottom", "--max-steps", "2", "--quiet", "--json"),
        (
            "train-classifier",
            "--run",
            str(run),
            "--data",
            data,
            "--max-steps",
            "2",
            "--quiet",
            "--json",
        ),
        (
            "sample",
            str(run),
            "--n",
            "4",
            "--class",
            "0",
            "2",
            "--out",
            str(tmp_path / "grid.png"),
            "--save-images",
            str(tmp_path / "images"),
            "--save-codes",
            str(tmp_path / "codes.npz"),
            "--quiet",
            "--json",
        ),
    ]
    for args in steps:
        assert main(list(args)) == 0, args
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 4 and 0.0 <= summary["class_agreement"] <= 1.0
    assert (run / "codes" / "train" / "meta.json").is_file()
    assert (tmp_path / "grid.png").is_file()
    assert len(list((tmp_path / "images").glob("*.png"))) == 4
    import numpy as np

    with np.load(tmp_path / "codes.npz") as saved:
        assert saved["codes_0"].shape == (4, 2, 2) and saved["codes_1"].shape == (4, 4, 4)
        assert saved["labels"].tolist() == [0, 0, 2, 2]
        first_codes = [saved["codes_0"], saved["codes_1"]]
    # --device cpu is what the default picks on a machine without CUDA: the same draws.
    args = ["sample", str(run), "--n", "4", "--class", "0", "2", "--quiet", "--device", "cpu"]
    out = ["--out", str(tmp_path / "again.png"), "--save-codes", str(tmp_path / "again.npz")]
    assert main(args + out) == 0
    if not torch.cuda.is_available():
        with np.load(tmp_path / "again.npz") as again:
            assert all(np.array_equal(again[f"codes_{i}"], first_codes[i]) for i in (0, 1))


def test_stage2_bad_input_is_one_line(tmp_path, npz_data, capsys):
    run = tmp_path / "run"
    assert (
        main(["train-vqvae", *TINY, "--data", str(npz_data), "--out", str(run), "--max-steps", "2"])
        == 0
    )
    capsys.readouterr()
    code = main(["train-prior", str(run), "--level", "top", "--quiet"])
    assert_one_line_error(capsys, code, "run `vqvae2 extract-codes` first")
    assert main(["extract-codes", str(run), "--data", str(npz_data), "--quiet"]) == 0
    capsys.readouterr()
    code = main(["train-prior", str(run), "--level", "middle", "--quiet"])
    assert_one_line_error(capsys, code, "there is no 'middle' level")
    code = main(["sample", str(run), "--n", "2", "--out", str(tmp_path / "s.png"), "--quiet"])
    assert_one_line_error(capsys, code, "has no trained top prior")
    for level in ("top", "bottom"):
        assert main(["train-prior", str(run), "--level", level, "--max-steps", "1", "--quiet"]) == 0
    capsys.readouterr()
    code = main(
        [
            "sample",
            str(run),
            "--n",
            "2",
            "--class",
            "7",
            "--out",
            str(tmp_path / "s.png"),
            "--quiet",
        ]
    )
    assert_one_line_error(capsys, code, "class 7 is out of range")
    code = main(
        ["sample", str(run), "--n", "2", "--out", str(tmp_path / "s.png"), "--device", "gpu"]
    )
    assert_one_line_error(capsys, code, "--device gpu: not a device")
    code = main(["reconstruct", str(run), "--out", str(tmp_path / "r.png"), "--device", "gpu"])
    assert_one_line_error(capsys, code, "--device gpu: not a device")
    # Truncate a code file: a clear error, not a crash.
    codes = run / "codes" / "train" / "top.npy"
    codes.write_bytes(codes.read_bytes()[:100])
    code = main(["train-prior", str(run), "--level", "top", "--resume", "--quiet"])
    assert_one_line_error(capsys, code, "truncated or corrupt")
