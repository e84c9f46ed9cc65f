"""The codec with trained priors: file sizes against the priors' NLL, lossless round trips, and
the command line in fresh processes (slow: trains a tiny run, starts processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae2.codec import OVERHEAD_BYTES, decode_images
from vqvae2.compress import compress_files, decompress_files, summarise, unfit_image
from vqvae2.config import PriorRunConfig, VQVAERunConfig, load_config
from vqvae2.run import Run, load_hierarchy
from vqvae2.train import extract_codes, train_prior, train_vqvae

from .conftest import run_module, write_npz
from .test_codec import ROUNDING_BITS_PER_SYMBOL, TERMINATION_BITS

pytestmark = pytest.mark.slow

SIZE = 64  # 8x8 and 16x16 codes: a few hundred bits a file, where a byte is well under 1%
NLL_MARGIN = 0.01  # the issue's bound: payload within 1% of the priors' NLL


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A tiny 64x64 run trained on blobs (priors class-conditional on 3 classes), and the
    first 40 blobs cut to 60x60 as PNG files with their labels."""
    root = tmp_path_factory.mktemp("codec-trained")
    data = write_npz(root / "blobs.npz", count=96, size=SIZE)
    vqvae_config = load_config(
        VQVAERunConfig, "tiny", [f"model.image_size={SIZE}", "train.max_steps=60"]
    )
    run = root / "run"
    train_vqvae(vqvae_config, data, run, progress=False)
    extract_codes(Run.open(run), data, progress=False)
    for level in ("top", "bottom"):
        config = load_config(PriorRunConfig, f"prior-{level}-tiny", ["train.max_steps=40"])
        train_prior(Run.open(run), level, config, progress=False)
    arrays = np.load(data)
    images, labels = arrays["images"][:40, 2:-2, 2:-2], arrays["labels"][:40]
    folder = root / "images"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"blob{index:02d}.png")
    return run, folder, labels


def test_files_sit_within_one_percent_of_the_nll_and_round_trip(trained, tmp_path):
    run, folder, labels = trained
    paths = sorted(folder.glob("*.png"))
    compressed = compress_files(Run.open(run), paths, tmp_path / "c", labels=labels.tolist())
    summary = summarise([item.encoded for item in compressed], ("top", "bottom"), SIZE**2)
    assert summary["payload_over_nll"] <= NLL_MARGIN, summary
    assert abs(summary["coded_over_nll"]) < 1e-4, summary  # quantisation: next to nothing
    for item in compressed:
        symbols = sum(level.numel() for level in item.encoded.codes)
        ideal = sum(item.encoded.coded_bits)
        payload_bits = 8 * len(item.encoded.payload)
        assert payload_bits <= ideal + TERMINATION_BITS + ROUNDING_BITS_PER_SYMBOL * symbols
        assert item.size == OVERHEAD_BYTES + len(item.encoded.payload)
    decompressed = decompress_files(
        Run.open(run), [item.file for item in compressed], tmp_path / "d"
    )
    vqvae, _ = load_hierarchy(run)
    for before, after in zip(compressed, decompressed, strict=True):
        assert all(
            torch.equal(a, b) for a, b in zip(before.encoded.codes, after.codes, strict=True)
        )
        decoded = decode_images(vqvae, [c[None] for c in after.codes], [after.header.slot])
        written = torch.from_numpy(np.array(Image.open(after.png)))[None]
        assert written.shape == (1, SIZE - 4, SIZE - 4)
        assert torch.equal(written, unfit_image(decoded[0], after.header))


def test_the_command_line_round_trip_and_bad_files_in_fresh_processes(trained, tmp_path):
    run, folder, labels = trained
    paths = sorted(folder.glob("*.png"))[:5]
    labels_text = [str(label) for label in labels[:5]]
    out = tmp_path / "c"
    done = run_module(
        "vqvae2", "compress", run, *paths, "--out", out, "--label", *labels_text, "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["images"] == 5 and report["bits_per_pixel"]["file"] > 0
    files = sorted(out.glob("*.vq2"))
    done = run_module("vqvae2", "decompress", *files, "--run", run, "--out", tmp_path / "d")
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "d").glob("*.png"))) == 5
    data = files[0].read_bytes()
    bad = {
        "truncated": data[:-3],
        "flipped": data[:35] + bytes([data[35] ^ 0x10]) + data[36:],
    }
    for name, content in bad.items():
        path = tmp_path / f"{name}.vq2"
        path.write_bytes(content)
        done = run_module("vqvae2", "decompress", path, "--run", run, "--out", tmp_path / "e")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (name, done.stderr)
        assert lines[0].startswith(f"vqvae2: error: {path}: "), lines
