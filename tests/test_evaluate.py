"""Rejection sampling, CAS, the InceptionV3 weights loader and `vqvae2 evaluate` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vqvae2.cas import classification_accuracy_score
from vqvae2.classifier import Classifier
from vqvae2.cli import main
from vqvae2.config import (
    ClassifierRunConfig,
    EvaluateConfig,
    VQVAERunConfig,
    load_config,
)
from vqvae2.data import SPLITS, float_to_uint8, open_dataset, uint8_to_float
from vqvae2.evaluate import evaluate_run, proportional_counts
from vqvae2.inception import InceptionV3, load_inception
from vqvae2.measure import extract_features
from vqvae2.metrics import frechet_distance, precision_recall
from vqvae2.model_configs import ClassifierConfig, PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.report import render_markdown
from vqvae2.run import Run, load_classifier, load_prior, load_run_config, load_vqvae
from vqvae2.sample import sample_with_rejection
from vqvae2.sampling import (
    accept_above_threshold,
    generate,
    generate_with_rejection,
    keep_top_per_class,
    reject_fraction_per_class,
    requested_class_scores,
)
from vqvae2.train import train_classifier
from vqvae2.vqvae import VQVAE2

from .conftest import (
    assert_one_line_error,
    half_accepting_threshold,
    tiny_config,
    torchrun,
    train_complete_tiny_run,
    write_npz,
)

# ----------------------------------------------------------------------------------------------
# Pure rejection rules


def test_keep_top_per_class_keeps_the_best_of_each_class():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    kept = keep_top_per_class(scores, labels, {0: 2, 1: 1, 2: 1})
    assert kept.tolist() == [1, 2, 5, 6]  # ascending indices: original order kept
    with pytest.raises(ValueError, match="cannot keep 2 items of class 2"):
        keep_top_per_class(scores, labels, {2: 2})


def test_reject_fraction_per_class_drops_the_worst_share_of_each_class():
    scores = torch.arange(8, dtype=torch.float32)  # higher index, better
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    kept = reject_fraction_per_class(scores, labels, 0.5)
    assert kept.tolist() == [4, 5, 6, 7]
    assert reject_fraction_per_class(scores, labels, 0.0).tolist() == list(range(8))
    # ceil((1 - 0.75) * 4) = 1 per class: the single best.
    assert reject_fraction_per_class(scores, labels, 0.75).tolist() == [6, 7]
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        reject_fraction_per_class(scores, labels, 1.0)


def test_accept_above_threshold():
    scores = torch.tensor([0.2, 0.6, 0.5, 0.9])
    assert accept_above_threshold(scores, 0.5).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="threshold"):
        accept_above_threshold(scores, 1.5)


def test_proportional_counts_sum_to_the_total():
    assert proportional_counts([5, 5], 7) == [4, 3]  # a tie goes to the first class
    assert proportional_counts([1, 2, 7], 10) == [1, 2, 7]
    # 333.33, 333.27, 333.39: the one left over goes to the largest remainder.
    assert proportional_counts([5700, 5699, 5701], 1000) == [333, 333, 334]


# ----------------------------------------------------------------------------------------------
# Rejection sampling with (untrained) models


@pytest.fixture
def hierarchy():
    vqvae = VQVAE2(tiny_config()).eval()  # 16x16, top 2x2, bottom 4x4, K = 13
    common = dict(
        codebook_size=13,
        hidden_channels=8,
        residual_channels=8,
        num_layers=1,
        attention_layers=0,
        kernel_size=3,
        dropout=0.0,
        output_stack_layers=0,
        condition_channels=8,
        num_classes=3,
    )
    priors = [
        PixelSNAIL(PixelSNAILConfig(code_size=2, **common)).eval(),
        PixelSNAIL(PixelSNAILConfig(code_size=4, condition_sizes=(2,), **common)).eval(),
    ]
    classifier = Classifier(
        ClassifierConfig(image_size=16, in_channels=1, num_classes=3, stage_channels=(4,))
    ).eval()
    return vqvae, priors, classifier


def test_rejection_keeps_the_best_scored_candidates_of_each_class(hierarchy):
    vqvae, priors, classifier = hierarchy
    labels = torch.tensor([2, 2, 0, 0, 0])
    output = generate_with_rejection(
        vqvae,
        priors,
        classifier,
        labels,
        reject_fraction=0.5,
        max_candidates=100,
        batch_size=64,
        generator=torch.Generator().manual_seed(3),
    )
    # The same candidates drawn by hand: class 0 needs ceil(3 / 0.5) = 6, class 2 needs 4.
    candidate_labels = torch.tensor([0] * 6 + [2] * 4)
    images, _ = generate(
        vqvae, priors, 10, candidate_labels, generator=torch.Generator().manual_seed(3)
    )
    scores = requested_class_scores(classifier, images, candidate_labels, 64)
    best_0 = torch.argsort(scores[:6], descending=True, stable=True)[:3].sort().values
    best_2 = 6 + torch.argsort(scores[6:], descending=True, stable=True)[:2].sort().values
    expected = torch.cat([best_2, best_0])  # in the order the labels were requested
    assert output.candidates == 10
    assert output.labels.tolist() == labels.tolist()
    torch.testing.assert_close(output.images, images[expected])
    torch.testing.assert_close(output.scores, scores[expected])
    worst_kept = output.scores[labels == 0].min()
    assert (scores[:6] > worst_kept).sum() == 2  # only the other two kept ones beat it


def test_threshold_rejection_keeps_only_samples_above_it(hierarchy):
    vqvae, priors, classifier = hierarchy
    labels = torch.tensor([0, 1, 2, 1])
    threshold = half_accepting_threshold(vqvae, priors, classifier, 60, 64)
    output = generate_with_rejection(
        vqvae,
        priors,
        classifier,
        labels,
        accept_threshold=threshold,
        max_candidates=2000,
        batch_size=16,
        generator=torch.Generator().manual_seed(0),
    )
    assert output.labels.tolist() == [0, 1, 2, 1]
    # One round was enough: the 3 short classes repeated 16 // 3 = 5 times, 15 candidates,
    # generated as one batch.
    assert output.candidates == 15
    batch = torch.tensor([0, 1, 2]).repeat(5)
    images, _ = generate(vqvae, priors, 15, batch, generator=torch.Generator().manual_seed(0))
    scores = requested_class_scores(classifier, images, batch, 16)
    accepted = {
        c: [i for i in range(15) if batch[i] == c and scores[i] >= threshold] for c in (0, 1, 2)
    }
    # The first accepted candidates of each class, in the order the labels were asked for.
    picks = [accepted[0][0], accepted[1][0], accepted[2][0], accepted[1][1]]
    torch.testing.assert_close(output.images, images[picks])
    torch.testing.assert_close(output.scores, scores[picks])
    assert bool((output.scores >= threshold).all())
    with pytest.raises(ValueError, match="lower the threshold"):
        generate_with_rejection(
            vqvae,
            priors,
            classifier,
            labels,
            accept_threshold=1.0,
            max_candidates=20,
            batch_size=16,
            generator=torch.Generator().manual_seed(0),
        )
    with pytest.raises(ValueError, match="exactly one"):
        generate_with_rejection(vqvae, priors, classifier, labels, max_candidates=10, batch_size=4)


# ----------------------------------------------------------------------------------------------
# Classification Accuracy Score


def test_cas_of_real_images_is_the_real_data_accuracy(tmp_path):
    data = write_npz(tmp_path / "blobs.npz", count=240)
    config = load_config(
        ClassifierRunConfig, "classifier-tiny", ["model.image_size=16", "train.max_steps=25"]
    )
    real = train_classifier(config, data, tmp_path / "real", progress=False)
    trained = load_classifier(tmp_path / "real").config  # num_classes filled in from the data
    train = open_dataset(data, "train", 16, 1, config.data)
    test = open_dataset(data, "test", 16, 1, config.data)
    result = classification_accuracy_score(
        train.images,
        train.labels,
        {"test": (test.images, test.labels)},
        ClassifierRunConfig(model=trained, data=config.data, train=config.train),
        progress=False,
    )
    assert result["test"]["top1"] == pytest.approx(real.metrics["test_accuracy"])
    with pytest.raises(ValueError, match="too few to train the CAS classifier"):
        classification_accuracy_score(
            train.images[:4], train.labels[:4], {"test": (test.images, test.labels)}, config
        )


# ----------------------------------------------------------------------------------------------
# InceptionV3 weights


@pytest.fixture(scope="module")
def inception_state():
    torch.manual_seed(0)
    return InceptionV3().state_dict()


def test_inception_loads_a_state_dict_and_gives_pool_features_and_logits(tmp_path, inception_state):
    path = tmp_path / "pt_inception.pth"
    torch.save(inception_state, path)
    network = load_inception(path)
    assert not network.training
    with torch.no_grad():
        output = network(torch.rand(2, 1, 16, 16) * 2 - 1)  # grey 16x16: resized to 299
    assert output.features.shape == (2, 2048) and output.logits.shape == (2, 1008)
    assert torch.isfinite(output.features).all()
    # safetensors without the batch-norm counters loads too, to the same weights.
    counters = [k for k in inception_state if k.endswith("num_batches_tracked")]
    save_file(
        {k: v for k, v in inception_state.items() if k not in counters},
        str(tmp_path / "inception.safetensors"),
    )
    again = load_inception(tmp_path / "inception.safetensors")
    for loaded, skipped in ((network, []), (again, counters)):
        state = loaded.state_dict()
        for name, value in inception_state.items():
            if name not in skipped:
                assert torch.equal(state[name], value), name


def test_weights_of_another_network_are_refused_in_one_line(tmp_path, inception_state):
    classifier = Classifier(ClassifierConfig())
    torch.save(classifier.state_dict(), tmp_path / "classifier.pth")
    with pytest.raises(ValueError, match="does not hold the FID InceptionV3 weights"):
        load_inception(tmp_path / "classifier.pth")
    # The right keys with a torchvision-style 1000-class head: a shape mismatch.
    wrong = dict(inception_state)
    wrong["fc.weight"] = torch.zeros(1000, 2048)
    wrong["fc.bias"] = torch.zeros(1000)
    torch.save(wrong, tmp_path / "imagenet1000.pth")
    with pytest.raises(ValueError, match="fc.weight has shape"):
        load_inception(tmp_path / "imagenet1000.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read Inception weights"):
        load_inception(tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="does not exist"):
        load_inception(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------
# A tiny trained run, evaluated end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """VQ-VAE, both priors and the classifier of a run on 3 classes of 16x16 blobs."""
    return train_complete_tiny_run(tmp_path_factory.mktemp("evaluate"))


def tiny_evaluate_config(**changes) -> EvaluateConfig:
    values = dict(
        num_samples=24,
        cas_samples=48,
        reject_fractions=(0.5,),
        kid_subsets=3,
        inception_score_splits=2,
        batch_size=64,
    )
    values.update(changes)
    return EvaluateConfig(**values)


def table1_by_hand(
    run: Path, data: Path, data_config, seed: int
) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Table 1 by a direct computation: each split's MSE on [0, 1] pixels of the VQ-VAE's
    forward pass (clamped), and each prior's NLL in nats per code, one image at a time, as the
    mean of -log_softmax(logits) at the image's own codes. Train is the seeded subset as large
    as the validation split (docs/evaluation.md).

    Returns:
        split -> MSE, and (split, level name) -> NLL (train and val).
    """
    vqvae = load_vqvae(run).eval()
    priors = {name: load_prior(run, name).eval() for name in ("top", "bottom")}
    splits = {split: open_dataset(data, split, 16, 1, data_config) for split in SPLITS}
    order = np.random.default_rng(seed).permutation(len(splits["train"]))
    chosen = {"train": sorted(order[: len(splits["val"])].tolist())}
    mse, nll = {}, {}
    for split, dataset in splits.items():
        indices = chosen.get(split, list(range(len(dataset))))
        images, labels = dataset.__getitems__(indices)
        pixels = images.double() / 255  # (N, 1, 16, 16) in [0, 1]
        with torch.no_grad():
            output = vqvae(uint8_to_float(images))
        reconstruction = (output.reconstruction.double().clamp(-1, 1) + 1) / 2
        mse[split] = float(((reconstruction - pixels) ** 2).mean())
        if split == "test":
            continue
        for level, (name, prior) in enumerate(priors.items()):
            nats, count = 0.0, 0
            for i in range(len(indices)):
                codes = [level_codes[i : i + 1] for level_codes in output.codes]  # (1, h, w)
                label = labels[i : i + 1] if prior.config.num_classes else None
                upper = codes[:level] if prior.config.condition_sizes else None
                with torch.no_grad():
                    logits = prior(codes[level], label, upper).logits  # (1, K, h, w)
                log_p = torch.log_softmax(logits.double(), dim=1)
                nats -= float(log_p.gather(1, codes[level][:, None]).sum())
                count += codes[level].numel()
            nll[(split, name)] = nats / count
    return mse, nll


def test_evaluate_writes_tables_curves_and_plots(tiny_run, tmp_path):
    run, data = tiny_run
    config = tiny_evaluate_config()
    report = evaluate_run(Run.open(run), data, tmp_path / "report", config, progress=False)
    table1, table2 = report["table1"], report["table2"]
    assert set(table1["priors"]) == {"top", "bottom"}
    # Table 1, computed here without the code that made it.
    data_config = load_config(VQVAERunConfig, "tiny").data
    expected_mse, expected_nll = table1_by_hand(run, data, data_config, config.seed)
    for split, mse in expected_mse.items():
        assert table1["vqvae"][f"{split}_mse"] == pytest.approx(mse, rel=1e-5), split
    for (split, name), nll in expected_nll.items():
        row = table1["priors"][name]
        assert row[f"{split}_nll_nats"] == pytest.approx(nll, rel=1e-5), (split, name)
        assert row[f"{split}_nll_bits"] == pytest.approx(nll / math.log(2), rel=1e-5)
    # The references, from the feature network's features of the real test images, their
    # reconstructions and the seeded subset of real train images.
    test = open_dataset(data, "test", 16, 1, data_config)
    images, _ = test.__getitems__(list(range(len(test))))
    vqvae, network = load_vqvae(run), load_classifier(Path(report["features"]["path"]))
    with torch.no_grad():
        recon = float_to_uint8(vqvae.decode_codes(vqvae.encode(uint8_to_float(images))))
    real_f = extract_features(network, images, 64)[0]
    recon_f = extract_features(network, recon, 64)[0]
    train = open_dataset(data, "train", 16, 1, data_config)
    order = np.random.default_rng(report["seeds"]["real_train_reference_subset"])
    chosen = np.sort(order.permutation(len(train))[: config.num_samples]).tolist()
    train_f = extract_features(network, train.__getitems__(chosen)[0], 64)[0]
    refs, n_test = report["references"], table1["test_size"]
    assert refs["test_reconstructions"]["fid"] == pytest.approx(
        frechet_distance(real_f, recon_f), rel=1e-6
    )
    assert refs["train_images"]["fid"] == pytest.approx(frechet_distance(real_f, train_f), rel=1e-6)
    expected = precision_recall(real_f, train_f, config.nearest_k)
    assert refs["train_images"]["precision"] == pytest.approx(expected.precision)
    assert refs["train_images"]["recall"] == pytest.approx(expected.recall)
    # Fig. 7: samples lie further from the real test images than real train images do, and
    # nearer their reconstructions than the real images; counts of whole samples and images.
    assert [row["reject_fraction"] for row in report["rejection"]] == [0.0, 0.5]
    for row in report["rejection"]:
        assert row["samples"] == 24
        assert refs["train_images"]["fid"] < row["fid"] and row["fid_star"] < row["fid"]
        assert row["precision"] * 24 == pytest.approx(round(row["precision"] * 24))
        assert row["recall"] * n_test == pytest.approx(round(row["recall"] * n_test))
    assert refs["train_images"]["precision"] > max(r["precision"] for r in report["rejection"])
    assert table2["cas_samples"] == 48
    assert table2["samples"]["top1"] * n_test == pytest.approx(
        round(table2["samples"]["top1"] * n_test)
    )
    assert table2["cas_steps"] == 20  # as many as the run's classifier
    assert report["seeds"]["sampling"] == 0
    out = tmp_path / "report"
    for name in (
        "report.json",
        "report.md",
        "fid-vs-inception-score.png",
        "precision-vs-recall.png",
        "samples-reject-0.00.png",
        "samples-reject-0.50.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["table2"] == table2
    markdown = (out / "report.md").read_text()
    assert "Table 1" in markdown and "Classification Accuracy Score" in markdown
    assert "not comparable with published values" in markdown
    assert render_markdown(report) == markdown


def test_evaluate_scores_with_a_network_that_did_not_reject(tiny_run, tmp_path):
    """By default the features come from a second classifier (another seed), not from the
    run's classifier that chose the samples; the report says which network did what."""
    run, data = tiny_run
    config = tiny_evaluate_config(reject_fractions=(0.0, 0.5), cas_steps=1)
    report = evaluate_run(Run.open(run), data, tmp_path / "default", config, progress=False)
    scorer = str(run / "classifier")
    assert report["rejection_scorer"] == scorer
    assert report["features"]["path"] == str(run / "feature-classifier") != scorer
    feature_config = load_run_config(run / "feature-classifier", "classifier", ClassifierRunConfig)
    scorer_config = load_run_config(run / "classifier", "classifier", ClassifierRunConfig)
    assert feature_config.train.seed == scorer_config.train.seed + 1
    assert feature_config.model == scorer_config.model
    feature_weights = load_classifier(run / "feature-classifier").state_dict()
    scorer_weights = load_classifier(run / "classifier").state_dict()
    assert not torch.equal(feature_weights["head.weight"], scorer_weights["head.weight"])
    markdown = (tmp_path / "default" / "report.md").read_text()
    assert "Rejection scorer: the run's classifier" in markdown
    assert str(run / "feature-classifier") in markdown


def test_evaluate_feature_network_options(tiny_run, tmp_path, monkeypatch):
    run, data = tiny_run
    config = tiny_evaluate_config(reject_fractions=(0.0,), cas_steps=1)
    default = evaluate_run(Run.open(run), data, tmp_path / "default", config, progress=False)
    # The default feature classifier named explicitly: the same features, the same numbers.
    named = evaluate_run(
        Run.open(run),
        data,
        tmp_path / "named",
        config,
        feature_classifier=run / "feature-classifier",
        progress=False,
    )
    assert named["features"]["path"] == default["features"]["path"]
    for key in ("fid", "fid_star", "precision", "recall", "inception_score"):
        assert named["rejection"][0][key] == pytest.approx(default["rejection"][0][key])
    # The rejection scorer named as the feature network: other features, other numbers.
    scorer = evaluate_run(
        Run.open(run),
        data,
        tmp_path / "scorer",
        config,
        feature_classifier=run / "classifier",
        progress=False,
    )
    assert scorer["features"]["path"] == str(run / "classifier")
    assert scorer["rejection"][0]["fid"] != pytest.approx(default["rejection"][0]["fid"])

    # InceptionV3 plumbing, with a small stand-in for the 299x299 network (slow on a CPU; 32
    # features instead of 2048 keep the 2048x2048 matrix square roots of FID out of the test).
    from vqvae2.inception import InceptionOutput

    class StandIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projection = torch.nn.Linear(16 * 16, 32)
            self.fc = torch.nn.Linear(32, 1008)

        def forward(self, images):  # (B, 1, 16, 16) -> 32 features, 1008 logits
            features = torch.relu(self.projection(images.flatten(1)))
            return InceptionOutput(logits=self.fc(features), features=features)

    loaded = []
    monkeypatch.setattr(
        "vqvae2.evaluate.load_inception", lambda path: loaded.append(path) or StandIn()
    )
    report = evaluate_run(
        Run.open(run),
        data,
        tmp_path / "inception",
        config,
        inception_weights="w.pth",
        progress=False,
    )
    assert loaded == ["w.pth"] and report["features"]["dimensions"] == 32
    assert report["features"]["network"].startswith("InceptionV3")
    assert "not comparable" not in (tmp_path / "inception" / "report.md").read_text()


def test_sample_with_rejection_from_a_run(tiny_run):
    run, _ = tiny_run
    result = sample_with_rejection(
        Run.open(run), 6, classes=[2, 0], reject_fraction=0.5, seed=1, progress=False
    )
    assert result.images.shape == (6, 1, 16, 16) and result.images.dtype == torch.uint8
    assert result.labels.tolist() == [2, 2, 2, 0, 0, 0] and result.candidates == 12
    again = sample_with_rejection(
        Run.open(run), 6, classes=[2, 0], reject_fraction=0.5, seed=1, progress=False
    )
    assert torch.equal(result.images, again.images)


def tiny_evaluate_args(run: Path, data: Path, out: Path) -> list[str]:
    """`vqvae2 evaluate` arguments for the tiny run: 24 samples per set, 48 for CAS, 3 steps."""
    return [
        "evaluate",
        str(run),
        "--data",
        str(data),
        "--n-samples",
        "24",
        "--cas-samples",
        "48",
        "--cas-steps",
        "3",
        "--reject-fractions",
        "0,0.5",
        "--out",
        str(out),
        "--quiet",
    ]


def test_cli_sample_with_rejection_and_evaluate(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    code = main(
        [
            "sample",
            str(run),
            "--n",
            "4",
            "--class",
            "0",
            "1",
            "--reject-fraction",
            "0.5",
            "--out",
            str(tmp_path / "grid.png"),
            "--quiet",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 4 and summary["candidates"] == 8
    assert (tmp_path / "grid.png").is_file()
    code = main(tiny_evaluate_args(run, data, tmp_path / "report"))
    assert code == 0
    out = capsys.readouterr().out
    assert "CAS top-1" in out and "rejecting 50%" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["command"].startswith(f"vqvae2 evaluate {run} --data {data}")
    assert report["table2"]["cas_steps"] == 3


def test_evaluate_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    out = ["--out", str(tmp_path / "report"), "--quiet"]
    # A run folder missing a model.
    (tmp_path / "empty").mkdir()
    code = main(["evaluate", str(tmp_path / "empty"), "--data", str(data), *out])
    assert_one_line_error(capsys, code, "no vqvae checkpoint")
    # A weights file of the wrong network.
    torch.save(Classifier(ClassifierConfig()).state_dict(), tmp_path / "wrong.pth")
    code = main(
        [
            "evaluate",
            str(run),
            "--data",
            str(data),
            "--inception-weights",
            str(tmp_path / "wrong.pth"),
            *out,
        ]
    )
    assert_one_line_error(capsys, code, "does not hold the FID InceptionV3 weights")
    # Too few samples for the metric.
    code = main(["evaluate", str(run), "--data", str(data), "--n-samples", "3", *out])
    assert_one_line_error(capsys, code, "too few for precision/recall")
    code = main(
        ["evaluate", str(run), "--data", str(data), "--n-samples", "24", "--cas-samples", "5", *out]
    )
    assert_one_line_error(capsys, code, "CAS samples are too few")
    code = main(["evaluate", str(run), "--data", str(data), "--reject-fractions", "0,1", *out])
    assert_one_line_error(capsys, code, "reject_fractions must lie in [0, 1)")
    code = main(
        [
            "sample",
            str(run),
            "--reject-fraction",
            "0.5",
            "--accept-threshold",
            "0.5",
            "--out",
            str(tmp_path / "g.png"),
            "--quiet",
        ]
    )
    assert_one_line_error(capsys, code, "not both")
    assert not (tmp_path / "report" / "report.json").exists()


def test_evaluate_without_a_classifier_is_one_line(tiny_run, tmp_path, capsys):
    import shutil

    run, data = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("classifier", "codes"))
    code = main(["evaluate", str(copy), "--data", str(data), "--out", str(tmp_path / "r")])
    assert_one_line_error(capsys, code, "no classifier checkpoint")


def test_float_to_uint8_round_trip_used_by_the_pool():
    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    from vqvae2.data import uint8_to_float

    assert torch.equal(float_to_uint8(uint8_to_float(images)), images)


def test_pool_batches_cover_the_pool_once_over_processes():
    from vqvae2.distributed import DistributedContext
    from vqvae2.rejection_sweep import pool_batches

    starts = [pool_batches(10, 2, DistributedContext(rank=r, world_size=3)) for r in range(3)]
    assert starts == [[0, 6], [2, 8], [4]]
    assert pool_batches(10, 2, DistributedContext()) == [0, 2, 4, 6, 8]


@pytest.mark.slow
def test_evaluate_under_torchrun_splits_the_pool_and_reports_once(tiny_run, tmp_path):
    run, data = tiny_run
    stdout = torchrun(
        2,
        "-m",
        "vqvae2",
        *tiny_evaluate_args(run, data, tmp_path / "report"),
        "--json",
        timeout=300,
    )
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert [row["samples"] for row in report["rejection"]] == [24, 24]
    assert report["table2"]["cas_samples"] == 48
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == report
