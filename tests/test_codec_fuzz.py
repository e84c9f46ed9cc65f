"""Fuzzing the codec's container: 100,000 damaged files through the parser (size, magic, version,
length and CRC checks come before any model work), each rejected with the one-line error or,
when the damage left a consistent file (a header field changed and the CRC refitted), read back
with exactly that field changed. Files of the current format and of version 1."""

from __future__ import annotations

import dataclasses
import random
import struct
import time
import zlib

import pytest

from vqvae2.codec import (
    CODING_BATCH_SIZE,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    CodecFormatError,
    Header,
    Versions,
    pack_file,
    parse_file,
)

from .test_codec import pack_version_1

MUTATIONS = 100_000
TIME_LIMIT_SECONDS = 60
# Damage the CRC32 always detects in files this short: up to 3 flipped bits, or any burst of
# flips within 32 bits.
ALWAYS_CAUGHT_FLIPS = 3
# The header of each format version, field by field: (Header field, bytes), from docs/codec.md.
LAYOUTS = {
    1: [
        ("magic", 4),
        ("format_version", 1),
        ("fingerprint", 8),
        ("height", 2),
        ("width", 2),
        ("fit", 1),
        ("num_levels", 1),
        ("label", 2),
        ("slot", 1),
        ("codes_check", 2),
        ("payload length", 4),
    ],
    2: [
        ("magic", 4),
        ("format_version", 1),
        ("fingerprint", 8),
        ("versions", 6),
        ("height", 2),
        ("width", 2),
        ("fit", 1),
        ("num_levels", 1),
        ("label", 2),
        ("slot", 1),
        ("codes_check", 4),
        ("payload length", 4),
    ],
}

V1_HEADER_BYTES = sum(size for _, size in LAYOUTS[1])


def field_at(version: int, offset: int) -> str:
    """The name of the header field holding byte ``offset`` of a file of ``version``."""
    start = 0
    for name, size in LAYOUTS[version]:
        if offset < start + size:
            return name
        start += size
    return "payload or CRC"


def random_header(rng: random.Random, version: int) -> Header:
    return Header(
        fingerprint=rng.randbytes(8),
        height=rng.randint(1, 64),
        width=rng.randint(1, 64),
        fit=rng.choice(["pad", "resize"]),
        num_levels=rng.randint(1, 3),
        label=rng.choice([None, rng.randint(0, 999)]),
        slot=rng.randrange(CODING_BATCH_SIZE),
        codes_check=rng.getrandbits(16 if version == 1 else 32),
        versions=None if version == 1 else Versions((2, rng.randrange(20), 0), (0, 5, 1)),
        format_version=version,
    )


def with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def pack_any(header: Header, payload: bytes) -> bytes:
    if header.format_version == 1:
        return pack_version_1(header, payload)
    return pack_file(header, payload)


def valid_files(rng: random.Random) -> list[bytes]:
    files = []
    for version in (FORMAT_VERSION, FORMAT_VERSION, 1):
        for payload_bytes in (0, 1, 7, 60, 300):
            files.append(pack_any(random_header(rng, version), rng.randbytes(payload_bytes)))
    return files


def flip_bits(data: bytes, mask: int) -> bytes:
    """``data`` with the bits set in ``mask`` (a little-endian integer) flipped."""
    return (int.from_bytes(data, "little") ^ mask).to_bytes(len(data), "little")


def few_bits(bits: int, rng: random.Random) -> int:
    """A mask of 1 to ``ALWAYS_CAUGHT_FLIPS`` bits among ``bits``."""
    mask = 0
    for _ in range(rng.randint(1, ALWAYS_CAUGHT_FLIPS)):
        mask |= 1 << rng.randrange(bits)
    return mask


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One damaged copy of ``data`` and the kind of damage."""
    kind = rng.choice(
        ["truncate", "flip", "flips", "burst", "random", "magic-random", "field", "splice", "empty"]
    )
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if kind == "flip":
        return kind, flip_bits(data, few_bits(8 * len(data), rng))
    if kind == "flips":  # about one bit in eight
        bits = 8 * len(data)
        mask = rng.getrandbits(bits) & rng.getrandbits(bits) & rng.getrandbits(bits)
        return kind, flip_bits(data, mask or 1)
    if kind == "burst":
        start = rng.randrange(len(data) - 3)
        burst = (int.from_bytes(data[start : start + 4]) ^ rng.getrandbits(32)).to_bytes(4)
        return kind, data[:start] + burst + data[start + 4 :]
    if kind == "random":
        return kind, rng.randbytes(rng.randrange(200))
    if kind == "magic-random":  # past the magic and version checks: length and CRC must catch it
        return kind, MAGIC + bytes([FORMAT_VERSION]) + rng.randbytes(rng.randrange(200))
    if kind == "field":  # a header byte set to anything, the CRC made to fit
        offset = rng.randrange(
            HEADER_BYTES if data[len(MAGIC)] == FORMAT_VERSION else V1_HEADER_BYTES
        )
        body = data[:offset] + bytes([rng.randrange(256)]) + data[offset + 1 : -4]
        return kind, with_crc(body)
    if kind == "splice":  # bytes inserted or removed
        at = rng.randrange(len(data))
        if rng.random() < 0.5:
            return kind, data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at:]
        return kind, data[:at] + data[at + rng.randint(1, 8) :]
    return kind, b""


def test_a_hundred_thousand_damaged_files_each_get_the_one_line_error():
    rng = random.Random(17)
    files = valid_files(rng)
    rejected: dict[str, int] = {}
    accepted: dict[str, int] = {}
    start = time.perf_counter()
    for index in range(MUTATIONS):
        original = files[index % len(files)]
        kind, data = mutate(original, rng)
        try:
            header, payload = parse_file(data)
        except CodecFormatError as error:
            message = str(error)
            assert message and "\n" not in message, (kind, data)
            rejected[kind] = rejected.get(kind, 0) + 1
            continue
        # Accepted: the damage left a consistent file, which reads back to these very bytes.
        assert pack_any(header, payload) == data, (kind, data)
        before, before_payload = parse_file(original)
        changed = {
            field.name
            for field in dataclasses.fields(Header)
            if getattr(header, field.name) != getattr(before, field.name)
        }
        if kind == "field" and data != original:
            # One header byte changed and the CRC refitted: exactly the field holding that byte
            # reads otherwise, the rest of the file as before.
            offset = next(i for i, (a, b) in enumerate(zip(data, original, strict=True)) if a != b)
            assert changed == {field_at(before.format_version, offset)}, (offset, changed)
            assert payload == before_payload
        else:
            # Any other damage that passes every check changed nothing.
            assert data == original and not changed, (kind, data)
        accepted[kind] = accepted.get(kind, 0) + 1
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_SECONDS, f"{MUTATIONS} files took {elapsed:.1f} s"
    assert sum(rejected.values()) + sum(accepted.values()) == MUTATIONS
    for kind in ("truncate", "flip", "random", "magic-random", "splice", "empty"):
        assert rejected[kind] > 0 and kind not in accepted, (kind, accepted)
    # A burst within 32 bits never passes the CRC unless it changed nothing; header fields
    # changed under a refitted CRC are often accepted (a height, a label, a fingerprint).
    assert accepted.get("burst", 0) <= rejected["burst"] / 1000
    assert accepted["field"] > MUTATIONS / 100


@pytest.mark.parametrize("size", range(HEADER_BYTES + 4))
def test_every_short_prefix_is_named_truncated_or_empty(size):
    data = valid_files(random.Random(0))[2]
    with pytest.raises(CodecFormatError, match="empty" if size == 0 else "truncated"):
        parse_file(data[:size])
