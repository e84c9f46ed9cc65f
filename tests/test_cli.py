"""The command line: help for every subcommand, one-line errors, an end-to-end run, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqvae2
from vqvae2.cli import build_parser, main
from vqvae2.config import VQVAERunConfig, load_config
from vqvae2.data import float_to_uint8, open_dataset, uint8_to_float
from vqvae2.logs import read_metrics
from vqvae2.measure import class_agreement
from vqvae2.run import load_classifier, load_vqvae

from .conftest import TINY_CLI as TINY
from .conftest import assert_one_line_error, run_module, train_tiny_run, write_npz

# An option that only this command's help shows (presets has none: its whole usage line).
HELP_MARKS = {
    "train-vqvae": "--max-steps",
    "reconstruct": "--images",
    "extract-codes": "--augment",
    "train-prior": "--level",
    "train-classifier": "--run",
    "sample": "--reject-fraction",
    "evaluate": "--inception-weights",
    "compress": "--label",
    "decompress": "--run",
    "make-shards": "--images-per-shard",
    "presets": "usage: vqvae2 presets [-h]\n",
}
SUBCOMMANDS = list(HELP_MARKS)


def json_line(capsys) -> dict:
    """The last line the CLI printed, as JSON."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_works_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert HELP_MARKS[command] in capsys.readouterr().out


def test_every_subcommand_is_listed_in_top_level_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in SUBCOMMANDS)


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


def test_train_then_reconstruct_end_to_end(tmp_path, npz_data, capsys):
    run = tmp_path / "run"
    data = ["--data", str(npz_data)]
    assert main(["train-vqvae", *TINY, *data, "--out", str(run), "--max-steps", "6", "--json"]) == 0
    summary = json_line(capsys)
    # The summary's MSE is the validation split's, on [0, 1] pixels, reconstructions clamped.
    model = load_vqvae(run)
    val = open_dataset(npz_data, "val", 16, 1, load_config(VQVAERunConfig, "tiny").data)
    images = uint8_to_float(torch.stack([val[i][0] for i in range(len(val))]))
    with torch.no_grad():
        expected = float(((model(images).reconstruction.clamp(-1, 1) - images) / 2).pow(2).mean())
    assert summary["step"] == 6 and summary["mse"] == pytest.approx(expected, rel=1e-5)
    grid = tmp_path / "g.png"
    assert main(["reconstruct", str(run), *data, "--out", str(grid), "--json"]) == 0
    report = json_line(capsys)
    assert report["images"] == 10 and report["split"] == "test"
    assert report["psnr"] == pytest.approx(10 * np.log10(1 / report["mse"]))
    # 3 rows (original, reconstruction, top only) of 10 tiles of 16 px with 2 px padding.
    assert Image.open(grid).size == (10 * 18 + 2, 3 * 18 + 2)
    # Specific image files work too.
    Image.new("L", (28, 28), 200).save(tmp_path / "one.png")
    files = ["--images", str(tmp_path / "one.png"), "--out", str(tmp_path / "f.png"), "--json"]
    assert main(["reconstruct", str(run), *files]) == 0
    assert json_line(capsys)["images"] == 1


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
    assert json_line(capsys)["step"] == 3
    assert main(["train-vqvae", *data, "--resume", "--quiet", "--json", "--max-steps", "5"]) == 0
    assert json_line(capsys)["step"] == 5
    # A run length shorter than the steps already taken is refused, not silently ignored.
    assert main(["train-vqvae", *data, "--resume", "--quiet", "--max-steps", "4"]) == 2
    assert "is at step 5, past train.max_steps 4" in capsys.readouterr().err


def test_commands_on_a_run_read_the_run_s_own_data_by_default(
    tmp_path, npz_data, capsys, monkeypatch
):
    """Without --data, resuming, extracting codes, reconstructing and resuming a classifier use
    the image source the run trained on, not the default Fashion-MNIST files (here another .npz
    of 60 images)."""
    from vqvae2.checkpoint import read_meta

    monkeypatch.setattr("vqvae2.cli.DEFAULT_DATA_PATH", str(write_npz(tmp_path / "other.npz", 60)))
    run = tmp_path / "run"
    assert (
        main(["train-vqvae", *TINY, "--data", str(npz_data), "--out", str(run), "--max-steps", "2"])
        == 0
    )
    assert main(["train-vqvae", "--out", str(run), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert read_meta(run, "vqvae")[1]["run"]["data_path"] == str(npz_data.resolve())
    assert main(["extract-codes", str(run), "--quiet"]) == 0
    train_rows = len(open_dataset(npz_data, "train", 16, 1))
    assert np.load(run / "codes" / "train" / "top.npy", mmap_mode="r").shape[0] == train_rows
    capsys.readouterr()
    assert main(["reconstruct", str(run), "--out", str(tmp_path / "r.png"), "--json"]) == 0
    assert json_line(capsys)["images"] == len(open_dataset(npz_data, "test", 16, 1))
    # A classifier trained with --out alone resumes on its own data too.
    scorer = ["train-classifier", "--out", str(tmp_path / "c"), "--quiet"]
    size = ["--config", "classifier-tiny", "model.image_size=16"]
    assert main([*scorer, *size, "--data", str(npz_data), "--max-steps", "2"]) == 0
    assert main([*scorer, "--resume", "--max-steps", "3"]) == 0
    assert read_meta(tmp_path / "c", "classifier")[1]["run"]["data_path"] == str(npz_data.resolve())


def test_errors_raised_in_loader_processes_keep_their_own_message():
    from vqvae2.cli import error_line

    wrapped = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\n    raise ValueError(...)\n'
        "ValueError: no readable images in the dataset\n"
    )
    assert error_line(wrapped) == "no readable images in the dataset"
    assert error_line(ValueError("first line\nsecond")) == "first line"
    assert error_line(OSError()) == "OSError"


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, npz_data, capsys):
    run = tmp_path / "run"
    data = ["--data", str(npz_data), "--out", str(run)]
    process = subprocess.Popen(
        [sys.executable, "-m", "vqvae2", "train-vqvae", *TINY, *data, "--max-steps", "100000"]
        + ["train.checkpoint_every=5", "train.log_every=1"],
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
    assert killed_at % 5 == 0  # checkpoints only every 5 steps
    final = killed_at + 3
    capsys.readouterr()
    resume = ["train-vqvae", *data, "--resume", "--quiet", "--max-steps", str(final), "--json"]
    assert main(resume) == 0
    assert json_line(capsys)["step"] == final
    # Every step logged exactly once: none lost, and the steps the killed process logged after
    # its last checkpoint are not logged twice.
    logged = [
        int(row["step"])
        for row in read_metrics(run / "metrics.csv")
        if row["split"] == "train" and row["metric"] == "loss"
    ]
    assert logged == list(range(1, final + 1))


@pytest.mark.slow
def test_python_dash_m_matches_console_script():
    dash_m = run_module("vqvae2", "presets")
    script = subprocess.run(
        [str(Path(sys.executable).with_name("vqvae2")), "presets"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dash_m.returncode == 0 and script.returncode == 0, dash_m.stderr + script.stderr
    assert script.stdout == dash_m.stdout
    assert {"fashion-mnist-32", "imagenet-256", "ffhq-1024", "tiny"} <= set(dash_m.stdout.split())


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
    summary = json_line(capsys)
    assert (run / "codes" / "train" / "meta.json").is_file()
    assert (tmp_path / "grid.png").is_file()
    files = sorted((tmp_path / "images").glob("*.png"))
    assert [f.name for f in files] == [f"sample-{i:05d}.png" for i in range(4)]
    # The agreement is the run's classifier's on the saved samples and the requested classes.
    saved_images = torch.stack(
        [torch.from_numpy(np.array(Image.open(f)))[None] for f in files]
    )  # (4, 1, 16, 16) uint8
    classifier = load_classifier(run / "classifier")
    expected = class_agreement(classifier, saved_images, torch.tensor([0, 0, 2, 2]))
    assert summary["samples"] == 4 and summary["class_agreement"] == expected

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

    # The samples through the latent codec and back: each PNG decodes its image's codes.
    packed = tmp_path / "packed"
    labels = ["--label", "0", "0", "2", "2"]
    assert main(["compress", str(run), *map(str, files), "--out", str(packed), *labels]) == 0
    vq2 = sorted(packed.glob("*.vq2"))
    assert [f.stem for f in vq2] == [f.stem for f in files]
    unpacked = tmp_path / "unpacked"
    assert main(["decompress", *map(str, vq2), "--run", str(run), "--out", str(unpacked)]) == 0
    model = load_vqvae(run)
    with torch.no_grad():
        codes = model.encode(uint8_to_float(saved_images))
        expected = float_to_uint8(model.decode_codes(codes))
    decoded = torch.stack(
        [torch.from_numpy(np.array(Image.open(unpacked / f"{f.stem}.png")))[None] for f in files]
    )
    assert torch.equal(decoded, expected)


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


def test_the_report_s_command_line_names_the_options_that_differ_from_the_defaults():
    from vqvae2.config import EvaluateConfig
    from vqvae2.report import evaluate_command

    config = EvaluateConfig(num_samples=24, cas_steps=5, reject_fractions=(0.5,), seed=3)
    line = evaluate_command("runs/a", "d.npz", "rep", config, "cpu", feature_classifier="fc")
    assert line == (
        "vqvae2 evaluate runs/a --data d.npz --n-samples 24 --cas-steps 5 --feature-classifier fc "
        "--reject-fractions 0.5 --device cpu --seed 3 --out rep"
    )
    assert (
        evaluate_command("r", "d", "o", EvaluateConfig())
        == "vqvae2 evaluate r --data d --seed 0 --out o"
    )


def test_resume_with_seed_zero_is_refused_like_any_seed(tmp_path, capsys):
    argv = ["train-vqvae", "--out", str(tmp_path / "run"), "--resume", "--seed", "0", "--quiet"]
    message = "--resume continues the saved config; drop --config, --seed and overrides"
    assert_one_line_error(capsys, main(argv), message)


@pytest.fixture(scope="module")
def run_with_priors(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("controls")
    run, _ = train_tiny_run(root, vqvae_steps=2, codes=True, prior_steps=2, preset="tiny")
    return run


def sampled_codes(run: Path, folder: Path, name: str, *options: str) -> dict:
    """The codes ``vqvae2 sample`` draws from ``run`` with ``options`` (6 images of classes 0
    and 1), and the JSON summary it prints."""
    codes = folder / f"{name}.npz"
    argv = ["sample", str(run), "--n", "6", "--class", "0", "1", "--out", str(folder / name)]
    assert main([*argv, "--save-codes", str(codes), "--quiet", *options]) == 0
    with np.load(codes) as arrays:
        return {key: arrays[key] for key in arrays.files}


def test_sampling_controls_reach_every_level_from_the_command_line(
    run_with_priors, tmp_path, capsys
):
    """--top-k 1 draws the most likely code everywhere (so every seed draws the same maps);
    --temperature takes one value per level; the summary records what was asked."""
    first = sampled_codes(run_with_priors, tmp_path, "k1-seed0.png", "--top-k", "1")
    other = sampled_codes(run_with_priors, tmp_path, "k1-seed5.png", "--top-k", "1", "--seed", "5")
    plain = sampled_codes(run_with_priors, tmp_path, "plain.png", "--seed", "5")
    assert all(np.array_equal(first[key], other[key]) for key in first)
    assert not all(np.array_equal(other[key], plain[key]) for key in plain)
    capsys.readouterr()
    sampled_codes(run_with_priors, tmp_path, "levels.png", "--temperature", "1", "0.5", "--json")
    summary = json.loads(capsys.readouterr().out)
    assert summary["temperature"] == [1.0, 0.5] and "top_k" not in summary
    per_level = sampled_codes(run_with_priors, tmp_path, "t11.png", "--temperature", "1", "1")
    default = sampled_codes(run_with_priors, tmp_path, "t.png")
    assert all(np.array_equal(per_level[key], default[key]) for key in default)


def test_a_run_trained_from_a_yaml_file_resumes_its_classifier(tmp_path, npz_data):
    """train-classifier --run RUN --resume continues the saved classifier whatever the run was
    trained from (it looked up a preset for a YAML-trained run and gave up)."""
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text((Path(vqvae2.__file__).parent / "configs" / "tiny.yaml").read_text())
    run = tmp_path / "run"
    args = ["--config", str(yaml_file), "model.image_size=16", "--quiet"]
    assert main(["train-vqvae", *args, "--data", str(npz_data), "--out", str(run)]) == 0
    classifier = ["train-classifier", "--run", str(run), "--quiet"]
    assert main([*classifier, "--config", "classifier-tiny", "--max-steps", "1"]) == 0
    assert main([*classifier, "--resume", "--max-steps", "2"]) == 0
    assert (run / "classifier" / "step-00000002").is_dir()


def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    looked_up = []
    monkeypatch.setattr("vqvae2.export._hub_folder", lambda name: looked_up.append(name))
    assert main(["sample", "runs/typo", "--out", "x.png", "--quiet"]) == 2
    assert not looked_up and "runs/typo" in capsys.readouterr().err


def test_export_onnx_without_the_onnx_package_writes_nothing(
    run_with_priors, tmp_path, monkeypatch, capsys
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnx" else find_spec(name, *a),
    )
    out = tmp_path / "model"
    assert main(["export", str(run_with_priors), str(out), "--onnx"]) == 2
    assert "needs the onnx package" in capsys.readouterr().err and not out.exists()
