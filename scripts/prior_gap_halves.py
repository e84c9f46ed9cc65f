"""Where does a prior's train/validation NLL gap come from? (issue 3 experiment)

Trains the top prior on a random half of a run's train codes, then measures its NLL on that
half, on the other half (images the VQ-VAE was trained on but the prior never saw) and on the
validation codes (seen by neither). If the held-out half scores like validation, the gap is the
prior memorising its training codes; if it scores like the training half, it is a shift between
the codes of images the VQ-VAE was trained on and of new images.

    .venv/bin/python scripts/prior_gap_halves.py runs/fmnist /tmp/prior-gap-halves [key=value ...]

Writes a scratch run folder (symlinking the VQ-VAE) and prints one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from vqvae2.codes import CodeDataset, CodeStoreWriter
from vqvae2.config import PriorRunConfig, load_config
from vqvae2.measure import measure_nll
from vqvae2.run import CODES_DIR, Run
from vqvae2.train import train_prior


def copy_codes(store: CodeDataset, rows: np.ndarray, directory: Path) -> CodeDataset:
    writer = CodeStoreWriter(
        directory,
        len(rows),
        store.level_names,
        store.code_sizes,
        store.codebook_size,
        {"num_classes": store.num_classes},
    )
    codes, labels = store.__getitems__(rows.tolist())
    writer.write(0, codes, labels)
    return CodeDataset(writer.close())


def main() -> None:
    source, scratch, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    os.symlink((source / "vqvae").resolve(), scratch / "vqvae")
    train = CodeDataset(source / CODES_DIR / "train")
    val = CodeDataset(source / CODES_DIR / "val")
    order = np.random.default_rng(0).permutation(len(train))
    half = len(order) // 2
    copy_codes(train, np.sort(order[:half]), scratch / CODES_DIR / "train")
    held_out = copy_codes(train, np.sort(order[half:]), scratch / CODES_DIR / "heldout")
    copy_codes(val, np.arange(len(val)), scratch / CODES_DIR / "val")
    config = load_config(PriorRunConfig, "prior-top-fashion-mnist-32", overrides)
    result = train_prior(Run.open(scratch), "top", config, progress=False)
    # As many held-out codes as validation codes, like the train figure.
    batches = -(-len(val) // 256)
    held_out_nats = measure_nll(result.model, held_out, 0, max_batches=batches)
    print(json.dumps({**result.metrics, "held_out_train_nll_nats": held_out_nats}))


if __name__ == "__main__":
    main()
