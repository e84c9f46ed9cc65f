"""Command-line interface: parses arguments, builds configs and calls library functions.

Every subcommand is a thin wrapper around a function importable from ``vqvae2``. User errors
(bad paths, bad configs, foreign checkpoints) end with one ``vqvae2: error: ...`` line and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import RuntimeConfig, VQVAERunConfig, check_temperature, list_presets
from .data import AUGMENTATION_KINDS, DEFAULT_DATA_PATH, SPLITS

if TYPE_CHECKING:
    from torch import Tensor

    from .run import Run

DEFAULT_PRESET = "fashion-mnist-32"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _runtime(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(
        device=args.device,
        precision=getattr(args, "precision", "float32"),
        compile=getattr(args, "compile", False),
        channels_last=getattr(args, "channels_last", False),
        tensorboard=getattr(args, "tensorboard", False),
    )


def _is_main_process() -> bool:
    """Under torchrun only rank 0 reports; the other processes stay silent."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_output(path: Path | None, option: str, folder: bool = False) -> None:
    """Refuse, before any long work, an output that cannot be written: the nearest existing
    folder above it must be one this process may write in (missing folders are created when
    the output is written), and a file output must not be a folder."""
    if path is None:
        return
    if not folder and path.is_dir():
        raise ValueError(f"{option} {path} is a folder")
    existing = path if folder else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write in {existing}")


def _check_positive(value: float | None, option: str) -> None:
    """A finite number > 0, or None (not given)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} must be a positive number, got {value}")


def _open_run(path: Path) -> Run:
    """The run a command works on, opened once."""
    from .run import Run

    return Run.open(path)


HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name


def _open_models(path: Path):
    """What ``sample`` draws from: a run folder, a folder written by ``vqvae2 export``, or the
    Hub name (``owner/name``) of one."""
    from .export import is_export, load_pretrained

    if is_export(path) or (not path.exists() and HUB_NAME.fullmatch(str(path))):
        return load_pretrained(path)
    return _open_run(path)


def _data_of(args: argparse.Namespace, recorded: Path | str | None) -> Path:
    """``--data`` when given, else the image source the run trained on (``recorded``), else
    the default Fashion-MNIST files: commands on a run read its data unless told otherwise."""
    if args.data is not None:
        return args.data
    return Path(recorded) if recorded is not None else Path(DEFAULT_DATA_PATH)


def _check_resume(args: argparse.Namespace, *flags: str) -> None:
    """--resume continues the saved config: no config, overrides or ``flags`` beside it."""
    given = args.config is not None or args.overrides or any(getattr(args, f) for f in flags)
    if args.resume and given:
        names = ", ".join(["--config", *(f"--{f}" for f in flags)])
        raise ValueError(f"--resume continues the saved config; drop {names} and overrides")


def _new_config(args: argparse.Namespace, config_class: type, preset: str, base=None):
    """The config of a new run: preset or YAML, overrides, then --max-steps (None on resume:
    the trainer reads the saved one)."""
    from .config import load_config, with_max_steps

    if args.resume:
        return None
    config = load_config(config_class, preset, list(args.overrides), base)
    return with_max_steps(config, args.max_steps)


def _cmd_train_vqvae(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .train import train_vqvae

    _check_output(args.out, "--out", folder=True)
    _check_positive(args.max_minutes, "--max-minutes")
    if args.resume and (args.config is not None or args.overrides or args.seed is not None):
        raise ValueError("--resume continues the saved config; drop --config, --seed and overrides")
    config = _new_config(args, VQVAERunConfig, args.config or DEFAULT_PRESET)
    if config is not None and args.seed is not None:
        config = replace(config, train=replace(config.train, seed=args.seed))
    result = train_vqvae(
        config,
        args.data if args.resume else _data_of(args, None),
        args.out,
        max_minutes=args.max_minutes,
        resume=args.resume,
        max_steps=args.max_steps if args.resume else None,
        progress=not args.quiet,
        preset=args.config or DEFAULT_PRESET,
        runtime=_runtime(args),
    )
    if not _is_main_process():
        return 0
    summary = {"run_dir": str(result.run_dir), "step": result.step, **result.metrics}
    if args.json:
        print(json.dumps(summary))
    else:
        usage = ", ".join(
            f"{key[len('usage_') :]} {value:.1%}"
            for key, value in result.metrics.items()
            if key.startswith("usage_")
        )
        print(
            f"trained {result.step} steps; validation MSE {result.metrics['mse']:.5f} "
            f"(PSNR {result.metrics['psnr']:.2f} dB), codes in use: {usage}"
        )
        print(f"run folder: {result.run_dir}")
    return 0


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from .reconstruct import reconstruct

    _check_output(args.out, "--out")
    run = _open_run(args.run_dir)
    data = None if args.images and args.data is None else _data_of(args, run.data_path)
    result = reconstruct(
        run,
        data,
        args.split,
        args.out,
        image_files=args.images,
        runtime=_runtime(args),
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['split']}: {result['images']} images, MSE {result['mse']:.5f}, "
            f"PSNR {result['psnr']:.2f} dB"
        )
        for name, level in result["levels"]["levels"].items():
            print(
                f"{name}: code perplexity {level['perplexity']:.1f} ({level['bits']:.2f} bits); "
                f"swapping its codes changes the output by MSE {level['swap_mse']:.5f}, "
                f"{level['swap_coarse_share']:.0%} of it at the top map's scale"
            )
        for name, prefix in result["levels"]["prefixes"].items():
            print(
                f"decoded from {name} alone: PSNR {prefix['psnr_vs_low_pass']:.2f} dB against the "
                f"image low-passed to {prefix['low_pass_side']}x{prefix['low_pass_side']}, "
                f"{prefix['psnr_vs_mean_image']:.2f} dB against the mean image"
            )
        print(f"grid: {result['grid']}")
    return 0


def _print_result(args: argparse.Namespace, result: dict, text: str) -> None:
    if _is_main_process():
        print(json.dumps(result) if args.json else text)


def _cmd_extract_codes(args: argparse.Namespace) -> int:
    from .train import extract_codes

    run = _open_run(args.run_dir)
    written = extract_codes(
        run,
        _data_of(args, run.data_path),
        progress=not args.quiet,
        runtime=_runtime(args),
        augment=args.augment,
    )
    for split, path in written.items():
        if _is_main_process():
            print(f"{split}: {path}")
    return 0


def _default_preset(run: Run, prefix: str) -> str:
    """``prefix-<VQ-VAE preset>`` when the run was trained from a preset that has one."""
    name = f"{prefix}-{run.preset}"
    if run.preset is None or name not in list_presets():
        raise ValueError(f"no preset '{name}' for this run; pass --config PRESET_OR_YAML")
    return name


def _cmd_train_prior(args: argparse.Namespace) -> int:
    from .config import PriorRunConfig
    from .train import train_prior

    run = _open_run(args.run_dir)
    run.level_index(args.level)  # a clear error before any preset lookup
    _check_positive(args.max_minutes, "--max-minutes")
    _check_resume(args)
    preset = args.config or (None if args.resume else _default_preset(run, f"prior-{args.level}"))
    result = train_prior(
        run,
        args.level,
        _new_config(args, PriorRunConfig, preset),
        max_minutes=args.max_minutes,
        resume=args.resume,
        max_steps=args.max_steps if args.resume else None,
        progress=not args.quiet,
        runtime=_runtime(args),
    )
    metrics = result.metrics
    if not metrics:
        return 0  # not rank 0
    _print_result(
        args,
        {"level": args.level, "step": result.step, **metrics},
        f"{args.level} prior, {result.step} steps: NLL train {metrics['train_nll_nats']:.4f} "
        f"nats/code ({metrics['train_nll_bits']:.4f} bits), validation "
        f"{metrics['val_nll_nats']:.4f} nats/code ({metrics['val_nll_bits']:.4f} bits)",
    )
    return 0


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from .config import ClassifierRunConfig
    from .train import train_classifier

    out, preset, base, run = args.out, args.config, None, None
    if args.run is not None:
        run = _open_run(args.run)
        model = run.config.model
        base = {"model": {"image_size": model.image_size, "in_channels": model.in_channels}}
        out = out or run.classifier_dir
        preset = preset or _default_preset(run, "classifier")
    if out is None:
        raise ValueError("give --out DIR (or --run RUN_DIR to write RUN_DIR/classifier)")
    _check_output(out, "--out", folder=True)
    _check_positive(args.max_minutes, "--max-minutes")
    _check_resume(args)
    config = _new_config(args, ClassifierRunConfig, preset or "classifier-fashion-mnist-32", base)
    # Without --data: the stage-1 run's images, or those a resumed --out classifier trained on.
    if args.resume and run is None:
        data = args.data  # None: the one the classifier trained on
    else:
        data = _data_of(args, None if run is None else run.data_path)
    result = train_classifier(
        config,
        data,
        out,
        max_minutes=args.max_minutes,
        resume=args.resume,
        max_steps=args.max_steps if args.resume else None,
        progress=not args.quiet,
        runtime=_runtime(args),
    )
    metrics = result.metrics
    if not metrics:
        return 0  # not rank 0
    _print_result(
        args,
        {"out": str(out), "step": result.step, **metrics},
        f"classifier, {result.step} steps: test accuracy {metrics['test_accuracy']:.2%} "
        f"(validation {metrics['val_accuracy']:.2%}); saved in {out}",
    )
    return 0


def _write_sample_images(args: argparse.Namespace, images: Tensor) -> None:
    """The grid (one row per requested class) and, with --save-images, each image."""
    from .sample import grid_columns, write_samples

    write_samples(images, args.out, grid_columns(args.n, args.classes), args.save_images)


def _check_sample_options(args: argparse.Namespace) -> None:
    """What the sampling functions do not check themselves, before the models load."""
    _check_positive(args.temperature, "--temperature")
    check_temperature(args.temperature, "--temperature")
    _check_output(args.out, "--out")
    _check_output(args.save_images, "--save-images", folder=True)
    _check_output(args.save_codes, "--save-codes")


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sample import class_agreement_of, sample_from_run, write_codes

    _check_sample_options(args)
    if args.reject_fraction is not None or args.accept_threshold is not None:
        return _cmd_sample_with_rejection(args)
    run = _open_models(args.run_dir)
    result = sample_from_run(
        run,
        args.n,
        classes=args.classes,
        temperature=args.temperature,
        seed=args.seed,
        progress=not args.quiet,
        sampler=args.sampler,
        runtime=_runtime(args),
    )
    _write_sample_images(args, result.images)
    if args.save_codes is not None:
        write_codes(result, args.save_codes)
    summary: dict = {
        "samples": args.n,
        "sampler": args.sampler,
        "grid": str(args.out),
        "seed": args.seed,
        "temperature": args.temperature,
    }
    agreement = class_agreement_of(run, result)
    if agreement is not None:
        summary["class_agreement"] = agreement
    text = f"{args.n} samples: {args.out}"
    if "class_agreement" in summary:
        text += (
            f"\nthe run's classifier assigns the requested class to "
            f"{summary['class_agreement']:.1%} of them"
        )
    _print_result(args, summary, text)
    return 0


def _cmd_sample_with_rejection(args: argparse.Namespace) -> int:
    """``sample --reject-fraction F`` / ``--accept-threshold T`` (Section 3.3)."""
    from .sample import sample_with_rejection, write_scores

    if args.reject_fraction is not None and args.accept_threshold is not None:
        raise ValueError("give --reject-fraction or --accept-threshold, not both")
    if args.save_codes is not None:
        raise ValueError("--save-codes is not available with rejection sampling")
    result = sample_with_rejection(
        _open_models(args.run_dir),
        args.n,
        classes=args.classes,
        reject_fraction=args.reject_fraction,
        accept_threshold=args.accept_threshold,
        temperature=args.temperature,
        seed=args.seed,
        progress=not args.quiet,
        sampler=args.sampler,
        runtime=_runtime(args),
    )
    _write_sample_images(args, result.images)
    if args.save_images is not None:
        write_scores(result, args.save_images / "scores.npz")
    summary = {
        "samples": args.n,
        "candidates": result.candidates,
        "accepted_fraction": args.n / result.candidates,
        "reject_fraction": args.reject_fraction,
        "accept_threshold": args.accept_threshold,
        "mean_score": float(result.scores.mean()),
        "min_score": float(result.scores.min()),
        "sampler": args.sampler,
        "grid": str(args.out),
        "seed": args.seed,
        "temperature": args.temperature,
    }
    _print_result(
        args,
        summary,
        f"{args.n} samples kept of {result.candidates} drawn: {args.out}\n"
        f"the run's classifier gives their requested class a mean probability of "
        f"{summary['mean_score']:.3f} (lowest {summary['min_score']:.3f})",
    )
    return 0


def _fractions(text: str) -> list[float]:
    """``"0,0.25,0.5"`` -> [0.0, 0.25, 0.5] for ``--reject-fractions``."""
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,0.25,0.5,0.75, got {text!r}"
        ) from None


def _evaluate_command(args: argparse.Namespace, data: Path) -> str:
    """The command line of an ``evaluate`` call, for the report."""
    words = ["vqvae2", "evaluate", str(args.run_dir), "--data", str(data)]
    for option in (
        "n_samples",
        "cas_samples",
        "cas_steps",
        "inception_weights",
        "feature_classifier",
    ):
        value = getattr(args, option)
        if value is not None:
            words += [f"--{option.replace('_', '-')}", str(value)]
    if args.reject_fractions is not None:
        words += ["--reject-fractions", ",".join(f"{f:g}" for f in args.reject_fractions)]
    if args.device != "auto":
        words += ["--device", args.device]
    words += ["--seed", str(args.seed), "--out", str(args.out)]
    return " ".join(words)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .config import EvaluateConfig
    from .evaluate import evaluate_run
    from .report import REPORT_MARKDOWN

    _check_output(args.out, "--out", folder=True)
    config = EvaluateConfig()
    changes: dict = {"seed": args.seed}
    if args.n_samples is not None:
        changes["num_samples"] = args.n_samples
    if args.cas_samples is not None:
        changes["cas_samples"] = args.cas_samples
    if args.cas_steps is not None:
        changes["cas_steps"] = args.cas_steps
    if args.reject_fractions is not None:
        changes["reject_fractions"] = tuple(args.reject_fractions)
    config = replace(config, **changes)
    run = _open_run(args.run_dir)
    data = _data_of(args, run.data_path)
    report = evaluate_run(
        run,
        data,
        args.out,
        config,
        inception_weights=args.inception_weights,
        feature_classifier=args.feature_classifier,
        progress=not args.quiet,
        command=_evaluate_command(args, data),
        runtime=_runtime(args),
    )
    if not _is_main_process():
        return 0
    if args.json:
        print(json.dumps(report))
        return 0
    base, last = report["rejection"][0], report["rejection"][-1]
    table2 = report["table2"]
    print(
        f"CAS top-1: samples {table2['samples']['top1']:.2%} (after reconstructing "
        f"{table2['samples_after_reconstructing']['top1']:.2%}), real data "
        f"{table2['real']['top1']:.2%}"
    )
    print(
        f"no rejection: FID {base['fid']:.3f}, IS {base['inception_score']:.3f}, precision "
        f"{base['precision']:.3f}, recall {base['recall']:.3f}"
    )
    if last is not base:
        print(
            f"rejecting {last['reject_fraction']:.0%}: FID {last['fid']:.3f}, IS "
            f"{last['inception_score']:.3f}, precision {last['precision']:.3f}, recall "
            f"{last['recall']:.3f}"
        )
    print(f"report: {args.out / REPORT_MARKDOWN}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress import OVERHEAD_BYTES, compress_files, compression_report

    labels = args.label
    if labels is not None and len(labels) == 1:
        labels = labels * len(args.images)
    results = compress_files(
        args.run_dir, args.images, args.out, labels=labels, progress=not args.quiet
    )
    report = compression_report(args.run_dir, results)
    if args.json:
        print(json.dumps(report))
        return 0
    bits, nll = report["bits_per_pixel"], report["nll_bits_per_pixel"]
    levels = ", ".join(f"{name} {value:.3f}" for name, value in nll.items() if name != "total")
    print(
        f"compressed {report['images']} images into {args.out}: {report['file_bytes']:.1f} bytes "
        f"each on average ({report['payload_bytes']:.1f} payload + {OVERHEAD_BYTES} header), "
        f"{bits['file']:.3f} bits per pixel ({bits['payload']:.3f} for the payload)"
    )
    print(
        f"the priors' NLL of the codes: {nll['total']:.3f} bits per pixel ({levels}); the "
        f"payload is {report['payload_over_nll']:+.2%} over it"
    )
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    from .compress import decompress_files

    results = decompress_files(args.files, args.out, args.run, progress=not args.quiet)
    if args.json:
        files = [
            {
                "file": str(result.file),
                "png": str(result.png),
                "height": result.header.height,
                "width": result.header.width,
                "label": result.header.label,
            }
            for result in results
        ]
        print(json.dumps({"run": str(args.run), "images": len(results), "files": files}))
    else:
        print(f"decompressed {len(results)} files into {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run, load_pretrained
    from .onnx_export import export_onnx

    _check_output(args.out, "out", folder=True)
    out = export_run(_open_run(args.run_dir), args.out, report=args.report)
    if args.onnx:
        export_onnx(load_pretrained(out).vqvae, out)
    print(f"exported {args.run_dir} to {out}" + (" (with encoder.onnx, decoder.onnx)" * args.onnx))
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    from .shards import write_shards

    written = write_shards(args.folder, args.out, images_per_shard=args.images_per_shard)
    counts = ", ".join(
        f"{split} {written.images[split]} images in {len(paths)} shards"
        for split, paths in written.shards.items()
    )
    print(f"wrote {written.manifest}: {counts}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(name)
    return 0


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


def _add_training_options(parser: argparse.ArgumentParser, result: str) -> None:
    """Options every training subcommand shares; ``result`` names what --json prints."""
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
        _add_compress,
        _add_decompress,
        _add_export,
        _add_make_shards,
        _add_presets,
    ):
        add_command(commands)
    return parser


def _add_train_vqvae(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train-vqvae",
        help="train stage 1 (the hierarchical VQ-VAE)",
        description="Train stage 1. Config: a preset name or YAML file, then key=value overrides "
        "such as model.codebook_size=256 or train.batch_size=64.",
    )
    train.add_argument(
        "--config",
        help=f"preset name or YAML file (default: {DEFAULT_PRESET}; presets: "
        f"{', '.join(list_presets())})",
    )
    train.add_argument(
        "--data",
        type=Path,
        help=f"image source: IDX folder, image folder or .npz (default: {DEFAULT_DATA_PATH}; "
        "with --resume, the run's own)",
    )
    train.add_argument("--out", type=Path, required=True, help="run folder to write")
    train.add_argument("--seed", type=int, help="sets train.seed")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    _add_training_options(train, "the final metrics")
    train.set_defaults(handler=_cmd_train_vqvae)


def _add_reconstruct(commands: argparse._SubParsersAction) -> None:
    recon = commands.add_parser(
        "reconstruct",
        help="write original / reconstruction / per-level grids and measure a split",
        description="Rows of the grid: originals, reconstructions, then decodes from the top "
        "level alone, the top two levels, ... (what each level adds).",
    )
    recon.add_argument("run_dir", type=Path, help="stage-1 run folder")
    recon.add_argument(
        "--data",
        type=Path,
        help="image source to measure (default without --images: the one the run trained on)",
    )
    recon.add_argument("--split", choices=SPLITS, default="test", help="split (default: test)")
    recon.add_argument("--images", nargs="+", help="image files to reconstruct instead")
    recon.add_argument("--out", type=Path, required=True, help="grid PNG to write")
    recon.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_device_option(recon)
    recon.set_defaults(handler=_cmd_reconstruct)


def _add_extract_codes(commands: argparse._SubParsersAction) -> None:
    extract = commands.add_parser(
        "extract-codes",
        help="encode the train and validation splits into RUN_DIR/codes (Algorithm 2, 1-7)",
    )
    extract.add_argument("run_dir", type=Path, help="stage-1 run folder")
    extract.add_argument(
        "--data", type=Path, help="image source (default: the one the run trained on)"
    )
    extract.add_argument(
        "--augment",
        nargs="+",
        choices=AUGMENTATION_KINDS,
        default=[],
        help="also store the codes of flipped and/or one-pixel-shifted training images in "
        "codes/train-augmented; priors then train on them conditioned on the transform "
        "(distribution augmentation) and evaluate and sample with the identity",
    )
    _add_output_options(extract, None)
    _add_device_option(extract)
    extract.set_defaults(handler=_cmd_extract_codes)


def _add_train_prior(commands: argparse._SubParsersAction) -> None:
    prior = commands.add_parser(
        "train-prior",
        help="train the PixelSNAIL prior of one level on the extracted codes",
        description="Config: a prior preset (default prior-LEVEL-<the VQ-VAE's preset>) or YAML.",
    )
    prior.add_argument("run_dir", type=Path, help="stage-1 run folder (with extracted codes)")
    prior.add_argument("--level", required=True, choices=("top", "middle", "bottom"))
    prior.add_argument("--config", help="prior preset name or YAML file")
    prior.add_argument("--resume", action="store_true", help="continue this level's prior")
    _add_training_options(prior, "the final NLL")
    prior.set_defaults(handler=_cmd_train_prior)


def _add_train_classifier(commands: argparse._SubParsersAction) -> None:
    classifier = commands.add_parser(
        "train-classifier",
        help="train the image classifier used for rejection sampling and evaluation",
    )
    classifier.add_argument(
        "--data",
        type=Path,
        help=f"image source (default: that of --run or of the resumed classifier, else "
        f"{DEFAULT_DATA_PATH})",
    )
    classifier.add_argument("--out", type=Path, help="output folder (default RUN_DIR/classifier)")
    classifier.add_argument("--run", type=Path, help="stage-1 run: image size, channels, --out")
    classifier.add_argument("--config", help="classifier preset name or YAML file")
    classifier.add_argument(
        "--resume", action="store_true", help="continue the classifier in --out"
    )
    _add_training_options(classifier, "the accuracy")
    classifier.set_defaults(handler=_cmd_train_classifier)


def _add_sample(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser(
        "sample",
        help="draw images: top codes, then each lower level, then one decoder pass",
    )
    sample.add_argument(
        "run_dir",
        type=Path,
        help="run folder with the VQ-VAE and all priors, or an exported model (folder or owner/name)",
    )
    sample.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    sample.add_argument(
        "--class",
        dest="classes",
        type=int,
        nargs="+",
        help="class label(s): --n spread over them in blocks, the first ones one more",
    )
    sample.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument("--out", type=Path, required=True, help="grid PNG to write")
    sample.add_argument("--save-images", type=Path, help="also write each image into this folder")
    sample.add_argument("--save-codes", type=Path, help="also write the codes to this .npz")
    _add_output_options(sample, "a summary")
    sample.add_argument(
        "--sampler",
        choices=("cached", "reference"),
        default="cached",
        help="cached: incremental (default); reference: one full forward pass per position",
    )
    sample.add_argument(
        "--reject-fraction",
        type=float,
        help="classifier rejection (Section 3.3): draw n/(1-F) per class, keep the n the run's "
        "classifier scores highest for their class",
    )
    sample.add_argument(
        "--accept-threshold",
        type=float,
        help="classifier rejection: keep samples whose class probability is at least this",
    )
    _add_device_option(sample)
    sample.set_defaults(handler=_cmd_sample)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="Tables 1-2 and Fig. 7: NLL, MSE, CAS, FID/FID*/KID/IS, precision/recall vs rejection",
        description="Evaluate a trained run (VQ-VAE, priors, classifier) and write report.json, "
        "report.md, Fig. 7 plots and sample grids to --out. Features come from a second "
        "classifier of the run's recipe with another seed (RUN_DIR/feature-classifier, trained "
        "on the first evaluation), not from the run's classifier that rejects the samples, "
        "unless --inception-weights or --feature-classifier is given; classifier features give "
        "numbers that are not comparable with published FID/IS.",
    )
    evaluate.add_argument(
        "run_dir", type=Path, help="run folder with the VQ-VAE, priors, classifier"
    )
    evaluate.add_argument(
        "--data", type=Path, help="the image source of the run (default: the one it trained on)"
    )
    evaluate.add_argument("--out", type=Path, required=True, help="report folder to write")
    evaluate.add_argument(
        "--n-samples", type=int, help="samples per metric set at each rejection rate (10000)"
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
    evaluate.set_defaults(handler=_cmd_evaluate)


def _add_compress(commands: argparse._SubParsersAction) -> None:
    compress = commands.add_parser(
        "compress",
        help="compress images losslessly in their codes: VQ-VAE codes range-coded with the priors",
        description="Each image goes to its codes (stage-1 encoder), and every level, top first, "
        "is range-coded with its prior's probabilities into OUT/<name>.vq2 (docs/codec.md). "
        "Images no larger than the model's side are padded centred (undone on decompress), "
        "larger ones resized by their short side and centre-cropped. Runs on the CPU.",
    )
    compress.add_argument("run_dir", type=Path, help="run folder with the VQ-VAE and all priors")
    compress.add_argument("images", type=Path, nargs="+", help="image files")
    compress.add_argument("--out", type=Path, required=True, help="folder for the .vq2 files")
    compress.add_argument(
        "--label",
        type=int,
        nargs="+",
        help="class label: one for every image or one per image (class-conditional priors)",
    )
    compress.add_argument("--quiet", action="store_true", help="no progress bar")
    compress.add_argument(
        "--json",
        action="store_true",
        help="print bits per pixel per level and in total, the priors' NLL and each file, as JSON",
    )
    compress.set_defaults(handler=_cmd_compress)


def _add_decompress(commands: argparse._SubParsersAction) -> None:
    decompress = commands.add_parser(
        "decompress",
        help="decode .vq2 files to PNG with the run that compressed them",
        description="The weights are not in the files: --run names the run they were "
        "compressed with, which each file's model fingerprint must match. Writes "
        "OUT/<name>.png at the original size of padded images.",
    )
    decompress.add_argument("files", type=Path, nargs="+", help=".vq2 files")
    decompress.add_argument(
        "--run", type=Path, required=True, help="the run folder the files were compressed with"
    )
    decompress.add_argument("--out", type=Path, required=True, help="folder for the PNG images")
    _add_output_options(decompress, "the files")
    decompress.set_defaults(handler=_cmd_decompress)


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a run's models as one shareable folder (Hub layout, model card; --onnx too)",
    )
    export.add_argument("run_dir", type=Path, help="run folder with the VQ-VAE and all priors")
    export.add_argument("out", type=Path, help="folder to write (new or empty)")
    export.add_argument(
        "--onnx", action="store_true", help="also write encoder.onnx and decoder.onnx"
    )
    export.add_argument(
        "--report", type=Path, help="evaluation report.json for the card (default: the newest)"
    )
    export.set_defaults(handler=_cmd_export)


def _add_make_shards(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser(
        "make-shards",
        help="write an image folder as tar shards (image + class), splits kept; --data reads them",
    )
    shards.add_argument(
        "folder", type=Path, help="image folder (train/ beside val/ or test/, or one)"
    )
    shards.add_argument("out", type=Path, help="folder for the shards and shards.json")
    shards.add_argument(
        "--images-per-shard", type=int, default=1000, help="images per tar file (default 1000)"
    )
    shards.set_defaults(handler=_cmd_make_shards)


def _add_presets(commands: argparse._SubParsersAction) -> None:
    presets = commands.add_parser("presets", help="list the built-in config presets")
    presets.set_defaults(handler=_cmd_presets)


def error_line(error: BaseException) -> str:
    """The one line a user sees for ``error``: its message's first line, or for an error that a
    DataLoader worker process re-raised, the original error's own message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and "Original Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]  # "ValueError: the message" -> "the message"
    return lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="vqvae2: %(message)s", stream=sys.stderr)
    parser = build_parser()
    # key=value overrides may sit anywhere among the options, which argparse's positional
    # matching does not allow: collect the leftovers that look like overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from .distributed import shutdown

    finished = False
    try:
        status = args.handler(args)
        finished = True
        return status
    except KeyboardInterrupt:
        print("vqvae2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError) as error:
        print(f"vqvae2: error: {error_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        # After a failure the other processes may never reach the closing barrier.
        shutdown(wait_for_others=finished)
