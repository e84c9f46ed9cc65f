"""Command-line interface: parses arguments, builds configs and calls library functions.

Every subcommand is a thin wrapper around a function importable from ``vqvae2``. User errors
(bad paths, bad configs, foreign checkpoints) end with one ``vqvae2: error: ...`` line and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import VQVAERunConfig, list_presets, load_config
from .data import DEFAULT_DATA_PATH, SPLITS

DEFAULT_PRESET = "fashion-mnist-32"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _cmd_train_vqvae(args: argparse.Namespace) -> int:
    from .train import train_vqvae

    overrides = list(args.overrides)
    if args.resume and (args.config is not None or overrides or args.seed is not None):
        raise ValueError("--resume continues the saved config; drop --config, --seed and overrides")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    config = load_config(VQVAERunConfig, args.config or DEFAULT_PRESET, overrides)
    result = train_vqvae(
        config,
        args.data,
        args.out,
        max_minutes=args.max_minutes,
        resume=args.resume,
        progress=not args.quiet,
    )
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
    from .train import reconstruct

    result = reconstruct(args.run_dir, args.data, args.split, args.out, image_files=args.images)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['split']}: {result['images']} images, MSE {result['mse']:.5f}, "
            f"PSNR {result['psnr']:.2f} dB"
        )
        print(f"grid: {result['grid']}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqvae2",
        description="VQ-VAE-2 (Razavi et al. 2019): hierarchical VQ-VAE and autoregressive priors.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        default=DEFAULT_DATA_PATH,
        help=f"image source: IDX folder, image folder or .npz (default: {DEFAULT_DATA_PATH})",
    )
    train.add_argument("--out", type=Path, required=True, help="run folder to write")
    train.add_argument("--max-minutes", type=float, help="stop after this much wall time")
    train.add_argument("--max-steps", type=int, help="sets train.max_steps")
    train.add_argument("--seed", type=int, help="sets train.seed")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.set_defaults(handler=_cmd_train_vqvae)

    recon = commands.add_parser(
        "reconstruct",
        help="write original / reconstruction / per-level grids and measure a split",
        description="Rows of the grid: originals, reconstructions, then decodes from the top "
        "level alone, the top two levels, ... (what each level adds).",
    )
    recon.add_argument("run_dir", type=Path, help="stage-1 run folder")
    recon.add_argument("--data", type=Path, default=None, help="image source to measure")
    recon.add_argument("--split", choices=SPLITS, default="test", help="split (default: test)")
    recon.add_argument("--images", nargs="+", help="image files to reconstruct instead")
    recon.add_argument("--out", type=Path, required=True, help="grid PNG to write")
    recon.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    recon.set_defaults(handler=_cmd_reconstruct)

    presets = commands.add_parser("presets", help="list the built-in config presets")
    presets.set_defaults(handler=_cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="vqvae2: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("vqvae2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"vqvae2: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
