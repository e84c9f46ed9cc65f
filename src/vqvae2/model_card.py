"""The model card of an exported run: a README.md whose YAML header the Hugging Face Hub reads
(library, tags, dataset) and whose figures are the ones the run logged: the last validation
MSE of stage 1, each prior's final NLL, the classifier's accuracy (each model's
``metrics.csv``) and, when the run was evaluated, FID/precision/recall and the CAS of its
``report.json``. A figure the run does not have is left out."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .classifier import Classifier
from .fingerprint import report_fingerprint
from .logs import read_metrics
from .pixelsnail import PixelSNAIL
from .report import REPORT_FINGERPRINT, REPORT_JSON
from .run import CLASSIFIER_KIND, METRICS_FILE, prior_kind
from .vqvae import VQVAE2

FIGURES_HEADING = "## Figures"
logger = logging.getLogger("vqvae2.model_card")
# Image sources whose Hub data set is known, by folder name.
HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist"}


@dataclass(frozen=True)
class Logged:
    """One figure of a ``metrics.csv``: its value and the step it was logged at."""

    value: float
    step: int


def last_logged(path: Path, split: str, metric: str) -> Logged | None:
    """The last ``metric`` of ``split`` in a ``metrics.csv`` (the final one of a finished
    training), or None when the file or the figure is missing."""
    try:
        rows = read_metrics(path)
    except OSError:
        return None
    found = [row for row in rows if row["split"] == split and row["metric"] == metric]
    if not found:
        return None
    return Logged(value=float(found[-1]["value"]), step=int(found[-1]["step"]))


def find_report(run_dir: Path, fingerprint: str) -> Path | None:
    """The newest evaluation report (``report.json``) inside the run folder that measured the
    models of ``fingerprint`` (``fingerprint.report_fingerprint``), or None. Reports of other
    weights (an evaluation before more training, or one written before reports carried the
    fingerprint) and unreadable ones are passed over with a warning."""
    reports = [path for path in run_dir.rglob(REPORT_JSON) if path.is_file()]
    for path in sorted(reports, key=lambda path: path.stat().st_mtime, reverse=True):
        try:
            measured = _read_report(path).get(REPORT_FINGERPRINT)
        except ValueError as error:
            logger.warning("model card: %s; its figures are left out", error)
            continue
        if measured == fingerprint:
            return path
        logger.warning(
            "model card: %s measured other weights than the ones exported; its figures are left "
            "out (run `vqvae2 evaluate` again to have them)",
            path,
        )
    return None


def model_card(
    run_dir: Path,
    data: str | None,
    vqvae: VQVAE2,
    priors: Sequence[PixelSNAIL],
    classifier: Classifier | None,
    report: str | Path | None = None,
) -> str:
    """The README.md of the export of the run in ``run_dir`` (whose models are given), which
    trained on ``data`` (None when not recorded). An evaluation report's figures are shown only
    if it measured these very models (``fingerprint.report_fingerprint``): ``report`` if given
    (else ``ValueError``), otherwise the newest such report in the run folder."""
    fingerprint = report_fingerprint(vqvae, priors, classifier)
    report_path = Path(report) if report is not None else find_report(run_dir, fingerprint)
    evaluation = _read_report(report_path) if report_path is not None else None
    if evaluation is not None and evaluation.get(REPORT_FINGERPRINT) != fingerprint:
        raise ValueError(
            f"{report_path} measured other weights than the run's latest checkpoints; evaluate "
            "them again, or export without --report"
        )
    conditional = priors[0].config.num_classes > 0
    lines = [
        *_header(data, conditional),
        *_description(run_dir, vqvae, priors, classifier, data),
        *_usage(priors[0].config.num_classes),
        FIGURES_HEADING,
        "",
        *_training_figures(run_dir, vqvae.config.level_names, classifier is not None),
    ]
    if evaluation is not None:
        lines += _evaluation_figures(evaluation, _shown(report_path, run_dir))
    return "\n".join(lines)


def _read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the evaluation report {path}: {error}") from None
    if not isinstance(report, dict) or not {"rejection", "table1", "table2"} <= set(report):
        raise ValueError(f"{path} is not a report of `vqvae2 evaluate`")
    return report


def _shown(path: Path, run_dir: Path) -> str:
    """``path`` relative to the run folder when inside it."""
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return path.name


def _header(data: str | None, conditional: bool) -> list[str]:
    tags = ["vq-vae-2", "vqvae", "pixelsnail", "image-generation", "pytorch"]
    if conditional:
        tags.append("class-conditional")
    lines = ["---", "library_name: vqvae2", "tags:", *(f"- {tag}" for tag in tags)]
    lines.append("pipeline_tag: unconditional-image-generation")
    dataset = HUB_DATASETS.get(Path(data).name.lower()) if data else None
    if dataset is not None:
        lines += ["datasets:", f"- {dataset}"]
    return [*lines, "---", ""]


def _description(
    run_dir: Path,
    vqvae: VQVAE2,
    priors: Sequence[PixelSNAIL],
    classifier: Classifier | None,
    data: str | None,
) -> list[str]:
    config = vqvae.config
    colour = "grey" if config.in_channels == 1 else "colour"
    sizes = ", ".join(
        f"{name} {size}x{size}"
        for name, size in zip(config.level_names, config.latent_sizes, strict=True)
    )
    classes = priors[0].config.num_classes
    text = (
        f"A VQ-VAE-2 (Razavi et al. 2019) trained with the `vqvae2` package: a {config.num_levels}"
        f"-level VQ-VAE for {config.image_size}x{config.image_size} {colour} images ({sizes} "
        f"codes from a codebook of {config.codebook_size} per level) and a PixelSNAIL prior "
        "per level"
    )
    text += f", conditioned on {classes} classes" if classes else ""
    text += (
        "; and the classifier that scores samples for rejection sampling."
        if classifier is not None
        else "."
    )
    source = f" Trained on `{Path(data).name}`" if data else ""
    return [f"# VQ-VAE-2: {run_dir.resolve().name}", "", text + source + ".", ""]


def _usage(classes: int) -> list[str]:
    labels = f"torch.arange(8) % {classes}" if classes else "None"
    return [
        "## Use",
        "",
        "```python",
        "import torch",
        "from vqvae2 import generate, load_pretrained",
        "",
        'models = load_pretrained("this-folder-or-hub-name")  # vqvae, priors, classifier',
        f"images, codes = generate(models.vqvae, models.priors, 8, {labels},",
        "                          generator=torch.Generator().manual_seed(0))",
        "# images: (8, C, H, W) floats in about [-1, 1]; codes: one map per level, top first",
        "```",
        "",
    ]


def _training_figures(run_dir: Path, levels: Sequence[str], has_classifier: bool) -> list[str]:
    """The figures each model's ``metrics.csv`` ends with, as a table."""
    wanted = [("VQ-VAE", run_dir / METRICS_FILE, "val", "mse", "validation MSE", 5)]
    wanted.append(("VQ-VAE", run_dir / METRICS_FILE, "val", "psnr", "validation PSNR (dB)", 2))
    for level in levels:
        path = run_dir / prior_kind(level) / METRICS_FILE
        for split, name in (("val", "validation"), ("train", "train")):
            for unit in ("nats", "bits"):
                measure = f"{name} NLL ({unit} per code)"
                wanted.append((f"{level} prior", path, "final", f"{split}_nll_{unit}", measure, 4))
    if has_classifier:
        path = run_dir / CLASSIFIER_KIND / METRICS_FILE
        for split in ("test", "val"):
            name = "validation" if split == "val" else split
            wanted.append(("classifier", path, "final", f"{split}_accuracy", f"{name} accuracy", 4))
    rows = []
    for model, path, split, metric, measure, digits in wanted:
        logged = last_logged(path, split, metric)
        if logged is not None:
            rows.append(f"| {model} | {measure} | {logged.value:.{digits}f} | {logged.step} |")
    if not rows:
        return []
    return [
        "Logged by the run's trainers (each model's `metrics.csv`; the last validation of "
        "stage 1 covers the whole validation split, NLL on the train split a random subset as "
        "large as the validation split; MSE on pixels scaled to the unit interval):",
        "",
        "| model | figure | value | training steps |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def _evaluation_figures(report: dict[str, Any], shown: str) -> list[str]:
    """Samples' FID/precision/recall per rejection rate, the CAS and how they were measured."""
    lines = [
        f"Measured by `vqvae2 evaluate` (report `{shown}`):",
        "",
        "| samples rejected | samples | FID | precision | recall | class agreement |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rejection"]:
        lines.append(
            f"| {row['reject_fraction']:.2f} | {row['samples']} | {row['fid']:.3f} | "
            f"{row['precision']:.3f} | {row['recall']:.3f} | {row['class_agreement']:.3f} |"
        )
    real = report.get("references", {}).get("train_images")
    if real is not None:
        lines.append(
            f"| real train images (reference) | | {real['fid']:.3f} | {real['precision']:.3f} | "
            f"{real['recall']:.3f} | |"
        )
    table1, table2 = report["table1"], report["table2"]
    lines += [
        "",
        "| classifier trained on | its accuracy (top-1) on the real test images |",
        "|---|---|",
        f"| {table2['cas_samples']} samples (CAS) | {table2['samples']['top1']:.4f} |",
        f"| {table2['real_train_size']} real train images | {table2['real']['top1']:.4f} |",
        "",
        f"VQ-VAE test MSE: {table1['vqvae']['test_mse']:.5f} on {table1['test_size']} images.",
        "",
        *_method_lines(report),
    ]
    return lines


def _method_lines(report: dict[str, Any]) -> list[str]:
    config, counts = report["config"], report["counts"]
    network = report.get("features", {}).get("network", "unknown")
    command = f" Command: `{report['command']}`." if report.get("command") else ""
    return [
        f"How: each row's {sum(counts['metric_set_per_class'])} samples (the test split's class "
        f"balance, from one pool drawn at temperature {config['temperature']} with seed "
        f"{config['seed']}, the lowest-scored share rejected by the run's classifier) against "
        f"the {report['table1']['test_size']} real test images, in the features of "
        f"`{network}`; precision and recall with k = {config['nearest_k']}. Class agreement: "
        "the share of samples that the run's classifier puts in the class they were drawn for. "
        f"CAS: a classifier of the run's recipe trained on {report['table2']['cas_samples']} "
        f"samples for {report['table2']['cas_steps']} steps.{command}",
        "",
    ]
