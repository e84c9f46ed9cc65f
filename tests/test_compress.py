"""The latent codec's file layer: fitting images, the run's fingerprint, compress -> decompress
of image files with a run's models (randomly initialised: fast), and the codec commands."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae2 import codec, compress
from vqvae2.cli import build_parser, main
from vqvae2.codec import (
    CODING_BATCH_SIZE,
    OVERHEAD_BYTES,
    CodecFormatError,
    Versions,
    codes_check,
    decode_images,
    max_file_bytes,
    pack_file,
    parse_file,
    quantise_probabilities,
    running_versions,
)
from vqvae2.compress import (
    compress_files,
    decompress_files,
    fit_image,
    run_files_fingerprint,
    run_fingerprint,
    unfit_image,
)
from vqvae2.export import export_run, load_pretrained
from vqvae2.run import Run, load_hierarchy

from .conftest import assert_one_line_error
from .test_codec import (
    DAMAGED,
    GOOD,
    HEADER,
    NUM_CLASSES,
    blob_images,
    pack_version_1,
    write_pngs,
    write_run,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("compress") / "run")


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
# Files with a run's models


def test_files_round_trip_and_the_png_is_the_decoded_codes(run_dir, tmp_path):
    paths = write_pngs(tmp_path / "in", blob_images(CODING_BATCH_SIZE + 3, size=12, seed=3))
    big = tmp_path / "in" / "big.png"
    Image.fromarray(np.full((30, 20), 90, np.uint8)).save(big)
    labels = [i % NUM_CLASSES for i in range(len(paths) + 1)]
    compressed = compress_files(Run.open(run_dir), [*paths, big], tmp_path / "c", labels=labels)
    assert [item.file.name for item in compressed[:2]] == ["image000.vq2", "image001.vq2"]
    assert all(item.size == item.file.stat().st_size for item in compressed)
    decompressed = decompress_files(
        Run.open(run_dir), [item.file for item in compressed], tmp_path / "d"
    )
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
    assert run_fingerprint(Run.open(first)) == run_fingerprint(
        Run.open(second)
    )  # same seed, same bytes
    weights = next((second / "prior-bottom").glob("step-*")) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last bit of the last weight
    weights.write_bytes(bytes(data))
    assert run_fingerprint(Run.open(first)) != run_fingerprint(Run.open(second))
    meta = next((first / "vqvae").glob("step-*")) / "meta.json"
    meta.write_text(
        meta.read_text().replace('"commitment_weight": 0.25', '"commitment_weight": 0.5')
    )
    changed = run_fingerprint(Run.open(first))
    assert changed not in (
        run_fingerprint(Run.open(second)),
        run_fingerprint(Run.open(write_run(tmp_path / "c"))),
    )


def test_another_run_is_refused_before_any_model_is_built(run_dir, tmp_path, monkeypatch, capsys):
    paths = write_pngs(tmp_path / "in", blob_images(2))
    compressed = compress_files(Run.open(run_dir), paths, tmp_path / "c", labels=[0, 1])
    other = write_run(tmp_path / "other", seed=1)

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(compress, "_load_models", no_models)
    code = main(
        ["decompress", str(compressed[1].file), "--run", str(other), "--out", str(tmp_path / "d")]
    )
    assert_one_line_error(capsys, code, "image001.vq2: compressed with another model")


def test_a_decoder_whose_probabilities_differ_is_caught(run_dir, tmp_path, monkeypatch, capsys):
    # What another CPU or library version could do: slightly other logits, other codes.
    paths = write_pngs(tmp_path / "in", blob_images(3, seed=4))
    compressed = compress_files(Run.open(run_dir), paths, tmp_path / "c", labels=[0, 1, 2])
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
    compressed = compress_files(Run.open(run_dir), paths, tmp_path / "c", labels=[2])
    wrong = colliding_codes(compressed[0].encoded.codes, 13)
    assert not torch.equal(wrong[1], compressed[0].encoded.codes[1])
    # A decoder gone astray that lands on those codes: the low 16 bits of the check agree.
    monkeypatch.setattr(compress, "decode_batch", lambda *args: [level[None] for level in wrong])
    with pytest.raises(CodecFormatError, match="the decoded codes fail the file's check"):
        decompress_files(Run.open(run_dir), [compressed[0].file], tmp_path / "d")
    assert not (tmp_path / "d" / "image000.png").exists()


def as_version_1(data: bytes, run: Run, check: int | None = None) -> bytes:
    """A file of today's format rewritten in format version 1 as vqvae2 wrote it: the
    fingerprint of the run's checkpoint files, its 16-bit codes check the low bits of today's
    (or ``check``)."""
    header, payload = parse_file(data)
    bits = header.codes_check & 0xFFFF if check is None else check
    old = dataclasses.replace(header, codes_check=bits, fingerprint=run_files_fingerprint(run))
    return pack_version_1(old, payload)


def test_version_1_files_decompress_with_their_16_bit_check(run_dir, tmp_path, caplog):
    paths = write_pngs(tmp_path / "in", blob_images(3, seed=6))
    compressed = compress_files(Run.open(run_dir), paths, tmp_path / "c", labels=[0, 1, 2])
    old = []
    for item in compressed:
        path = tmp_path / "old" / item.file.name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(as_version_1(item.file.read_bytes(), Run.open(run_dir)))
        old.append(path)
    with caplog.at_level("WARNING", logger="vqvae2.compress"):
        decompressed = decompress_files(Run.open(run_dir), old, tmp_path / "d")
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
    old[1].write_bytes(
        as_version_1(compressed[1].file.read_bytes(), Run.open(run_dir), check=wrong)
    )
    with pytest.raises(CodecFormatError, match="image001.vq2: the decoded codes fail"):
        decompress_files(Run.open(run_dir), old, tmp_path / "d2")


def with_versions(data: bytes, versions: Versions) -> bytes:
    header, payload = parse_file(data)
    return pack_file(dataclasses.replace(header, versions=versions), payload)


OTHER_VERSIONS = Versions(torch=(2, 9, 1), constriction=(0, 4, 1))


def test_other_library_versions_decode_with_a_note_when_the_check_passes(run_dir, tmp_path, caplog):
    paths = write_pngs(tmp_path / "in", blob_images(3, seed=7))
    compressed = compress_files(Run.open(run_dir), paths, tmp_path / "c", labels=[0, 1, 2])
    here = running_versions()
    assert all(item.header.versions == here for item in compressed)
    torch_release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:3])
    assert here.torch == torch_release
    compressed[2].file.write_bytes(with_versions(compressed[2].file.read_bytes(), OTHER_VERSIONS))
    files = [item.file for item in compressed]
    with caplog.at_level("WARNING", logger="vqvae2.compress"):
        decompressed = decompress_files(Run.open(run_dir), files, tmp_path / "d")
    assert torch.equal(decompressed[2].codes[1], compressed[2].encoded.codes[1])
    assert (tmp_path / "d" / "image002.png").is_file()
    assert [record.getMessage() for record in caplog.records] == [
        f"1 of 3 files were compressed under torch 2.9.1, constriction 0.4.1, this is {here}; "
        "their decoded codes passed the 32-bit check"
    ]


def test_a_failed_check_names_the_versions_the_file_needs(run_dir, tmp_path, monkeypatch):
    paths = write_pngs(tmp_path / "in", blob_images(1, seed=8))
    compressed = compress_files(Run.open(run_dir), paths, tmp_path / "c", labels=[1])
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
        decompress_files(Run.open(run_dir), [file], tmp_path / "d")
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


def test_one_label_is_every_image_s(run_dir, tmp_path):
    paths = write_pngs(tmp_path / "in", blob_images(3))
    compressed = compress_files(Run.open(run_dir), paths, tmp_path / "c", labels=[2])
    assert [item.header.label for item in compressed] == [2, 2, 2]


# ----------------------------------------------------------------------------------------------
# A run and its export code the same files


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    return export_run(Run.open(run_dir), tmp_path_factory.mktemp("export") / "models")


def decoded_pngs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def test_files_of_a_run_decompress_with_its_export_and_back(run_dir, exported, tmp_path):
    paths = write_pngs(tmp_path / "in", blob_images(3, seed=9))
    run, models = Run.open(run_dir), load_pretrained(exported)
    assert run_fingerprint(run) == run_fingerprint(models)
    by_run = compress_files(run, paths, tmp_path / "c-run", labels=[0, 1, 2])
    by_export = compress_files(models, paths, tmp_path / "c-export", labels=[0, 1, 2])
    assert [item.file.read_bytes() for item in by_run] == [
        item.file.read_bytes() for item in by_export
    ]
    decompress_files(run, [item.file for item in by_run], tmp_path / "run-run")
    decompress_files(models, [item.file for item in by_run], tmp_path / "run-export")
    decompress_files(run, [item.file for item in by_export], tmp_path / "export-run")
    expected = decoded_pngs(tmp_path / "run-run")
    assert len(expected) == 3
    assert decoded_pngs(tmp_path / "run-export") == expected
    assert decoded_pngs(tmp_path / "export-run") == expected


def test_the_cli_takes_an_exported_folder(run_dir, exported, tmp_path, capsys):
    paths = write_pngs(tmp_path / "in", blob_images(2, seed=10))
    out = tmp_path / "c"
    args = ["compress", str(exported), *map(str, paths), "--out", str(out), "--label", "2"]
    assert main([*args, "--quiet"]) == 0
    files = [str(out / "image000.vq2"), str(out / "image001.vq2")]
    assert main(["decompress", *files, "--run", str(run_dir), "--out", str(tmp_path / "d")]) == 0
    assert "decompressed 2 files" in capsys.readouterr().out
    other = write_run(tmp_path / "other", seed=1)
    code = main(["decompress", *files, "--run", str(other), "--out", str(tmp_path / "e")])
    assert_one_line_error(capsys, code, "image000.vq2: compressed with another model")
    old = tmp_path / "old.vq2"
    old.write_bytes(as_version_1(Path(files[0]).read_bytes(), Run.open(run_dir)))
    code = main(["decompress", str(old), "--run", str(exported), "--out", str(tmp_path / "f")])
    assert_one_line_error(capsys, code, "format version 1 files carry the fingerprint of a run's")


def test_the_fingerprint_changes_with_any_weight_of_any_model(exported):
    models = load_pretrained(exported)
    before = run_fingerprint(models)
    seen = {before}
    for model in (models.vqvae, *models.priors):
        for name, tensor in model.state_dict().items():
            if tensor.numel() == 0 or not tensor.is_floating_point():
                continue
            flat = tensor.view(-1)  # shares the model's storage
            kept = flat[-1].clone()
            flat[-1] = kept + 1.0
            changed = run_fingerprint(models)
            flat[-1] = kept
            assert changed not in seen, name
            seen.add(changed)
    assert run_fingerprint(models) == before
    assert len(seen) > 20
