"""Stage 2 from a trained run: code store, extract-codes, train-prior, classifier, sampling."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace

import pytest
import torch
import yaml

from vqvae2.codes import CodeDataset, CodeStoreWriter
from vqvae2.config import (
    ClassifierRunConfig,
    PriorRunConfig,
    VQVAERunConfig,
    load_config,
)
from vqvae2.data import open_dataset, uint8_to_float
from vqvae2.measure import class_agreement, measure_nll
from vqvae2.run import Run, load_classifier, load_prior, load_vqvae
from vqvae2.sample import sample_from_run
from vqvae2.train import (
    train_classifier,
    train_prior,
)

from .conftest import train_tiny_run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny 2-level VQ-VAE trained on 3 classes of blobs, with its codes extracted."""
    return train_tiny_run(tmp_path_factory.mktemp("stage2"), vqvae_steps=40, codes=True)


def test_code_store_round_trip_and_random_access(tmp_path):
    writer = CodeStoreWriter(
        tmp_path / "codes", 5, ["top", "bottom"], [2, 4], 13, {"num_classes": 3}
    )
    top = torch.arange(20).view(5, 2, 2) % 13
    bottom = torch.arange(80).view(5, 4, 4) % 13
    writer.write(0, [top[:3], bottom[:3]], torch.tensor([0, 1, 2]))
    writer.write(3, [top[3:], bottom[3:]], torch.tensor([2, 1]))
    assert not (tmp_path / "codes").exists()  # nothing visible until close
    writer.close()
    store = CodeDataset(tmp_path / "codes")
    assert len(store) == 5 and store.num_classes == 3
    (batch_top, batch_bottom), labels = store.__getitems__([4, 0, 2])
    assert torch.equal(batch_top, top[[4, 0, 2]]) and torch.equal(batch_bottom, bottom[[4, 0, 2]])
    assert labels.tolist() == [1, 0, 2] and batch_top.dtype == torch.int64


def test_truncated_or_missing_code_store_is_named(tmp_path):
    writer = CodeStoreWriter(tmp_path / "codes", 4, ["bottom"], [4], 13)
    writer.write(0, [torch.zeros(4, 4, 4, dtype=torch.long)], torch.zeros(4, dtype=torch.long))
    writer.close()
    path = tmp_path / "codes" / "bottom.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CodeDataset(tmp_path / "codes")
    with pytest.raises(ValueError, match="run `vqvae2 extract-codes` first"):
        CodeDataset(tmp_path / "nothing")


def test_extracted_codes_decode_to_the_forward_reconstruction(trained_run):
    run, data = trained_run
    vqvae = load_vqvae(run)
    config = load_config(VQVAERunConfig, "tiny").data
    train = open_dataset(data, "train", 16, 1, config)
    store = CodeDataset(run / "codes" / "train")
    assert len(store) == len(train)
    indices = list(range(0, len(train), 7))
    images, labels = train.__getitems__(indices)
    images = uint8_to_float(images)
    codes, stored_labels = store.__getitems__(indices)
    with torch.no_grad():
        forward = vqvae(images).reconstruction
        decoded = vqvae.decode_codes(codes)
    torch.testing.assert_close(decoded, forward, rtol=0, atol=1e-5)
    assert torch.equal(labels, stored_labels)


def test_prior_learns_resumes_and_reports_nll(trained_run, tmp_path):
    run, _ = trained_run
    config = load_config(
        PriorRunConfig, "prior-top-tiny", ["train.max_steps=30", "train.learning_rate=3e-3"]
    )
    result = train_prior(Run.open(run), "top", config, progress=False)
    metrics = result.metrics
    uniform = math.log(16)  # nats per code of a uniform guess over K = 16
    assert metrics["val_nll_nats"] < uniform and metrics["train_nll_nats"] < uniform
    prior = load_prior(run, "top")
    assert prior.config.num_classes == 3 and prior.config.code_size == 2
    store = CodeDataset(run / "codes" / "val")
    assert measure_nll(prior, store, 0) == pytest.approx(metrics["val_nll_nats"], rel=1e-5)
    more = train_prior(
        Run.open(run),
        "top",
        load_config(PriorRunConfig, "prior-top-tiny", ["train.max_steps=35"]),
        resume=True,
        progress=False,
    )
    assert more.step == 35
    with pytest.raises(ValueError, match="already holds a trained prior"):
        train_prior(Run.open(run), "top", config, progress=False)


def test_bottom_prior_is_conditioned_on_the_top_codes(trained_run):
    run, _ = trained_run
    config = load_config(PriorRunConfig, "prior-bottom-tiny", ["train.max_steps=5"])
    train_prior(Run.open(run), "bottom", config, progress=False)
    prior = load_prior(run, "bottom")
    assert prior.config.condition_sizes == (2,) and prior.config.code_size == 4
    # Other top codes give other bottom logits, even at the first position (0, 0), which no
    # bottom code precedes: the top codes are all it has to go on there besides the class.
    val = CodeDataset(run / "codes" / "val")
    (top, bottom), labels = val.__getitems__(list(range(len(val))))
    with torch.no_grad():
        given = prior(bottom, labels, [top]).logits
        other = prior(bottom, labels, [(top + 1) % 16]).logits
    assert not torch.allclose(given[:, :, 0, 0], other[:, :, 0, 0])


def test_prior_for_a_missing_level_is_refused(trained_run):
    run, _ = trained_run
    with pytest.raises(ValueError, match="there is no 'middle' level"):
        train_prior(
            Run.open(run), "middle", load_config(PriorRunConfig, "prior-top-tiny"), progress=False
        )


@pytest.mark.parametrize(
    "setting",
    [
        "code_size=8",
        "codebook_size=32",
        "condition_sizes=[4]",
        "num_classes=7",
        "num_augmentations=2",
    ],
)
def test_a_prior_config_that_sets_a_data_field_is_refused(trained_run, tmp_path, setting):
    """The data fields come from the VQ-VAE and the codes: a YAML or override that sets one is
    refused in one line instead of being silently replaced."""
    run, _ = trained_run
    field = setting.partition("=")[0]
    with pytest.raises(ValueError, match=f"prior.{field} is set from the VQ-VAE"):
        load_config(PriorRunConfig, "prior-top-tiny", [f"prior.{setting}"])
    yaml_file = tmp_path / "prior.yaml"
    yaml_file.write_text(f"prior:\n  {field}: {setting.partition('=')[2]}\n")
    with pytest.raises(ValueError, match=f"remove it from {yaml_file}"):
        load_config(PriorRunConfig, yaml_file)
    # From Python, with a config built by hand: refused when the value is not the data's.
    config = load_config(PriorRunConfig, "prior-top-tiny", ["train.max_steps=1"])
    value = yaml.safe_load(setting.partition("=")[2])
    hand_made = replace(
        config,
        prior=replace(config.prior, **{field: tuple(value) if isinstance(value, list) else value}),
    )
    scratch = tmp_path / "run"
    shutil.copytree(run, scratch, ignore=shutil.ignore_patterns("prior-*", "classifier"))
    with pytest.raises(ValueError, match=f"prior.{field}"):
        train_prior(Run.open(scratch), "top", hand_made, progress=False)
    assert (
        train_prior(Run.open(scratch), "top", config, progress=False).step == 1
    )  # defaults are fine


def test_classifier_beats_chance(trained_run, tmp_path):
    _, data = trained_run
    config = load_config(
        ClassifierRunConfig,
        "classifier-tiny",
        ["model.image_size=16", "train.max_steps=60", "data.val_fraction=0.1"],
    )
    result = train_classifier(config, data, tmp_path / "classifier", progress=False)
    assert result.metrics["test_accuracy"] > 0.6  # 3 classes of blob sizes: chance is 1/3
    # class_agreement on real test images is the test accuracy.
    classifier = load_classifier(tmp_path / "classifier")
    test = open_dataset(data, "test", 16, 1, config.data)
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = test.labels
    assert class_agreement(classifier, images, labels) == pytest.approx(
        result.metrics["test_accuracy"]
    )


def test_time_budget_ends_prior_and_classifier_training(trained_run, tmp_path, step_clock):
    """A 6-second budget on a clock that gains one second per step ends both after 6 steps."""
    run, data = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("prior-*", "classifier"))
    budget = ["train.max_steps=100000", "train.lr_schedule=linear", "train.schedule_minutes=0.1"]
    prior_config = load_config(PriorRunConfig, "prior-top-tiny", budget)
    prior = train_prior(Run.open(copy), "top", prior_config, progress=False, now=step_clock)
    assert prior.step == 6
    classifier_config = load_config(
        ClassifierRunConfig, "classifier-tiny", ["model.image_size=16", *budget]
    )
    result = train_classifier(
        classifier_config, data, tmp_path / "classifier", progress=False, now=step_clock
    )
    assert result.step == 6


def test_sampling_from_a_run(trained_run):
    run, _ = trained_run
    if not (run / "prior-bottom" / "latest").exists():
        train_prior(
            Run.open(run),
            "bottom",
            load_config(PriorRunConfig, "prior-bottom-tiny"),
            progress=False,
        )
    if not (run / "prior-top" / "latest").exists():
        train_prior(
            Run.open(run), "top", load_config(PriorRunConfig, "prior-top-tiny"), progress=False
        )
    result = sample_from_run(Run.open(run), 6, classes=[2, 0], seed=3, progress=False)
    assert result.images.shape == (6, 1, 16, 16) and result.images.dtype == torch.uint8
    assert result.labels.tolist() == [2, 2, 2, 0, 0, 0]
    again = sample_from_run(Run.open(run), 6, classes=[2, 0], seed=3, progress=False)
    other = sample_from_run(Run.open(run), 6, classes=[2, 0], seed=4, progress=False)
    assert torch.equal(result.images, again.images)
    assert not all(torch.equal(a, b) for a, b in zip(result.codes, other.codes, strict=True))
    with pytest.raises(ValueError, match="class 5 is out of range"):
        sample_from_run(Run.open(run), 2, classes=[5], progress=False)


def test_sample_from_run_uses_the_sampler_asked_for(trained_run, monkeypatch):
    """``sampler="reference"`` reaches the level sampler (it was once accepted and ignored)."""
    import vqvae2.sampling as sampling

    run, _ = trained_run
    if not (run / "prior-bottom" / "latest").exists():
        train_prior(
            Run.open(run),
            "bottom",
            load_config(PriorRunConfig, "prior-bottom-tiny"),
            progress=False,
        )
    if not (run / "prior-top" / "latest").exists():
        train_prior(
            Run.open(run), "top", load_config(PriorRunConfig, "prior-top-tiny"), progress=False
        )
    calls = {"cached": 0, "reference": 0}
    for name, sample_level in list(sampling.SAMPLERS.items()):

        def counted(*args, _name=name, _sample_level=sample_level, **kwargs):
            calls[_name] += 1
            return _sample_level(*args, **kwargs)

        monkeypatch.setitem(sampling.SAMPLERS, name, counted)
    reference = sample_from_run(Run.open(run), 2, seed=5, progress=False, sampler="reference")
    assert calls == {"cached": 0, "reference": 2}  # one call per level
    cached = sample_from_run(Run.open(run), 2, seed=5, progress=False)
    assert calls == {"cached": 2, "reference": 2}
    assert all(torch.equal(a, b) for a, b in zip(reference.codes, cached.codes, strict=True))
