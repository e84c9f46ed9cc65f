"""Shared fixtures: seeded RNGs, deterministic float32 maths, tiny configs and tiny datasets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from vqvae2.checkpoint import save_checkpoint
from vqvae2.config import ClassifierRunConfig, PriorRunConfig, VQVAERunConfig, load_config
from vqvae2.extract import extract_codes
from vqvae2.logs import read_metrics
from vqvae2.model_configs import PixelSNAILConfig, VQVAEConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.run import Run
from vqvae2.sampling import generate, requested_class_scores
from vqvae2.train import train_classifier, train_prior, train_vqvae
from vqvae2.vqvae import VQVAE2

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# Tiny test models run fastest on one thread, and a busy machine does not slow them further.
torch.set_num_threads(1)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Marks of the tests on the real Fashion-MNIST files (CI installs them, so there they must run).
REAL_DATA = [
    pytest.mark.slow,
    pytest.mark.realdata,
    pytest.mark.skipif(
        not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() and not os.environ.get("CI"),
        reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
    ),
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: modules with real-data tests, then modules with other slow tests, then
    the rest (file order within each; a module's tests stay together, so its fixtures are built
    once). A parallel run (scripts/test.sh) then starts its few long tests on separate workers
    at once instead of ending on them one after another."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("realdata"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]  # tests/test_x.py

    module_rank: dict[str, int] = {}
    for item in items:
        module_rank[module(item)] = min(rank(item), module_rank.get(module(item), 2))
    items.sort(key=lambda item: module_rank[module(item)])


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``gpu`` need CUDA: skipped without it (collected either way)."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def tiny_config(**changes) -> VQVAEConfig:
    """A 16x16 grey 2-level model with odd sizes (K = 13, D = 6) to catch transposed dims."""
    values = dict(
        image_size=16,
        in_channels=1,
        num_levels=2,
        hidden_channels=8,
        residual_channels=4,
        num_res_blocks=1,
        codebook_size=13,
        embedding_dim=6,
        dead_code_after_steps=0,
    )
    values.update(changes)
    return VQVAEConfig(**values)


def write_npz(path: Path, count: int = 96, size: int = 16, classes: int = 3) -> Path:
    """Blobs of three kinds (classes) as uint8 grey images in an .npz file."""
    rng = np.random.default_rng(0)
    labels = np.arange(count) % classes
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((count, size, size), np.uint8)
    for i, label in enumerate(labels):
        cy, cx = rng.integers(4, size - 4, 2)
        radius = 2 + label
        images[i] = np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2, 230, 20)
    np.savez(path, images=images, labels=labels)
    return path


def tiny_prior_config(**changes) -> PixelSNAILConfig:
    """A PixelSNAIL over 5x5 codes (K = 7): three gated layers, no attention, unconditional."""
    values = dict(
        code_size=5,
        codebook_size=7,
        hidden_channels=8,
        residual_channels=6,
        num_layers=3,
        attention_layers=0,
        attention_heads=2,
        kernel_size=3,
        dropout=0.0,
        output_stack_layers=1,
        condition_channels=4,
    )
    values.update(changes)
    return PixelSNAILConfig(**values)


# The CLI's flags for a tiny 16x16 stage-1 run, quiet.
TINY_CLI = ["--config", "tiny", "model.image_size=16", "--quiet"]


def tiny_run_config(*overrides: str) -> VQVAERunConfig:
    """The ``tiny`` stage-1 preset at 16x16, with ``overrides`` (``key=value``) applied."""
    return load_config(VQVAERunConfig, "tiny", ["model.image_size=16", *overrides])


def train_tiny_run(
    root: Path,
    *,
    vqvae_steps: int,
    images: int = 96,
    codes: bool = False,
    prior_steps: int = 0,
    prior_levels: tuple[str, ...] = ("top", "bottom"),
    classifier_steps: int = 0,
    overrides: tuple[str, ...] = (),
    preset: str | None = None,
) -> tuple[Path, Path]:
    """A tiny run in ``root/run`` on ``images`` blobs of 3 classes (``root/blobs.npz``): the
    16x16 VQ-VAE trained ``vqvae_steps`` steps (``overrides`` applied to its config; recorded
    as trained from ``preset``, as the CLI's ``--config tiny`` does, when given), then, as
    asked, its codes extracted, the priors of ``prior_levels`` and the classifier trained.

    Returns:
        (run folder, data file).
    """
    data = write_npz(root / "blobs.npz", count=images)
    run = root / "run"
    config = tiny_run_config(f"train.max_steps={vqvae_steps}", *overrides)
    train_vqvae(config, data, run, progress=False, preset=preset)
    if codes or prior_steps:
        extract_codes(Run.open(run), data, progress=False)
    for level in prior_levels if prior_steps else ():
        prior = load_config(
            PriorRunConfig, f"prior-{level}-tiny", [f"train.max_steps={prior_steps}"]
        )
        train_prior(Run.open(run), level, prior, progress=False)
    if classifier_steps:
        steps = ["model.image_size=16", f"train.max_steps={classifier_steps}"]
        classifier = load_config(ClassifierRunConfig, "classifier-tiny", steps)
        train_classifier(classifier, data, run / "classifier", progress=False)
    return run, data


NUM_CLASSES = 3  # of the priors in write_run


def prior_config(code_size: int, condition_sizes: tuple[int, ...] = ()) -> PixelSNAILConfig:
    """A small class-conditional PixelSNAIL over codes of side ``code_size`` (K = 13)."""
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


def train_complete_tiny_run(root: Path) -> tuple[Path, Path]:
    """Every model of a run on 300 blobs: VQ-VAE (30 steps), codes, both priors (10 steps),
    classifier (20 steps). Returns (run folder, data file)."""
    return train_tiny_run(root, images=300, vqvae_steps=30, prior_steps=10, classifier_steps=20)


@pytest.fixture
def npz_data(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "blobs.npz")


@pytest.fixture
def step_clock():
    """A fake clock for the trainers' ``now``: one second passes at each optimiser step."""
    seconds = [0.0]
    handle = register_optimizer_step_post_hook(lambda *_: seconds.__setitem__(0, seconds[0] + 1.0))
    yield lambda: seconds[0]
    handle.remove()


def metric_values(path: Path, split: str, metric: str) -> dict[int, float]:
    """step -> value of one metric of one split in a ``metrics.csv``."""
    return {
        int(row["step"]): float(row["value"])
        for row in read_metrics(path)
        if row["split"] == split and row["metric"] == metric
    }


def assert_states_close(
    first: Path | Mapping[str, torch.Tensor], second: Path | Mapping[str, torch.Tensor], atol: float
) -> None:
    """Two state dicts (or safetensors files of them) hold the same names, floating tensors
    within ``atol`` of each other and other tensors equal."""
    a = load_file(str(first)) if isinstance(first, Path) else first
    b = load_file(str(second)) if isinstance(second, Path) else second
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            difference = (a[name] - b[name]).abs().max().item()
            assert difference <= atol, f"{name}: max difference {difference:.3g} > {atol}"
        else:
            assert torch.equal(a[name], b[name]), name


def assert_one_line_error(capsys, code: int, fragment: str) -> None:
    """The CLI exited with status 2 after one ``vqvae2: error: ...`` line naming ``fragment``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("vqvae2: error: ") and fragment in err[-1], err
    assert not any("Traceback" in line for line in err)


def one_line_error(capsys, code: int) -> str:
    """The one ``vqvae2: error: ...`` line the CLI ended with (exit status 2, no traceback),
    without its prefix."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("vqvae2: error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1].removeprefix("vqvae2: error: ")


def run_python(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process on one CPU thread, its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def run_module(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m ARGS`` in a fresh process on one CPU thread, its output captured."""
    return run_python("-m", *args, timeout=timeout)


def torchrun(processes: int, *args: object, timeout: float = 180) -> str:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N ARGS`` on the CPU (one
    thread per process); fails the test with the processes' output unless all exit 0.

    Returns:
        Their standard output.
    """
    finished = run_module(
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *args,
        timeout=timeout,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished.stdout


def half_accepting_threshold(
    vqvae: VQVAE2, priors, classifier, count: int, score_batch: int, generator=None
) -> float:
    """A classifier threshold that about half of every class's samples reach: the smallest of
    the classes' median requested-class scores over ``count`` probe samples (3 classes)."""
    labels = torch.arange(count) % 3
    probe, _ = generate(vqvae, priors, count, labels, generator=generator)
    scores = requested_class_scores(classifier, probe, labels, score_batch)
    return min(float(scores[labels == c].median()) for c in range(3))


def rewind(run: Path, copy_to: Path, kind_dir: str, step: int) -> Path:
    """A copy of ``run`` as if it had stopped (or been killed) right after its checkpoint at
    ``step`` in ``kind_dir``: ``latest`` names it and later step folders are gone."""
    shutil.copytree(run, copy_to)
    (copy_to / kind_dir / "latest").write_text(f"step-{step:08d}\n")
    for later in (copy_to / kind_dir).glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    return copy_to
