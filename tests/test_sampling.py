"""Ancestral sampling: seeded reproducibility, valid codes, hierarchy checks."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch
from einops import rearrange

import vqvae2.sampling
from vqvae2.classifier import Classifier
from vqvae2.config import MIN_TEMPERATURE, EvaluateConfig
from vqvae2.model_configs import ClassifierConfig, PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler
from vqvae2.sampling import (
    DrawControls,
    _draw,
    check_hierarchy,
    generate,
    generate_with_rejection,
    keep_top_per_class,
    reject_fraction_per_class,
    requested_class_scores,
    requested_labels,
    sample_codes,
    sample_level_cached,
    sample_level_reference,
)
from vqvae2.vqvae import VQVAE2

from .conftest import half_accepting_threshold, tiny_config, tiny_prior_config


def priors_for(vqvae: VQVAE2, num_classes: int = 3) -> list[PixelSNAIL]:
    config = vqvae.config
    priors = []
    for level, side in enumerate(config.latent_sizes):
        priors.append(
            PixelSNAIL(
                PixelSNAILConfig(
                    code_size=side,
                    codebook_size=config.codebook_size,
                    hidden_channels=8,
                    residual_channels=8,
                    num_layers=2,
                    attention_layers=1 if level == 0 else 0,
                    attention_heads=2,
                    kernel_size=3,
                    dropout=0.0,
                    output_stack_layers=1,
                    condition_res_blocks=1 if level else 0,
                    condition_channels=4,
                    condition_sizes=tuple(config.latent_sizes[:level]),
                    num_classes=num_classes,
                )
            ).eval()
        )
    return priors


def test_seeded_generator_reproduces_samples_and_codes_are_in_range():
    vqvae = VQVAE2(tiny_config(num_levels=3, image_size=32)).eval()
    priors = priors_for(vqvae)
    labels = torch.tensor([0, 1, 2, 1])
    first, codes = generate(vqvae, priors, 4, labels, 1.0, torch.Generator().manual_seed(7))
    second, again = generate(vqvae, priors, 4, labels, 1.0, torch.Generator().manual_seed(7))
    third, other = generate(vqvae, priors, 4, labels, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(codes, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(codes, other, strict=True))
    assert first.shape == (4, 1, 32, 32)
    assert [c.shape for c in codes] == [(4, 2, 2), (4, 4, 4), (4, 8, 8)]
    assert all(int(c.min()) >= 0 and int(c.max()) < 13 for c in codes)


def test_sampling_runs_in_eval_mode_and_restores_the_mode_it_found():
    """Priors and VQ-VAE in train mode (dropout on) sample as in eval mode and stay in train mode."""
    vqvae = VQVAE2(tiny_config())
    priors = priors_for(vqvae)
    for prior in priors:
        for module in prior.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.5
    labels = torch.tensor([0, 2])
    for sampler in ("cached", "reference"):
        for module in (vqvae, *priors):
            module.train()
        images, codes = generate(
            vqvae, priors, 2, labels, 1.0, torch.Generator().manual_seed(3), sampler
        )
        assert vqvae.training and all(prior.training for prior in priors)
        for module in (vqvae, *priors):
            module.eval()
        expected, expected_codes = generate(
            vqvae, priors, 2, labels, 1.0, torch.Generator().manual_seed(3), sampler
        )
        assert not vqvae.training and not any(prior.training for prior in priors)
        assert all(torch.equal(a, b) for a, b in zip(codes, expected_codes, strict=True))
        torch.testing.assert_close(images, expected)


def test_low_temperature_picks_the_most_likely_code():
    vqvae = VQVAE2(tiny_config()).eval()
    prior = priors_for(vqvae, num_classes=0)[0]
    codes = sample_level_reference(
        prior, 3, temperature=1e-4, generator=torch.Generator().manual_seed(0)
    )
    logits = prior(codes).logits  # teacher-forced on the sampled codes
    assert torch.equal(codes, logits.argmax(dim=1))


def test_sampled_codes_follow_the_prior_distribution():
    """With a one-position map, sample frequencies approach softmax(logits)."""
    config = PixelSNAILConfig(
        code_size=1,
        codebook_size=4,
        hidden_channels=4,
        residual_channels=4,
        num_layers=1,
        attention_layers=0,
        kernel_size=3,
        dropout=0.0,
        output_stack_layers=0,
        condition_channels=4,
    )
    prior = PixelSNAIL(config).eval()
    with torch.no_grad():
        prior.output.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0]))
        expected = torch.softmax(
            prior(torch.zeros(1, 1, 1, dtype=torch.long)).logits[0, :, 0, 0], 0
        )
    draws = sample_level_reference(prior, 4000, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    torch.testing.assert_close(frequencies, expected, atol=0.03, rtol=0)


def test_sample_codes_conditions_each_level_on_those_above():
    vqvae = VQVAE2(tiny_config()).eval()
    priors = priors_for(vqvae, num_classes=0)
    codes = sample_codes(priors, 16, generator=torch.Generator().manual_seed(1))
    assert [c.shape for c in codes] == [(16, 2, 2), (16, 4, 4)]
    # By hand from the same generator stream: the top level, then the bottom given that top.
    generator = torch.Generator().manual_seed(1)
    top = sample_level_cached(priors[0], 16, None, None, 1.0, generator)
    state = generator.get_state()
    bottom = sample_level_cached(priors[1], 16, None, [top], 1.0, generator)
    assert torch.equal(codes[0], top) and torch.equal(codes[1], bottom)
    # The same draws given other top codes give other bottom codes (22 of the 256 here).
    generator.set_state(state)
    other = sample_level_cached(priors[1], 16, None, [(top + 1) % 13], 1.0, generator)
    assert not torch.equal(other, bottom)


def test_mismatched_priors_are_refused():
    vqvae = VQVAE2(tiny_config())
    priors = priors_for(vqvae)
    with pytest.raises(ValueError, match="2 levels but 1 priors"):
        check_hierarchy(vqvae, priors[:1])
    other = VQVAE2(tiny_config(codebook_size=16))
    with pytest.raises(ValueError, match="trained on another VQ-VAE"):
        check_hierarchy(other, priors)
    bigger = VQVAE2(tiny_config(image_size=32))
    with pytest.raises(ValueError, match="models 2x2 maps, the VQ-VAE.s top level is 4x4"):
        check_hierarchy(bigger, priors)
    with pytest.raises(ValueError, match="temperature"):
        sample_level_reference(priors[0], 1, torch.tensor([0]), temperature=0)


CACHE_CONFIGURATIONS = [
    dict(attention_layers=0),
    dict(attention_layers=2),
    dict(attention_layers=1, num_classes=3),
    dict(condition_sizes=(3,), condition_res_blocks=2, num_classes=3),  # bottom of 2 levels
    dict(condition_sizes=(2, 3), condition_res_blocks=1, attention_layers=1),  # bottom of 3
    dict(attention_layers=1, num_augmentations=3),  # augmentation-conditioned, no classes
    dict(condition_sizes=(3,), condition_res_blocks=1, num_classes=3, num_augmentations=2),
    # bottom of 3 levels, class-conditional, attention
    dict(condition_sizes=(2, 3), condition_res_blocks=1, attention_layers=1, num_classes=3),
    # kernels wider than the map: 5x5 and 7x7 on 2x2 codes
    dict(code_size=2, attention_layers=1, num_classes=3),
    dict(code_size=2, kernel_size=7, condition_sizes=(1,), condition_res_blocks=1),
]


def cache_prior(**changes) -> PixelSNAIL:
    config = tiny_prior_config(**{"code_size": 6, "kernel_size": 5, **changes})
    return PixelSNAIL(config).eval()


def cache_inputs(prior: PixelSNAIL, batch: int = 3):
    config = prior.config
    labels = torch.arange(batch) % config.num_classes if config.num_classes else None
    upper = [torch.randint(0, 7, (batch, s, s)) for s in config.condition_sizes] or None
    return labels, upper


@pytest.mark.parametrize("changes", CACHE_CONFIGURATIONS, ids=str)
def test_cached_logits_match_the_full_forward_pass(changes):
    prior = cache_prior(**changes)
    labels, upper = cache_inputs(prior)
    side = prior.config.code_size
    codes = torch.randint(0, 7, (3, side, side))
    with torch.no_grad():
        full = prior(codes, labels, upper).logits
        state = IncrementalSampler(prior, 3, prior.condition(labels, upper))
        for row in range(side):
            for column in range(side):
                torch.testing.assert_close(
                    state.logits_at(row, column), full[:, :, row, column], rtol=0, atol=1e-4
                )
                state.set_codes(row, column, codes[:, row, column])


@pytest.mark.parametrize("changes", CACHE_CONFIGURATIONS, ids=str)
def test_cached_sampler_draws_the_same_codes_as_the_reference(changes):
    prior = cache_prior(**changes)
    labels, upper = cache_inputs(prior)
    reference = sample_level_reference(
        prior, 3, labels, upper, 1.0, torch.Generator().manual_seed(5)
    )
    cached = sample_level_cached(prior, 3, labels, upper, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(reference, cached)


@pytest.mark.parametrize("num_levels", [2, 3])
def test_cached_and_reference_generate_the_same_images(num_levels):
    vqvae = VQVAE2(tiny_config(num_levels=num_levels, image_size=32)).eval()
    priors = priors_for(vqvae)
    labels = torch.tensor([2, 0])
    cached, _ = generate(vqvae, priors, 2, labels, 1.0, torch.Generator().manual_seed(3), "cached")
    reference, _ = generate(
        vqvae, priors, 2, labels, 1.0, torch.Generator().manual_seed(3), "reference"
    )
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_finite_and_positive(temperature):
    prior = priors_for(VQVAE2(tiny_config()), num_classes=0)[0]
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        sample_codes([prior], 2, temperature=temperature)
    with pytest.raises(ValueError, match="evaluate.temperature must be a finite number > 0"):
        EvaluateConfig(temperature=temperature)


def test_temperatures_below_the_smallest_float32_normal_are_refused():
    """Dividing by 1e-39 in float32 overflows the logits (softmax NaN, a multinomial error)."""
    prior = priors_for(VQVAE2(tiny_config()), num_classes=0)[0]
    message = (
        "temperature 1e-39 is below the smallest sampling temperature, 1.18e-38 "
        "(float32's smallest normal number)"
    )
    with pytest.raises(ValueError) as error:
        sample_codes([prior], 2, temperature=1e-39)
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        EvaluateConfig(temperature=1e-39)
    assert str(error.value) == f"evaluate.{message}"
    EvaluateConfig(temperature=MIN_TEMPERATURE)  # the bound itself is taken


def test_tiny_temperatures_draw_the_most_likely_code_and_others_draw_as_before():
    """logits / 2e-38 overflows float32 for logits above 6.8; such rows draw their argmax, rows
    that stay finite draw exactly as softmax(logits / T) always did."""
    logits = torch.tensor([[20.0, 30.0, 0.0, -10.0], [1.0, 2.0, 3.0, 2.5]])
    codes = _draw(logits.repeat(50, 1), 2e-38, torch.Generator().manual_seed(0))
    assert codes.tolist() == [1, 2] * 50
    logits = torch.randn(200, 13)
    for temperature in (1.0, 0.7, 1e-3):
        expected = torch.multinomial(
            torch.softmax(logits / temperature, dim=-1),
            1,
            generator=torch.Generator().manual_seed(2),
        ).squeeze(1)
        drawn = _draw(logits, temperature, torch.Generator().manual_seed(2))
        assert torch.equal(drawn, expected)


# ----------------------------------------------------------------------------------------------
# Top-k, top-p and per-level temperatures


def brute_force_kept(logits: list[float], temperature: float, top_k, top_p) -> set[int]:
    """The codes top-k then top-p keep, by hand in float64: ties with the last kept stay."""
    codes = set(range(len(logits)))
    if top_k is not None:
        kth = sorted(logits, reverse=True)[top_k - 1]
        codes = {c for c in codes if logits[c] >= kth}
    if top_p is not None:
        weights = {c: math.exp(logits[c] / temperature) for c in codes}
        probability = {c: w / sum(weights.values()) for c, w in weights.items()}
        total, least = 0.0, None
        for value in sorted(probability.values(), reverse=True):
            total, least = total + value, value
            if total >= top_p:
                break
        codes = {c for c in codes if probability[c] >= least}
    return codes


# Hand-made rows with ties at the k-th logit and at the nucleus's edge: probabilities
# 0.4, 0.2, 0.2, 0.1, 0.1 (in shuffled order) and logits 3, 1, 2, 2, 0, 2.
NUCLEUS_ROW = [math.log(v) for v in (0.1, 0.2, 0.4, 0.1, 0.2)]
TIED_ROW = [3.0, 1.0, 2.0, 2.0, 0.0, 2.0]
FILTER_CASES = [
    (TIED_ROW, 1.0, 1, None, {0}),
    (TIED_ROW, 1.0, 2, None, {0, 2, 3, 5}),  # three logits tie with the 2nd largest
    (TIED_ROW, 1.0, 5, None, {0, 1, 2, 3, 5}),
    (NUCLEUS_ROW, 1.0, None, 0.3, {2}),  # the top code alone holds 0.4
    (NUCLEUS_ROW, 1.0, None, 0.5, {1, 2, 4}),  # 0.4 + 0.2 reaches 0.5; the other 0.2 ties
    (NUCLEUS_ROW, 1.0, None, 0.85, {0, 1, 2, 3, 4}),
    # At T = 0.5 the probabilities square and renormalise: 0.615, 0.154, 0.154, 0.038, 0.038.
    (NUCLEUS_ROW, 0.5, None, 0.7, {1, 2, 4}),
    (NUCLEUS_ROW, 0.5, None, 0.6, {2}),
    (TIED_ROW, 1.0, 4, 0.7, {0, 2, 3, 5}),  # top-k first, then the nucleus of what is left
    (TIED_ROW, 1.0, 4, 0.5, {0, 2, 3, 5}),  # code 0 holds 0.48 of the four; the rest tie
    (TIED_ROW, 1.0, 5, 0.4, {0}),  # code 0 holds 0.45 of the five
]


@pytest.mark.parametrize("row, temperature, top_k, top_p, expected", FILTER_CASES)
def test_filtered_draws_stay_in_the_brute_force_top_k_and_nucleus(
    row, temperature, top_k, top_p, expected
):
    assert brute_force_kept(row, temperature, top_k, top_p) == expected  # the hand count
    logits = torch.tensor([row, row[::-1]]).repeat(2000, 1)  # (4000, K), also reversed
    controls = DrawControls(temperature, top_k, top_p)
    codes = _draw(logits, controls, torch.Generator().manual_seed(0))
    reversed_expected = {len(row) - 1 - c for c in expected}
    assert set(codes[0::2].tolist()) == expected  # every kept code drawn, no other
    assert set(codes[1::2].tolist()) == reversed_expected


def test_kept_codes_are_drawn_in_proportion_to_their_probability():
    """top-p 0.5 keeps 0.4, 0.2, 0.2: renormalised to 0.5, 0.25, 0.25."""
    logits = torch.tensor([NUCLEUS_ROW]).repeat(20000, 1)
    codes = _draw(logits, DrawControls(top_p=0.5), torch.Generator().manual_seed(1))
    frequencies = torch.bincount(codes, minlength=5).float() / len(codes)
    torch.testing.assert_close(
        frequencies, torch.tensor([0.0, 0.25, 0.5, 0.0, 0.25]), atol=0.01, rtol=0
    )


def test_top_k_of_all_codes_and_top_p_of_one_draw_exactly_as_temperature_alone():
    logits = torch.randn(300, 13) * 3
    for temperature in (1.0, 0.8):
        expected = torch.multinomial(
            torch.softmax(logits / temperature, dim=-1),
            1,
            generator=torch.Generator().manual_seed(4),
        ).squeeze(1)
        for controls in (
            temperature,
            DrawControls(temperature),
            DrawControls(temperature, top_k=13),
            DrawControls(temperature, top_p=1.0),
            DrawControls(temperature, top_k=13, top_p=1.0),
        ):
            drawn = _draw(logits, controls, torch.Generator().manual_seed(4))
            assert torch.equal(drawn, expected), controls
    # A real filter changes the draws of these flat-ish rows.
    filtered = _draw(logits, DrawControls(top_k=2), torch.Generator().manual_seed(4))
    assert not torch.equal(filtered, expected)


def teacher_forced_ranks(prior: PixelSNAIL, codes: torch.Tensor, labels, upper) -> torch.Tensor:
    """(B, H, W) rank of each code among its position's logits given the codes before it: the
    number of codes with a strictly larger logit (0 = the most likely, ties share a rank)."""
    with torch.no_grad():
        logits = prior(codes, labels, upper).logits  # (B, K, H, W)
    chosen = logits.gather(1, codes[:, None])  # (B, 1, H, W)
    return (logits > chosen).sum(dim=1)


@pytest.mark.parametrize(
    "controls",
    [DrawControls(top_k=2), DrawControls(0.7, top_k=3), DrawControls(top_p=0.5)],
    ids=str,
)
@pytest.mark.parametrize("changes", CACHE_CONFIGURATIONS[:3], ids=str)
def test_cached_and_reference_filtered_draws_agree_and_stay_in_the_top_codes(changes, controls):
    prior = cache_prior(**changes)
    labels, upper = cache_inputs(prior)
    draws = [
        sampler(prior, 3, labels, upper, controls, torch.Generator().manual_seed(5))
        for sampler in (sample_level_reference, sample_level_cached)
    ]
    assert torch.equal(draws[0], draws[1])
    ranks = teacher_forced_ranks(prior, draws[0], labels, upper)
    if controls.top_k is not None:
        assert int(ranks.max()) < controls.top_k
    unfiltered = sample_level_reference(
        prior, 3, labels, upper, 0.7, torch.Generator().manual_seed(5)
    )
    assert int(teacher_forced_ranks(prior, unfiltered, labels, upper).max()) >= 3  # not vacuous


def test_top_p_draws_stay_in_the_nucleus_of_the_teacher_forced_logits():
    prior = cache_prior()
    codes = sample_level_cached(
        prior, 4, temperature=DrawControls(top_p=0.6), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        logits = prior(codes).logits  # (4, K, H, W)
    rows = rearrange(logits, "b k h w -> (b h w) k")  # in the order of codes.flatten()
    nuclei = [brute_force_kept(row, 1.0, None, 0.6) for row in rows.tolist()]
    assert all(
        code in nucleus for code, nucleus in zip(codes.flatten().tolist(), nuclei, strict=True)
    )
    assert sum(len(nucleus) for nucleus in nuclei) < 0.6 * 7 * len(nuclei)  # not vacuous


def test_per_level_temperatures_reach_their_levels():
    """(0.5, 1.3) draws the top level at 0.5 and the bottom at 1.3, by hand and in both samplers."""
    vqvae = VQVAE2(tiny_config()).eval()
    priors = priors_for(vqvae, num_classes=0)
    controls = (DrawControls(0.5, top_k=4), DrawControls(1.3, top_p=0.9))
    generator = torch.Generator().manual_seed(1)
    top = sample_level_reference(priors[0], 8, None, None, controls[0], generator)
    bottom = sample_level_reference(priors[1], 8, None, [top], controls[1], generator)
    for sampler in ("reference", "cached"):
        codes = sample_codes(priors, 8, None, controls, torch.Generator().manual_seed(1), sampler)
        assert torch.equal(codes[0], top) and torch.equal(codes[1], bottom)
    plain = sample_codes(priors, 8, None, (0.5, 1.3), torch.Generator().manual_seed(1))
    swapped = sample_codes(priors, 8, None, (1.3, 0.5), torch.Generator().manual_seed(1))
    by_hand = sample_level_cached(priors[0], 8, None, None, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(plain[0], by_hand) and not torch.equal(swapped[0], by_hand)
    # One item in a sequence is for every level, like the bare value.
    once = sample_codes(priors, 8, None, [0.5], torch.Generator().manual_seed(1))
    bare = sample_codes(priors, 8, None, 0.5, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(once, bare, strict=True))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DrawControls(top_k=0), "top_k must be an integer >= 1, got 0"),
        (lambda: DrawControls(top_k=2.5), "top_k must be an integer >= 1, got 2.5"),
        (lambda: DrawControls(top_p=0.0), "top_p must lie in (0, 1], got 0.0"),
        (lambda: DrawControls(top_p=1.5), "top_p must lie in (0, 1], got 1.5"),
        (lambda: DrawControls(top_p=float("nan")), "top_p must lie in (0, 1], got nan"),
        (lambda: DrawControls(0.0), "temperature must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_draw_controls_give_one_line(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value) == message


def test_controls_that_do_not_fit_the_priors_give_one_line():
    vqvae = VQVAE2(tiny_config()).eval()
    priors = priors_for(vqvae, num_classes=0)
    cases = [
        (DrawControls(top_k=14), "top_k 14 is more than the prior's 13 codes"),
        ((1.0, DrawControls(top_k=20)), "top_k 20 is more than the prior's 13 codes"),
        ((1.0, 0.9, 0.8), "give one temperature for every level or one per level (2), got 3"),
        ((), "give one temperature for every level or one per level (2), got 0"),
        ((1.0, -2.0), "temperature must be a finite number > 0, got -2.0"),
    ]
    for controls, message in cases:
        with pytest.raises(ValueError) as error:
            sample_codes(priors, 2, None, controls)
        assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        sample_level_cached(priors[0], 2, temperature=DrawControls(top_k=14))
    assert str(error.value) == "top_k 14 is more than the prior's 13 codes"


def test_requested_labels_give_every_class_its_share():
    """Each of k classes gets count // k samples or one more (the first count % k classes)."""
    assert requested_labels([1, 2, 3], 4, 5).tolist() == [1, 1, 2, 3]
    assert requested_labels([4, 0], 5, 5).tolist() == [4, 4, 4, 0, 0]  # the order given
    assert requested_labels([1, 2, 3], 2, 5).tolist() == [1, 2]  # fewer samples than classes
    labels = requested_labels(None, 1001, 1000)
    counts = torch.bincount(labels, minlength=1000)
    assert len(labels) == 1001 and int(counts[0]) == 2 and bool((counts[1:] == 1).all())
    assert torch.equal(labels, torch.sort(labels).values)  # in blocks, class 0 first
    with pytest.raises(ValueError, match="class 7 is out of range"):
        requested_labels([1, 7], 4, 5)


# ----------------------------------------------------------------------------------------------
# Rejection sampling holds the kept samples and one batch


def image_storages(image_shape: tuple[int, ...]) -> dict[int, int]:
    """Bytes of every live tensor storage shaped like a batch of images (N, *image_shape), by
    the storage's address."""
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and tuple(obj.shape[1:]) == image_shape:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return storages


@pytest.fixture
def watched_generate(monkeypatch):
    """``generate`` as rejection sampling calls it, recording the image bytes held once it made
    a batch (anything held before is still held then): the largest in ``peak[0]``. Storages
    alive before the test (other tests' tensors in this process) are not counted."""
    image_shape = (1, 16, 16)
    gc.collect()
    before = set(image_storages(image_shape))
    peak = [0]

    def watched(*args, **kwargs):
        result = generate(*args, **kwargs)
        held = image_storages(image_shape)
        peak[0] = max(peak[0], sum(size for ptr, size in held.items() if ptr not in before))
        return result

    monkeypatch.setattr(vqvae2.sampling, "generate", watched)
    return peak


def rejection_models():
    vqvae = VQVAE2(tiny_config()).eval()  # 16x16 grey, K = 13
    classifier = Classifier(
        ClassifierConfig(image_size=16, in_channels=1, num_classes=3, stage_channels=(4,))
    ).eval()
    return vqvae, priors_for(vqvae), classifier


def test_rejection_holds_the_kept_samples_and_one_batch_and_keeps_the_best(watched_generate):
    vqvae, priors, classifier = rejection_models()
    labels = torch.tensor([1, 0, 1, 0])  # N = 4; 8 candidates a class at 75% rejection
    output = generate_with_rejection(
        vqvae,
        priors,
        classifier,
        labels,
        reject_fraction=0.75,
        max_candidates=16,
        batch_size=3,
        generator=torch.Generator().manual_seed(4),
    )
    image = 16 * 16 * 4  # bytes of one float32 image
    assert output.candidates == 16
    assert 0 < watched_generate[0] <= (4 + 3) * image  # 16 drawn, 4 kept + one batch of 3 held
    # The same 16 candidates drawn and scored by hand, in batches of 3 from the same generator.
    candidate_labels = torch.tensor([0] * 8 + [1] * 8)
    generator = torch.Generator().manual_seed(4)
    batches = [
        generate(vqvae, priors, len(chunk), chunk, generator=generator)[0]
        for chunk in candidate_labels.split(3)
    ]
    scores = torch.cat(
        [
            requested_class_scores(classifier, batch, chunk, 3)
            for batch, chunk in zip(batches, candidate_labels.split(3), strict=True)
        ]
    )
    kept = keep_top_per_class(scores, candidate_labels, {0: 2, 1: 2})  # ascending: 0s then 1s
    expected = kept[[2, 0, 3, 1]]  # in the order the labels were requested
    assert torch.equal(output.images, torch.cat(batches)[expected])
    assert torch.equal(output.scores, scores[expected])


def test_rejection_counts_take_the_fraction_as_the_decimal_written():
    """In floats, (1 - 0.41) * 100 = 59.00000000000001 kept 60 of 100 and 21 / (1 - 0.3) =
    30.000000000000004 drew 31 candidates for 21 samples."""
    scores = torch.arange(100, dtype=torch.float32)
    for fraction in (0.41, np.float64(0.41), np.float32(0.41)):  # NumPy numbers as Python's
        kept = reject_fraction_per_class(scores, torch.zeros(100, dtype=torch.long), fraction)
        assert torch.equal(kept, torch.arange(41, 100)), fraction  # the best 59
    vqvae, priors, classifier = rejection_models()
    output = generate_with_rejection(
        vqvae,
        priors,
        classifier,
        torch.zeros(21, dtype=torch.long),
        reject_fraction=0.3,
        max_candidates=30,  # the old count, 31, was refused here
        batch_size=16,
        generator=torch.Generator().manual_seed(5),
    )
    assert output.candidates == 30 and len(output.images) == 21


def test_rejection_draws_its_candidates_under_the_controls_given():
    """Per-level controls reach the candidates: with no rejection they are generate's samples."""
    vqvae, priors, classifier = rejection_models()
    labels = torch.tensor([0, 1, 2, 1])
    controls = (DrawControls(0.8, top_k=3), DrawControls(top_p=0.5))
    output = generate_with_rejection(
        vqvae,
        priors,
        classifier,
        labels,
        reject_fraction=0.0,
        max_candidates=4,
        batch_size=4,
        temperature=controls,
        generator=torch.Generator().manual_seed(6),
    )
    by_label = torch.tensor([0, 1, 1, 2])  # the candidates are drawn class by class
    expected, _ = generate(vqvae, priors, 4, by_label, controls, torch.Generator().manual_seed(6))
    plain, _ = generate(vqvae, priors, 4, by_label, 1.0, torch.Generator().manual_seed(6))
    assert torch.equal(output.images, expected[[0, 1, 3, 2]])
    assert not torch.equal(expected, plain)


def test_threshold_rejection_holds_the_kept_samples_and_one_batch(watched_generate):
    vqvae, priors, classifier = rejection_models()
    threshold = half_accepting_threshold(
        vqvae, priors, classifier, 30, 30, generator=torch.Generator().manual_seed(1)
    )
    watched_generate[0] = 0
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    output = generate_with_rejection(
        vqvae,
        priors,
        classifier,
        labels,
        accept_threshold=threshold,
        max_candidates=200,
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert output.candidates > 6  # some were rejected
    assert bool((output.scores >= threshold).all()) and output.labels.tolist() == labels.tolist()
    assert 0 < watched_generate[0] <= (6 + 4) * 16 * 16 * 4
