"""The measurement behind the cached sampler's agreement figure (bench/bench_sampler_agreement.py).

The figure is only as good as three facts: ``torch.multinomial`` draws one sample as an
exponential race (so the divergence formula is the right one), the formula gives the chance
that two probability vectors' draws part from one generator state, and the bench's teacher
forcing reproduces what each sampler computes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from vqvae2.model_configs import PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.sampling import sample_level_cached

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_sampler_agreement.py"
_spec = importlib.util.spec_from_file_location("bench_sampler_agreement", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_multinomial_draws_one_sample_as_an_exponential_race():
    """One sample is argmax_k p_k / E_k with E ~ Exp(1), K draws per row whatever p holds."""
    probabilities = torch.softmax(
        torch.randn(6, 37, generator=torch.Generator().manual_seed(1)), -1
    )
    drawing, racing = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drawn = torch.multinomial(probabilities, 1, generator=drawing)[:, 0]
    race = torch.empty_like(probabilities).exponential_(1, generator=racing)
    assert torch.equal(drawn, (probabilities / race).argmax(-1))
    assert torch.equal(drawing.get_state(), racing.get_state())
    peaked = torch.zeros(6, 37)
    peaked[:, 3] = 1
    other = torch.Generator().manual_seed(5)
    assert torch.equal(torch.multinomial(peaked, 1, generator=other)[:, 0], torch.full((6,), 3))
    assert torch.equal(other.get_state(), drawing.get_state())  # same generator use


def test_divergence_is_zero_for_identical_probabilities():
    probabilities = torch.softmax(
        torch.randn(40, 512, generator=torch.Generator().manual_seed(2)), -1
    )
    race = bench.multinomial_divergence(probabilities, probabilities.clone())
    assert race.dtype == torch.float64 and race.shape == (40,)
    assert float(race.abs().max()) < 1e-12
    assert float(bench.inverse_cdf_divergence(probabilities, probabilities).abs().max()) == 0.0


def test_divergence_of_hand_made_pairs():
    a = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    b = torch.tensor([[0.3, 0.5, 0.2], [0.5, 0.5, 0.0]])
    # Row 0: same code with 1/(1 + 5/3 + 2/3) + 1/(5/3 + 1 + 2/3) + 1/(5/2 + 5/2 + 1) = 23/30.
    # Row 1: a always draws 0, b draws 0 with 1/2 (codes a or b never draws count for nothing).
    race = bench.multinomial_divergence(a, b)
    torch.testing.assert_close(race, torch.tensor([7 / 30, 0.5], dtype=torch.float64))
    # Inverse CDF: CDFs (0.5, 0.8, 1) and (0.3, 0.8, 1), then (1, 1, 1) and (0.5, 1, 1).
    inverse = bench.inverse_cdf_divergence(a, b)
    torch.testing.assert_close(inverse, torch.tensor([0.2, 0.5], dtype=torch.float64))


def test_divergence_matches_multinomial_draws_from_one_generator_state():
    """The formula against the frequency of differing draws from equal generator states."""
    logits = torch.randn(16, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(16, generator=torch.Generator().manual_seed(4))
    a, b = torch.softmax(logits, -1), torch.softmax(logits + 0.2 * noise, -1)
    expected = float(bench.multinomial_divergence(a[None], b[None]))
    draws = 200_000
    first, second = (
        torch.multinomial(p.expand(draws, -1), 1, generator=torch.Generator().manual_seed(9))
        for p in (a, b)
    )
    observed = float((first != second).double().mean())
    sigma = (expected * (1 - expected) / draws) ** 0.5
    assert 0.02 < expected < 0.5  # a pair that parts often enough to measure
    assert abs(observed - expected) < 4 * sigma
    # Far from the inverse-CDF coupling's figure for this pair: the formula is the race's own.
    assert abs(float(bench.inverse_cdf_divergence(a[None], b[None])) - expected) > 10 * sigma


def tiny_prior() -> PixelSNAIL:
    torch.manual_seed(0)
    config = PixelSNAILConfig(
        code_size=4,
        codebook_size=13,
        hidden_channels=16,
        residual_channels=12,
        num_layers=3,
        attention_layers=1,
        attention_heads=2,
        kernel_size=5,
        dropout=0.0,
        output_stack_layers=1,
        condition_sizes=(2,),
        condition_res_blocks=1,
        condition_channels=8,
        num_classes=3,
    )
    return PixelSNAIL(config).eval()


def test_teacher_forcing_reproduces_both_samplers():
    prior = tiny_prior()
    labels = torch.tensor([0, 2, 1])
    upper = [torch.randint(0, 13, (3, 2, 2), generator=torch.Generator().manual_seed(6))]
    codes, cached, reference = bench.teacher_forced_logits(
        prior, labels, upper, 1.0, torch.Generator().manual_seed(7)
    )
    sampled = sample_level_cached(prior, 3, labels, upper, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(codes, sampled)  # the cached sampler's own draws
    assert cached.shape == reference.shape == (3, 13, 4, 4)
    with torch.no_grad():  # the reference sampler's logits: the map filled up to each position
        condition = prior.condition(labels, upper)
        for position in range(16):
            row, column = divmod(position, 4)
            prefix = codes.flatten(1).clone()
            prefix[:, position:] = 0
            step = prior.logits(prefix.view(3, 4, 4), condition)[:, :, row, column]
            assert torch.equal(step, reference[:, :, row, column])
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
    figures = bench.agreement(cached, reference, 1.0, side=4)
    assert figures["positions_per_map"] == 16
    assert figures["max_abs_logit_difference"] == float((cached - reference).abs().max())
    assert 0 <= figures["multinomial_per_position_mean"] <= figures["multinomial_per_position_max"]
    assert figures["multinomial_per_position_max"] < 1e-4


def test_teacher_forcing_of_the_first_rows_scales_to_the_map():
    prior = tiny_prior()
    labels = torch.tensor([1, 0])
    upper = [torch.randint(0, 13, (2, 2, 2), generator=torch.Generator().manual_seed(6))]
    _, cached, reference = bench.teacher_forced_logits(
        prior, labels, upper, 1.0, torch.Generator().manual_seed(7), rows=2
    )
    assert cached.shape == reference.shape == (2, 13, 2, 4)
    # A hand-made gap: one logit 0.1 apart at one of the 8 measured positions of each map.
    shifted = reference.clone()
    shifted[:, 5, 1, 2] += 0.1
    figures = bench.agreement(shifted, reference, 1.0, side=4)
    a = torch.softmax(reference[:, :, 1, 2], -1)
    b = torch.softmax(shifted[:, :, 1, 2], -1)
    per_map = bench.multinomial_divergence(a, b)  # (2,), the other positions ~0
    assert figures["positions_measured_per_map"] == 8 and figures["positions_per_map"] == 16
    torch.testing.assert_close(
        figures["multinomial_expected_per_map"], float(per_map.mean()) * 2, rtol=1e-3, atol=1e-6
    )
    assert abs(figures["max_abs_logit_difference"] - 0.1) < 1e-4
