"""A lossless codec for a trained run's latent codes: image <-> codes <-> bytes.

Razavi et al. 2019 (Section 3.2) read fitting the priors as lossless compression of the latent
codes; this module makes that literal. An image goes through the stage-1 encoder to its codes,
then every level, top first, is entropy-coded with the per-position categorical probabilities of
its prior (given the levels above and, for class-conditional priors, the class), through the range
coder of ``constriction``. Decoding runs the priors position by position with the same
probabilities, then the stage-1 decoder once.

Probabilities: the float32 logits of the incremental sampler (``pixelsnail_sampler.IncrementalSampler``,
the same calls in the encoder, teacher-forced with the true codes, and in the decoder) go through a
float64 softmax and are quantised here to integer weights, each at least 1, summing to
``2 ** CODER_PRECISION_BITS`` (``quantise_probabilities``). constriction's non-"perfect"
categorical model receives ``weight - 1`` as exact float64 integers: its own quantisation gives
each code ``floor(cumulative * scale) + index`` with ``scale`` exactly 1 for these numbers, so the
coder uses exactly our weights. Encoder and decoder get bit-identical logits because they run
the same code path on the CPU with ``CODING_THREADS`` threads, float32, eval mode, always in
batches of exactly ``CODING_BATCH_SIZE`` rows, and each image in the same row of its batch: on
the CPU a row's float results do not depend on what the other rows hold, but they can differ in
the last bits between batch sizes and between rows (measured with PyTorch 2.13: with a tiny
prior, odd and even rows differ). Each file records its row; decoding groups files into batches
in their rows (``slot_batches``). Files therefore decode on the same software and hardware
stack; across CPUs or library versions the float results, and so the decoded codes, may differ.
Each file records the torch and constriction versions that compressed it: decoding under others
is allowed but logged, and a failed codes check then names the versions.

The payload is one range-coded stream per image, all levels top first in raster order, cut to the
shortest byte string that still decodes (``encode_symbols``). The container (``pack_file`` /
``parse_file``, layout in docs/codec.md) carries a magic, the format version, the run's
fingerprint, the torch and constriction versions, the original image size and how it was fitted,
the number of levels, the class label, the batch row, a 32-bit check of the codes (16 bits in
format version 1, still read), the payload length and a CRC32; all but the codes check are
checked before any model work, the codes check after decoding (``codes_check``).

The pure parts (container, quantisation, symbol coding, the batch coders) do no file I/O; the
thin functions at the end (``run_fingerprint``, ``compress_files``, ``decompress_files``) read and
write files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import constriction
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ._helpers import evaluating
from .checkpoint import META, MODEL_WEIGHTS, held_checkpoint_dir
from .config import PriorRunConfig, VQVAERunConfig
from .data import UNREADABLE, fit_uint8_array, float_to_uint8, uint8_to_float
from .pixelsnail import PixelSNAIL
from .pixelsnail_sampler import IncrementalSampler
from .report import save_png
from .run import (
    VQVAE_KIND,
    has_checkpoint,
    level_names,
    load_prior,
    load_run_config,
    load_vqvae,
    prior_kind,
)
from .sampling import check_hierarchy
from .vqvae import VQVAE2

logger = logging.getLogger("vqvae2.codec")

# constriction's default range coder (``stream.queue.RangeEncoder``): 32-bit words, a 64-bit
# state and probabilities in fixed point with 24 bits.
CODER_PRECISION_BITS = 24
PROBABILITY_TOTAL = 1 << CODER_PRECISION_BITS
WORD_BYTES = 4  # the coder's 32-bit words, stored big-endian

# Rows the models see in every call while coding; part of what the file format fixes (see above).
CODING_BATCH_SIZE = 16
CODING_THREADS = 1

MAGIC = b"VQ2C"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: a 16-bit codes check and no library versions
FINGERPRINT_BYTES = 8  # the first 8 bytes of a SHA-256
NO_LABEL = 0xFFFF  # the label field of a file coded without a class
MAX_SIDE = 0xFFFF  # image sides are stored as uint16
VERSION_PARTS = 3  # a library release: major, minor, patch
VERSION_PART_MAX = 0xFF  # each part is a uint8
SUFFIX = ".vq2"
# magic, version, fingerprint, torch and constriction versions (major, minor, patch each), height,
# width, fit, levels, label, batch row, codes check, payload length
_HEADER = struct.Struct(">4sB8s3B3BHHBBHBII")  # big-endian
# Format version 1, read but no longer written: no library versions and a 16-bit codes check.
_HEADER_V1 = struct.Struct(">4sB8sHHBBHBHI")
_CRC = struct.Struct(">I")
_PREFIX_BYTES = len(MAGIC) + 1  # magic and version: enough to tell the layout
HEADER_BYTES = _HEADER.size  # 36
OVERHEAD_BYTES = _HEADER.size + _CRC.size  # 40: everything in a file but the payload
CODES_CHECK_MASK = 0xFFFFFFFF  # the codes check is a whole CRC32
CODES_CHECK_MASK_V1 = 0xFFFF  # version 1 kept its low 16 bits

Fit = Literal["pad", "resize"]
# pad: placed centred on a black square of the model's side (as the IDX loader pads 28 -> 32),
# undone on decompression; resize: short side resized to the model's side and centre-cropped,
# which cannot be undone (the output stays square).
FIT_CODES: dict[str, int] = {"pad": 0, "resize": 1}


class CodecFormatError(ValueError):
    """A compressed file that cannot be decoded: a one-line reason."""


class PayloadError(CodecFormatError):
    """A payload that does not decode with the run's priors; ``index`` is its place in the
    batch."""

    def __init__(self, index: int) -> None:
        super().__init__("the payload does not decode with this run's priors")
        self.index = index


class Versions(NamedTuple):
    """The torch and constriction releases a file was compressed with, (major, minor, patch)
    each: the float results the probabilities come from depend on them (see the module
    docstring)."""

    torch: tuple[int, int, int]
    constriction: tuple[int, int, int]

    def __str__(self) -> str:
        return (
            f"torch {'.'.join(map(str, self.torch))}, "
            f"constriction {'.'.join(map(str, self.constriction))}"
        )


@dataclass(frozen=True)
class Header:
    """What a compressed file says about its image, besides the payload."""

    fingerprint: bytes  # FINGERPRINT_BYTES of the run's checkpoint hash (``run_fingerprint``)
    height: int  # the original image's height and width in pixels
    width: int
    fit: Fit  # how the image was fitted to the model's square side
    num_levels: int
    label: int | None  # the class the priors were given, None for unconditional priors
    slot: int  # the row of its coding batch the image was coded in (see ``slot_batches``)
    codes_check: int  # ``codes_check`` of the image's codes: catches a decoder that went astray
    versions: Versions | None  # the libraries that compressed it; None in version-1 files
    format_version: int = FORMAT_VERSION  # 1 for files written before the 32-bit check

    @property
    def codes_check_mask(self) -> int:
        """The bits of ``codes_check`` this file's format version keeps."""
        return CODES_CHECK_MASK_V1 if self.format_version == 1 else CODES_CHECK_MASK


# ----------------------------------------------------------------------------------------------
# The container


def pack_file(header: Header, payload: bytes) -> bytes:
    """The bytes of a compressed file (format ``FORMAT_VERSION``): header, payload, then the
    CRC32 of both."""
    if header.format_version != FORMAT_VERSION or header.versions is None:
        raise ValueError(f"files are written in format version {FORMAT_VERSION}, with versions")
    if header.label is not None and not 0 <= header.label < NO_LABEL:
        raise ValueError(f"class labels must lie in [0, {NO_LABEL}), got {header.label}")
    label = NO_LABEL if header.label is None else header.label
    if not (1 <= header.height <= MAX_SIDE and 1 <= header.width <= MAX_SIDE):
        raise ValueError(
            f"image sides must lie in [1, {MAX_SIDE}], got {header.height}x{header.width}"
        )
    if not 0 <= header.codes_check <= CODES_CHECK_MASK:
        raise ValueError(f"the codes check is 32 bits, got {header.codes_check}")
    if not 0 <= header.slot < CODING_BATCH_SIZE:
        raise ValueError(f"batch rows lie in [0, {CODING_BATCH_SIZE}), got {header.slot}")
    if len(header.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"the fingerprint must have {FINGERPRINT_BYTES} bytes")
    parts = (*header.versions.torch, *header.versions.constriction)
    lengths = {len(release) for release in header.versions}
    if lengths != {VERSION_PARTS} or not all(0 <= part <= VERSION_PART_MAX for part in parts):
        raise ValueError(
            f"library versions take {VERSION_PARTS} parts of 0-{VERSION_PART_MAX}: {parts}"
        )
    head = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        header.fingerprint,
        *parts,
        header.height,
        header.width,
        FIT_CODES[header.fit],
        header.num_levels,
        label,
        header.slot,
        header.codes_check,
        len(payload),
    )
    body = head + payload
    return body + _CRC.pack(zlib.crc32(body))


def _unpack_header(data: bytes, version: int) -> tuple[dict[str, Any], int, int]:
    """A header's fields as they stand (nothing checked) but the fit, its raw fit code, and
    the declared payload length."""
    if version == 1:
        _, _, fingerprint, height, width, fit, levels, label, slot, check, length = (
            _HEADER_V1.unpack_from(data)
        )
        versions = None
    else:
        _, _, fingerprint, *parts, height, width, fit, levels, label, slot, check, length = (
            _HEADER.unpack_from(data)
        )
        versions = Versions(tuple(parts[:VERSION_PARTS]), tuple(parts[VERSION_PARTS:]))
    fields = dict(
        fingerprint=fingerprint,
        height=height,
        width=width,
        num_levels=levels,
        label=None if label == NO_LABEL else label,
        slot=slot,
        codes_check=check,
        versions=versions,
        format_version=version,
    )
    return fields, fit, length


def parse_file(data: bytes) -> tuple[Header, bytes]:
    """Check a compressed file's bytes and split them into header and payload.

    Reads format ``FORMAT_VERSION`` and the older version 1 (``READABLE_VERSIONS``). Checks, in
    order: size, magic, version, the declared payload length against the size, the CRC32, then
    each field. Reads nothing else and runs no model.

    Returns:
        The header and the payload bytes.

    Raises:
        CodecFormatError: one line saying what is wrong.
    """
    if not data:
        raise CodecFormatError("the file is empty")
    if len(data) < _PREFIX_BYTES:
        raise CodecFormatError(
            f"truncated: {len(data)} bytes, a compressed image has at least {OVERHEAD_BYTES}"
        )
    if data[: len(MAGIC)] != MAGIC:
        raise CodecFormatError("not a vqvae2 compressed image (wrong magic bytes)")
    version = data[len(MAGIC)]
    if version not in READABLE_VERSIONS:
        raise CodecFormatError(
            f"format version {version}; this vqvae2 reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    header_bytes = (_HEADER_V1 if version == 1 else _HEADER).size
    if len(data) < header_bytes + _CRC.size:
        raise CodecFormatError(
            f"truncated: {len(data)} bytes, a compressed image of format version {version} has "
            f"at least {header_bytes + _CRC.size}"
        )
    fields, fit, length = _unpack_header(data, version)
    expected = header_bytes + _CRC.size + length
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "trailing bytes"
        raise CodecFormatError(f"{state}: {len(data)} bytes, the header declares {expected}")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise CodecFormatError("CRC32 mismatch: the file is corrupt")
    fits = {code: name for name, code in FIT_CODES.items()}
    height, width, slot = fields["height"], fields["width"], fields["slot"]
    if fit not in fits:
        raise CodecFormatError(f"unknown fit code {fit}")
    if fields["num_levels"] < 1:
        raise CodecFormatError("the header declares no latent levels")
    if height < 1 or width < 1:
        raise CodecFormatError(f"the header declares an empty image ({height}x{width})")
    if slot >= CODING_BATCH_SIZE:
        raise CodecFormatError(f"batch row {slot} is out of range [0, {CODING_BATCH_SIZE})")
    return Header(fit=fits[fit], **fields), data[header_bytes : -_CRC.size]


def max_file_bytes(positions: int) -> int:
    """The largest compressed file of an image with ``positions`` codes (all levels): a code
    costs at most ``CODER_PRECISION_BITS`` (its weight is at least 1 of ``PROBABILITY_TOTAL``),
    the coder's rounding under one bit more, ending the stream under one word."""
    payload = -(-positions * (CODER_PRECISION_BITS + 1) // 8) + WORD_BYTES
    return OVERHEAD_BYTES + payload


# ----------------------------------------------------------------------------------------------
# Probabilities and symbols


def quantise_probabilities(logits: Tensor) -> np.ndarray:
    """Integer code weights from logits: float64 softmax, then a fixed total.

    Each code gets ``floor(p * free)`` of ``free = 2**24 - K`` (one unit per code is set aside so
    that every code keeps a weight of at least 1); the units left over go one each to the codes
    with the largest remainders (the lower code first on ties), then every weight gets its unit.

    Args:
        logits: (N, K) float, K >= 2.

    Returns:
        (N, K) int64 weights, each >= 1, every row summing to ``PROBABILITY_TOTAL``.
    """
    count, codebook_size = logits.shape
    if not 2 <= codebook_size < PROBABILITY_TOTAL // 2:
        raise ValueError(f"the codec needs 2 <= K < {PROBABILITY_TOTAL // 2}, got {codebook_size}")
    free = PROBABILITY_TOTAL - codebook_size
    scaled = torch.softmax(logits.double(), dim=-1).numpy() * free  # (N, K)
    weights = np.floor(scaled)
    left_over = free - weights.sum(axis=1, keepdims=True)  # (N, 1) exact integers in [0, K]
    order = np.argsort(weights - scaled, axis=1, kind="stable")  # largest remainder first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(codebook_size), order.shape), axis=1)
    weights += rank < left_over
    return weights.astype(np.int64) + 1


def code_bits(weights: np.ndarray, symbols: np.ndarray) -> np.ndarray:
    """Bits the coder's model spends on each symbol: -log2(weight / total).

    Args:
        weights: (N, K) int64 from ``quantise_probabilities``.
        symbols: (N,) int in [0, K).

    Returns:
        (N,) float64.
    """
    chosen = np.take_along_axis(weights, symbols[:, None].astype(np.int64), axis=1)[:, 0]
    return CODER_PRECISION_BITS - np.log2(chosen)


def nll_bits(logits: Tensor, symbols: Tensor) -> Tensor:
    """The prior's negative log-likelihood of each symbol in bits, from its float probabilities.

    Args:
        logits: (N, K) float.
        symbols: (N,) int64 in [0, K).

    Returns:
        (N,) float64.
    """
    log_probabilities = torch.log_softmax(logits.double(), dim=-1)  # (N, K)
    return -log_probabilities.gather(1, symbols[:, None]).squeeze(1) / np.log(2)


def _coder_model() -> Any:
    # Not "perfect": fed weight - 1 as exact integers, the fast quantisation reproduces the
    # weights exactly (see the module docstring).
    return constriction.stream.model.Categorical(perfect=False)


def _coder_probabilities(weights: np.ndarray) -> np.ndarray:
    return (weights - 1).astype(np.float64)


def _words(payload: bytes) -> np.ndarray:
    """Payload bytes -> the coder's uint32 words, the last one completed with zero bytes."""
    padded = payload + bytes(-len(payload) % WORD_BYTES)
    return np.frombuffer(padded, dtype=">u4").astype(np.uint32)


def _decodes_to(payload: bytes, symbols: np.ndarray, weights: np.ndarray) -> bool:
    try:
        decoder = constriction.stream.queue.RangeDecoder(_words(payload))
        decoded = decoder.decode(_coder_model(), _coder_probabilities(weights))
    except (AssertionError, ValueError):  # constriction's answer to data that cannot decode
        return False
    return bool(np.array_equal(decoded, symbols))


def encode_symbols(symbols: np.ndarray, weights: np.ndarray) -> bytes:
    """Range-code a sequence of symbols, each with its own integer weights.

    The coder's output is cut to the shortest byte string that decodes back to ``symbols`` when
    completed with zero bytes: for each length the coder's point truncated to that many bytes and
    the next larger string of that length are tried (one of them is the shortest string in the
    coder's final interval when any is), lengths by bisection; every candidate is checked by
    decoding it, with the weights alone (no model).

    Args:
        symbols: (N,) int in [0, K).
        weights: (N, K) int64 from ``quantise_probabilities``.

    Returns:
        The payload bytes.
    """
    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(symbols, _coder_model(), _coder_probabilities(weights))
    full = encoder.get_compressed().astype(">u4").tobytes()

    def shortest_of_length(length: int) -> bytes | None:
        truncated = full[:length]
        candidates = [truncated]
        if length:
            larger = int.from_bytes(truncated, "big") + 1
            if larger < 1 << (8 * length):
                candidates.append(larger.to_bytes(length, "big"))
        return next((c for c in candidates if _decodes_to(c, symbols, weights)), None)

    best, low, high = full, 0, len(full)  # ``full`` decodes; search lengths in [low, high)
    while low < high:
        middle = (low + high) // 2
        found = shortest_of_length(middle)
        if found is None:
            low = middle + 1
        else:
            best, high = found, middle
    return best


class SymbolDecoder:
    """Decodes one payload a symbol at a time, given each symbol's weights as it comes."""

    def __init__(self, payload: bytes) -> None:
        self._decoder = constriction.stream.queue.RangeDecoder(_words(payload))
        self._model = _coder_model()

    def decode(self, weights: np.ndarray) -> int | None:
        """The next symbol, coded with (K,) int64 weights; None when the payload does not
        decode with them."""
        try:
            (symbol,) = self._decoder.decode(self._model, _coder_probabilities(weights[None]))
        except (AssertionError, ValueError):  # constriction's answer to data that cannot decode
            return None
        return int(symbol)


# ----------------------------------------------------------------------------------------------
# Images in and out of the model's square


def fit_image(image: np.ndarray, size: int, channels: int) -> tuple[Tensor, Fit]:
    """An image as the model sees it, and how it was fitted.

    Images no larger than ``size`` either way are placed centred on a black square (as the IDX
    loader pads Fashion-MNIST's 28x28 to 32x32), larger ones resized by their short side and
    centre-cropped (``data.fit_uint8_array``).

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


def codes_check(codes: Sequence[Tensor]) -> int:
    """The CRC32 of one image's codes (per level (h_l, w_l), top first, as big-endian int32 in
    raster order). A file stores it; a decoder whose probabilities differ from the encoder's
    (another CPU, another library version, a changed prior) decodes other codes, and the check
    names the file instead of writing a wrong image (one such decode in 2**32 passes it)."""
    data = b"".join(level.to(torch.int32).numpy().astype(">i4").tobytes() for level in codes)
    return zlib.crc32(data) & CODES_CHECK_MASK


# ----------------------------------------------------------------------------------------------
# Coding batches of images with a run's models


@contextmanager
def coding_threads() -> Iterator[None]:
    """Run the block with ``CODING_THREADS`` intra-op threads, then restore the setting: the
    float results, and so the coded probabilities, depend on how work is split over threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(CODING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _slots(count: int, slots: Sequence[int] | None) -> list[int]:
    """The batch rows of ``count`` images: ``slots`` checked, or 0 .. count - 1."""
    slots = list(range(count)) if slots is None else [int(slot) for slot in slots]
    if not 1 <= count <= CODING_BATCH_SIZE:
        raise ValueError(f"a coding batch holds 1 to {CODING_BATCH_SIZE} images, got {count}")
    if len(slots) != count or len(set(slots)) != count:
        raise ValueError(f"give {count} different batch rows, got {slots}")
    if not all(0 <= slot < CODING_BATCH_SIZE for slot in slots):
        raise ValueError(f"batch rows lie in [0, {CODING_BATCH_SIZE}), got {slots}")
    return slots


def _on_the_cpu(models: Sequence[torch.nn.Module], *tensors: Tensor | None) -> None:
    """Refuse models or inputs off the CPU: another device's float results differ from the
    CPU's, so a file coded there would not decode here (docs/codec.md)."""
    devices = [p.device for model in models for p in model.parameters()]
    devices += [tensor.device for tensor in tensors if tensor is not None]
    elsewhere = next((device for device in devices if device.type != "cpu"), None)
    if elsewhere is not None:
        raise ValueError(
            f"the codec runs on the CPU (encoder and decoder need bit-identical "
            f"probabilities); got a model or tensor on {elsewhere}"
        )


def _placed(rows: Tensor, slots: Sequence[int]) -> Tensor:
    """(B, ...) -> (CODING_BATCH_SIZE, ...): row i at ``slots[i]``, the other rows copies of
    row 0 (rows do not interact: only where a row sits and the batch size change its results)."""
    batch = rows[:1].expand(CODING_BATCH_SIZE, *rows.shape[1:]).clone()
    batch[list(slots)] = rows
    return batch


def slot_batches(slots: Sequence[int]) -> list[list[int]]:
    """Indices of items grouped into coding batches, each item in the batch row it was coded
    in: in order, each item joins the first batch whose row ``slots[i]`` is still free.

    Args:
        slots: each item's batch row, in [0, CODING_BATCH_SIZE).

    Returns:
        Lists of indices into ``slots``; within a list, the slots differ.
    """
    batches: list[list[int]] = []
    taken: list[set[int]] = []
    for index, slot in enumerate(slots):
        free = next((b for b, used in enumerate(taken) if slot not in used), len(batches))
        if free == len(batches):
            batches.append([])
            taken.append(set())
        batches[free].append(index)
        taken[free].add(slot)
    return batches


def _prior_labels(prior: PixelSNAIL, labels: Tensor | None) -> Tensor | None:
    return labels if prior.config.num_classes > 0 else None


def _position_weights(state: IncrementalSampler, row: int, col: int) -> tuple[Tensor, np.ndarray]:
    """The logits (P, K) float32 at (row, col) and their weights (P, K) int64: the one call the
    encoder and the decoder share."""
    logits = state.logits_at(row, col)
    return logits, quantise_probabilities(logits)


class EncodedImage(NamedTuple):
    codes: list[Tensor]  # per level (h_l, w_l) int64, top first
    payload: bytes
    nll_bits: list[float]  # per level: -log2 of the prior's float probabilities, summed
    coded_bits: list[float]  # per level: what the coder's integer weights spend, summed
    slot: int  # the batch row it was coded in


@torch.no_grad()
def encode_batch(
    vqvae: VQVAE2,
    priors: Sequence[PixelSNAIL],
    images: Tensor,
    labels: Tensor | None,
    slots: Sequence[int] | None = None,
) -> list[EncodedImage]:
    """Codes and payloads of up to ``CODING_BATCH_SIZE`` images, coded in one batch.

    Args:
        vqvae, priors: a run's models (priors top first), on the CPU.
        images: (B, C, S, S) uint8, 1 <= B <= CODING_BATCH_SIZE.
        labels: (B,) int64 classes for class-conditional priors, else None.
        slots: the batch row of each image (default 0 .. B - 1); decoding puts it there again.

    Returns:
        One ``EncodedImage`` per image.
    """
    _on_the_cpu([vqvae, *priors], images, labels)
    slots = _slots(len(images), slots)
    batch_labels = None if labels is None else _placed(labels, slots)
    with coding_threads(), evaluating(vqvae, *priors):
        codes = vqvae.encode(uint8_to_float(_placed(images, slots)))  # per level (P, h, w)
        symbols, weights, nll, coded = [], [], [], []
        for level, prior in enumerate(priors):
            side = prior.config.code_size
            upper = codes[:level] if prior.config.condition_sizes else None
            condition = prior.condition(_prior_labels(prior, batch_labels), upper)
            state = IncrementalSampler(prior, CODING_BATCH_SIZE, condition)
            level_logits, level_weights = [], []
            for row in range(side):
                for col in range(side):
                    logits, position_weights = _position_weights(state, row, col)
                    level_logits.append(logits)
                    level_weights.append(position_weights)
                    state.set_codes(row, col, codes[level][:, row, col])
            level_symbols = codes[level].flatten(1).numpy()  # (P, h*w), raster order
            level_weights = np.stack(level_weights, axis=1)  # (P, h*w, K)
            stacked = torch.stack(level_logits, dim=1)  # (P, h*w, K)
            bits = nll_bits(stacked.flatten(0, 1), codes[level].flatten())  # (P*h*w,)
            nll.append(bits.view(CODING_BATCH_SIZE, -1).sum(1).numpy())  # (P,)
            flat_weights = level_weights.reshape(-1, level_weights.shape[-1])  # (P*h*w, K)
            coded.append(
                code_bits(flat_weights, level_symbols.flatten())
                .reshape(CODING_BATCH_SIZE, -1)
                .sum(1)
            )
            symbols.append(level_symbols)
            weights.append(level_weights)
    all_symbols = np.concatenate(symbols, axis=1)  # (P, positions of every level)
    all_weights = np.concatenate(weights, axis=1)  # (P, positions, K)
    return [
        EncodedImage(
            codes=[level_codes[slot] for level_codes in codes],
            payload=encode_symbols(all_symbols[slot], all_weights[slot]),
            nll_bits=[float(level_bits[slot]) for level_bits in nll],
            coded_bits=[float(level_bits[slot]) for level_bits in coded],
            slot=slot,
        )
        for slot in slots
    ]


@torch.no_grad()
def decode_batch(
    priors: Sequence[PixelSNAIL],
    payloads: Sequence[bytes],
    labels: Tensor | None,
    slots: Sequence[int] | None = None,
) -> list[Tensor]:
    """The codes of up to ``CODING_BATCH_SIZE`` payloads, decoded position by position.

    Args:
        priors: the run's priors, top first, on the CPU.
        payloads: B payloads of files compressed with this run, 1 <= B <= CODING_BATCH_SIZE.
        labels: (B,) int64 classes for class-conditional priors, else None.
        slots: the batch row each payload was coded in (default 0 .. B - 1), all different.

    Returns:
        Per level (B, h_l, w_l) int64 codes, top first.

    Raises:
        PayloadError: a payload does not decode.
    """
    _on_the_cpu(priors, labels)
    slots = _slots(len(payloads), slots)
    decoders = [SymbolDecoder(payload) for payload in payloads]
    batch_labels = None if labels is None else _placed(labels, slots)
    codes: list[Tensor] = []
    with coding_threads(), evaluating(*priors):
        for level, prior in enumerate(priors):
            side = prior.config.code_size
            level_codes = torch.zeros(CODING_BATCH_SIZE, side, side, dtype=torch.long)
            upper = codes[:level] if prior.config.condition_sizes else None
            condition = prior.condition(_prior_labels(prior, batch_labels), upper)
            state = IncrementalSampler(prior, CODING_BATCH_SIZE, condition)
            for row in range(side):
                for col in range(side):
                    _, weights = _position_weights(state, row, col)
                    decoded = [
                        decoder.decode(weights[slot])
                        for decoder, slot in zip(decoders, slots, strict=True)
                    ]
                    if None in decoded:
                        raise PayloadError(decoded.index(None))
                    level_codes[:, row, col] = _placed(torch.tensor(decoded), slots)
                    state.set_codes(row, col, level_codes[:, row, col])
            codes.append(level_codes)
    return [level_codes[slots] for level_codes in codes]


@torch.no_grad()
def decode_images(
    vqvae: VQVAE2, codes: Sequence[Tensor], slots: Sequence[int] | None = None
) -> Tensor:
    """One decoder pass over a coding batch: codes (B, h_l, w_l) per level, top first, each
    image in its batch row ``slots`` (default 0 .. B - 1) -> (B, C, S, S) uint8."""
    _on_the_cpu([vqvae], *codes)
    slots = _slots(len(codes[0]), slots)
    with coding_threads(), evaluating(vqvae):
        decoded = vqvae.decode_codes([_placed(level, slots) for level in codes])
    return float_to_uint8(decoded[slots])


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


# ----------------------------------------------------------------------------------------------
# Files: the thin layer that reads and writes them


def run_fingerprint(run_dir: str | Path) -> bytes:
    """``FINGERPRINT_BYTES`` of the SHA-256 of a run's checkpoints: the metadata (configs
    included) and weights files of the VQ-VAE and of every level's prior, top first, each
    framed by its kind, name and length. Any change to a weight or a config changes it. Reads
    the files; builds no model.

    Raises:
        ValueError: the run lacks the VQ-VAE or a level's prior.
    """
    with _held_run(Path(run_dir)) as step_dirs:
        return _fingerprint(step_dirs)


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


def _fingerprint(step_dirs: dict[str, Path]) -> bytes:
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


def running_versions() -> Versions:
    """The torch and constriction releases this process codes with."""
    found = []
    for version in (torch.__version__, importlib.metadata.version("constriction")):
        release = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
        if release is None:
            raise ValueError(f"cannot read a release number from version {version!r}")
        found.append(tuple(int(part or 0) for part in release.groups()))
    return Versions(*found)


def _load_models(run_dir: Path) -> tuple[bytes, VQVAE2, list[PixelSNAIL]]:
    """The run's models on the CPU and the fingerprint of exactly their checkpoints."""
    with _held_run(run_dir) as step_dirs:
        fingerprint = _fingerprint(step_dirs)
        vqvae = load_vqvae(step_dirs[VQVAE_KIND])
        priors = [
            load_prior(step_dirs[prior_kind(level)], level) for level in vqvae.config.level_names
        ]
    check_hierarchy(vqvae, priors)
    return fingerprint, vqvae, priors


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
    run_dir: str | Path,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[int] | None = None,
    progress: bool = False,
) -> list[CompressedFile]:
    """Compress image files with a run: ``out_dir/<stem>.vq2`` per image.

    Args:
        run_dir: a run with its VQ-VAE and every level's prior.
        paths: image files (any size; grey or colour, converted to the model's channels).
        out_dir: folder for the compressed files (created).
        labels: one class per image, required exactly when the priors are class-conditional.
        progress: show a progress bar.

    Returns:
        One ``CompressedFile`` per image, in order.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    paths = [Path(path) for path in paths]
    if not paths:
        raise ValueError("no image files given")
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"image file {missing[0]} does not exist")
    outputs = _output_paths(paths, out_dir, SUFFIX)
    fingerprint, vqvae, priors = _load_models(run_dir)
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


def read_checked(paths: Sequence[Path], run_dir: Path) -> list[tuple[Header, bytes]]:
    """Parse compressed files and check them against a run, reading only the files and the
    run's checkpoint metadata and hashes (no model is built).

    Raises:
        CodecFormatError: naming the first file that is corrupt or not from this run.
    """
    model = load_run_config(run_dir, VQVAE_KIND, VQVAERunConfig).model
    limit = max_file_bytes(sum(side * side for side in model.latent_sizes))
    parsed = []
    for path in paths:
        try:
            parsed.append(parse_file(_read_capped(path, limit)))
        except CodecFormatError as error:
            raise CodecFormatError(f"{path}: {error}") from None
    fingerprint = run_fingerprint(run_dir)
    num_classes = max(
        load_run_config(run_dir, prior_kind(level), PriorRunConfig).prior.num_classes
        for level in model.level_names
    )
    for path, (header, _) in zip(paths, parsed, strict=True):
        problem = None
        if header.fingerprint != fingerprint:
            problem = (
                f"compressed with another model (fingerprint {header.fingerprint.hex()}; "
                f"{run_dir} has {fingerprint.hex()})"
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


def decompress_files(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    run_dir: str | Path,
    progress: bool = False,
) -> list[DecompressedFile]:
    """Decompress files written by ``compress_files`` into ``out_dir/<stem>.png``.

    The weights are not in the files: ``run_dir`` must be the run they were compressed with,
    which the fingerprint checks before any model is built.

    Raises:
        CodecFormatError: a file is corrupt, truncated, of another version or from another run.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    paths = [Path(path) for path in paths]
    if not paths:
        raise ValueError("no compressed files given")
    outputs = _output_paths(paths, out_dir, ".png")
    parsed = read_checked(paths, run_dir)
    fingerprint, vqvae, priors = _load_models(run_dir)
    if fingerprint != parsed[0][0].fingerprint:
        raise ValueError(
            f"the checkpoints in {run_dir} changed after the files were checked (a trainer "
            f"writing?): the files need fingerprint {parsed[0][0].fingerprint.hex()}"
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


def compression_report(run_dir: str | Path, results: Sequence[CompressedFile]) -> dict[str, Any]:
    """``summarise`` of ``compress_files``'s results, with one entry per file (plain data)."""
    model = load_run_config(run_dir, VQVAE_KIND, VQVAERunConfig).model
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
    return {"run": str(run_dir), **summary, "files": files}
