"""``import vqvae2`` stays light: the trainers, the evaluation and their dependencies load only
when one of their names is first used."""

from __future__ import annotations

import json

import pytest

from .conftest import run_python

# Modules that a bare ``import vqvae2`` must not load.
HEAVY = [
    "vqvae2.train",
    "vqvae2.loop",
    "vqvae2.evaluate",
    "vqvae2.sample",
    "tqdm",
    "matplotlib",
    "torch.nn.parallel.distributed",
]

PROBE = f"""
import json, sys
import vqvae2
before = [name for name in {HEAVY!r} if name in sys.modules]
trainer = vqvae2.train_vqvae
print(json.dumps({{
    "before": before,
    "trainer": trainer.__module__ + "." + trainer.__name__,
    "train_loaded": "vqvae2.train" in sys.modules,
}}))
"""


@pytest.mark.slow
def test_import_vqvae2_loads_no_training_module():
    result = run_python("-c", PROBE)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["before"] == []
    assert loaded["trainer"] == "vqvae2.train.train_vqvae" and loaded["train_loaded"]
