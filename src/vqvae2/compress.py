"""Compressing image files with a run (or its export) and back: the latent codec's file layer.

The codec's core (``codec.py``) turns codes into bytes and back with a run's models; this module
opens what it needs: image files (fitted to the model's square and back), the models of a
``Run`` or of an export (``load_pretrained``) and the fingerprint of their content (the same for
both), the ``.vq2`` files (size-capped reads, checks against the models before any model is
built from a run), PNG output, progress bars, and the
report of a compression run (bits per pixel beside the priors' NLL). Format and coding are
described in ``codec.py`` and docs/codec.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from .checkpoint import META, MODEL_WEIGHTS, held_checkpoint_dir, read_checkpoint
from .codec import (
    CODING_BATCH_SIZE,
    FINGERPRINT_BYTES,
    FORMAT_VERSION,
    MAX_SIDE,
    OVERHEAD_BYTES,
    SUFFIX,
    CodecFormatError,
    EncodedImage,
    Fit,
    Header,
    PayloadError,
    Versions,
    codes_check,
    decode_batch,
    decode_images,
    encode_batch,
    max_file_bytes,
    pack_file,
    parse_file,
    running_versions,
    slot_batches,
)
from .config import PriorRunConfig, VQVAEConfig, VQVAERunConfig, config_from_dict
from .export import PretrainedModels
from .fingerprint import content_digest, models_digest
from .images import UNREADABLE, fit_uint8_array
from .pixelsnail import PixelSNAIL
from .report import save_png
from .run import (
    VQVAE_KIND,
    Run,
    has_checkpoint,
    level_names,
    load_prior,
    load_run_config,
    load_vqvae,
    prior_kind,
)
from .sampling import check_hierarchy
from .vqvae import VQVAE2

logger = logging.getLogger("vqvae2.compress")

# ----------------------------------------------------------------------------------------------
# Images in and out of the model's square


def fit_image(image: np.ndarray, size: int, channels: int) -> tuple[Tensor, Fit]:
    """An image as the model sees it, and how it was fitted.

    Images no larger than ``size`` either way are placed centred on a black square (as the IDX
    loader pads Fashion-MNIST's 28x28 to 32x32), larger ones resized by their short side and
    centre-cropped (``images.fit_uint8_array``).

    Args:
        image: (H, W) or (H, W, C) uint8, C in {1, 3, 4}.

    Returns:
        (channels, size, size) uint8 and "pad" or "resize".
    """
    height, width = image.shape[:2]
    fit: Fit = "pad" if height <= size and width <= size else "resize"
    return fit_uint8_array(image[None], size, channels)[0], fit


def unfit_image(image: Tensor, header: Header) -> Tensor:
    """Undo ``fit_image``'s padding: (C, S, S) uint8 -> (C, H, W) for a padded image, else as is."""
    if header.fit != "pad":
        return image
    size = image.shape[-1]
    top, left = (size - header.height) // 2, (size - header.width) // 2
    return image[:, top : top + header.height, left : left + header.width]


# ----------------------------------------------------------------------------------------------
# The models: a run's or an export's, and their fingerprint

Models = Run | PretrainedModels  # what the codec codes with: a run folder or an exported folder


def run_fingerprint(models: Models) -> bytes:
    """``FINGERPRINT_BYTES`` of the SHA-256 of the models' content: for the VQ-VAE and then each
    level's prior, top first, the model's config as canonical JSON and its weights in key order
    (``_content_fingerprint``). A run and its export have the same fingerprint; any change to a
    weight or a config changes it. Of a run it reads the checkpoints and builds no model.

    Raises:
        ValueError: the run lacks the VQ-VAE or a level's prior.
    """
    if isinstance(models, PretrainedModels):
        return _content_fingerprint([models.vqvae, *models.priors])
    with _held_run(models.path) as step_dirs:
        parts = []
        for kind, step_dir in step_dirs.items():
            checkpoint = read_checkpoint(step_dir, kind)
            if kind == VQVAE_KIND:
                config = config_from_dict(VQVAERunConfig, checkpoint.config).model
            else:
                config = config_from_dict(PriorRunConfig, checkpoint.config).prior
            parts.append((config, checkpoint.model_state))
    return content_digest(parts)[:FINGERPRINT_BYTES]


def run_files_fingerprint(run: Run) -> bytes:
    """The fingerprint of format version 1 files: ``FINGERPRINT_BYTES`` of the SHA-256 of the
    run's checkpoint files (metadata and weights of the VQ-VAE and each prior, top first, each
    framed by its kind, name and length)."""
    with _held_run(run.path) as step_dirs:
        return _files_fingerprint(step_dirs)


def _content_fingerprint(models: Sequence[VQVAE2 | PixelSNAIL]) -> bytes:
    return models_digest(models)[:FINGERPRINT_BYTES]


@contextmanager
def _held_run(run_dir: Path) -> Iterator[dict[str, Path]]:
    """The step folders of the VQ-VAE and of every level's prior (top first) by kind, held for
    the block: a trainer writing the run meanwhile does not delete them."""
    with ExitStack() as stack:
        step_dirs = {}
        for kind in (VQVAE_KIND, *(prior_kind(level) for level in level_names(run_dir))):
            if not has_checkpoint(run_dir / kind):
                raise ValueError(f"{run_dir} has no trained {kind} checkpoint")
            step_dirs[kind] = stack.enter_context(held_checkpoint_dir(run_dir, kind))
        yield step_dirs


def _files_fingerprint(step_dirs: dict[str, Path]) -> bytes:
    digest = hashlib.sha256()
    for kind, step_dir in step_dirs.items():
        for name in (META, MODEL_WEIGHTS):
            path = step_dir / name
            digest.update(f"{kind}/{name}:{path.stat().st_size}:".encode())
            with open(path, "rb") as handle:
                while chunk := handle.read(_READ_CHUNK):
                    digest.update(chunk)
    return digest.digest()[:FINGERPRINT_BYTES]


_READ_CHUNK = 1 << 20


class LoadedModels(NamedTuple):
    vqvae: VQVAE2
    priors: list[PixelSNAIL]  # one per level, top first
    fingerprint: bytes  # of their content (``run_fingerprint``)
    files_fingerprint: bytes | None  # of a run's checkpoint files; None for an export


def _load_models(models: Models) -> LoadedModels:
    """The models and their fingerprints: a run's loaded on the CPU, all from the same held
    step folders; an export's as they are (the core refuses models off the CPU)."""
    if isinstance(models, PretrainedModels):
        vqvae, priors = models.vqvae, list(models.priors)
        return LoadedModels(vqvae, priors, _content_fingerprint([vqvae, *priors]), None)
    with _held_run(models.path) as step_dirs:
        files_fingerprint = _files_fingerprint(step_dirs)
        vqvae = load_vqvae(step_dirs[VQVAE_KIND])
        priors = [
            load_prior(step_dirs[prior_kind(level)], level) for level in vqvae.config.level_names
        ]
    check_hierarchy(vqvae, priors)
    return LoadedModels(vqvae, priors, _content_fingerprint([vqvae, *priors]), files_fingerprint)


def _model_facts(models: Models) -> tuple[VQVAEConfig, int]:
    """The VQ-VAE's config and the priors' number of classes (0: unconditional), read without
    building a model."""
    if isinstance(models, PretrainedModels):
        return models.vqvae.config, max(prior.config.num_classes for prior in models.priors)
    num_classes = max(
        load_run_config(models.path, prior_kind(level), PriorRunConfig).prior.num_classes
        for level in models.level_names
    )
    return models.config.model, num_classes


# ----------------------------------------------------------------------------------------------
# Files in and out


def _output_paths(paths: Sequence[Path], out_dir: Path, suffix: str) -> list[Path]:
    outputs = [out_dir / (path.stem + suffix) for path in paths]
    seen: dict[Path, Path] = {}
    for path, output in zip(paths, outputs, strict=True):
        if output in seen:
            raise ValueError(f"{seen[output]} and {path} would both be written to {output}")
        seen[output] = path
    return outputs


def _read_image(path: Path, channels: int) -> np.ndarray:
    """An image file as uint8 (H, W) grey or (H, W, 3) RGB."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except UNREADABLE as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    if max(array.shape[:2]) > MAX_SIDE:
        raise ValueError(f"{path} is larger than {MAX_SIDE} pixels a side")
    return array


def _checked_labels(
    priors: Sequence[PixelSNAIL], labels: Sequence[int] | None, count: int
) -> Tensor | None:
    """(count,) int64 labels for class-conditional priors (None otherwise), checked."""
    num_classes = max(prior.config.num_classes for prior in priors)
    if num_classes == 0:
        if labels is not None:
            raise ValueError("the run's priors are not class-conditional: give no labels")
        return None
    if labels is None:
        raise ValueError("the run's priors are class-conditional: give each image's class label")
    if len(labels) == 1:
        labels = list(labels) * count  # one class for every image
    if len(labels) != count:
        raise ValueError(f"{len(labels)} labels for {count} images")
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(
            f"class label {bad[0]} is out of range: the priors know 0..{num_classes - 1}"
        )
    return torch.tensor(list(labels), dtype=torch.long)


class CompressedFile(NamedTuple):
    image: Path  # the image file read
    file: Path  # the compressed file written
    header: Header
    encoded: EncodedImage
    size: int  # bytes of the compressed file


def compress_files(
    models: Models,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[int] | None = None,
    progress: bool = False,
) -> list[CompressedFile]:
    """Compress image files with a run's models: ``out_dir/<stem>.vq2`` per image.

    Args:
        models: a ``Run`` with its VQ-VAE and every level's prior, or its export
            (``load_pretrained``); the files decompress with either.
        paths: image files (any size; grey or colour, converted to the model's channels).
        out_dir: folder for the compressed files (created).
        labels: one class per image (or one for all), required exactly when the priors are
            class-conditional.
        progress: show a progress bar.

    Returns:
        One ``CompressedFile`` per image, in order.
    """
    out_dir = Path(out_dir)
    paths = [Path(path) for path in paths]
    if not paths:
        raise ValueError("no image files given")
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"image file {missing[0]} does not exist")
    outputs = _output_paths(paths, out_dir, SUFFIX)
    vqvae, priors, fingerprint, _ = _load_models(models)
    versions = running_versions()
    all_labels = _checked_labels(priors, labels, len(paths))
    config = vqvae.config
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CompressedFile] = []
    starts = range(0, len(paths), CODING_BATCH_SIZE)
    for start in tqdm(starts, desc="compress", disable=not progress, leave=False):
        chunk = slice(start, start + CODING_BATCH_SIZE)
        arrays = [_read_image(path, config.in_channels) for path in paths[chunk]]
        fitted = [fit_image(array, config.image_size, config.in_channels) for array in arrays]
        chunk_labels = None if all_labels is None else all_labels[chunk]
        images = torch.stack([image for image, _ in fitted])
        encoded = encode_batch(vqvae, priors, images, chunk_labels)
        for index, (array, (_, fit), item) in enumerate(zip(arrays, fitted, encoded, strict=True)):
            header = Header(
                fingerprint=fingerprint,
                height=array.shape[0],
                width=array.shape[1],
                fit=fit,
                num_levels=config.num_levels,
                label=None if chunk_labels is None else int(chunk_labels[index]),
                slot=item.slot,
                codes_check=codes_check(item.codes),
                versions=versions,
            )
            data = pack_file(header, item.payload)
            output = outputs[start + index]
            output.write_bytes(data)
            results.append(CompressedFile(paths[start + index], output, header, item, len(data)))
    return results


class DecompressedFile(NamedTuple):
    file: Path  # the compressed file read
    png: Path  # the image written
    header: Header
    codes: list[Tensor]  # per level (h_l, w_l) int64, top first
    image: Tensor  # (C, H, W) uint8 as written


def _read_capped(path: Path, limit: int) -> bytes:
    """A file's bytes, refused before it is read when it holds more than ``limit``: no
    compressed image of the run is larger (``max_file_bytes``), so nothing huge is read."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = b"" if size > limit else handle.read(limit + 1)  # + 1: a file still growing
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    if size > limit or len(data) > limit:
        raise CodecFormatError(
            f"{max(size, len(data))} bytes or more, but a compressed image of this run has at "
            f"most {limit}: not a .vq2 file of this run"
        )
    return data


def read_checked(models: Models, paths: Sequence[Path]) -> list[tuple[Header, bytes]]:
    """Parse compressed files and check them against a run or an export, reading only the
    files and, of a run, its checkpoints (no model is built).

    Raises:
        CodecFormatError: naming the first file that is corrupt or not from these models.
    """
    model, num_classes = _model_facts(models)
    limit = max_file_bytes(sum(side * side for side in model.latent_sizes))
    parsed = []
    for path in paths:
        try:
            parsed.append(parse_file(_read_capped(path, limit)))
        except CodecFormatError as error:
            raise CodecFormatError(f"{path}: {error}") from None
    fingerprints = _expected_fingerprints(models, [header for header, _ in parsed])
    for path, (header, _) in zip(paths, parsed, strict=True):
        problem = None
        expected = fingerprints[header.format_version]
        if header.fingerprint != expected:
            problem = (
                f"compressed with another model (fingerprint {header.fingerprint.hex()}; "
                f"{models.path} has {expected.hex()})"
            )
        elif header.num_levels != model.num_levels:
            problem = f"{header.num_levels} levels, the run has {model.num_levels}"
        elif (header.label is None) != (num_classes == 0):
            problem = "its class label does not fit the run's priors"
        elif header.label is not None and header.label >= num_classes:
            problem = f"class label {header.label}, the priors know 0..{num_classes - 1}"
        elif header.fit == "pad" and max(header.height, header.width) > model.image_size:
            problem = (
                f"a padded {header.height}x{header.width} image in a {model.image_size} square"
            )
        if problem is not None:
            raise CodecFormatError(f"{path}: {problem}")
    return parsed


def _expected_fingerprints(models: Models, headers: Sequence[Header]) -> dict[int, bytes]:
    """The fingerprint each format version's files must carry: of the models' content, and for
    version 1 of a run's checkpoint files (an export cannot check those)."""
    expected = {FORMAT_VERSION: run_fingerprint(models)}
    old = next((h for h in headers if h.format_version == 1), None)
    if old is not None:
        if isinstance(models, PretrainedModels):
            raise CodecFormatError(
                "format version 1 files carry the fingerprint of a run's checkpoint files: "
                f"decompress them with that run, not an export ({models.path})"
            )
        expected[1] = run_files_fingerprint(models)
    return expected


def decompress_files(
    models: Models,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    progress: bool = False,
) -> list[DecompressedFile]:
    """Decompress files written by ``compress_files`` into ``out_dir/<stem>.png``.

    The weights are not in the files: ``models`` must be the run they were compressed with or
    its export (``load_pretrained``), which the fingerprint checks before any model is built.

    Raises:
        CodecFormatError: a file is corrupt, truncated, of another version or from another run.
    """
    out_dir = Path(out_dir)
    paths = [Path(path) for path in paths]
    if not paths:
        raise ValueError("no compressed files given")
    outputs = _output_paths(paths, out_dir, ".png")
    parsed = read_checked(models, paths)
    vqvae, priors, fingerprint, files_fingerprint = _load_models(models)
    loaded = {FORMAT_VERSION: fingerprint, 1: files_fingerprint}
    changed = [h for h, _ in parsed if h.fingerprint != loaded[h.format_version]]
    if changed:
        raise ValueError(
            f"the checkpoints in {models.path} changed after the files were checked (a trainer "
            f"writing?): the files need fingerprint {changed[0].fingerprint.hex()}"
        )
    here = running_versions()
    done: dict[int, DecompressedFile] = {}
    batches = slot_batches([header.slot for header, _ in parsed])
    for batch in tqdm(batches, desc="decompress", disable=not progress, leave=False):
        headers = [parsed[index][0] for index in batch]
        slots = [header.slot for header in headers]
        labels = None
        if headers[0].label is not None:
            labels = torch.tensor([header.label for header in headers], dtype=torch.long)
        try:
            codes = decode_batch(priors, [parsed[index][1] for index in batch], labels, slots)
        except PayloadError as error:
            raise CodecFormatError(f"{paths[batch[error.index]]}: {error}") from None
        for place, (index, header) in enumerate(zip(batch, headers, strict=True)):
            _check_decoded(paths[index], header, [level[place] for level in codes], here)
        images = decode_images(vqvae, codes, slots)
        for place, (index, header) in enumerate(zip(batch, headers, strict=True)):
            image = unfit_image(images[place], header)
            png = save_png(image, outputs[index])
            image_codes = [level[place] for level in codes]
            done[index] = DecompressedFile(paths[index], png, header, image_codes, image)
    _note_other_versions([header for header, _ in parsed], here)
    return [done[index] for index in range(len(paths))]


def _check_decoded(path: Path, header: Header, codes: Sequence[Tensor], here: Versions) -> None:
    """Refuse decoded codes that fail the file's codes check, naming the likely cause."""
    if codes_check(codes) & header.codes_check_mask == header.codes_check:
        return
    if header.versions is not None and header.versions != here:
        cause = (
            f"it was compressed under {header.versions}, this is {here}: "
            "decompress it under those versions"
        )
    else:
        cause = (
            "this machine's probabilities differ from the compressing one's (another CPU?) "
            "or the file was altered"
        )
    raise CodecFormatError(f"{path}: the decoded codes fail the file's check: {cause}")


def _note_other_versions(headers: Sequence[Header], here: Versions) -> None:
    """One log line per set of library versions other than this process's whose files passed
    their codes check, and one for version-1 files (their check has 16 bits)."""
    others: dict[Versions, int] = {}
    for header in headers:
        if header.versions is not None and header.versions != here:
            others[header.versions] = others.get(header.versions, 0) + 1
    for versions, count in others.items():
        logger.warning(
            "%d of %d files were compressed under %s, this is %s; their decoded codes passed "
            "the 32-bit check",
            count,
            len(headers),
            versions,
            here,
        )
    old = sum(header.format_version == 1 for header in headers)
    if old:
        logger.warning(
            "%d of %d files are format version 1, whose codes check has 16 bits: one wrong "
            "decode in 65,536 passes it",
            old,
            len(headers),
        )


# ----------------------------------------------------------------------------------------------
# The report of a compression run


def summarise(
    encoded: Sequence[EncodedImage],
    level_names: Sequence[str],
    pixels: int,
    file_bytes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Bits per pixel of a set of compressed images, per level and in total, beside the priors'
    NLL of the same codes (Table 1's measure, also in nats per code).

    Args:
        encoded: the images' ``EncodedImage``.
        level_names: the levels' names, top first.
        pixels: pixels per image (the model's S x S).
        file_bytes: each file's size, when the images were written as files.

    Returns:
        Plain data: means over the images, and the payload's and the coder's excess over the
        NLL (overall and the largest of one image).
    """
    count = len(encoded)
    nll = np.array([item.nll_bits for item in encoded])  # (N, levels)
    coded = np.array([item.coded_bits for item in encoded])  # (N, levels)
    payload = np.array([8 * len(item.payload) for item in encoded], dtype=np.float64)  # (N,)
    codes = np.array([[level.numel() for level in item.codes] for item in encoded])
    summary: dict[str, Any] = {
        "images": count,
        "pixels_per_image": pixels,
        "nll_nats_per_code": {
            name: float(nll[:, i].sum() * np.log(2) / codes[:, i].sum())
            for i, name in enumerate(level_names)
        },
        "nll_bits_per_pixel": {
            **{name: float(nll[:, i].mean() / pixels) for i, name in enumerate(level_names)},
            "total": float(nll.sum(1).mean() / pixels),
        },
        "bits_per_pixel": {
            **{name: float(coded[:, i].mean() / pixels) for i, name in enumerate(level_names)},
            "payload": float(payload.mean() / pixels),
        },
        "payload_bytes": float(payload.mean() / 8),
        "coded_over_nll": float(coded.sum() / nll.sum() - 1),
        "payload_over_nll": float(payload.sum() / nll.sum() - 1),
        "max_payload_over_nll": float((payload / nll.sum(1) - 1).max()),
        "max_payload_minus_coded_bits": float((payload - coded.sum(1)).max()),
    }
    if file_bytes is not None:
        summary["bits_per_pixel"]["file"] = float(8 * np.mean(file_bytes) / pixels)
        summary["file_bytes"] = float(np.mean(file_bytes))
        summary["header_bytes"] = OVERHEAD_BYTES
    return summary


def compression_report(models: Models, results: Sequence[CompressedFile]) -> dict[str, Any]:
    """``summarise`` of ``compress_files``'s results, with one entry per file (plain data)."""
    model = models.vqvae.config if isinstance(models, PretrainedModels) else models.config.model
    pixels = model.image_size**2
    names = model.level_names
    files = []
    for result in results:
        encoded, header = result.encoded, result.header
        files.append(
            {
                "image": str(result.image),
                "file": str(result.file),
                "bytes": result.size,
                "payload_bytes": len(encoded.payload),
                "height": header.height,
                "width": header.width,
                "fit": header.fit,
                "label": header.label,
                "bits_per_pixel": {
                    **dict(zip(names, np.array(encoded.coded_bits) / pixels, strict=True)),
                    "payload": 8 * len(encoded.payload) / pixels,
                    "file": 8 * result.size / pixels,
                },
                "nll_bits_per_pixel": {
                    **dict(zip(names, np.array(encoded.nll_bits) / pixels, strict=True)),
                    "total": sum(encoded.nll_bits) / pixels,
                },
            }
        )
    summary = summarise(
        [result.encoded for result in results], names, pixels, [r.size for r in results]
    )
    return {"run": str(models.path), **summary, "files": files}


def compression_text(report: dict[str, Any], out_dir: str | Path) -> str:
    """``compression_report`` for people: file sizes and bits per pixel beside the priors' NLL."""
    bits, nll = report["bits_per_pixel"], report["nll_bits_per_pixel"]
    levels = ", ".join(f"{name} {value:.3f}" for name, value in nll.items() if name != "total")
    return (
        f"compressed {report['images']} images into {out_dir}: {report['file_bytes']:.1f} bytes "
        f"each on average ({report['payload_bytes']:.1f} payload + {OVERHEAD_BYTES} header), "
        f"{bits['file']:.3f} bits per pixel ({bits['payload']:.3f} for the payload)\n"
        f"the priors' NLL of the codes: {nll['total']:.3f} bits per pixel ({levels}); the "
        f"payload is {report['payload_over_nll']:+.2%} over it"
    )


def decompression_summary(
    models: Models, results: Sequence[DecompressedFile], out_dir: str | Path
) -> tuple[dict[str, Any], str]:
    """What ``vqvae2 decompress`` prints: a record of each file's PNG, size and label, and a
    line."""
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
    record = {"run": str(models.path), "images": len(results), "files": files}
    return record, f"decompressed {len(results)} files into {out_dir}"
