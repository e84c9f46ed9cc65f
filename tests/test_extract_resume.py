"""``extract-codes`` killed with SIGKILL and run again: the rerun keeps the shards the killed
process finished, encodes only the others, and ends with the store of an uninterrupted run, bit
for bit; an unfinished store made with another stage-1 checkpoint is discarded, not mixed
(docs/faults.md). Plus the shard records of ``CodeStoreWriter`` on their own.

Each extraction runs the CLI in a fresh interpreter through the script below, which makes the
shards small (the CLI has no option for it), counts the images the VQ-VAE encodes, and can hold
the process after it has encoded a given number of images, for this test to kill it there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vqvae2.codes import SHARD_RECORDS, CodeDataset, CodeStoreWriter

from .conftest import train_tiny_run

SCRIPT = r"""
import json
import sys
import time
from pathlib import Path

import torch

import vqvae2.extract as extract
from vqvae2.cli import main
from vqvae2.vqvae import VQVAE2

options = json.loads(sys.argv[1])
extract.EXTRACT_SHARD_SIZE = options["shard_size"]
encode = VQVAE2.encode
encoded = [0]


def counting_encode(self, images):
    result = encode(self, images)
    encoded[0] += len(images)
    Path(options["count"]).write_text(str(encoded[0]))
    if "pause_at" in options and encoded[0] >= options["pause_at"]:
        Path(options["marker"]).write_text("")
        time.sleep(600)
    return result


VQVAE2.encode = counting_encode
torch.set_num_threads(1)
sys.exit(main(sys.argv[2:]))
"""

SHARD_SIZE = 8  # images per shard here: several shards in a split of the tiny data
PAUSE_AT = 24  # images encoded when the first process is killed: shards 0 and 1 recorded
TIMEOUT = 120.0  # seconds an extraction may take


def start(folder: Path, run: Path, name: str, pause: bool) -> tuple[subprocess.Popen, Path]:
    """Start ``vqvae2 extract-codes RUN`` (held after ``PAUSE_AT`` images with ``pause``);
    the process, and the file that gets the images it has encoded. Its output goes to
    ``folder/name.log``, a marker to ``folder/name.marker`` when it is held."""
    count, marker, log = (folder / f"{name}.{suffix}" for suffix in ("count", "marker", "log"))
    options = {"shard_size": SHARD_SIZE, "count": str(count), "marker": str(marker)}
    if pause:
        options["pause_at"] = PAUSE_AT
    script = folder / "extract.py"
    script.write_text(SCRIPT)
    argv = [sys.executable, str(script), json.dumps(options), "extract-codes", str(run)]
    with log.open("w") as output:
        process = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    return process, count


def extract(folder: Path, run: Path, name: str) -> tuple[int, str]:
    """Run ``vqvae2 extract-codes RUN`` to its end: the images it encoded, and its output."""
    process, count = start(folder, run, name, pause=False)
    log = folder / f"{name}.log"
    assert process.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    return int(count.read_text()), log.read_text()


def kill_when_held(folder: Path, run: Path, name: str) -> None:
    """Run ``vqvae2 extract-codes RUN`` until it has encoded ``PAUSE_AT`` images, then kill it
    with SIGKILL."""
    process, _ = start(folder, run, name, pause=True)
    marker, log = folder / f"{name}.marker", folder / f"{name}.log"
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert process.poll() is None, f"ended before the kill: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=TIMEOUT) == -signal.SIGKILL


def store_arrays(run: Path, split: str) -> dict[str, np.ndarray]:
    store = CodeDataset(run / "codes" / split)
    return {**dict(zip(store.level_names, store.codes, strict=True)), "labels": store.labels}


def assert_same_stores(run: Path, reference: Path) -> None:
    for split in ("train", "val"):
        found, expected = store_arrays(run, split), store_arrays(reference, split)
        assert found.keys() == expected.keys()
        for name in expected:
            assert np.array_equal(found[name], expected[name]), f"{split} {name} differ"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny stage-1 run with checkpoints at steps 1 and 2, and a copy of it whose codes an
    uninterrupted extraction wrote: (run, reference run, images encoded there)."""
    folder = tmp_path_factory.mktemp("extract")
    every_step = ("train.checkpoint_every=1",)
    train_tiny_run(folder, vqvae_steps=2, overrides=every_step)
    reference = folder / "reference"
    shutil.copytree(folder / "run", reference)
    total, _ = extract(folder, reference, "reference")
    return folder / "run", reference, total


@pytest.mark.slow
def test_a_killed_extraction_run_again_encodes_only_the_missing_shards(runs, tmp_path):
    base, reference, total = runs
    run = tmp_path / "run"
    shutil.copytree(base, run)
    kill_when_held(tmp_path, run, "killed")
    records = run / "codes" / ".train.tmp" / SHARD_RECORDS
    recorded = sorted(path.name for path in records.glob("*.json")) if records.exists() else []

    encoded, log = extract(tmp_path, run, "rerun")
    assert_same_stores(run, reference)
    # Shards 0 and 1 (16 images) were recorded before the kill; shard 2 was encoded, not yet
    # recorded, so the rerun encodes it again with everything after it.
    assert encoded == total - 2 * SHARD_SIZE, f"the rerun encoded {encoded} of {total} images"
    assert recorded == ["0-8.json", "8-16.json"]
    assert "kept 2 of" in log
    assert not (run / "codes" / ".train.tmp").exists()


@pytest.mark.slow
def test_an_unfinished_store_of_another_checkpoint_is_discarded_not_mixed(runs, tmp_path):
    base, reference, total = runs
    run = tmp_path / "run"
    shutil.copytree(base, run)
    latest = run / "vqvae" / "latest"
    newest = latest.read_text()
    latest.write_text("step-00000001\n")  # the killed extraction encodes with step 1
    kill_when_held(tmp_path, run, "killed")
    latest.write_text(newest)

    encoded, log = extract(tmp_path, run, "rerun")
    assert "discarding the unfinished code store" in log and "vqvae_step" in log
    assert encoded == total
    assert_same_stores(run, reference)  # step 2's codes everywhere


def test_a_shard_record_holds_only_while_its_rows_match(tmp_path):
    def writer(**changes) -> CodeStoreWriter:
        options = {"source": {"weights": "a"}, **changes}
        return CodeStoreWriter(tmp_path / "codes", 6, ["top"], [2], 13, **options)

    first = writer()
    codes = torch.arange(24).view(6, 2, 2) % 13
    first.write(0, [codes[:3]], torch.tensor([0, 1, 2]))
    first.finish_shard(range(0, 3))
    assert first.previous == "none"

    again = writer()  # a rerun of the same extraction
    assert again.previous == "kept"
    assert again.shard_done(range(0, 3)) and not again.shard_done(range(3, 6))
    again.codes[0][1] = 0  # a row changed after its shard was recorded
    again.flush()
    assert not writer().shard_done(range(0, 3))

    other = writer(source={"weights": "b"})
    assert other.previous == "it was made with another weights"
    assert not other.shard_done(range(0, 3))
    assert int(np.abs(other.codes[0][:3]).sum()) == 0  # a fresh store, nothing kept
