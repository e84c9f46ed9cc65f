"""The ``vqvae2`` command line's parser: option blocks that several commands share, then each
command's own options. ``vqvae2.cli`` runs the command it parses."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import list_presets
from .data import AUGMENTATION_KINDS, DEFAULT_DATA_PATH, SPLITS

DEFAULT_PRESET = "fashion-mnist-32"


def _fractions(text: str) -> tuple[float, ...]:
    """``"0,0.25,0.5"`` -> (0.0, 0.25, 0.5) for ``--reject-fractions``."""
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,0.25,0.5,0.75, got {text!r}"
        ) from None


def _command(
    commands: argparse._SubParsersAction, name: str, help: str, **kwargs
) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, **kwargs)


def _add_run_dir(parser: argparse.ArgumentParser, help: str = "stage-1 run folder") -> None:
    parser.add_argument("run_dir", type=Path, help=help)


def _add_data(parser: argparse.ArgumentParser, default: str = "the one the run trained on") -> None:
    parser.add_argument("--data", type=Path, help=f"image source (default: {default})")


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N (default auto: cuda:LOCAL_RANK when CUDA is available, else cpu)",
    )


def _add_output_options(parser: argparse.ArgumentParser, result: str | None) -> None:
    """--quiet and, when the command prints a ``result``, --json."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if result is not None:
        parser.add_argument("--json", action="store_true", help=f"print {result} as JSON")


def _add_training_options(parser: argparse.ArgumentParser, result: str, config: str) -> None:
    """Options every training command shares: ``config`` names what --config takes, ``result``
    what --json prints."""
    parser.add_argument("--config", help=config)
    parser.add_argument("--max-minutes", type=float, help="stop after this much wall time")
    parser.add_argument("--max-steps", type=int, help="sets train.max_steps")
    _add_output_options(parser, result)
    _add_device_option(parser)
    parser.add_argument(
        "--precision",
        choices=("float32", "bf16"),
        default="float32",
        help="bf16: bfloat16 autocast (quantizer distances and EMA stay float32)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the training forward pass"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="channels-last (NHWC) memory layout"
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the figures and image grids as TensorBoard events in the run's "
        "tensorboard/ folder (needs: pip install 'vqvae2[tensorboard]')",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _add_sample_options(parser: argparse.ArgumentParser) -> None:
    """How the images are drawn (``_draw_settings``), rejection included."""
    parser.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        default=[1.0],
        help="softmax temperature: one for every level, or one per level, top first",
    )
    parser.add_argument(
        "--top-k", type=int, help="draw each code among the K most likely only (top-k filtering)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        help="draw each code among the most likely ones holding probability P (nucleus)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--sampler",
        choices=("cached", "cached-compiled", "cached-cuda-graph", "reference"),
        default="cached",
        help="cached: incremental (default); cached-compiled: its per-position step through "
        "torch.compile (compiles once per shape, seconds); cached-cuda-graph: that step replayed "
        "as a CUDA graph (CUDA only); reference: one full forward pass per position",
    )
    parser.add_argument(
        "--reject-fraction",
        type=float,
        help="classifier rejection (Section 3.3): draw n/(1-F) per class, keep the n the run's "
        "classifier scores highest for their class",
    )
    parser.add_argument(
        "--accept-threshold",
        type=float,
        help="classifier rejection: keep samples whose class probability is at least this",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqvae2",
        description="VQ-VAE-2 (Razavi et al. 2019): hierarchical VQ-VAE and autoregressive priors.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        _add_train_vqvae,
        _add_reconstruct,
        _add_extract_codes,
        _add_train_prior,
        _add_train_classifier,
        _add_sample,
        _add_evaluate,
        _add_codec,
        _add_export,
        _add_make_shards,
    ):
        add_command(commands)
    _command(commands, "presets", "list the built-in config presets")
    return parser


def _add_train_vqvae(commands: argparse._SubParsersAction) -> None:
    train = _command(
        commands,
        "train-vqvae",
        "train stage 1 (the hierarchical VQ-VAE)",
        description="Train stage 1. Config: a preset name or YAML file, then key=value overrides "
        "such as model.codebook_size=256 or train.batch_size=64.",
    )
    presets = ", ".join(list_presets())
    config = f"preset name or YAML file (default: {DEFAULT_PRESET}; presets: {presets})"
    _add_data(
        train,
        f"{DEFAULT_DATA_PATH}; with --resume, the run's own; IDX folder, image "
        "folder, .npz or tar shards",
    )
    train.add_argument("--out", type=Path, required=True, help="run folder to write")
    train.add_argument("--seed", type=int, help="sets train.seed")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    _add_training_options(train, "the final metrics", config)


def _add_reconstruct(commands: argparse._SubParsersAction) -> None:
    recon = _command(
        commands,
        "reconstruct",
        "write original / reconstruction / per-level grids and measure a split",
        description="Rows of the grid: originals, reconstructions, then decodes from the top "
        "level alone, the top two levels, ... (what each level adds).",
    )
    _add_run_dir(recon, "stage-1 run folder, or an exported model (folder or owner/name)")
    _add_data(recon, "without --images, the one the run trained on")
    recon.add_argument("--split", choices=SPLITS, default="test", help="split (default: test)")
    recon.add_argument("--images", nargs="+", help="image files to reconstruct instead")
    recon.add_argument("--out", type=Path, required=True, help="grid PNG to write")
    recon.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_device_option(recon)


def _add_extract_codes(commands: argparse._SubParsersAction) -> None:
    extract = _command(
        commands,
        "extract-codes",
        "encode the train and validation splits into RUN_DIR/codes (Algorithm 2, 1-7)",
    )
    _add_run_dir(extract)
    _add_data(extract)
    extract.add_argument(
        "--augment",
        nargs="+",
        choices=AUGMENTATION_KINDS,
        default=[],
        help="also store the codes of flipped and/or one-pixel-shifted training images in "
        "codes/train-augmented; priors then train on them conditioned on the transform "
        "(distribution augmentation) and evaluate and sample with the identity",
    )
    extract.add_argument(
        "--shard-size",
        type=int,
        help="images encoded between progress marks; a killed run again redoes only the "
        "unfinished shards (default 4096)",
    )
    _add_output_options(extract, None)
    _add_device_option(extract)


def _add_train_prior(commands: argparse._SubParsersAction) -> None:
    prior = _command(
        commands,
        "train-prior",
        "train the PixelSNAIL prior of one level on the extracted codes",
        description="Config: a prior preset (default prior-LEVEL-<the VQ-VAE's preset>) or YAML.",
    )
    _add_run_dir(prior, "stage-1 run folder (with extracted codes)")
    prior.add_argument("--level", required=True, choices=("top", "middle", "bottom"))
    prior.add_argument("--resume", action="store_true", help="continue this level's prior")
    _add_training_options(prior, "the final NLL", "prior preset name or YAML file")


def _add_train_classifier(commands: argparse._SubParsersAction) -> None:
    classifier = _command(
        commands,
        "train-classifier",
        "train the image classifier used for rejection sampling and evaluation",
    )
    _add_data(classifier, f"that of --run or of the resumed classifier, else {DEFAULT_DATA_PATH}")
    classifier.add_argument("--out", type=Path, help="output folder (default RUN_DIR/classifier)")
    classifier.add_argument("--run", type=Path, help="stage-1 run: image size, channels, --out")
    classifier.add_argument(
        "--resume", action="store_true", help="continue the classifier in --out"
    )
    _add_training_options(classifier, "the accuracy", "classifier preset name or YAML file")


def _add_sample(commands: argparse._SubParsersAction) -> None:
    sample = _command(
        commands,
        "sample",
        "draw images: top codes, then each lower level, then one decoder pass",
    )
    _add_run_dir(
        sample,
        "run folder with the VQ-VAE and all priors, or an exported model (folder or owner/name)",
    )
    sample.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    sample.add_argument(
        "--class",
        dest="classes",
        type=int,
        nargs="+",
        help="class label(s): --n spread over them in blocks, the first ones one more",
    )
    _add_sample_options(sample)
    sample.add_argument("--out", type=Path, required=True, help="grid PNG to write")
    sample.add_argument("--save-images", type=Path, help="also write each image into this folder")
    sample.add_argument("--save-codes", type=Path, help="also write the codes to this .npz")
    _add_output_options(sample, "a summary")
    _add_device_option(sample)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = _command(
        commands,
        "evaluate",
        "Tables 1-2 and Fig. 7: NLL, MSE, CAS, FID/FID*/KID/IS, precision/recall vs rejection",
        description="Evaluate a trained run (VQ-VAE, priors, classifier) and write report.json, "
        "report.md, Fig. 7 plots and sample grids to --out. Features come from a second "
        "classifier of the run's recipe with another seed (RUN_DIR/feature-classifier, trained "
        "on the first evaluation), not from the run's classifier that rejects the samples, "
        "unless --inception-weights or --feature-classifier is given; classifier features give "
        "numbers that are not comparable with published FID/IS.",
    )
    _add_run_dir(evaluate, "run folder with the VQ-VAE, priors, classifier")
    _add_data(evaluate)
    evaluate.add_argument("--out", type=Path, required=True, help="report folder to write")
    evaluate.add_argument(
        "--n-samples",
        dest="num_samples",
        metavar="N_SAMPLES",
        type=int,
        help="samples per metric set at each rejection rate (10000)",
    )
    evaluate.add_argument(
        "--reject-fractions",
        type=_fractions,
        help="comma-separated rejection rates in [0, 1) (default 0,0.25,0.5,0.75)",
    )
    evaluate.add_argument(
        "--cas-samples", type=int, help="samples the CAS classifier trains on (default: train size)"
    )
    evaluate.add_argument(
        "--cas-steps",
        type=int,
        help="CAS classifier steps (default: those of the run's classifier)",
    )
    evaluate.add_argument(
        "--inception-weights",
        type=Path,
        help="FID InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth) for the features",
    )
    evaluate.add_argument(
        "--feature-classifier",
        type=Path,
        help="take features from this classifier folder (default RUN_DIR/feature-classifier)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_output_options(evaluate, "the whole report")
    _add_device_option(evaluate)


def _add_codec(commands: argparse._SubParsersAction) -> None:
    """``compress`` and ``decompress``."""
    compress = _command(
        commands,
        "compress",
        "compress images losslessly in their codes: VQ-VAE codes range-coded with the priors",
        description="Each image goes to its codes (stage-1 encoder), and every level, top first, "
        "is range-coded with its prior's probabilities into OUT/<name>.vq2 (docs/codec.md). "
        "Images no larger than the model's side are padded centred (undone on decompress), "
        "larger ones resized by their short side and centre-cropped. Runs on the CPU.",
    )
    _add_run_dir(
        compress, "run folder with the VQ-VAE and all priors, or its export (`vqvae2 export`)"
    )
    compress.add_argument("images", type=Path, nargs="+", help="image files")
    compress.add_argument("--out", type=Path, required=True, help="folder for the .vq2 files")
    compress.add_argument(
        "--label",
        type=int,
        nargs="+",
        help="class label: one for every image or one per image (class-conditional priors)",
    )
    _add_output_options(
        compress, "bits per pixel per level and in total, the priors' NLL and each file"
    )
    decompress = _command(
        commands,
        "decompress",
        "decode .vq2 files to PNG with the run that compressed them",
        description="The weights are not in the files: --run names the run they were "
        "compressed with or its export, whose models' fingerprint each file must match. Writes "
        "OUT/<name>.png at the original size of padded images.",
    )
    decompress.add_argument("files", type=Path, nargs="+", help=".vq2 files")
    decompress.add_argument(
        "--run",
        type=Path,
        required=True,
        help="the run (or its exported folder) the files were compressed with",
    )
    decompress.add_argument("--out", type=Path, required=True, help="folder for the PNG images")
    _add_output_options(decompress, "the files")


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = _command(
        commands,
        "export",
        "write a run's models as one shareable folder (Hub layout, model card; --onnx too)",
    )
    _add_run_dir(export, "run folder with the VQ-VAE and all priors")
    export.add_argument("out", type=Path, help="folder to write (new or empty)")
    export.add_argument(
        "--onnx", action="store_true", help="also write encoder.onnx and decoder.onnx"
    )
    export.add_argument(
        "--report",
        type=Path,
        help="evaluation report.json for the card, of these very weights (default: the newest "
        "such report in the run folder)",
    )


def _add_make_shards(commands: argparse._SubParsersAction) -> None:
    shards = _command(
        commands,
        "make-shards",
        "write an image folder as tar shards (image + class), splits kept; --data reads them",
    )
    shards.add_argument(
        "folder", type=Path, help="image folder (train/ beside val/ or test/, or one)"
    )
    shards.add_argument("out", type=Path, help="folder for the shards and shards.json")
    shards.add_argument(
        "--images-per-shard", type=int, default=1000, help="images per tar file (default 1000)"
    )
