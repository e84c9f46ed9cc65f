"""Command-line interface: each command parses (``vqvae2.cli_parser``), opens the run, calls
one library function and prints what it returns.

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
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_parser import DEFAULT_PRESET, build_parser
from .config import RuntimeConfig, VQVAERunConfig, check_temperature, list_presets
from .data import DEFAULT_DATA_PATH

if TYPE_CHECKING:
    from .run import Run

DEFAULT_CLASSIFIER = "classifier-fashion-mnist-32"  # without --run
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


def _report(args: argparse.Namespace, summarize: Callable[..., tuple[dict, str]], *inputs) -> int:
    """Print, on rank 0, what ``summarize(*inputs)`` returns: its record as JSON with --json,
    else its text. Returns the exit status 0."""
    if _is_main_process():
        record, text = summarize(*inputs)
        print(json.dumps(record) if getattr(args, "json", False) else text)
    return 0


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
    """What ``sample``, ``compress`` and ``decompress`` take: a run folder, a folder written by ``vqvae2 export``, or the
    Hub name (``owner/name``) of one."""
    from .export import is_export, load_pretrained

    # owner/name is a Hub name only when no such local folder could be meant (runs/typo is not)
    hub_name = not path.exists() and not path.parent.exists() and HUB_NAME.fullmatch(str(path))
    if is_export(path) or hub_name:
        return load_pretrained(path)
    return _open_run(path)


def _data_of(args: argparse.Namespace, recorded: Path | str | None) -> Path:
    """``--data`` when given, else the image source the run trained on (``recorded``), else
    the default Fashion-MNIST files: commands on a run read its data unless told otherwise."""
    if args.data is not None:
        return args.data
    return Path(recorded) if recorded is not None else Path(DEFAULT_DATA_PATH)


# ----------------------------------------------------------------------------------------------
# Training commands


def _check_training(args: argparse.Namespace, *flags: str) -> None:
    """--max-minutes is positive; --resume continues the saved config: no config, overrides or
    ``flags`` beside it."""
    _check_positive(args.max_minutes, "--max-minutes")
    given = args.config is not None or args.overrides
    if args.resume and (given or any(getattr(args, f) is not None for f in flags)):
        names = ", ".join(["--config", *(f"--{f}" for f in flags)])
        raise ValueError(f"--resume continues the saved config; drop {names} and overrides")


def _new_config(args: argparse.Namespace, config_class: type, preset: str | None, base=None):
    """The config of a new run: preset or YAML, ``base``, overrides, then --max-steps and
    --seed (None on resume: the trainer reads the saved one)."""
    from .config import load_config, with_max_steps

    if args.resume:
        return None
    config = with_max_steps(
        load_config(config_class, preset, list(args.overrides), base), args.max_steps
    )
    if getattr(args, "seed", None) is None:
        return config
    return replace(config, train=replace(config.train, seed=args.seed))


def _training(args: argparse.Namespace) -> dict:
    """The run-length, progress and runtime arguments every trainer takes."""
    return {
        "max_minutes": args.max_minutes,
        "resume": args.resume,
        "max_steps": args.max_steps if args.resume else None,  # a new run's is in its config
        "progress": not args.quiet,
        "runtime": _runtime(args),
    }


def _cmd_train_vqvae(args: argparse.Namespace) -> int:
    from .train import train_vqvae, vqvae_summary

    _check_output(args.out, "--out", folder=True)
    _check_training(args, "seed")
    preset = args.config or DEFAULT_PRESET
    config = _new_config(args, VQVAERunConfig, preset)
    data = args.data if args.resume else _data_of(args, None)  # None: the run's own
    result = train_vqvae(config, data, args.out, preset=preset, **_training(args))
    return _report(args, vqvae_summary, result)


def _cmd_train_prior(args: argparse.Namespace) -> int:
    from .config import PriorRunConfig
    from .train import prior_summary, train_prior

    run = _open_run(args.run_dir)
    run.level_index(args.level)  # a clear error before any preset lookup
    _check_training(args)
    preset = args.config or (None if args.resume else run.preset_for(f"prior-{args.level}"))
    config = _new_config(args, PriorRunConfig, preset)
    result = train_prior(run, args.level, config, **_training(args))
    return _report(args, prior_summary, args.level, result)


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from .config import ClassifierRunConfig
    from .fit import classifier_summary, train_classifier

    run = None if args.run is None else _open_run(args.run)
    preset = args.config or (DEFAULT_CLASSIFIER if run is None else None)
    if preset is None and not args.resume:  # a resumed classifier keeps its saved config
        preset = run.preset_for("classifier")
    out = args.out or (run.classifier_dir if run else None)
    if out is None:
        raise ValueError("give --out DIR (or --run RUN_DIR to write RUN_DIR/classifier)")
    _check_output(out, "--out", folder=True)
    _check_training(args)
    config = _new_config(args, ClassifierRunConfig, preset, run and _image_shape(run))
    # Without --data: the stage-1 run's images, or those a resumed --out classifier trained on.
    data = args.data if args.resume and run is None else _data_of(args, run and run.data_path)
    result = train_classifier(config, data, out, **_training(args))
    return _report(args, classifier_summary, result)


def _image_shape(run: Run) -> dict:
    """The config values a classifier takes from the run it serves: its images' size."""
    model = run.config.model
    return {"model": {"image_size": model.image_size, "in_channels": model.in_channels}}


# ----------------------------------------------------------------------------------------------
# Commands on a trained run


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from .export import PretrainedModels
    from .reconstruct import reconstruct, reconstruction_text

    _check_output(args.out, "--out")
    run = _open_models(args.run_dir)
    if isinstance(run, PretrainedModels) and args.data is None and not args.images:
        raise ValueError(f"{args.run_dir} is an exported model: give --data PATH or image files")
    data = None if args.images and args.data is None else _data_of(args, run.data_path)
    runtime = _runtime(args)
    result = reconstruct(run, data, args.split, args.out, args.images, runtime=runtime)
    return _report(args, lambda: (result, reconstruction_text(result)))


def _cmd_extract_codes(args: argparse.Namespace) -> int:
    from .extract import extract_codes

    run = _open_run(args.run_dir)
    data, runtime = _data_of(args, run.data_path), _runtime(args)
    written = extract_codes(
        run,
        data,
        progress=not args.quiet,
        runtime=runtime,
        augment=args.augment,
        shard_size=args.shard_size,
    )
    for split, path in written.items():
        if _is_main_process():
            print(f"{split}: {path}")
    return 0


def _check_sample_options(args: argparse.Namespace) -> None:
    """What the sampling functions do not check themselves, before the models load."""
    for temperature in args.temperature:
        _check_positive(temperature, "--temperature")
        check_temperature(temperature, "--temperature")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be an integer >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    _check_output(args.out, "--out")
    _check_output(args.save_images, "--save-images", folder=True)
    _check_output(args.save_codes, "--save-codes")
    if args.reject_fraction is not None and args.accept_threshold is not None:
        raise ValueError("give --reject-fraction or --accept-threshold, not both")
    if _rejecting(args) and args.save_codes is not None:
        raise ValueError("--save-codes is not available with rejection sampling")


def _rejecting(args: argparse.Namespace) -> bool:
    return args.reject_fraction is not None or args.accept_threshold is not None


def _draw_settings(args: argparse.Namespace) -> dict:
    """How each image is drawn, as the summary records it (one temperature, or one per level
    top first; top-k and top-p when given)."""
    temperature = args.temperature[0] if len(args.temperature) == 1 else args.temperature
    settings = {"temperature": temperature, "seed": args.seed, "sampler": args.sampler}
    filters = {"top_k": args.top_k, "top_p": args.top_p}
    return {**settings, **{name: value for name, value in filters.items() if value is not None}}


def _draw_arguments(args: argparse.Namespace) -> dict:
    """How each image is drawn, as ``sample_from_run`` and ``sample_with_rejection`` take it:
    the controls of each level (``DrawControls``: one for every level, or one per level)."""
    from .sampling import DrawControls

    controls = tuple(
        DrawControls(temperature, top_k=args.top_k, top_p=args.top_p)
        for temperature in args.temperature
    )
    return {"temperature": controls, "seed": args.seed, "sampler": args.sampler}


def _cmd_sample(args: argparse.Namespace) -> int:
    from . import sample

    _check_sample_options(args)
    if _rejecting(args):
        return _cmd_sample_with_rejection(args)
    models, draw, runtime = _open_models(args.run_dir), _draw_arguments(args), _runtime(args)
    result = sample.sample_from_run(
        models, args.n, args.classes, **draw, progress=not args.quiet, runtime=runtime
    )
    columns = sample.grid_columns(args.n, args.classes)
    sample.write_samples(result.images, args.out, columns, args.save_images)
    if args.save_codes is not None:
        sample.write_codes(result, args.save_codes)
    return _report(args, sample.sample_summary, models, result, args.out, _draw_settings(args))


def _cmd_sample_with_rejection(args: argparse.Namespace) -> int:
    """``sample --reject-fraction F`` / ``--accept-threshold T`` (Section 3.3)."""
    from . import sample

    rejection = {"reject_fraction": args.reject_fraction, "accept_threshold": args.accept_threshold}
    settings, runtime = {**rejection, **_draw_settings(args)}, _runtime(args)
    models, draw = _open_models(args.run_dir), {**rejection, **_draw_arguments(args)}
    result = sample.sample_with_rejection(
        models, args.n, args.classes, **draw, progress=not args.quiet, runtime=runtime
    )
    columns = sample.grid_columns(args.n, args.classes)
    sample.write_samples(result.images, args.out, columns, args.save_images)
    if args.save_images is not None:
        sample.write_scores(result, args.save_images / "scores.npz")
    return _report(args, sample.rejection_summary, result, args.out, settings)


def _evaluate_config(args: argparse.Namespace):
    """The default ``EvaluateConfig`` with the options given and --seed."""
    from .config import EvaluateConfig

    names = ("num_samples", "cas_samples", "cas_steps", "reject_fractions")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return EvaluateConfig(seed=args.seed, **given)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run
    from .report import evaluate_command, evaluation_summary

    _check_output(args.out, "--out", folder=True)
    config = _evaluate_config(args)
    run = _open_run(args.run_dir)
    data, runtime = _data_of(args, run.data_path), _runtime(args)
    features = {"inception_weights": args.inception_weights}
    features["feature_classifier"] = args.feature_classifier
    command = evaluate_command(args.run_dir, data, args.out, config, runtime.device, **features)
    options = {**features, "progress": not args.quiet, "command": command, "runtime": runtime}
    report = evaluate_run(run, data, args.out, config, **options)
    return _report(args, evaluation_summary, report, args.out)


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress import compress_files, compression_report, compression_text

    models, progress = _open_models(args.run_dir), not args.quiet
    results = compress_files(models, args.images, args.out, args.label, progress)
    report = compression_report(models, results)
    return _report(args, lambda: (report, compression_text(report, args.out)))


def _cmd_decompress(args: argparse.Namespace) -> int:
    from .compress import decompress_files, decompression_summary

    models = _open_models(args.run)
    results = decompress_files(models, args.files, args.out, progress=not args.quiet)
    return _report(args, decompression_summary, models, results, args.out)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run, load_pretrained
    from .onnx_export import export_onnx

    _check_output(args.out, "OUT", folder=True)
    if args.onnx:
        from .onnx_export import check_onnx_available

        check_onnx_available()  # before the export, so a missing package leaves no folder
    out = export_run(_open_run(args.run_dir), args.out, report=args.report)
    if args.onnx:
        export_onnx(load_pretrained(out).vqvae, out)
    print(f"exported {args.run_dir} to {out}" + (" (with encoder.onnx, decoder.onnx)" * args.onnx))
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    from .shards import write_shards

    print(write_shards(args.folder, args.out, images_per_shard=args.images_per_shard).summary())
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    print("\n".join(list_presets()))
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train-vqvae": _cmd_train_vqvae,
    "reconstruct": _cmd_reconstruct,
    "extract-codes": _cmd_extract_codes,
    "train-prior": _cmd_train_prior,
    "train-classifier": _cmd_train_classifier,
    "sample": _cmd_sample,
    "evaluate": _cmd_evaluate,
    "compress": _cmd_compress,
    "decompress": _cmd_decompress,
    "export": _cmd_export,
    "make-shards": _cmd_make_shards,
    "presets": _cmd_presets,
}


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
        status = HANDLERS[args.command](args)
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
