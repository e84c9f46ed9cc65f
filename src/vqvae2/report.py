"""What a run writes for people to look at: image grids and PNG files, and the evaluation report
(``report.json``, ``report.md`` and the two Fig. 7 plots of Razavi et al. 2019)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .config import EvaluateConfig

REPORT_JSON = "report.json"
REPORT_FINGERPRINT = "models_fingerprint"  # report.json's key for the measured models' SHA-256
REPORT_MARKDOWN = "report.md"
FID_PLOT = "fid-vs-inception-score.png"
PRECISION_RECALL_PLOT = "precision-vs-recall.png"
GRID_COLUMNS = 10  # samples per class in the report's sample grids


def make_grid(images: Tensor, columns: int, padding: int = 2) -> Tensor:
    """Tile images into one picture.

    Args:
        images: (N, C, H, W) uint8.
        columns: images per row.
        padding: pixels of black between tiles.

    Returns:
        (C, rows * (H + padding) + padding, columns * (W + padding) + padding) uint8.
    """
    count, channels, height, width = images.shape
    rows = max(1, math.ceil(count / columns))
    grid = torch.zeros(
        channels,
        rows * (height + padding) + padding,
        columns * (width + padding) + padding,
        dtype=torch.uint8,
    )
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) image (C = 1 or 3) as PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
    return path


def class_rows_grid(pool: Tensor, labels: Tensor, selection: Tensor, num_classes: int) -> Tensor:
    """One row per class of the first ``GRID_COLUMNS`` selected samples -> uint8 grid."""
    rows = []
    for label in range(num_classes):
        members = selection[labels[selection] == label][:GRID_COLUMNS]
        row = pool[members]
        if len(row) < GRID_COLUMNS:  # pad a short class with black tiles
            row = torch.cat(
                [row, torch.zeros(GRID_COLUMNS - len(row), *pool.shape[1:], dtype=pool.dtype)]
            )
        rows.append(row)
    return make_grid(torch.cat(rows), columns=GRID_COLUMNS)


def plot_rejection_curves(
    rows: list[dict[str, Any]], references: dict[str, Any], out_dir: Path
) -> None:
    """Fig. 7 analogues: FID / FID* against IS, precision against recall, per rejection rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['reject_fraction']:.0%}" for row in rows]
    figure, axes = plt.subplots(figsize=(5, 4))
    scores = [row["inception_score"] for row in rows]
    axes.plot(scores, [row["fid"] for row in rows], "o-", label="FID (vs test images)")
    axes.plot(scores, [row["fid_star"] for row in rows], "s--", label="FID* (vs reconstructions)")
    for label, score, row in zip(labels, scores, rows, strict=True):
        axes.annotate(label, (score, row["fid"]), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("Inception Score (higher is better)")
    axes.set_ylabel("FID (lower is better)")
    axes.set_title("Rejection rate vs FID / IS (Fig. 7a)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / FID_PLOT, dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot([r["recall"] for r in rows], [r["precision"] for r in rows], "o-", label="samples")
    for label, row in zip(labels, rows, strict=True):
        axes.annotate(
            label, (row["recall"], row["precision"]), textcoords="offset points", xytext=(4, 4)
        )
    train = references["train_images"]
    axes.plot([train["recall"]], [train["precision"]], "k*", label="real train images")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title("Rejection rate vs precision / recall (Fig. 7b)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / PRECISION_RECALL_PLOT, dpi=100)
    plt.close(figure)


def _format(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: Tables 1 and 2, the rejection table, references, verdict."""
    lines = [
        *_header_lines(report),
        *_table1_lines(report["table1"]),
        *_table2_lines(report["table2"]),
        *_rejection_lines(report),
        *_verdict_lines(report),
    ]
    return "\n".join(lines)


def _header_lines(report: dict[str, Any]) -> list[str]:
    lines = ["# Evaluation report", ""]
    if report.get("command"):
        lines += ["```bash", report["command"], "```", ""]
    features = report["features"]
    seeds = ", ".join(
        f"{name.replace('_', ' ')} {value}" for name, value in report["seeds"].items()
    )
    lines += [
        f"Run: `{report['run_dir']}`; data: `{report['data']}`. Feature network: "
        f"{features['network']} ({features['dimensions']} features, `{features['path']}`). "
        f"Rejection scorer: the run's classifier (`{report['rejection_scorer']}`). "
        f"Seeds: {seeds}.",
        "",
    ]
    if not features["network"].startswith("InceptionV3"):
        lines += [
            "FID, KID and IS below use a classifier trained on this dataset, not InceptionV3: "
            "they compare runs of this project and are **not comparable with published values**.",
            "",
        ]
    return lines


def _table1_lines(table1: dict[str, Any]) -> list[str]:
    lines = [
        "## Table 1: NLL and MSE",
        "",
        "| | train NLL nats/code (bits) | validation NLL nats/code (bits) | validation - train |",
        "|---|---|---|---|",
    ]
    for name, row in table1["priors"].items():
        lines.append(
            f"| {name} prior | {row['train_nll_nats']:.4f} ({row['train_nll_bits']:.4f}) | "
            f"{row['val_nll_nats']:.4f} ({row['val_nll_bits']:.4f}) | {row['gap_nats']:.4f} |"
        )
    vq = table1["vqvae"]
    return lines + [
        "",
        "| VQ-VAE MSE ([0, 1] pixels) | train | validation | test |",
        "|---|---|---|---|",
        f"| | {vq['train_mse']:.5f} | {vq['val_mse']:.5f} | {vq['test_mse']:.5f} |",
        "",
        f"Train figures: a fixed random subset of {table1['train_subset_size']} train images (as "
        f"many as the validation split); validation {table1['val_size']}, test "
        f"{table1['test_size']} images.",
        "",
    ]


def _table2_lines(table2: dict[str, Any]) -> list[str]:
    def accuracies(row: dict[str, float]) -> str:
        return f"{row['top1']:.2%} | {row['top5']:.2%}"

    return [
        "## Table 2: Classification Accuracy Score",
        "",
        "| classifier trained on | tested on | top-1 | top-5 |",
        "|---|---|---|---|",
        f"| {table2['cas_samples']} samples (no rejection), {table2['cas_steps']} steps | real test "
        f"images | {accuracies(table2['samples'])} |",
        f"| the same classifier | VQ-VAE reconstructions of the test images ('after "
        f"reconstructing') | {accuracies(table2['samples_after_reconstructing'])} |",
        f"| {table2['real_train_size']} real train images (the run's classifier, "
        f"{table2['real_classifier_steps']} steps) | real test images | "
        f"{accuracies(table2['real'])} |",
        f"| the same classifier | VQ-VAE reconstructions of the test images | "
        f"{accuracies(table2['real_after_reconstructing'])} |",
        "",
    ]


def _metric_cells(row: dict[str, Any]) -> str:
    """FID ... coverage cells of one row of the rejection table."""
    return (
        f"{_format(row['fid'])} | {_format(row.get('fid_star'))} | {_format(row['kid'], 4)} | "
        f"{_format(row['inception_score'])} | {row['precision']:.3f} | {row['recall']:.3f} | "
        f"{row['density']:.3f} | {row['coverage']:.3f} |"
    )


def _rejection_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Fig. 7: rejection sampling",
        "",
        "| rejected | samples | mean p(class) | classifier agrees | FID | FID* | KID | IS | "
        "precision | recall | density | coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rejection"]:
        lines.append(
            f"| {row['reject_fraction']:.0%} | {row['samples']} | {row['mean_score']:.3f} | "
            f"{row['class_agreement']:.1%} | {_metric_cells(row)}"
        )
    references = report["references"]
    for name, title in (
        ("train_images", "real train images (as many as the samples)"),
        ("test_reconstructions", "VQ-VAE reconstructions of the test images"),
    ):
        lines.append(f"| *{title}* | | | | {_metric_cells(references[name])}")
    counts, config = report["counts"], report["config"]
    return lines + [
        "",
        f"FID, KID and precision/recall compare with the {report['table1']['test_size']} real "
        "test images, FID* with their VQ-VAE reconstructions. IS of the real test images: "
        f"{references['test_images_inception_score']:.3f}. Each rate's set has the test split's "
        f"class balance ({counts['metric_set_per_class']} per class), drawn at random from the "
        f"kept share of one pool of {sum(counts['pool_per_class'])} samples "
        f"({counts['pool_per_class']} per class), each scored once by the run's classifier. "
        f"Precision/recall: k = {config['nearest_k']}; KID: {config['kid_subsets']} subsets of "
        f"{counts['kid_subset_size']}.",
        "",
        f"![FID vs IS]({FID_PLOT}) ![precision vs recall]({PRECISION_RECALL_PLOT})",
        "",
    ]


def _verdict_lines(report: dict[str, Any]) -> list[str]:
    lines = ["## Verdict", ""]
    base, rejected = report["rejection"][0], report["rejection"][1:]
    verdict = report["verdict"]
    if not rejected:
        lines.append("- Only the no-rejection rate was measured.")
    for metric, title, name in (("fid", "FID", "FID"), ("precision", "Precision", "precision")):
        if not rejected:
            break
        last = rejected[-1]
        improved = verdict[f"{metric}_improved_at_every_rate"]
        outcome = "**improved**" if improved else "did **not** improve"
        lines.append(
            f"- {title}: {base[metric]:.3f} without rejection, {last[metric]:.3f} rejecting "
            f"{last['reject_fraction']:.0%}; rejection {outcome} {name} at every rate."
        )
    timings = report["timings_seconds"]
    parts = ", ".join(
        f"{name.replace('_', ' ')} {seconds:.0f} s"
        for name, seconds in timings.items()
        if name != "total"
    )
    return lines + ["", f"Wall time: {timings['total'] / 60:.1f} min ({parts}).", ""]


def write_report(
    report: dict[str, Any],
    out_dir: Path,
    pool: Tensor,
    pool_labels: Tensor,
    selections: list[Tensor],
    fractions: tuple[float, ...],
    num_classes: int,
) -> None:
    for fraction, selection in zip(fractions, selections, strict=True):
        save_png(
            class_rows_grid(pool, pool_labels, selection, num_classes),
            out_dir / f"samples-reject-{fraction:.2f}.png",
        )
    plot_rejection_curves(report["rejection"], report["references"], out_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / REPORT_MARKDOWN).write_text(render_markdown(report))


def evaluation_text(report: dict[str, Any], out_dir: str | Path) -> str:
    """The headline of an evaluation report for people: CAS, then FID, IS, precision and recall
    without rejection and at the highest rejection rate, then where ``report.md`` is."""
    base, last = report["rejection"][0], report["rejection"][-1]
    table2 = report["table2"]
    lines = [
        f"CAS top-1: samples {table2['samples']['top1']:.2%} (after reconstructing "
        f"{table2['samples_after_reconstructing']['top1']:.2%}), real data "
        f"{table2['real']['top1']:.2%}",
        f"no rejection: FID {base['fid']:.3f}, IS {base['inception_score']:.3f}, precision "
        f"{base['precision']:.3f}, recall {base['recall']:.3f}",
    ]
    if last is not base:
        lines.append(
            f"rejecting {last['reject_fraction']:.0%}: FID {last['fid']:.3f}, IS "
            f"{last['inception_score']:.3f}, precision {last['precision']:.3f}, recall "
            f"{last['recall']:.3f}"
        )
    lines.append(f"report: {Path(out_dir) / REPORT_MARKDOWN}")
    return "\n".join(lines)


def evaluation_summary(report: dict[str, Any], out_dir: str | Path) -> tuple[dict, str]:
    """What ``vqvae2 evaluate`` prints: the whole report as its record, and its headline."""
    return report, evaluation_text(report, out_dir)


def evaluate_command(
    run_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    config: EvaluateConfig,
    device: str = "auto",
    inception_weights: str | Path | None = None,
    feature_classifier: str | Path | None = None,
) -> str:
    """The ``vqvae2 evaluate`` command line that repeats an evaluation, for its report: the
    command's options whose values differ from their defaults, then the seed and the folder."""
    default = EvaluateConfig()

    def fractions(config: EvaluateConfig) -> str:
        return ",".join(f"{fraction:g}" for fraction in config.reject_fractions)

    words = ["vqvae2", "evaluate", str(run_dir), "--data", str(data_path)]
    for flag, value, unset in (
        ("--n-samples", config.num_samples, default.num_samples),
        ("--cas-samples", config.cas_samples, default.cas_samples),
        ("--cas-steps", config.cas_steps, default.cas_steps),
        ("--inception-weights", inception_weights, None),
        ("--feature-classifier", feature_classifier, None),
        ("--reject-fractions", fractions(config), fractions(default)),
        ("--device", device, "auto"),
    ):
        if value != unset:
            words += [flag, str(value)]
    return " ".join([*words, "--seed", str(config.seed), "--out", str(out_dir)])
