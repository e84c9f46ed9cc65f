"""The latent codec's core: probability quantisation, the range coder, the container, the codes
check, and coding batches with a run's models (randomly initialised: fast)."""

from __future__ import annotations

import ast
import dataclasses
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae2 import codec
from vqvae2.codec import (
    CODER_PRECISION_BITS,
    CODING_BATCH_SIZE,
    OVERHEAD_BYTES,
    PROBABILITY_TOTAL,
    CodecFormatError,
    Header,
    SymbolDecoder,
    Versions,
    code_bits,
    codes_check,
    decode_batch,
    encode_batch,
    encode_symbols,
    max_file_bytes,
    nll_bits,
    pack_file,
    parse_file,
    quantise_probabilities,
    slot_batches,
)
from vqvae2.run import load_hierarchy

from .conftest import NUM_CLASSES, run_python, write_run

# The coder's cost beyond the integer weights' ideal: under a byte to end on a byte boundary
# inside the final interval (one bit of margin), plus the range coder's rounding, at most
# log2(1 + 2**-8) bits per symbol (its range keeps >= 32 bits beside 24-bit probabilities).
TERMINATION_BITS = 9
ROUNDING_BITS_PER_SYMBOL = float(np.log2(1 + 2**-8))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("codec") / "run")


def blob_images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(count, 1, size, size) uint8 images: bright discs on dark ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((count, 1, size, size), np.uint8)
    for i in range(count):
        cy, cx = rng.integers(3, size - 3, 2)
        images[i, 0] = np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(4, 16), 220, 30)
    return torch.from_numpy(images)


def write_pngs(folder: Path, images: torch.Tensor) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"image{index:03d}.png"
        Image.fromarray(image[0].numpy()).save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Probabilities and the range coder


@pytest.mark.parametrize("codebook_size", [13, 512])
def test_quantised_weights_sum_to_the_total_and_follow_the_probabilities(codebook_size):
    logits = torch.randn(50, codebook_size) * 4
    logits[0] = -1000.0
    logits[0, 3] = 1000.0  # one certain code: every other one still gets a weight of 1
    weights = quantise_probabilities(logits)
    assert weights.dtype == np.int64 and weights.shape == (50, codebook_size)
    assert (weights.sum(1) == PROBABILITY_TOTAL).all() and weights.min() == 1
    assert weights[0, 3] == PROBABILITY_TOTAL - (codebook_size - 1)
    probabilities = torch.softmax(logits.double(), -1).numpy()
    # w = floor(p * (T - K)) + (0 or 1) + 1, so |w - p T| <= max(p K, 2) <= K + 1
    error = np.abs(weights - probabilities * PROBABILITY_TOTAL)
    assert error.max() <= codebook_size + 1
    assert error[1:].mean() < 2
    assert np.array_equal(quantise_probabilities(logits[7:8]), weights[7:8])  # row by row


def test_symbols_round_trip_through_the_range_coder_within_the_termination_bound():
    rng = np.random.default_rng(0)
    for trial in range(20):
        count = int(rng.integers(1, 300))
        logits = torch.from_numpy(rng.normal(size=(count, 13)) * rng.uniform(0.5, 6)).float()
        weights = quantise_probabilities(logits)
        probabilities = weights / PROBABILITY_TOTAL
        symbols = np.array([rng.choice(13, p=row / row.sum()) for row in probabilities])
        payload = encode_symbols(symbols, weights)
        decoder = SymbolDecoder(payload)
        assert [decoder.decode(row) for row in weights] == symbols.tolist(), trial
        ideal = code_bits(weights, symbols).sum()
        bound = ideal + TERMINATION_BITS + ROUNDING_BITS_PER_SYMBOL * count
        assert 8 * len(payload) <= bound, (trial, 8 * len(payload), ideal)


def test_the_coder_uses_exactly_the_integer_weights():
    # Every symbol has weight 2**16 of 2**24: exactly 8 bits each, so 100 symbols fill 100
    # bytes, plus at most one for the coder's rounding.
    weights = np.full((100, 256), PROBABILITY_TOTAL // 256, dtype=np.int64)
    symbols = np.arange(100) * 7 % 256
    assert code_bits(weights, symbols).sum() == 800
    payload = encode_symbols(symbols, weights)
    assert 100 <= len(payload) <= 101
    # A symbol of weight 1 costs all 24 bits.
    weights = np.full((1, 2), 1, dtype=np.int64)
    weights[0, 0] = PROBABILITY_TOTAL - 1
    assert code_bits(weights, np.array([1]))[0] == CODER_PRECISION_BITS


def test_nll_bits_are_the_float_probabilities():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
    bits = nll_bits(logits, torch.tensor([2, 0]))
    assert bits[0].item() == pytest.approx(2.0)
    assert bits[1].item() == pytest.approx(-np.log2(np.exp(10) / (np.exp(10) + 3)))


# ----------------------------------------------------------------------------------------------
# The container


HEADER = Header(
    fingerprint=bytes(range(8)),
    height=28,
    width=27,
    fit="pad",
    num_levels=2,
    label=7,
    slot=5,
    codes_check=0xDEADBEEF,
    versions=Versions(torch=(2, 13, 0), constriction=(0, 5, 0)),
)


@pytest.mark.parametrize(
    "header",
    [HEADER, dataclasses.replace(HEADER, label=None, fit="resize", height=600, width=4000)],
)
def test_container_round_trip(header):
    payload = bytes(range(40))
    data = pack_file(header, payload)
    assert len(data) == OVERHEAD_BYTES + len(payload)
    assert parse_file(data) == (header, payload)
    assert parse_file(pack_file(header, b"")) == (header, b"")


def with_crc(body: bytes) -> bytes:
    """``body`` with a fresh CRC32: a change the CRC does not catch."""
    return body + struct.pack(">I", zlib.crc32(body))


def set_byte(data: bytes, offset: int, value: int) -> bytes:
    return with_crc(data[:offset] + bytes([value]) + data[offset + 1 : -4])


GOOD = pack_file(HEADER, b"\x12\x34\x56\x78\x9a")
DAMAGED = {
    "empty": (b"", "empty"),
    "truncated header": (GOOD[:20], "truncated"),
    "truncated payload": (GOOD[:-1], "truncated"),
    "trailing bytes": (GOOD + b"\0", "trailing bytes"),
    "wrong magic": (b"PNG!" + GOOD[4:], "wrong magic"),
    "wrong version": (set_byte(GOOD, 4, 3), "format version 3"),
    "bit flip": (GOOD[:30] + bytes([GOOD[30] ^ 4]) + GOOD[31:], "CRC32"),
    "unknown fit": (set_byte(GOOD, 23, 9), "unknown fit"),
    "no levels": (set_byte(GOOD, 24, 0), "no latent levels"),
    "empty image": (with_crc(GOOD[:19] + b"\0\0" + GOOD[21:-4]), "empty image"),
    "batch row": (set_byte(GOOD, 27, CODING_BATCH_SIZE), "batch row 16 is out of range"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_each_kind_of_damage_is_named_in_one_line(case):
    data, fragment = DAMAGED[case]
    with pytest.raises(CodecFormatError, match=fragment) as error:
        parse_file(data)
    assert "\n" not in str(error.value)


# A file of format version 1 as vqvae2 wrote it before the 32-bit codes check (HEADER with a
# 16-bit check, this payload), kept byte for byte.
VERSION_1_FILE = bytes.fromhex(
    "56513243010001020304050607001c001b0002000705beef00000005123456789a4c45a808"
)
VERSION_1_PAYLOAD = b"\x12\x34\x56\x78\x9a"


def pack_version_1(header: Header, payload: bytes) -> bytes:
    """A file in format version 1: magic, version, fingerprint, height, width, fit, levels,
    label, batch row, a 16-bit codes check, payload length; payload; CRC32."""
    label = 0xFFFF if header.label is None else header.label
    head = struct.pack(
        ">4sB8sHHBBHBHI",
        b"VQ2C",
        1,
        header.fingerprint,
        header.height,
        header.width,
        {"pad": 0, "resize": 1}[header.fit],
        header.num_levels,
        label,
        header.slot,
        header.codes_check,
        len(payload),
    )
    return with_crc(head + payload)


def test_version_1_files_still_parse():
    expected = dataclasses.replace(HEADER, codes_check=0xBEEF, versions=None, format_version=1)
    assert parse_file(VERSION_1_FILE) == (expected, VERSION_1_PAYLOAD)
    assert pack_version_1(expected, VERSION_1_PAYLOAD) == VERSION_1_FILE
    assert expected.codes_check_mask == 0xFFFF and HEADER.codes_check_mask == 0xFFFFFFFF
    assert OVERHEAD_BYTES == 40 and len(VERSION_1_FILE) == 32 + len(VERSION_1_PAYLOAD)
    with pytest.raises(ValueError, match="format version 2"):
        pack_file(expected, VERSION_1_PAYLOAD)  # read, never written


def test_the_largest_possible_payload_fits_the_read_limit():
    # Every code at the smallest weight (1 of 2**24): the costliest payload of its length.
    for positions in (1, 20, 333):
        weights = np.full((positions, 13), 1, dtype=np.int64)
        weights[:, 0] = PROBABILITY_TOTAL - 12
        payload = encode_symbols(np.full(positions, 7), weights)
        assert 3 * positions <= len(payload)  # 24 bits per code
        assert OVERHEAD_BYTES + len(payload) <= max_file_bytes(positions)
    assert max_file_bytes(20) == OVERHEAD_BYTES + 63 + 4  # ceil(20 * 25 / 8) + a word


def test_the_codes_check_follows_every_code():
    codes = [torch.arange(4).view(2, 2), torch.arange(16).view(4, 4) % 13]
    check = codes_check(codes)
    every_code = np.concatenate([level.flatten().numpy() for level in codes])
    assert check == zlib.crc32(every_code.astype(">i4").tobytes())  # all 32 bits
    for level, position in ((0, (1, 0)), (1, (3, 3))):
        changed = [c.clone() for c in codes]
        changed[level][position] += 1
        assert codes_check(changed) != check


def test_codes_round_trip_through_a_file_on_bytes_alone():
    # No model and no file: codes and their weights -> payload -> the container's bytes ->
    # header and payload -> the same codes, which pass the header's check.
    rng = np.random.default_rng(3)
    levels = [torch.from_numpy(rng.integers(0, 13, (side, side))) for side in (2, 4)]
    symbols = np.concatenate([level.flatten().numpy() for level in levels])  # (20,) top first
    logits = torch.from_numpy(rng.normal(size=(len(symbols), 13)) * 3).float()
    weights = quantise_probabilities(logits)  # (20, 13)
    header = dataclasses.replace(HEADER, codes_check=codes_check(levels))
    data = pack_file(header, encode_symbols(symbols, weights))
    assert OVERHEAD_BYTES < len(data) <= max_file_bytes(len(symbols))
    parsed, payload = parse_file(data)
    assert parsed == header and len(payload) == len(data) - OVERHEAD_BYTES
    decoder = SymbolDecoder(payload)
    decoded = np.array([decoder.decode(row) for row in weights])
    assert np.array_equal(decoded, symbols)
    decoded_levels = [torch.from_numpy(decoded[:4]).view(2, 2), torch.from_numpy(decoded[4:])]
    assert codes_check([decoded_levels[0], decoded_levels[1].view(4, 4)]) == parsed.codes_check


# The package modules the core may load: the models it drives and their config; none that opens
# run folders, checkpoints, data files or reports, draws progress bars or parses a command line.
CORE_MODULES = {
    "codec",
    "_helpers",
    "pixelsnail",
    "pixelsnail_sampler",
    "vqvae",
    "quantize",
    "model_configs",
}
CORE_LIBRARIES = {"torch", "numpy", "constriction", "einops"}  # beside the standard library


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """The package modules ``vqvae2.<module>`` imports, itself and those reached through them
    included, and the other libraries they import (top-level names, standard library aside):
    read from the sources, every import statement, nothing run."""
    package = Path(codec.__file__).parent
    modules: set[str] = set()
    libraries: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in modules:
            continue
        modules.add(name)
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                todo += [name for name in names if (package / f"{name}.py").is_file()]
            elif isinstance(node, ast.ImportFrom):
                libraries.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                libraries.update(alias.name.split(".")[0] for alias in node.names)
    return modules, libraries - set(sys.stdlib_module_names)


def test_the_core_imports_no_run_checkpoint_report_data_or_cli_module():
    modules, libraries = imports_of("codec")
    assert modules == CORE_MODULES
    assert libraries == CORE_LIBRARIES
    # The same reading finds the file layer's imports: the check can see what it forbids.
    file_modules, file_libraries = imports_of("compress")
    assert {"run", "checkpoint", "report", "images", "codec"} <= file_modules
    assert {"tqdm", "PIL"} <= file_libraries


@pytest.mark.slow
def test_a_fresh_interpreter_loads_the_core_alone():
    # (tqdm is not looked for: torch itself imports it.)
    probe = (
        "import json, sys; import vqvae2.codec; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('vqvae2', 'PIL')))))"
    )
    result = run_python("-c", probe)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert loaded == {"vqvae2", *(f"vqvae2.{name}" for name in CORE_MODULES)}


# ----------------------------------------------------------------------------------------------
# Coding with a run's models


def test_encoder_and_decoder_see_bit_identical_probabilities(run_dir, monkeypatch):
    vqvae, priors = load_hierarchy(run_dir)
    seen: list[torch.Tensor] = []
    original = codec._position_weights

    def recording(state, row, col):
        logits, weights = original(state, row, col)
        seen.append(logits.clone())
        return logits, weights

    monkeypatch.setattr(codec, "_position_weights", recording)
    images, labels = blob_images(5), torch.tensor([0, 1, 2, 0, 1])
    encoded = encode_batch(vqvae, priors, images, labels)
    encoder_logits = list(seen)
    seen.clear()
    codes = decode_batch(priors, [item.payload for item in encoded], labels)
    assert len(seen) == len(encoder_logits) == 2 * 2 + 4 * 4
    for position, (ours, theirs) in enumerate(zip(encoder_logits, seen, strict=True)):
        assert torch.equal(ours[:5], theirs[:5]), position  # bit for bit
    for level, level_codes in enumerate(codes):
        assert torch.equal(level_codes, torch.stack([item.codes[level] for item in encoded]))
    assert torch.equal(codes[0], vqvae.encode(images.float() / 127.5 - 1)[0])


def test_an_image_codes_the_same_in_its_batch_row_whatever_the_other_rows(run_dir):
    # On the CPU a row's float results can depend on its place in the batch (with these tiny
    # widths odd and even rows differ): only the row and the batch size may be relied on.
    vqvae, priors = load_hierarchy(run_dir)
    images = blob_images(CODING_BATCH_SIZE, seed=1)
    labels = torch.arange(CODING_BATCH_SIZE) % NUM_CLASSES
    together = encode_batch(vqvae, priors, images, labels)
    assert [item.slot for item in together] == list(range(CODING_BATCH_SIZE))
    for index in (0, 5, CODING_BATCH_SIZE - 1):
        one = slice(index, index + 1)
        alone = encode_batch(vqvae, priors, images[one], labels[one], slots=[index])
        assert alone[0].payload == together[index].payload
    # Decoded among other images (from another batch) in the same rows.
    others = encode_batch(vqvae, priors, blob_images(3, seed=9), labels[:3], slots=[1, 2, 4])
    mixed = [together[0], others[0], others[1], together[3], others[2]]
    codes = decode_batch(
        priors,
        [item.payload for item in mixed],
        torch.tensor([0, 0, 1, 0, 2]),
        [item.slot for item in mixed],
    )
    for place, item in enumerate(mixed):
        assert all(torch.equal(codes[level][place], item.codes[level]) for level in range(2))
    with pytest.raises(ValueError, match="1 to 16 images"):
        encode_batch(vqvae, priors, blob_images(CODING_BATCH_SIZE + 1), None)
    with pytest.raises(ValueError, match="different batch rows"):
        decode_batch(priors, [b"", b""], None, [3, 3])


def test_files_are_grouped_into_batches_in_their_rows():
    assert slot_batches([0, 1, 2, 0, 1, 0]) == [[0, 1, 2], [3, 4], [5]]
    assert slot_batches([3, 3, 5]) == [[0, 2], [1]]


def test_nll_is_the_priors_teacher_forced_loss(run_dir):
    vqvae, priors = load_hierarchy(run_dir)
    images, labels = blob_images(6, seed=2), torch.tensor([2, 1, 0, 2, 1, 0])
    encoded = encode_batch(vqvae, priors, images, labels)
    codes = [torch.stack([item.codes[level] for item in encoded]) for level in range(2)]
    for level, prior in enumerate(priors):
        with torch.no_grad():
            loss = prior(codes[level], labels, codes[:level] or None).loss  # nats per code
        nll = sum(item.nll_bits[level] for item in encoded)
        assert nll == pytest.approx(float(loss) * codes[level].numel() / np.log(2), rel=1e-5)
        # weight >= p (T - K): quantisation adds at most -log2(1 - K / T) bits to a code (and
        # saves bits on codes less likely than 1 / T)
        coded = sum(item.coded_bits[level] for item in encoded)
        assert coded <= nll - codes[level].numel() * np.log2(1 - 13 / PROBABILITY_TOTAL)


def test_coding_restores_the_thread_setting(run_dir):
    vqvae, priors = load_hierarchy(run_dir)
    torch.set_num_threads(2)
    try:
        encode_batch(vqvae, priors, blob_images(1), torch.tensor([0]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
