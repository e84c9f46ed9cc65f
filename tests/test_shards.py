"""Tar shards: written from an image folder, read back per split, split over ranks and loader
workers, and bad shard sources as one clear error."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from vqvae2 import shards, write_shards
from vqvae2.batches import EpochBatchSampler
from vqvae2.cli import main
from vqvae2.config import DataConfig, VQVAERunConfig, load_config
from vqvae2.data import batch_loader, open_dataset
from vqvae2.shards import ShardDataset, expand_braces
from vqvae2.train import train_vqvae

from .conftest import assert_one_line_error, assert_states_close

CLASSES = ("cat", "dog", "owl")


def write_folder(root: Path, counts: dict[str, int], size: int = 12, seed: int = 0) -> list[Path]:
    """Random RGB images, PNG and JPEG alternately, in ``root/SPLIT/CLASS/`` (or
    ``root/CLASS/`` for the split ``""``); ``counts`` images per class and split."""
    rng = np.random.default_rng(seed)
    files = []
    for split, count in counts.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                path = folder / f"{i}.{'png' if i % 2 else 'JPG'}"
                Image.fromarray(pixels).save(path, format="PNG" if i % 2 else "JPEG")
                files.append(path)
    return files


def read_split(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.__getitems__(list(range(len(dataset))))


@pytest.mark.parametrize(
    "counts", [{"train": 7, "test": 3}, {"train": 5, "val": 2}, {"": 6}], ids=str
)
def test_shards_read_back_each_split_of_the_folder(tmp_path, counts):
    """Every split (own folder or carved) reads the same images and labels from the shards as
    from the folder, and the shards hold each file's bytes unchanged beside its class."""
    files = write_folder(tmp_path / "folder", counts)
    written = write_shards(tmp_path / "folder", tmp_path / "shards", images_per_shard=4)
    config = DataConfig(val_fraction=0.2, test_fraction=0.2)
    for split in ("train", "val", "test"):
        folder_set = open_dataset(tmp_path / "folder", split, 8, 3, config)
        shard_set = open_dataset(tmp_path / "shards", split, 8, 3, config)
        assert isinstance(shard_set, ShardDataset)
        assert shard_set.class_names == folder_set.class_names
        folder_images, folder_labels = read_split(folder_set)
        shard_images, shard_labels = read_split(shard_set)
        assert torch.equal(shard_images, folder_images), split
        assert torch.equal(shard_labels, folder_labels), split
    own_splits = [split or "train" for split in counts]
    assert sorted(written.shards) == sorted(own_splits)
    total = sum(written.images.values())
    assert total == len(files) == 3 * sum(counts.values())
    assert sum(map(len, written.shards.values())) == sum(
        -(-n // 4) for n in written.images.values()
    )
    with tarfile.open(written.shards["train"][0]) as tar:
        names = tar.getnames()
        assert names[:4] == ["00000000.jpg", "00000000.cls", "00000001.png", "00000001.cls"]
        first_file = tmp_path / "folder" / ("train" if "train" in counts else "") / "cat/0.JPG"
        assert tar.extractfile("00000000.jpg").read() == first_file.read_bytes()
        assert tar.extractfile("00000000.cls").read() == b"0"


def test_a_pattern_reads_the_shards_as_one_source(tmp_path):
    """Brace ranges, globs and a single .tar name shards; beside shards.json they take its
    class names, elsewhere the class indices."""
    write_folder(tmp_path / "folder", {"": 5})
    write_shards(tmp_path / "folder", tmp_path / "shards", images_per_shard=4)
    whole = DataConfig(val_fraction=0.0, test_fraction=0.0)
    everything = read_split(open_dataset(tmp_path / "folder", "train", 8, 3, whole))
    for pattern in ("train-{000000..000003}.tar", "train-*.tar", "train-00000[0-3].tar"):
        dataset = open_dataset(tmp_path / "shards" / pattern, "train", 8, 3, whole)
        assert dataset.class_names == list(CLASSES)
        images, labels = read_split(dataset)
        assert torch.equal(images, everything[0]) and torch.equal(labels, everything[1])
    single = open_dataset(tmp_path / "shards" / "train-000001.tar", "train", 8, 3, whole)
    assert torch.equal(read_split(single)[0], everything[0][4:8])
    elsewhere = tmp_path / "copied"
    shutil.copytree(tmp_path / "shards", elsewhere, ignore=shutil.ignore_patterns("*.json"))
    dataset = open_dataset(elsewhere / "train-{000000..000003}.tar", "train", 8, 3, whole)
    assert dataset.class_names == ["0", "1", "2"]
    assert torch.equal(read_split(dataset)[1], everything[1])
    # Carved like a folder without split folders: the same validation images.
    carve = DataConfig(val_fraction=0.25, test_fraction=0.25)
    val = open_dataset(elsewhere / "train-*.tar", "val", 8, 3, carve)
    folder_val = open_dataset(tmp_path / "folder", "val", 8, 3, carve)
    assert torch.equal(read_split(val)[0], read_split(folder_val)[0])


def test_brace_expansion():
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def images_of_an_epoch(dataset, world_size: int, workers: int, batch: int) -> list[tuple]:
    """(rank, worker, image) of every image the ranks' loaders read in one epoch."""
    seen = []
    steps = len(dataset) // batch
    for rank in range(world_size):
        sampler = EpochBatchSampler(len(dataset), batch, 3, 0, steps, rank, world_size)
        for images, _, worker in batch_loader(dataset, sampler, workers):
            seen += [(rank, int(w), image) for w, image in zip(worker, images, strict=True)]
    return seen


class WorkerTagged(ShardDataset):
    """A shard dataset whose batches also say which loader worker read them."""

    def __getitems__(self, items):
        images, labels = super().__getitems__(items)
        info = get_worker_info()
        return images, labels, torch.full((len(items),), -1 if info is None else info.id)


def distinct_image_shards(tmp_path: Path, count: int) -> ShardDataset:
    """Shards of ``count`` PNGs that differ in their first pixel; the dataset reads them."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (8, 8), (i, 255 - i, 7)).save(folder / f"{i:03d}.png")
    write_shards(folder, tmp_path / "shards", images_per_shard=5)
    whole = DataConfig(val_fraction=0.0, test_fraction=0.0)
    dataset = open_dataset(tmp_path / "shards", "train", 8, 3, whole)
    return WorkerTagged(dataset.index, dataset.class_names, 8, 3)


@pytest.mark.slow  # DataLoader worker processes
def test_two_ranks_with_two_workers_each_read_every_image_once_per_epoch(tmp_path):
    dataset = distinct_image_shards(tmp_path, 24)
    seen = images_of_an_epoch(dataset, world_size=2, workers=2, batch=4)
    firsts = sorted(int(image[0, 0, 0]) for _, _, image in seen)
    assert firsts == list(range(24))  # every image once, none twice
    assert {(rank, worker) for rank, worker, _ in seen} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_two_ranks_read_every_image_once_per_epoch_and_a_pickled_copy_reads_the_same(tmp_path):
    dataset = distinct_image_shards(tmp_path, 24)
    seen = images_of_an_epoch(dataset, world_size=2, workers=0, batch=6)
    assert sorted(int(image[0, 0, 0]) for _, _, image in seen) == list(range(24))
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned loader worker gets
    assert torch.equal(read_split(copy)[0], read_split(dataset)[0])


def tar_with(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "x-{0..3", "unbalanced brace"),
        (lambda d: d / "x-{5..2}.tar", "runs backwards"),
        (lambda d: d / "x-{abc}.tar", "neither a range"),
        (lambda d: d / "none-*.tar", "matches no files"),
        (lambda d: d / "good-{0..1}.tar", "good-1.tar of the pattern .* does not exist"),
        (lambda d: d / "good-{0,0}.tar", "names .*good-0.tar twice"),
        (lambda d: tar_with(d / "empty.tar", {}), "hold no images"),
        (lambda d: tar_with(d / "labels.tar", {"a.cls": b"1"}), "hold no images"),
        (lambda d: tar_with(d / "word.tar", {"a.png": png_bytes(), "a.cls": b"cat"}), "'cat'"),
        (lambda d: garbage(d / "noise.tar"), "is not a readable tar file"),
        (lambda d: cut_short(d / "cut.tar"), "cut.tar is not a readable tar file: unexpected end"),
    ],
)
def test_bad_shard_sources_are_one_clear_error(tmp_path, make, message):
    tar_with(tmp_path / "good-0.tar", {"a.png": png_bytes(), "a.cls": b"0"})
    with pytest.raises(ValueError, match=message) as error:
        open_dataset(make(tmp_path), "train", 8, 3, DataConfig(val_fraction=0, test_fraction=0))
    assert "\n" not in str(error.value)


def garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return path


def cut_short(path: Path) -> Path:
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")
    tar_with(path, {"a.png": buffer.getvalue(), "a.cls": b"0"})
    path.write_bytes(path.read_bytes()[:3000])
    return path


def test_a_broken_manifest_or_missing_shard_and_writing_twice_are_clear_errors(tmp_path):
    write_folder(tmp_path / "folder", {"train": 2, "test": 1})
    write_shards(tmp_path / "folder", tmp_path / "shards")
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(tmp_path / "folder", tmp_path / "shards")
    (tmp_path / "shards" / "test-000000.tar").unlink()
    with pytest.raises(ValueError, match="test-000000.tar listed in .* is missing"):
        open_dataset(tmp_path / "shards", "test", 8, 3)
    (tmp_path / "shards" / "shards.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the manifest"):
        open_dataset(tmp_path / "shards", "train", 8, 3)


def split_arrays(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    config = DataConfig(val_fraction=0, test_fraction=0)
    return read_split(open_dataset(folder, split, 8, 3, config))


def test_a_split_opens_from_its_shard_indexes_and_a_changed_shard_is_read_again(
    tmp_path, monkeypatch
):
    """make-shards keeps each shard's header pass in .index/; opening a split then reads no tar
    header (before, every open scanned them all), the same images come back, and a shard
    rewritten since (another size and time) is scanned again."""
    write_folder(tmp_path / "folder", {"train": 5, "test": 2})
    written = write_shards(tmp_path / "folder", tmp_path / "shards", images_per_shard=4)
    indexes = sorted(p.name for p in (tmp_path / "shards" / ".index").iterdir())
    assert indexes == sorted(
        f"{path.name}.npz" for paths in written.shards.values() for path in paths
    )
    scanned = split_arrays(tmp_path / "shards", "train")
    scans = []
    real_scan = shards._scan_shard
    monkeypatch.setattr(shards, "_scan_shard", lambda path: scans.append(path) or real_scan(path))
    from_indexes = split_arrays(tmp_path / "shards", "train")
    assert scans == [] and all(map(torch.equal, from_indexes, scanned))
    first = written.shards["train"][0]
    tar_with(first, {"0.png": png_bytes(), "0.cls": b"2"})  # rewritten: one black image, owl
    rewritten_images, rewritten_labels = split_arrays(first, "train")
    assert scans == [first] and rewritten_labels.tolist() == [2]
    assert not rewritten_images.any()
    # The same size and modification time (as cp -p or rsync -a leave them), another label.
    status = first.stat()
    tar_with(first, {"0.png": png_bytes(), "0.cls": b"1"})
    os.utime(first, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert first.stat().st_size == status.st_size
    assert split_arrays(first, "train")[1].tolist() == [1] and scans == [first, first]


def test_an_unreadable_or_unwritable_shard_index_is_scanned_past(tmp_path):
    write_folder(tmp_path / "folder", {"train": 3})
    write_shards(tmp_path / "folder", tmp_path / "shards", images_per_shard=2)
    expected = split_arrays(tmp_path / "shards", "train")
    index = tmp_path / "shards" / ".index"
    for kept in index.iterdir():
        kept.write_bytes(b"not an npz file")
    assert all(map(torch.equal, split_arrays(tmp_path / "shards", "train"), expected))
    shutil.rmtree(index)
    index.write_text("a file where the index folder would go")
    assert all(map(torch.equal, split_arrays(tmp_path / "shards", "train"), expected))


def test_a_shard_pattern_on_the_command_line_is_one_error_line(tmp_path, capsys):
    code = main(["train-vqvae", "--data", str(tmp_path / "x-{5..2}.tar"), "--out", str(tmp_path)])
    assert_one_line_error(capsys, code, "runs backwards")


def test_the_trainers_take_shards_as_they_take_the_folder(tmp_path, capsys):
    """Stage 1 trained on the shards equals stage 1 trained on the folder, weight for weight;
    extract-codes reads the shards folder and train-classifier a shard pattern."""
    write_folder(tmp_path / "folder", {"train": 8, "test": 2}, size=16)
    write_shards(tmp_path / "folder", tmp_path / "shards", images_per_shard=5)
    config = load_config(
        VQVAERunConfig,
        "tiny",
        ["model.image_size=16", "train.max_steps=3", "train.batch_size=4", "data.random_flip=true"],
    )
    runs = {}
    for source in ("folder", "shards"):
        runs[source] = train_vqvae(
            config, tmp_path / source, tmp_path / f"run-{source}", progress=False
        )
    assert_states_close(
        runs["shards"].model.state_dict(), runs["folder"].model.state_dict(), atol=0.0
    )
    run = str(tmp_path / "run-shards")
    assert main(["extract-codes", run, "--data", str(tmp_path / "shards"), "--quiet"]) == 0
    codes = np.load(tmp_path / "run-shards" / "codes" / "train" / "labels.npy")
    folder_train = open_dataset(tmp_path / "folder", "train", 16, 1, config.data)
    assert np.array_equal(codes, folder_train.labels.numpy())
    classifier = ["train-classifier", "--out", str(tmp_path / "c"), "--quiet", "--max-steps", "2"]
    pattern = str(tmp_path / "shards" / "train-{000000..000004}.tar")
    size = ["--config", "classifier-tiny", "model.image_size=16", "train.batch_size=4"]
    assert main([*classifier, *size, "--data", pattern]) == 0


def test_make_shards_writes_what_write_shards_writes(tmp_path, capsys):
    write_folder(tmp_path / "folder", {"train": 3, "test": 1})
    args = ["make-shards", str(tmp_path / "folder"), str(tmp_path / "out")]
    assert main([*args, "--images-per-shard", "4"]) == 0
    assert "train 9 images in 3 shards, test 3 images in 1 shards" in capsys.readouterr().out
    write_shards(tmp_path / "folder", tmp_path / "api", images_per_shard=4)
    for name in ("train-000000.tar", "train-000002.tar", "test-000000.tar"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    assert_one_line_error(capsys, main(args), "already holds shards")
