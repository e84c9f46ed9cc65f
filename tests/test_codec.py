"""The latent codec: probability quantisation, the range coder, the container, fitting images,
and compress -> decompress with a run's models (randomly initialised: fast)."""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae2 import codec
from vqvae2.checkpoint import save_checkpoint
from vqvae2.cli import build_parser, main
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
    compress_files,
    decode_batch,
    decode_images,
    decompress_files,
    encode_batch,
    encode_symbols,
    fit_image,
    max_file_bytes,
    nll_bits,
    pack_file,
    parse_file,
    quantise_probabilities,
    run_fingerprint,
    running_versions,
    slot_batches,
    unfit_image,
)
from vqvae2.config import PixelSNAILConfig, PriorRunConfig, VQVAERunConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.run import load_hierarchy
from vqvae2.vqvae import VQVAE2

from .conftest import assert_one_line_error, tiny_config

NUM_CLASSES = 3
# The coder's cost beyond the integer weights' ideal: under a byte to end on a byte boundary
# inside the final interval (one bit of margin), plus the range coder's rounding, at most
# log2(1 + 2**-8) bits per symbol (its range keeps >= 32 bits beside 24-bit probabilities).
TERMINATION_BITS = 9
ROUNDING_BITS_PER_SYMBOL = float(np.log2(1 + 2**-8))


def prior_config(code_size: int, condition_sizes: tuple[int, ...] = ()) -> PixelSNAILConfig:
    return PixelSNAILConfig(
        code_size=code_size,
        codebook_size=13,
        hidden_channels=8,
        residual_channels=8,
        num_layers=2,
        attention_layers=0 if condition_sizes else 1,
        attention_heads=2,
        kernel_size=3,
        dropout=0.0,
        output_stack_layers=1,
        condition_res_blocks=1 if condition_sizes else 0,
        condition_channels=8,
        condition_sizes=condition_sizes,
        num_classes=NUM_CLASSES,
    )


def write_run(run_dir: Path, seed: int = 0) -> Path:
    """A run folder with a randomly initialised 16x16 grey 2-level VQ-VAE (K = 13) and
    class-conditional priors: the codec needs no training to be lossless."""
    torch.manual_seed(seed)
    vqvae_config = VQVAERunConfig(model=tiny_config())
    save_checkpoint(run_dir / "vqvae", "vqvae", 1, vqvae_config, VQVAE2(vqvae_config.model))
    top, bottom = vqvae_config.model.latent_sizes
    for level, config in (("top", prior_config(top)), ("bottom", prior_config(bottom, (top,)))):
        prior = PixelSNAIL(config)
        # Random logits far from uniform, so that codes cost different amounts.
        torch.nn.init.normal_(prior.output.weight, std=1.0)
        save_checkpoint(
            run_dir / f"prior-{level}", f"prior-{level}", 1, PriorRunConfig(config), prior
        )
    return run_dir


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


# ----------------------------------------------------------------------------------------------
# Images in and out of the model's square


def test_small_images_are_padded_centred_and_cropped_back():
    image = np.arange(12 * 11, dtype=np.uint8).reshape(12, 11) + 1
    fitted, fit = fit_image(image, 16, 1)
    assert fit == "pad" and fitted.shape == (1, 16, 16) and fitted.dtype == torch.uint8
    assert torch.equal(fitted[0, 2:14, 2:13], torch.from_numpy(image))  # (16-12)//2, (16-11)//2
    assert fitted.sum() == int(image.sum(dtype=np.int64))  # black around it
    header = dataclasses.replace(HEADER, height=12, width=11)
    assert torch.equal(unfit_image(fitted, header)[0], torch.from_numpy(image))


def test_large_images_are_resized_and_stay_square():
    image = np.full((20, 40, 3), 200, dtype=np.uint8)
    fitted, fit = fit_image(image, 16, 1)
    assert fit == "resize" and fitted.shape == (1, 16, 16) and int(fitted.min()) >= 190
    header = dataclasses.replace(HEADER, height=20, width=40, fit="resize")
    assert unfit_image(fitted, header).shape == (1, 16, 16)


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


def test_files_round_trip_and_the_png_is_the_decoded_codes(run_dir, tmp_path):
    paths = write_pngs(tmp_path / "in", blob_images(CODING_BATCH_SIZE + 3, size=12, seed=3))
    big = tmp_path / "in" / "big.png"
    Image.fromarray(np.full((30, 20), 90, np.uint8)).save(big)
    labels = [i % NUM_CLASSES for i in range(len(paths) + 1)]
    compressed = compress_files(run_dir, [*paths, big], tmp_path / "c", labels=labels)
    assert [item.file.name for item in compressed[:2]] == ["image000.vq2", "image001.vq2"]
    assert all(item.size == item.file.stat().st_size for item in compressed)
    decompressed = decompress_files([item.file for item in compressed], tmp_path / "d", run_dir)
    vqvae, _ = load_hierarchy(run_dir)
    for before, after in zip(compressed, decompressed, strict=True):
        for level in range(2):
            assert torch.equal(before.encoded.codes[level], after.codes[level])
        decoded = decode_images(vqvae, [c[None] for c in after.codes], [after.header.slot])
        expected = unfit_image(decoded[0], after.header)
        written = torch.from_numpy(np.array(Image.open(after.png)))[None]
        assert torch.equal(written, expected) and torch.equal(after.image, expected)
        assert after.header.label == before.header.label
    assert decompressed[0].image.shape == (1, 12, 12) and decompressed[-1].image.shape == (
        1,
        16,
        16,
    )
    assert decompressed[-1].header.fit == "resize"


def test_the_fingerprint_follows_every_weight_and_config(tmp_path):
    first, second = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    assert run_fingerprint(first) == run_fingerprint(second)  # same seed, same bytes
    weights = next((second / "prior-bottom").glob("step-*")) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last bit of the last weight
    weights.write_bytes(bytes(data))
    assert run_fingerprint(first) != run_fingerprint(second)
    meta = next((first / "vqvae").glob("step-*")) / "meta.json"
    meta.write_text(
        meta.read_text().replace('"commitment_weight": 0.25', '"commitment_weight": 0.5')
    )
    changed = run_fingerprint(first)
    assert changed not in (run_fingerprint(second), run_fingerprint(write_run(tmp_path / "c")))


def test_another_run_is_refused_before_any_model_is_built(run_dir, tmp_path, monkeypatch, capsys):
    paths = write_pngs(tmp_path / "in", blob_images(2))
    compressed = compress_files(run_dir, paths, tmp_path / "c", labels=[0, 1])
    other = write_run(tmp_path / "other", seed=1)

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(codec, "_load_models", no_models)
    code = main(
        ["decompress", str(compressed[1].file), "--run", str(other), "--out", str(tmp_path / "d")]
    )
    assert_one_line_error(capsys, code, "image001.vq2: compressed with another model")


def test_the_codes_check_follows_every_code():
    codes = [torch.arange(4).view(2, 2), torch.arange(16).view(4, 4) % 13]
    check = codes_check(codes)
    every_code = np.concatenate([level.flatten().numpy() for level in codes])
    assert check == zlib.crc32(every_code.astype(">i4").tobytes())  # all 32 bits
    for level, position in ((0, (1, 0)), (1, (3, 3))):
        changed = [c.clone() for c in codes]
        changed[level][position] += 1
        assert codes_check(changed) != check


def test_a_decoder_whose_probabilities_differ_is_caught(run_dir, tmp_path, monkeypatch, capsys):
    # What another CPU or library version could do: slightly other logits, other codes.
    paths = write_pngs(tmp_path / "in", blob_images(3, seed=4))
    compressed = compress_files(run_dir, paths, tmp_path / "c", labels=[0, 1, 2])
    original = codec._position_weights

    def shifted(state, row, col):
        logits, _ = original(state, row, col)
        logits = logits + torch.linspace(0, 3, logits.shape[-1])
        return logits, quantise_probabilities(logits)

    monkeypatch.setattr(codec, "_position_weights", shifted)
    files = [str(item.file) for item in compressed]
    code = main(["decompress", *files, "--run", str(run_dir), "--out", str(tmp_path / "d")])
    assert_one_line_error(capsys, code, "image000.vq2: the decoded codes fail the file's check")
    assert not (tmp_path / "d").exists()


def colliding_codes(codes: list[torch.Tensor], codebook_size: int) -> list[torch.Tensor]:
    """Other codes for the same image whose CRC32 agrees with that of ``codes`` in its low 16
    bits (what a 16-bit check cannot tell apart), found by trying random bottom levels."""
    top_bytes = codes[0].numpy().astype(">i4").tobytes()
    target = codes_check(codes) & 0xFFFF
    rng = np.random.default_rng(0)
    candidates = rng.integers(0, codebook_size, (1 << 19, *codes[1].shape)).astype(">i4")
    row_bytes = candidates[0].nbytes
    flat = candidates.tobytes()
    top_crc = zlib.crc32(top_bytes)
    for index in range(len(candidates)):
        chunk = flat[index * row_bytes : (index + 1) * row_bytes]
        if zlib.crc32(chunk, top_crc) & 0xFFFF == target:
            bottom = torch.from_numpy(candidates[index].astype(np.int64))
            if not torch.equal(bottom, codes[1]):
                return [codes[0], bottom]
    raise AssertionError("no collision found")


def test_a_decoder_drift_that_a_16_bit_check_misses_is_caught(run_dir, tmp_path, monkeypatch):
    paths = write_pngs(tmp_path / "in", blob_images(1, seed=5))
    compressed = compress_files(run_dir, paths, tmp_path / "c", labels=[2])
    wrong = colliding_codes(compressed[0].encoded.codes, 13)
    assert not torch.equal(wrong[1], compressed[0].encoded.codes[1])
    # A decoder gone astray that lands on those codes: the low 16 bits of the check agree.
    monkeypatch.setattr(codec, "decode_batch", lambda *args: [level[None] for level in wrong])
    with pytest.raises(CodecFormatError, match="the decoded codes fail the file's check"):
        decompress_files([compressed[0].file], tmp_path / "d", run_dir)
    assert not (tmp_path / "d" / "image000.png").exists()


def as_version_1(data: bytes, check: int | None = None) -> bytes:
    """A file of today's format rewritten in format version 1 (its 16-bit codes check the low
    bits of today's, or ``check``)."""
    header, payload = parse_file(data)
    bits = header.codes_check & 0xFFFF if check is None else check
    return pack_version_1(dataclasses.replace(header, codes_check=bits), payload)


def test_version_1_files_decompress_with_their_16_bit_check(run_dir, tmp_path, caplog):
    paths = write_pngs(tmp_path / "in", blob_images(3, seed=6))
    compressed = compress_files(run_dir, paths, tmp_path / "c", labels=[0, 1, 2])
    old = []
    for item in compressed:
        path = tmp_path / "old" / item.file.name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(as_version_1(item.file.read_bytes()))
        old.append(path)
    with caplog.at_level("WARNING", logger="vqvae2.codec"):
        decompressed = decompress_files(old, tmp_path / "d", run_dir)
    for before, after in zip(compressed, decompressed, strict=True):
        assert after.header.format_version == 1 and after.header.versions is None
        assert all(
            torch.equal(a, b) for a, b in zip(before.encoded.codes, after.codes, strict=True)
        )
    assert [record.getMessage() for record in caplog.records] == [
        "3 of 3 files are format version 1, whose codes check has 16 bits: one wrong decode "
        "in 65,536 passes it"
    ]
    wrong = (compressed[1].header.codes_check + 1) & 0xFFFF
    old[1].write_bytes(as_version_1(compressed[1].file.read_bytes(), check=wrong))
    with pytest.raises(CodecFormatError, match="image001.vq2: the decoded codes fail"):
        decompress_files(old, tmp_path / "d2", run_dir)


def with_versions(data: bytes, versions: Versions) -> bytes:
    header, payload = parse_file(data)
    return pack_file(dataclasses.replace(header, versions=versions), payload)


OTHER_VERSIONS = Versions(torch=(2, 9, 1), constriction=(0, 4, 1))


def test_other_library_versions_decode_with_a_note_when_the_check_passes(run_dir, tmp_path, caplog):
    paths = write_pngs(tmp_path / "in", blob_images(3, seed=7))
    compressed = compress_files(run_dir, paths, tmp_path / "c", labels=[0, 1, 2])
    here = running_versions()
    assert all(item.header.versions == here for item in compressed)
    torch_release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:3])
    assert here.torch == torch_release
    compressed[2].file.write_bytes(with_versions(compressed[2].file.read_bytes(), OTHER_VERSIONS))
    files = [item.file for item in compressed]
    with caplog.at_level("WARNING", logger="vqvae2.codec"):
        decompressed = decompress_files(files, tmp_path / "d", run_dir)
    assert torch.equal(decompressed[2].codes[1], compressed[2].encoded.codes[1])
    assert (tmp_path / "d" / "image002.png").is_file()
    assert [record.getMessage() for record in caplog.records] == [
        f"1 of 3 files were compressed under torch 2.9.1, constriction 0.4.1, this is {here}; "
        "their decoded codes passed the 32-bit check"
    ]


def test_a_failed_check_names_the_versions_the_file_needs(run_dir, tmp_path, monkeypatch):
    paths = write_pngs(tmp_path / "in", blob_images(1, seed=8))
    compressed = compress_files(run_dir, paths, tmp_path / "c", labels=[1])
    file = compressed[0].file
    file.write_bytes(with_versions(file.read_bytes(), OTHER_VERSIONS))
    original = codec._position_weights

    def shifted(state, row, col):  # the float results of those other versions
        logits, _ = original(state, row, col)
        logits = logits + torch.linspace(0, 3, logits.shape[-1])
        return logits, quantise_probabilities(logits)

    monkeypatch.setattr(codec, "_position_weights", shifted)
    message = (
        "image000.vq2: the decoded codes fail the file's check: it was compressed under torch "
        f"2.9.1, constriction 0.4.1, this is {running_versions()}: decompress it under those "
        "versions"
    )
    with pytest.raises(CodecFormatError) as error:
        decompress_files([file], tmp_path / "d", run_dir)
    assert str(error.value).endswith(message)


def test_huge_or_endless_files_are_refused_before_they_are_read(run_dir, tmp_path, capsys):
    limit = max_file_bytes(2 * 2 + 4 * 4)  # the tiny run's 2x2 + 4x4 codes
    huge = tmp_path / "huge.vq2"
    with open(huge, "wb") as handle:
        handle.truncate(1 << 40)  # sparse: a terabyte that takes no disk
    just_over = tmp_path / "over.vq2"
    just_over.write_bytes(GOOD[:4] + bytes(limit - 3))
    cases = [(huge, f"{1 << 40} bytes or more"), (just_over, f"{limit + 1} bytes or more")]
    if Path("/dev/zero").exists():  # endless, and its size reads 0
        cases.append((Path("/dev/zero"), f"{limit + 1} bytes or more"))
    for path, size in cases:
        code = main(["decompress", str(path), "--run", str(run_dir), "--out", str(tmp_path / "d")])
        assert_one_line_error(
            capsys,
            code,
            f"{path}: {size}, but a compressed image of this run has at most {limit}: not a "
            ".vq2 file of this run",
        )


def test_labels_and_images_are_checked_first(run_dir, tmp_path, capsys):
    paths = write_pngs(tmp_path / "in", blob_images(2))
    out = str(tmp_path / "c")
    code = main(["compress", str(run_dir), *map(str, paths), "--out", out, "--quiet"])
    assert_one_line_error(capsys, code, "class-conditional: give each image's class label")
    code = main(["compress", str(run_dir), *map(str, paths), "--out", out, "--label", "3"])
    assert_one_line_error(capsys, code, "class label 3 is out of range")
    code = main(
        ["compress", str(run_dir), *map(str, paths), "--out", out, "--label", "0", "1", "2"]
    )
    assert_one_line_error(capsys, code, "3 labels for 2 images")
    code = main(["compress", str(run_dir), str(tmp_path / "nope.png"), "--out", out])
    assert_one_line_error(capsys, code, "nope.png does not exist")


def test_cli_compress_json_then_decompress(run_dir, tmp_path, capsys):
    import json

    paths = write_pngs(tmp_path / "in", blob_images(3, size=16))
    out = tmp_path / "c"
    args = ["compress", str(run_dir), *map(str, paths), "--out", str(out), "--label", "1"]
    assert main([*args, "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["pixels_per_image"] == 16 * 16
    assert set(report["bits_per_pixel"]) == {"top", "bottom", "payload", "file"}
    entry = report["files"][0]
    assert (
        entry["bytes"]
        == Path(entry["file"]).stat().st_size
        == OVERHEAD_BYTES + entry["payload_bytes"]
    )
    assert entry["label"] == 1 and entry["fit"] == "pad"
    total = entry["nll_bits_per_pixel"]["total"]
    assert total == pytest.approx(
        entry["nll_bits_per_pixel"]["top"] + entry["nll_bits_per_pixel"]["bottom"]
    )
    files = sorted(str(path) for path in out.glob("*.vq2"))
    assert main(["decompress", *files, "--run", str(run_dir), "--out", str(tmp_path / "d")]) == 0
    assert "decompressed 3 files" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "d").iterdir()) == [
        "image000.png",
        "image001.png",
        "image002.png",
    ]


@pytest.mark.parametrize("case", ["empty", "truncated payload", "wrong version", "bit flip"])
def test_cli_names_a_bad_file_in_one_line(run_dir, tmp_path, capsys, case):
    data, fragment = DAMAGED[case]
    path = tmp_path / "bad.vq2"
    path.write_bytes(data)
    code = main(["decompress", str(path), "--run", str(run_dir), "--out", str(tmp_path / "d")])
    assert_one_line_error(capsys, code, fragment)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("command", "mark"), [("compress", "--label"), ("decompress", "--run")])
def test_help_of_the_codec_commands(command, mark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0 and mark in capsys.readouterr().out
