"""Distribution augmentation of the priors: image transforms, the augmented code store, priors
trained on it conditioned on the transform, and evaluation/sampling with the identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vqvae2.loop
from vqvae2.cli import main
from vqvae2.codes import CodeDataset, PriorTrainingCodes
from vqvae2.config import PriorRunConfig, VQVAERunConfig, load_config
from vqvae2.data import (
    apply_augmentation,
    augmentation_names,
    float_to_uint8,
    open_dataset,
    shift_image,
    uint8_to_float,
)
from vqvae2.measure import measure_nll
from vqvae2.run import Run, load_prior, load_vqvae
from vqvae2.sample import sample_from_run
from vqvae2.train import extract_codes, train_prior, train_vqvae

from .conftest import train_tiny_run

KINDS = ("flip", "shift")
NAMES = ["identity", "flip"] + [
    f"{base}shift-{way}" for base in ("", "flip+") for way in ("right", "left", "down", "up")
]


@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory):
    """A tiny trained VQ-VAE with plain and augmented train codes extracted."""
    run, data = train_tiny_run(tmp_path_factory.mktemp("augment"), vqvae_steps=20, images=48)
    written = extract_codes(Run.open(run), data, progress=False, augment=KINDS)
    assert sorted(written) == ["train", "train-augmented", "val"]
    return run, data


def test_transform_names_and_pixels():
    assert augmentation_names([]) == ["identity"]
    assert augmentation_names(["flip"]) == ["identity", "flip"]
    assert augmentation_names(KINDS) == NAMES
    with pytest.raises(ValueError, match="unknown augmentation rotate"):
        augmentation_names(["rotate"])
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 2, 1] = 1.0
    assert shift_image(image, 0, 1)[0, 0, 2, 2] == 1 and shift_image(image, 0, 1).sum() == 1
    assert shift_image(image, -1, 0)[0, 0, 1, 1] == 1
    edge = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 5, 5)
    assert shift_image(edge, 0, 1)[0, 0, 0].tolist() == [0, 0, 1, 2, 3]  # edge repeated
    both = apply_augmentation(image, "flip+shift-down")
    assert torch.equal(both, shift_image(image.flip(-1), 1, 0))
    assert torch.equal(apply_augmentation(image, "identity"), image)


def test_augmented_store_holds_the_codes_of_each_transform(augmented_run):
    run, data = augmented_run
    vqvae = load_vqvae(run).eval()
    dataset = open_dataset(data, "train", 16, 1, load_config(VQVAERunConfig, "tiny").data)
    images, labels = dataset.__getitems__(list(range(len(dataset))))
    images = uint8_to_float(images)
    plain = CodeDataset(run / "codes" / "train")
    augmented = CodeDataset(run / "codes" / "train-augmented")
    count = len(dataset)
    assert len(plain) == count and len(augmented) == count * (len(NAMES) - 1)
    assert augmented.augmentation_names == NAMES and plain.augmentation_names == ["identity"]
    with torch.no_grad():
        for index, name in enumerate(NAMES):
            expected = vqvae.encode(apply_augmentation(images, name))
            store, rows = (
                (plain, range(count))
                if index == 0
                else (augmented, range((index - 1) * count, index * count))
            )
            codes, store_labels = store.__getitems__(list(rows))
            assert all(torch.equal(a, b) for a, b in zip(codes, expected, strict=True)), name
            assert torch.equal(store_labels, labels)
            assert store.augmentation_indices(list(rows)).unique().tolist() == [index]
    # The flipped images really give other codes, or the test above proves little.
    assert not torch.equal(plain.__getitems__([0])[0][1], augmented.__getitems__([0])[0][1])


def test_training_codes_join_plain_and_augmented_rows(augmented_run):
    run, _ = augmented_run
    plain = CodeDataset(run / "codes" / "train")
    augmented = CodeDataset(run / "codes" / "train-augmented")
    joined = PriorTrainingCodes(plain, augmented)
    assert len(joined) == len(plain) + len(augmented) and joined.num_augmentations == 10
    count = len(plain)
    rows = [count + 3 * count + 1, 2, count + 5]  # "shift-left" row 1, plain row 2, "flip" row 5
    codes, labels, transforms = joined.__getitems__(rows)
    assert transforms.tolist() == [4, 0, 1]
    expected = [
        augmented.__getitems__([3 * count + 1]),
        plain.__getitems__([2]),
        augmented.__getitems__([5]),
    ]
    for position, (level_codes, label) in enumerate(expected):
        assert labels[position] == label[0]
        for level in range(2):
            assert torch.equal(codes[level][position], level_codes[level][0])
    assert PriorTrainingCodes(plain).num_augmentations == 0
    plain.meta = {**plain.meta, "vqvae_step": plain.meta["vqvae_step"] + 1}  # another VQ-VAE
    with pytest.raises(ValueError, match="do not match .*extract them again"):
        PriorTrainingCodes(plain, augmented)


def test_prior_trains_on_augmented_codes_and_evaluates_with_the_identity(augmented_run):
    run, _ = augmented_run
    config = load_config(
        PriorRunConfig, "prior-top-tiny", ["train.max_steps=30", "train.learning_rate=3e-3"]
    )
    metrics = train_prior(Run.open(run), "top", config, progress=False).metrics
    prior = load_prior(run, "top")
    assert prior.config.num_augmentations == 10
    # Reported figures are on the plain codes, with the identity transform (index 0): another
    # transform's index gives the same codes another likelihood.
    val = CodeDataset(run / "codes" / "val")
    assert measure_nll(prior, val, 0) == pytest.approx(metrics["val_nll_nats"], rel=1e-5)
    (top, _), labels = val.__getitems__(list(range(len(val))))
    with torch.no_grad():
        identity = float(prior(top, labels, None, torch.zeros_like(labels)).loss)
        flipped = float(prior(top, labels, None, torch.ones_like(labels)).loss)
    assert metrics["val_nll_nats"] == pytest.approx(identity, rel=1e-5)
    assert metrics["val_nll_nats"] != pytest.approx(flipped, rel=1e-3)
    assert metrics["val_nll_nats"] < np.log(16)
    bottom = load_config(PriorRunConfig, "prior-bottom-tiny", ["train.max_steps=3"])
    train_prior(Run.open(run), "bottom", bottom, progress=False)
    result = sample_from_run(Run.open(run), 6, classes=[0, 1, 2], seed=0, progress=False)
    assert result.images.shape == (6, 1, 16, 16) and result.codes[0].shape == (6, 2, 2)
    with torch.no_grad():
        decoded = float_to_uint8(load_vqvae(run).eval().decode_codes(result.codes))
    assert torch.equal(result.images, decoded)


def test_plain_priors_ignore_augmented_codes_when_asked(augmented_run, tmp_path, monkeypatch):
    run, _ = augmented_run
    scratch = tmp_path / "run"
    scratch.mkdir()
    for name in ("vqvae", "codes", "config.yaml"):
        (scratch / name).symlink_to(run / name)
    sizes = []
    batch_sampler = vqvae2.loop.rank_batch_sampler
    monkeypatch.setattr(
        vqvae2.loop,
        "rank_batch_sampler",
        lambda size, *args: sizes.append(size) or batch_sampler(size, *args),
    )
    config = load_config(
        PriorRunConfig, "prior-top-tiny", ["train.max_steps=2", "augmented_codes=false"]
    )
    train_prior(Run.open(scratch), "top", config, progress=False)
    assert load_prior(scratch, "top").config.num_augmentations == 0
    # The batches come from the plain train codes alone.
    assert sizes == [len(CodeDataset(run / "codes" / "train"))]


def test_extracting_again_without_augmentation_drops_the_store_and_resume_is_refused(tmp_path):
    from .conftest import write_npz

    data = write_npz(tmp_path / "blobs.npz", count=24)
    config = load_config(VQVAERunConfig, "tiny", ["model.image_size=16", "train.max_steps=3"])
    train_vqvae(config, data, tmp_path / "run", progress=False)
    extract_codes(Run.open(tmp_path / "run"), data, progress=False, augment=["flip"])
    prior_config = load_config(PriorRunConfig, "prior-top-tiny", ["train.max_steps=2"])
    train_prior(Run.open(tmp_path / "run"), "top", prior_config, progress=False)
    assert load_prior(tmp_path / "run", "top").config.num_augmentations == 2
    extract_codes(Run.open(tmp_path / "run"), data, progress=False)
    assert not (tmp_path / "run" / "codes" / "train-augmented").exists()
    with pytest.raises(ValueError, match="started on codes with 2 transforms .* now holds 0"):
        train_prior(
            Run.open(tmp_path / "run"),
            "top",
            load_config(PriorRunConfig, "prior-top-tiny", ["train.max_steps=4"]),
            resume=True,
            progress=False,
        )


def test_cli_rejects_an_unknown_augmentation(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["extract-codes", str(tmp_path), "--augment", "rotate"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'rotate'" in err and "Traceback" not in err
