"""Exporting a trained run in the Hub layout and loading it back: the same weights and samples,
a model card whose every figure comes from the run's logs, and one-line errors (a Hub name
with no network, folders that are not exports)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vqvae2.cli import main
from vqvae2.evaluate import evaluate_run
from vqvae2.export import (
    CARD_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    WEIGHTS_FILE,
    export_run,
    from_pretrained,
    load_pretrained,
    save_pretrained,
)
from vqvae2.fingerprint import report_fingerprint
from vqvae2.logs import read_metrics
from vqvae2.model_card import FIGURES_HEADING
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.run import Run, load_classifier, load_hierarchy
from vqvae2.sampling import generate

from .conftest import run_python, train_complete_tiny_run
from .test_evaluate import tiny_evaluate_config

# A number in running text: not part of a word or a name such as "top-1" or "prior-top".
NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w])")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """VQ-VAE, both priors and the classifier of a run on 3 classes of 16x16 blobs, evaluated
    (its report in RUN/evaluation/)."""
    run, data = train_complete_tiny_run(tmp_path_factory.mktemp("export"))
    evaluate_run(Run.open(run), data, run / "evaluation", tiny_evaluate_config(), progress=False)
    return run


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    return export_run(Run.open(trained_run), tmp_path_factory.mktemp("exported") / "model")


def test_each_model_is_a_hub_folder_with_the_run_s_weights(trained_run, exported):
    index = json.loads((exported / INDEX_FILE).read_text())
    assert index["priors"] == ["prior-top", "prior-bottom"]
    for name, class_name in [("vqvae", "VQVAE2"), ("prior-top", "PixelSNAIL"),
                             ("prior-bottom", "PixelSNAIL"), ("classifier", "Classifier")]:  # fmt: skip
        assert (exported / name / WEIGHTS_FILE).is_file()
        assert json.loads((exported / name / CONFIG_FILE).read_text())["_class_name"] == class_name
    models = load_pretrained(exported)
    vqvae, priors = load_hierarchy(trained_run)
    classifier = load_classifier(trained_run / "classifier")
    pairs = [(vqvae, models.vqvae), *zip(priors, models.priors, strict=True)]
    for run_model, loaded in [*pairs, (classifier, models.classifier)]:
        assert loaded.config == run_model.config and not loaded.training
        state, loaded_state = run_model.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys()
        assert all(torch.equal(state[key], loaded_state[key]) for key in state)
    assert models.level_names == ("top", "bottom")


def test_the_export_samples_what_the_run_samples_for_the_same_seed(trained_run, exported):
    labels = torch.arange(6) % 3
    vqvae, priors = load_hierarchy(trained_run)
    models = load_pretrained(str(exported))
    runs = [
        generate(vqvae, priors, 6, labels, generator=torch.Generator().manual_seed(seed))
        for seed in (0, 1)
    ]
    export_images, export_codes = generate(
        models.vqvae, models.priors, 6, labels, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(export_images, runs[0][0])
    assert all(torch.equal(a, b) for a, b in zip(export_codes, runs[0][1], strict=True))
    assert not torch.equal(runs[0][1][1], runs[1][1][1])  # another seed draws other codes


def logged_numbers(run: Path) -> list[float]:
    """Every number of the run's logs: each metrics.csv (steps and values) and the report."""
    numbers: list[float] = []
    for path in run.rglob("metrics.csv"):
        for row in read_metrics(path):
            numbers += [float(row["step"]), float(row["value"])]

    def walk(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers.append(float(value))

    walk(json.loads((run / "evaluation" / "report.json").read_text()))
    return numbers


def figure_numbers(card: str) -> list[str]:
    """The numbers of the card's figures section as written, code spans left out."""
    section = card.split(FIGURES_HEADING, 1)[1]
    return NUMBER.findall(re.sub(r"`[^`]*`", "", section))


def test_every_number_in_the_card_s_figures_comes_from_the_run_s_logs(trained_run, exported):
    card = (exported / CARD_FILE).read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "vqvae2" and "class-conditional" in header["tags"]
    assert "datasets" not in header  # blobs.npz is no Hub data set
    logged = logged_numbers(trained_run)
    written = figure_numbers(card)
    assert len(written) > 40
    for text in written:
        digits = len(text.partition(".")[2])
        assert any(f"{value:.{digits}f}" == text for value in logged), text
    mse = [row for row in read_metrics(trained_run / "metrics.csv") if row["metric"] == "mse"]
    report = json.loads((trained_run / "evaluation" / "report.json").read_text())
    assert f"| validation MSE | {float(mse[-1]['value']):.5f} | 30 |" in card
    assert f"| {report['rejection'][0]['fid']:.3f} |" in card


def test_figures_a_run_does_not_have_are_left_out(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("classifier", "evaluation"))
    (run / "prior-bottom" / "metrics.csv").unlink()
    card = (export_run(Run.open(run), tmp_path / "out") / CARD_FILE).read_text()
    assert "| top prior | validation NLL (nats per code) |" in card
    for absent in ("bottom prior", "classifier |", "FID", "CAS", "n/a", "nan"):
        assert absent not in card
    assert load_pretrained(tmp_path / "out").classifier is None


def test_a_report_of_other_weights_stays_out_of_the_card(trained_run, tmp_path, caplog):
    """A report whose models fingerprint is not the exported weights' (an evaluation before
    more training; here its recorded fingerprint changed) is passed over with a warning, and
    refused when named; before, the newest report's figures went into any card."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    report_file = run / "evaluation" / "report.json"
    report = json.loads(report_file.read_text())
    assert report["models_fingerprint"] == report_fingerprint(
        *Run.open(run).load_hierarchy(), Run.open(run).load_classifier()
    )
    report["models_fingerprint"] = "0" * 64
    report_file.write_text(json.dumps(report))
    (run / "old-evaluation").mkdir()
    (run / "old-evaluation" / "report.json").write_text("{cut short")  # unreadable: passed over
    with caplog.at_level(logging.WARNING, logger="vqvae2.model_card"):
        card = (export_run(Run.open(run), tmp_path / "out") / CARD_FILE).read_text()
    assert "FID" not in card and "CAS" not in card
    assert "| top prior | validation NLL (nats per code) |" in card  # training figures stay
    assert "measured other weights than the ones exported" in caplog.text
    with pytest.raises(ValueError, match="measured other weights than the run's latest"):
        export_run(Run.open(run), tmp_path / "out2", report=report_file)
    assert not (tmp_path / "out2").exists()


def test_a_hub_name_without_network_fails_in_one_line_quickly():
    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        load_pretrained("nobody-here/no-such-vqvae2-model")
    assert time.monotonic() - start < 60
    message = str(error.value)
    assert "\n" not in message and "nobody-here/no-such-vqvae2-model" in message


def test_bad_folders_are_one_line_each(trained_run, exported, tmp_path):
    with pytest.raises(ValueError, match="not an exported vqvae2 model"):
        load_pretrained(trained_run)
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_run(Run.open(trained_run), exported)
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds a VQVAE2, expected a PixelSNAIL"):
        from_pretrained(exported / "vqvae", expected=PixelSNAIL)
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / "prior-top" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read .*prior-top"):
        load_pretrained(broken)
    save_pretrained(load_pretrained(exported).priors[1], broken / "prior-top")
    with pytest.raises(ValueError, match="top prior models 4x4 maps"):
        load_pretrained(broken)


PROBE = """
import sys, time
import vqvae2.export
print("huggingface_hub" in sys.modules)
start = time.monotonic()
try:
    vqvae2.export.load_pretrained("nobody-here/no-such-vqvae2-model")
except ValueError as error:
    print(repr(str(error)), time.monotonic() - start)
"""


@pytest.mark.slow
def test_import_downloads_nothing_and_offline_mode_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_python("-c", PROBE, timeout=60)
    assert result.returncode == 0, result.stderr
    imported, message = result.stdout.strip().splitlines()
    assert imported == "False"
    assert "HF_HUB_OFFLINE" in message and "Traceback" not in result.stderr


def test_the_cli_exports_a_run_and_samples_from_the_export_as_from_the_run(
    trained_run, tmp_path, capsys
):
    out = tmp_path / "model"
    assert main(["export", str(trained_run), str(out), "--onnx"]) == 0
    assert (out / "encoder.onnx").is_file() and (out / "decoder.onnx").is_file()
    for source, name in ((trained_run, "run"), (out, "export")):
        argv = ["sample", str(source), "--n", "6", "--class", "0", "2", "--seed", "3"]
        argv += [
            "--out",
            str(tmp_path / f"{name}.png"),
            "--save-codes",
            str(tmp_path / f"{name}.npz"),
        ]
        assert main([*argv, "--json"]) == 0
    from_run, from_export = (np.load(tmp_path / f"{name}.npz") for name in ("run", "export"))
    assert sorted(from_run.files) == sorted(from_export.files)
    for key in from_run.files:
        assert np.array_equal(from_run[key], from_export[key]), key
    assert (tmp_path / "run.png").read_bytes() == (tmp_path / "export.png").read_bytes()
    for source, name in ((trained_run, "run-kept"), (out, "export-kept")):  # with its classifier
        argv = ["sample", str(source), "--n", "4", "--reject-fraction", "0.5", "--seed", "1"]
        assert main([*argv, "--out", str(tmp_path / f"{name}.png"), "--quiet"]) == 0
    assert (tmp_path / "run-kept.png").read_bytes() == (tmp_path / "export-kept.png").read_bytes()
    capsys.readouterr()
    assert main(["sample", "nobody-here/no-such-model", "--out", str(tmp_path / "x.png")]) != 0
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "nobody-here/no-such-model" in error


def test_files_compressed_with_the_run_decompress_with_the_export_and_back(
    trained_run, exported, tmp_path
):
    images = np.load(trained_run.parent / "blobs.npz")["images"][:4]
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / "in" / f"blob{index}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(paths[-1])
    labels = ["--label", "0", "1", "2", "0", "--quiet"]
    for source, target in ((trained_run, exported), (exported, trained_run)):
        packed = tmp_path / f"packed-{source.name}"
        assert main(["compress", str(source), *map(str, paths), "--out", str(packed), *labels]) == 0
        files = [str(path) for path in sorted(packed.glob("*.vq2"))]
        assert len(files) == 4
        for folder in (source, target):
            out = tmp_path / f"{source.name}-by-{folder.name}"
            assert main(["decompress", *files, "--run", str(folder), "--out", str(out)]) == 0
    pngs = {
        out.name: [path.read_bytes() for path in sorted(out.glob("*.png"))]
        for out in tmp_path.glob("*-by-*")
    }
    assert len(pngs) == 4 and all(len(images) == 4 for images in pngs.values())
    assert all(images == pngs["run-by-run"] for images in pngs.values())


def test_the_cli_reconstructs_a_split_with_an_export_as_with_the_run(
    trained_run, exported, tmp_path, capsys
):
    data = trained_run.parent / "blobs.npz"
    results = []
    for source, name in ((trained_run, "run"), (exported, "export")):
        argv = ["reconstruct", str(source), "--data", str(data), "--split", "val", "--json"]
        capsys.readouterr()
        assert main([*argv, "--out", str(tmp_path / f"{name}.png")]) == 0
        results.append(json.loads(capsys.readouterr().out))
    from_run, from_export = results
    assert from_run["images"] == from_export["images"] > 0  # the same carved validation split
    assert from_run["mse"] == from_export["mse"] and from_run["levels"] == from_export["levels"]
    assert (tmp_path / "run.png").read_bytes() == (tmp_path / "export.png").read_bytes()
    capsys.readouterr()
    assert main(["reconstruct", str(exported), "--out", str(tmp_path / "x.png")]) == 2
    assert "is an exported model: give --data PATH" in capsys.readouterr().err
