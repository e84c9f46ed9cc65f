"""Properties of the EMA vector quantizer (VQ-VAE eq. 1, VQ-VAE-2 Section 2.1)."""

from __future__ import annotations

import pytest
import torch

from vqvae2.quantize import DISTINCT_TOLERANCE, VectorQuantizerEMA, rotate_to_codes


def make_quantizer(codebook_size=13, dim=6, decay=0.99, dead_after=0, **kwargs):
    return VectorQuantizerEMA(
        codebook_size=codebook_size,
        embedding_dim=dim,
        commitment_weight=0.25,
        decay=decay,
        epsilon=1e-5,
        dead_code_after_steps=dead_after,
        **kwargs,
    )


def test_nearest_code_matches_brute_force():
    quantizer = make_quantizer().eval()
    inputs = torch.randn(3, 6, 5, 7)
    output = quantizer(inputs)
    vectors = inputs.permute(0, 2, 3, 1).reshape(-1, 6)  # (N, D)
    brute = torch.stack(
        [
            ((vectors[i][None, :] - quantizer.codebook) ** 2).sum(1).argmin()
            for i in range(len(vectors))
        ]
    )
    assert output.codes.shape == (3, 5, 7)
    assert torch.equal(output.codes.flatten(), brute)
    expected = quantizer.codebook[brute].reshape(3, 5, 7, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(output.quantized, expected, rtol=0, atol=1e-6)


def test_one_ema_update_equals_hand_computation():
    quantizer = make_quantizer(codebook_size=2, dim=1, decay=0.9).train()
    quantizer.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    quantizer.embed_sum.copy_(quantizer.codebook)
    quantizer.initialized.fill_(True)
    # Three vectors near code 0 (1, 2, 3) and one near code 1 (8).
    inputs = torch.tensor([1.0, 2.0, 3.0, 8.0]).view(1, 1, 1, 4)
    quantizer(inputs)
    # N = 0.9 * 1 + 0.1 * n  ->  [0.9 + 0.3, 0.9 + 0.1] = [1.2, 1.0]
    # m = 0.9 * e + 0.1 * sum  ->  [0 + 0.6, 9 + 0.8] = [0.6, 9.8]
    # Laplace: N~ = (N + eps) / (total + K eps) * total, total = 2.2
    eps, total = 1e-5, 2.2
    smoothed = [(n + eps) / (total + 2 * eps) * total for n in (1.2, 1.0)]
    expected = torch.tensor([[0.6 / smoothed[0]], [9.8 / smoothed[1]]])
    torch.testing.assert_close(quantizer.cluster_size, torch.tensor([1.2, 1.0]))
    torch.testing.assert_close(quantizer.embed_sum, torch.tensor([[0.6], [9.8]]))
    torch.testing.assert_close(quantizer.codebook, expected)


def test_ema_moves_codebook_in_train_mode_only():
    quantizer = make_quantizer()
    inputs = torch.randn(2, 6, 4, 4)
    quantizer.train()
    quantizer(inputs)  # first call seeds the codebook from the data
    before = quantizer.codebook.clone()
    quantizer(torch.randn(2, 6, 4, 4))
    assert not torch.equal(before, quantizer.codebook)

    quantizer.eval()
    frozen = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    quantizer(torch.randn(2, 6, 4, 4))
    for name, buffer in quantizer.named_buffers():
        assert torch.equal(frozen[name], buffer), name


def test_straight_through_gradient_is_identity():
    quantizer = make_quantizer().eval()
    inputs = torch.randn(2, 6, 3, 3, requires_grad=True)
    weights = torch.randn(2, 6, 3, 3)
    output = quantizer(inputs)
    (output.quantized * weights).sum().backward()
    torch.testing.assert_close(inputs.grad, weights)


def rotation_gradient_by_matrices(inputs, codes, upstream):
    """lambda * R^T g per vector, R built as an explicit D x D matrix (Fifty et al. 2024, eq. 4)."""
    vectors_e = inputs.permute(0, 2, 3, 1).reshape(-1, inputs.shape[1]).double()  # (N, D)
    vectors_q = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).double()
    vectors_g = upstream.permute(0, 2, 3, 1).reshape(-1, upstream.shape[1]).double()
    rows = []
    for e, q, g in zip(vectors_e, vectors_q, vectors_g, strict=True):
        e_hat, q_hat = e / e.norm(), q / q.norm()
        r = (e_hat + q_hat) / (e_hat + q_hat).norm()
        rotation = torch.eye(len(e), dtype=torch.float64) - 2 * torch.outer(r, r)
        rotation += 2 * torch.outer(q_hat, e_hat)
        torch.testing.assert_close(rotation @ e_hat, q_hat)  # R turns e's direction into q's
        rows.append(q.norm() / e.norm() * rotation.T @ g)
    batch, dim, height, width = inputs.shape
    return torch.stack(rows).view(batch, height, width, dim).permute(0, 3, 1, 2).float()


def test_rotation_trick_returns_codes_and_rotates_the_gradient():
    inputs = torch.randn(2, 5, 3, 3, requires_grad=True)
    codes = torch.randn(2, 5, 3, 3)
    upstream = torch.randn(2, 5, 3, 3)
    output = rotate_to_codes(inputs, codes)
    torch.testing.assert_close(output, codes)
    (output * upstream).sum().backward()
    expected = rotation_gradient_by_matrices(inputs.detach(), codes, upstream)
    torch.testing.assert_close(inputs.grad, expected, rtol=1e-4, atol=1e-5)
    # Rotation keeps lengths: each vector's gradient norm is ||g|| * ||q|| / ||e||.
    ratio = codes.norm(dim=1) / inputs.detach().norm(dim=1)
    torch.testing.assert_close(inputs.grad.norm(dim=1), upstream.norm(dim=1) * ratio)


def test_rotation_trick_handles_opposite_and_equal_directions():
    inputs = torch.tensor([1.0, 2.0, -2.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    codes = torch.cat([-3 * inputs[..., :1], 0.5 * inputs[..., 1:]], dim=3)  # opposite, same
    inputs.requires_grad_(True)
    upstream = torch.tensor([0.3, -1.0, 0.7]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    output = rotate_to_codes(inputs, codes)
    torch.testing.assert_close(output, codes)
    (output * upstream).sum().backward()
    assert torch.isfinite(inputs.grad).all()
    # Same direction: R = I, so the gradient is the upstream one scaled by ||q|| / ||e|| = 0.5.
    torch.testing.assert_close(inputs.grad[..., 1], 0.5 * upstream[..., 1])


def test_quantizer_with_rotation_trick():
    straight = make_quantizer().eval()
    rotation = make_quantizer(gradient_estimator="rotation").eval()
    rotation.load_state_dict(straight.state_dict())
    inputs = torch.randn(2, 6, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 6, 3, 3)
    output = rotation(inputs)
    expected = straight(inputs.detach())
    assert torch.equal(output.codes, expected.codes)
    torch.testing.assert_close(output.quantized, expected.quantized)
    torch.testing.assert_close(output.commitment_loss, expected.commitment_loss)
    (output.quantized * upstream).sum().backward()
    snapped = rotation.lookup(output.codes)
    want = rotation_gradient_by_matrices(inputs.detach(), snapped, upstream)
    torch.testing.assert_close(inputs.grad, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(inputs.grad, upstream)  # not the straight-through gradient
    with torch.no_grad():  # without gradients the output is the code vectors to the bit
        assert torch.equal(straight(inputs).quantized, snapped)
        assert torch.equal(rotation(inputs).quantized, snapped)


def test_unknown_gradient_estimator_is_refused():
    with pytest.raises(ValueError, match="gradient_estimator must be one of"):
        make_quantizer(gradient_estimator="gumbel")


def test_deferred_updates_move_the_codebook_as_one_whole_batch():
    torch.manual_seed(3)
    whole = make_quantizer(dead_after=1).train()
    whole.initialized.fill_(True)  # random codebook, so that some codes go unused
    split = make_quantizer().train()
    split.load_state_dict(whole.state_dict())
    split.dead_code_after_steps = 1
    inputs = torch.randn(4, 6, 3, 3) * 3
    expected = whole(inputs)
    before = split.codebook.clone()
    with split.deferred_updates():
        outputs = [split(inputs[:2]), split(inputs[2:])]
        assert torch.equal(split.codebook, before)  # held still while the batches pass
    assert torch.equal(torch.cat([o.codes for o in outputs]), expected.codes)
    # Codes this batch left unused were re-seeded with its inputs (dead after one step).
    unused = torch.ones(13, dtype=torch.bool)
    unused[expected.codes.flatten()] = False
    vectors = inputs.permute(0, 2, 3, 1).reshape(-1, 6)
    assert unused.any()
    assert all((vectors == whole.codebook[code]).all(1).any() for code in unused.nonzero())
    for name, buffer in whole.named_buffers():
        torch.testing.assert_close(dict(split.named_buffers())[name], buffer, msg=name)


def test_deferred_updates_drop_their_statistics_on_error():
    quantizer = make_quantizer().train()
    quantizer(torch.randn(2, 6, 3, 3))  # seeds the codebook
    before = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    with pytest.raises(KeyError), quantizer.deferred_updates():
        quantizer(torch.randn(2, 6, 3, 3))
        raise KeyError("interrupted")
    for name, buffer in quantizer.named_buffers():
        assert torch.equal(buffer, before[name]), name
    nested = (quantizer.deferred_updates(), quantizer.deferred_updates())
    with pytest.raises(RuntimeError, match="already active"), nested[0], nested[1]:
        pass
    quantizer(torch.randn(2, 6, 3, 3))  # immediate updates again afterwards
    assert not torch.equal(quantizer.codebook, before["codebook"])


def test_commitment_loss_is_beta_times_mse_to_codes():
    quantizer = make_quantizer().eval()
    inputs = torch.randn(2, 6, 3, 3, requires_grad=True)
    output = quantizer(inputs)
    snapped = quantizer.lookup(output.codes)
    expected = 0.25 * ((inputs - snapped) ** 2).mean()
    torch.testing.assert_close(output.commitment_loss, expected)
    output.commitment_loss.backward()
    torch.testing.assert_close(inputs.grad, 0.25 * 2 * (inputs - snapped).detach() / inputs.numel())


def test_first_training_batch_seeds_the_codebook():
    quantizer = make_quantizer(codebook_size=4, dim=2, decay=0.0).train()
    inputs = torch.arange(16.0).view(1, 2, 2, 4)  # 8 vectors (x, x + 8), x = 0 ... 7
    output = quantizer(inputs)
    # Seed 0's random choice of rows: 4, 0, 7, 3, i.e. codes (4, 12), (0, 8), (7, 15), (3, 11).
    # Each code is nearest to two of the 8 vectors; decay 0 then makes it their mean (counts of
    # 2 out of 8 come through the Laplace smoothing unchanged).
    assert bool(quantizer.initialized)
    assert output.codes.flatten().tolist() == [1, 1, 3, 3, 0, 0, 2, 2]
    assert quantizer.cluster_size.tolist() == [2.0, 2.0, 2.0, 2.0]
    expected = torch.tensor([[4.5, 12.5], [0.5, 8.5], [6.5, 14.5], [2.5, 10.5]])
    torch.testing.assert_close(quantizer.codebook, expected)


def test_codebook_seeds_are_a_seeded_random_choice_over_the_whole_map():
    """At paper shapes (N = K x W rows) evenly spaced rows k*N//K all lie in column 0 of the
    latent map, the zero-padded edge; the seeds must come from across the map instead."""
    width = 8
    vectors = torch.randn(2 * 4 * width, 6)  # a (2, 6, 4, 8) batch flattened: 64 rows, K = 16
    columns = torch.arange(width).repeat(2 * 4)  # map column of each row: k * 64 // 16 is 0 or 4

    def seed_rows(**seed) -> list[int]:
        quantizer = make_quantizer(codebook_size=16, **seed).train()
        quantizer._initialize_from(vectors)  # what the first training batch does first
        return [int(torch.nonzero((vectors == code).all(1))[0]) for code in quantizer.codebook]

    rows = seed_rows()
    assert len(set(rows)) == 16  # 16 distinct inputs, none picked twice
    assert len({int(columns[row]) for row in rows}) >= 5  # not the columns 0 and 4 alone
    assert seed_rows(seed=0) == rows  # the default seed is 0, and a seed repeats its picks
    assert seed_rows(seed=1) != rows


def pairwise_distances(rows: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances in float64, the diagonal set to infinity."""
    distances = torch.cdist(rows.double(), rows.double())
    return distances.fill_diagonal_(float("inf"))


def test_codebook_seeds_are_distinct_vectors_of_the_batch():
    """A first batch of 256 rows holding 40 distinct vectors (one of them 200 times over, like
    the outputs of a padded border; the others near it but 1e-3 apart): 32 codes all seeded
    from different vectors. With 10 distinct vectors, 10 codes are seeded from them and the
    other 6 keep their random initial vectors."""
    generator = torch.Generator().manual_seed(3)
    border = torch.randn(1, 6, generator=generator)
    others = border + 1e-3 * torch.randn(39, 6, generator=generator)
    rows = torch.cat([border.expand(217, 6), others])[torch.randperm(256, generator=generator)]
    quantizer = make_quantizer(codebook_size=32).train()
    quantizer._initialize_from(rows)
    gaps = pairwise_distances(quantizer.codebook)
    data_gap = float(pairwise_distances(torch.cat([border, others])).min())  # the data's own
    assert data_gap > DISTINCT_TOLERANCE * float(rows.pow(2).sum(1).mean().sqrt())
    assert float(gaps.min()) >= data_gap  # no two codes closer than two distinct vectors
    assert all(bool((rows == code).all(1).any()) for code in quantizer.codebook)

    few = torch.randn(10, 6, generator=generator).repeat(6, 1)  # (60, 6), 10 distinct rows
    quantizer = make_quantizer(codebook_size=16).train()
    initial = quantizer.codebook.clone()
    quantizer._initialize_from(few)
    from_data = [bool((few == code).all(1).any()) for code in quantizer.codebook]
    assert sum(from_data) == 10 and all(from_data[:10])
    assert torch.equal(quantizer.codebook[10:], initial[10:])
    assert float(pairwise_distances(quantizer.codebook).min()) > 0.1


def test_nearest_code_is_exact_for_inputs_far_from_the_origin():
    """Inputs and codes 1000 away from the origin, about 1 apart from each other: the matrix
    product that expands ||x - e||^2 rounds at about 0.1 there, more than many gaps between
    the two nearest codes; the choice must still be the float64 brute-force nearest code."""
    generator = torch.Generator().manual_seed(0)
    offset = 1000 * torch.nn.functional.normalize(torch.randn(6, generator=generator), dim=0)
    quantizer = make_quantizer().eval()
    quantizer.codebook.copy_(offset + torch.randn(13, 6, generator=generator))
    inputs = offset + torch.randn(2000, 6, generator=generator)  # (N, D)
    codes, distances = quantizer.nearest_codes(inputs)
    exact = torch.cdist(inputs.double(), quantizer.codebook.double()).pow(2)  # (N, K)
    expected = exact.argmin(1)
    assert int((codes != expected).sum()) == 0
    torch.testing.assert_close(distances.double(), exact.min(1).values, rtol=1e-5, atol=1e-6)


def test_dead_codes_are_restarted_from_worst_served_inputs():
    quantizer = make_quantizer(codebook_size=3, dim=1, decay=0.5, dead_after=2).train()
    quantizer.codebook.copy_(torch.tensor([[0.0], [1.0], [100.0]]))
    quantizer.embed_sum.copy_(quantizer.codebook)
    quantizer.initialized.fill_(True)
    inputs = torch.tensor([0.0, 1.0, 5.0]).view(1, 1, 1, 3)  # code 2 (at 100) is never used
    quantizer(inputs)
    assert int(quantizer.steps_unused[2]) == 1
    assert float(quantizer.codebook[2]) > 50  # not yet dead
    quantizer(inputs)
    # Dead after 2 unused steps: re-seeded with 5.0, the input farthest from its code.
    assert float(quantizer.codebook[2]) == 5.0
    assert int(quantizer.steps_unused[2]) == 0
    output = quantizer.eval()(inputs)
    assert int(output.codes.flatten()[2]) == 2  # the restarted code now serves 5.0


def test_reduce_fn_receives_the_batch_statistics():
    seen = []

    def record(tensor):
        seen.append(tensor.clone())
        return tensor

    quantizer = make_quantizer(codebook_size=5, dim=3, reduce_fn=record).train()
    quantizer.initialized.fill_(True)
    inputs = torch.randn(2, 3, 4, 4)
    output = quantizer(inputs)
    # One EMA step reduces the batch's code counts (K,) and its per-code sums (K, D).
    codes = output.codes.flatten()
    vectors = inputs.permute(0, 2, 3, 1).reshape(-1, 3)
    counts = torch.bincount(codes, minlength=5).float()
    sums = torch.stack([vectors[codes == code].sum(0) for code in range(5)])
    assert len(seen) == 2
    assert torch.equal(seen[0], counts)
    torch.testing.assert_close(seen[1], sums)


def test_perplexity_and_usage():
    quantizer = make_quantizer(codebook_size=4, dim=1).eval()
    quantizer.codebook.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    inputs = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 1, 4)
    output = quantizer(inputs)
    torch.testing.assert_close(output.perplexity, torch.tensor(2.0))
    assert float(output.usage) == 0.5
