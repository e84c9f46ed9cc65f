"""The latent codec's core: the container format and the range coding of codes, on bytes alone.

Razavi et al. 2019 (Section 3.2) read fitting the priors as lossless compression of the latent
codes; this module makes that literal. An image's codes (from the stage-1 encoder) are
entropy-coded level by level, top first, with the per-position categorical probabilities of its
prior (given the levels above and, for class-conditional priors, the class), through the range
coder of ``constriction``. Decoding runs the priors position by position with the same
probabilities, then the stage-1 decoder once.

Probabilities: the float32 logits of the incremental sampler
(``pixelsnail_sampler.IncrementalSampler``, the same calls in the encoder, teacher-forced with the
true codes, and in the decoder) go through a float64 softmax and are quantised here to integer
weights, each at least 1, summing to ``2 ** CODER_PRECISION_BITS`` (``quantise_probabilities``).
constriction's non-"perfect" categorical model receives ``weight - 1`` as exact float64
integers: its own quantisation gives each code ``floor(cumulative * scale) + index`` with
``scale`` exactly 1 for these numbers, so the coder uses exactly our weights. Encoder and
decoder get bit-identical logits because they run the same code path on the CPU with
``CODING_THREADS`` threads, float32, eval mode, always in batches of exactly
``CODING_BATCH_SIZE`` rows, and each image in the same row of its batch: on the CPU a row's
float results do not depend on what the other rows hold, but they can differ in the last bits
between batch sizes and between rows (measured with PyTorch 2.13: with a tiny prior, odd and
even rows differ). Each file records its row; decoding groups files into batches in their rows
(``slot_batches``). Files therefore decode on the same software and hardware stack; across CPUs
or library versions the float results, and so the decoded codes, may differ. Each file records
the torch and constriction versions that compressed it (``running_versions``).

The payload is one range-coded stream per image, all levels top first in raster order, cut to the
shortest byte string that still decodes (``encode_symbols``). The container (``pack_file`` /
``parse_file``, layout in docs/codec.md) carries a magic, the format version, the run's
fingerprint, the torch and constriction versions, the original image size and how it was fitted,
the number of levels, the class label, the batch row, a 32-bit check of the codes (16 bits in
format version 1, still read), the payload length and a CRC32; all but the codes check are
checked before any model work, the codes check after decoding (``codes_check``).

Everything here is pure: bytes, tensors and models in, bytes and tensors out, no files. Images,
run folders, fingerprints and progress are the file layer's (``compress.py``).
"""

from __future__ import annotations

import importlib.metadata
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import constriction
import numpy as np
import torch
from torch import Tensor

from ._helpers import evaluating, float_to_uint8, uint8_to_float
from .pixelsnail import PixelSNAIL
from .pixelsnail_sampler import IncrementalSampler
from .vqvae import VQVAE2

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

    fingerprint: bytes  # FINGERPRINT_BYTES of the models' hash (compress.run_fingerprint)
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


def codes_check(codes: Sequence[Tensor]) -> int:
    """The CRC32 of one image's codes (per level (h_l, w_l), top first, as big-endian int32 in
    raster order). A file stores it; a decoder whose probabilities differ from the encoder's
    (another CPU, another library version, a changed prior) decodes other codes, and the check
    names the file instead of writing a wrong image (one such decode in 2**32 passes it)."""
    data = b"".join(level.to(torch.int32).numpy().astype(">i4").tobytes() for level in codes)
    return zlib.crc32(data) & CODES_CHECK_MASK


def running_versions() -> Versions:
    """The torch and constriction releases this process codes with."""
    found = []
    for version in (torch.__version__, importlib.metadata.version("constriction")):
        release = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
        if release is None:
            raise ValueError(f"cannot read a release number from version {version!r}")
        found.append(tuple(int(part or 0) for part in release.groups()))
    return Versions(*found)


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
