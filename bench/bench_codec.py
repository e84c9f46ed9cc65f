"""The latent codec against JPEG and WebP: rate-distortion on Fashion-MNIST test images, the
lossless round trip, and compress / decompress speed.

Every codec sees the same images: the test set's 28x28 grey images padded (centred, black) to
the 32x32 the run's model codes, which is how the IDX loader feeds training and how `compress`
fits a 28x28 PNG. Bits per pixel count a file's bits over those 32x32 = 1,024 pixels, and PSNR is
measured on the same 1,024 pixels (from the mean squared error over all the images, [0, 255]).

* VQ-VAE-2 codec: the first ``--images`` test images written as 28x28 PNGs, then
  `compress_files` (with their labels) and `decompress_files`, end to end and timed. Its one
  operating point per run is the 32x32 decode of the codes (what `decompress` writes, before the
  padding is cropped away). Checked on the way: every decompressed file's codes equal the
  encoder's, and every PNG equals decoding those codes.
* JPEG (Pillow, optimised Huffman tables) and WebP (Pillow, lossy, method 6): quality sweeps of
  the same padded 32x32 images.
* "Headers excluded": the codec's payload without its 30-byte container, JPEG's entropy-coded
  scan data without its markers and tables, WebP's VP8 bitstream without the RIFF container.
* Matched bpp: JPEG's / WebP's PSNR interpolated (linearly, on the sweep's Pareto front) at the
  codec's bits per pixel; matched PSNR: their bits per pixel at the codec's PSNR. Outside a
  sweep's range there is no figure.

Writes ``OUT/bench_codec.json`` and the plot, prints Markdown tables.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_codec.py runs/fmnist --images 1000 \\
        --plot docs/codec-rate-distortion.png
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from vqvae2.codec import decode_images, slot_batches
from vqvae2.compress import (
    compress_files,
    compression_report,
    decompress_files,
    fit_image,
    unfit_image,
)
from vqvae2.data import DEFAULT_DATA_PATH, open_dataset
from vqvae2.run import Run, load_hierarchy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SOURCE_SIDE = 28  # Fashion-MNIST as stored
JPEG_QUALITIES = (1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95)
WEBP_QUALITIES = (0, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
WEBP_METHOD = 6  # slowest, smallest files
RIFF_AND_CHUNK_HEADER = 20  # "RIFF" size "WEBP" + "VP8 " size: the container around VP8 data
PEAK = 255.0


def psnr(mse: float) -> float:
    return float(10 * np.log10(PEAK**2 / mse))


def jpeg_scan_bytes(data: bytes) -> int:
    """Bytes of a baseline JPEG's entropy-coded scan: after the SOS segment, before EOI."""
    start = data.index(b"\xff\xda")
    header_length = int.from_bytes(data[start + 2 : start + 4], "big")
    return data.rindex(b"\xff\xd9") - (start + 2 + header_length)


def sweep(images: np.ndarray, kind: str) -> list[dict]:
    """bpp (whole file and headers excluded) and PSNR at each quality of ``kind``.

    Args:
        images: (N, S, S) uint8.
    """
    qualities = JPEG_QUALITIES if kind == "JPEG" else WEBP_QUALITIES
    pixels = images.shape[1] * images.shape[2]
    points = []
    for quality in qualities:
        total_bytes = bare_bytes = 0
        squared_error = 0.0
        for image in images:
            buffer = io.BytesIO()
            if kind == "JPEG":
                Image.fromarray(image).save(buffer, "JPEG", quality=quality, optimize=True)
            else:
                Image.fromarray(image).save(buffer, "WEBP", quality=quality, method=WEBP_METHOD)
            data = buffer.getvalue()
            total_bytes += len(data)
            bare_bytes += (
                jpeg_scan_bytes(data) if kind == "JPEG" else len(data) - RIFF_AND_CHUNK_HEADER
            )
            decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)
            squared_error += float(((decoded - image) ** 2).sum())
        points.append(
            {
                "quality": quality,
                "bpp_file": 8 * total_bytes / (len(images) * pixels),
                "bpp_bare": 8 * bare_bytes / (len(images) * pixels),
                "psnr": psnr(squared_error / (len(images) * pixels)),
            }
        )
    return points


def pareto(points: list[dict], rate: str) -> tuple[np.ndarray, np.ndarray]:
    """(bpp, PSNR) of the sweep's points that no cheaper point beats, by increasing bpp."""
    ordered = sorted(points, key=lambda point: point[rate])
    rates, qualities = [], []
    for point in ordered:
        if not qualities or point["psnr"] > qualities[-1]:
            rates.append(point[rate])
            qualities.append(point["psnr"])
    return np.array(rates), np.array(qualities)


def interpolate(x: float, xs: np.ndarray, ys: np.ndarray) -> float | None:
    """ys at x on the increasing sequence xs, linearly; None outside [xs[0], xs[-1]]."""
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def matched(codec_bpp: float, codec_psnr: float, points: list[dict], rate: str) -> dict:
    rates, qualities = pareto(points, rate)
    return {
        "psnr_at_codec_bpp": interpolate(codec_bpp, rates, qualities),
        "bpp_at_codec_psnr": interpolate(codec_psnr, qualities, rates),
        "bpp_range": [float(rates[0]), float(rates[-1])],
        "psnr_range": [float(qualities[0]), float(qualities[-1])],
    }


def run_codec(run_dir: Path, images: np.ndarray, labels: list[int], work: Path) -> dict:
    """Compress and decompress the images as PNG files; check the round trip; the codec's
    operating point and speeds."""
    paths = []
    for index, image in enumerate(images):
        path = work / "images" / f"test{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    start = time.perf_counter()
    compressed = compress_files(Run.open(run_dir), paths, work / "compressed", labels=labels)
    compress_seconds = time.perf_counter() - start
    start = time.perf_counter()
    decompressed = decompress_files(
        Run.open(run_dir), [item.file for item in compressed], work / "out"
    )
    decompress_seconds = time.perf_counter() - start

    vqvae, _ = load_hierarchy(run_dir)
    codes_identical = png_equal = 0
    squared_error = 0.0
    side = vqvae.config.image_size
    slots = [item.header.slot for item in decompressed]
    for batch in slot_batches(slots):
        codes = [
            torch.stack([compressed[i].encoded.codes[level] for i in batch])
            for level in range(vqvae.config.num_levels)
        ]
        decoded = decode_images(vqvae, codes, [slots[i] for i in batch])  # (B, 1, S, S)
        for place, index in enumerate(batch):
            after = decompressed[index]
            codes_identical += all(
                torch.equal(a, b)
                for a, b in zip(compressed[index].encoded.codes, after.codes, strict=True)
            )
            written = torch.from_numpy(np.array(Image.open(after.png)))[None]
            png_equal += torch.equal(written, unfit_image(decoded[place], after.header))
            padded = fit_image(images[index], side, 1)[0].double()
            squared_error += float(((decoded[place].double() - padded) ** 2).sum())
    report = compression_report(Run.open(run_dir), compressed)
    count = len(images)
    return {
        "report": {key: value for key, value in report.items() if key != "files"},
        "psnr": psnr(squared_error / (count * side * side)),
        "round_trip": {
            "images": count,
            "codes_identical": codes_identical,
            "png_equal": png_equal,
        },
        "compress_images_per_second": count / compress_seconds,
        "decompress_images_per_second": count / decompress_seconds,
    }


def pillow_speed(images: np.ndarray, kind: str, quality: int) -> dict:
    """Encode and decode images/s of Pillow at one quality."""
    buffers = []
    start = time.perf_counter()
    for image in images:
        buffer = io.BytesIO()
        options = {"optimize": True} if kind == "JPEG" else {"method": WEBP_METHOD}
        Image.fromarray(image).save(buffer, kind, quality=quality, **options)
        buffers.append(buffer.getvalue())
    encode = time.perf_counter() - start
    start = time.perf_counter()
    for data in buffers:
        np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    decode = time.perf_counter() - start
    return {
        "encode_images_per_second": len(images) / encode,
        "decode_images_per_second": len(images) / decode,
    }


def plot(results: dict, path: Path) -> None:
    codec = results["codec"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for kind, colour in (("JPEG", "tab:blue"), ("WebP", "tab:green")):
        for rate, style, label in (
            ("bpp_file", "-", "file"),
            ("bpp_bare", "--", "headers excluded"),
        ):
            rates, qualities = pareto(results[kind], rate)
            axes.plot(rates, qualities, style, marker=".", color=colour, label=f"{kind}, {label}")
    bits = codec["report"]["bits_per_pixel"]
    axes.plot(bits["file"], codec["psnr"], "o", color="tab:red", label="VQ-VAE-2 codec, file")
    axes.plot(
        bits["payload"],
        codec["psnr"],
        "s",
        color="tab:red",
        mfc="none",
        label="VQ-VAE-2 codec, payload",
    )
    nll = codec["report"]["nll_bits_per_pixel"]["total"]
    axes.plot(nll, codec["psnr"], "x", color="black", label="priors' NLL of the codes")
    axes.set_xlabel("bits per pixel (32x32 padded Fashion-MNIST test images)")
    axes.set_ylabel("PSNR (dB)")
    axes.set_xlim(0, 4)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    axes.set_title(f"Rate-distortion, {codec['round_trip']['images']} test images")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(results: dict) -> str:
    codec = results["codec"]
    report = codec["report"]
    bits, nll = report["bits_per_pixel"], report["nll_bits_per_pixel"]

    def number(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "| codec, bits counted | bpp | PSNR dB | JPEG PSNR at this bpp | WebP PSNR at this bpp "
        "| JPEG bpp at this PSNR | WebP bpp at this PSNR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rate, codec_bpp in (
        ("VQ-VAE-2 codec, whole `.vq2` files", "bpp_file", bits["file"]),
        ("VQ-VAE-2 codec, payload (headers excluded)", "bpp_bare", bits["payload"]),
    ):
        jpeg = results["matched"]["JPEG"][rate]
        webp = results["matched"]["WebP"][rate]
        lines.append(
            f"| {name} | {codec_bpp:.3f} | {codec['psnr']:.2f} | "
            f"{number(jpeg['psnr_at_codec_bpp'], 2)} | {number(webp['psnr_at_codec_bpp'], 2)} | "
            f"{number(jpeg['bpp_at_codec_psnr'], 3)} | {number(webp['bpp_at_codec_psnr'], 3)} |"
        )
    levels = ", ".join(
        f"{name} {value:.3f} ({report['nll_nats_per_code'][name]:.3f} nats/code)"
        for name, value in nll.items()
        if name != "total"
    )
    lines += [
        "",
        f"Priors' NLL of the test codes (Table 1's measure): {nll['total']:.3f} bits per pixel "
        f"({levels}); the payload is {report['payload_over_nll']:+.2%} over it (largest for one "
        f"image {report['max_payload_over_nll']:+.2%}), the integer weights alone "
        f"{report['coded_over_nll']:+.5%}.",
    ]
    for kind in ("JPEG", "WebP"):
        for rate, label in (("bpp_file", "files"), ("bpp_bare", "headers excluded")):
            span = results["matched"][kind][rate]
            lines.append(
                f"- {kind} sweep, {label}: {span['bpp_range'][0]:.3f}-{span['bpp_range'][1]:.3f} "
                f"bpp, {span['psnr_range'][0]:.2f}-{span['psnr_range'][1]:.2f} dB"
            )
    trip = codec["round_trip"]
    lines += [
        "",
        f"Round trip: {trip['images']} images, codes identical for {trip['codes_identical']}, "
        f"PNG equal to decoding the codes for {trip['png_equal']}.",
        f"Speed (end to end, files included): compress {codec['compress_images_per_second']:.1f} "
        f"images/s, decompress {codec['decompress_images_per_second']:.1f} images/s; "
        + "; ".join(
            f"{kind} q{speed['quality']} encode {speed['encode_images_per_second']:.0f} / decode "
            f"{speed['decode_images_per_second']:.0f} images/s"
            for kind, speed in results["pillow_speed"].items()
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a trained Fashion-MNIST run (VQ-VAE + priors)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_PATH)
    parser.add_argument("--images", type=int, default=1000, help="first N test images")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-codec"))
    parser.add_argument("--plot", type=Path, default=Path("docs/codec-rate-distortion.png"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads outside coding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    test = open_dataset(args.data, "test", SOURCE_SIDE, 1)
    count = min(args.images, len(test))
    images_tensor, labels = test.__getitems__(list(range(count)))
    images = images_tensor[:, 0].numpy()  # (N, 28, 28) uint8
    side = 32
    padded = np.stack([fit_image(image, side, 1)[0][0].numpy() for image in images])

    with tempfile.TemporaryDirectory() as work:
        codec = run_codec(args.run_dir, images, labels.tolist(), Path(work))
    results: dict = {
        "run": str(args.run_dir),
        "images": count,
        "codec": codec,
        "JPEG": sweep(padded, "JPEG"),
        "WebP": sweep(padded, "WebP"),
    }
    bits = codec["report"]["bits_per_pixel"]
    results["matched"] = {
        kind: {
            "bpp_file": matched(bits["file"], codec["psnr"], results[kind], "bpp_file"),
            "bpp_bare": matched(bits["payload"], codec["psnr"], results[kind], "bpp_bare"),
        }
        for kind in ("JPEG", "WebP")
    }
    results["pillow_speed"] = {
        "JPEG": {"quality": 50, **pillow_speed(padded, "JPEG", 50)},
        "WebP": {"quality": 50, **pillow_speed(padded, "WebP", 50)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_codec.json").write_text(json.dumps(results, indent=2))
    plot(results, args.plot)
    print(markdown(results))
    print(json.dumps({key: results[key] for key in ("run", "images", "matched")}))


if __name__ == "__main__":
    main()
