"""Vector quantizer with exponential-moving-average codebook updates.

VQ-VAE (van den Oord et al. 2017, eq. 1 and Appendix A.1) as used by VQ-VAE-2 (Razavi et al.
2019, Section 2.1): each encoder vector snaps to its nearest codebook vector, the codebook follows
an EMA of the vectors assigned to it (decay gamma = 0.99, Laplace-smoothed counts), the encoder is
pulled towards its code by the commitment loss beta * ||sg[e] - E(x)||^2, and gradients pass the
quantization straight through. As an option the encoder's gradient instead goes through the
rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick").

Two additions fight codebook collapse, the most common failure of public VQ-VAE code:
  * data initialisation: the first training batch seeds the codebook with a seeded random
    choice of its distinct encoder outputs (no two codes start as twins);
  * dead-code restart: a code unused for ``dead_code_after_steps`` training steps is re-seeded
    with the encoder output that is currently worst served (farthest from its nearest code).
Both are deterministic and see the encoder outputs of every process (through ``gather_fn``), so
each process of a data-parallel run makes the same choice a single process would make on the
global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

ReduceFn = Callable[[Tensor], Tensor]  # sums a tensor over processes
GatherFn = Callable[[Tensor], Tensor]  # concatenates (N, ...) tensors over processes, rank order


def identity_reduce(tensor: Tensor) -> Tensor:
    """Default reduce and gather function: a single process has nothing to combine with."""
    return tensor


GRADIENT_ESTIMATORS = ("straight_through", "rotation")
# Rows closer than this fraction of the batch's RMS norm count as one vector when seeding codes:
# float32 rounding leaves twins about 1e-7 of it apart, while the distinct encoder outputs of a
# fashion-mnist-32 first batch lie at least 6e-4 of it apart (measured).
DISTINCT_TOLERANCE = 1e-5
# Codes per input whose distances are computed from differences (see ``nearest_codes``): more
# than the two of a near-tie, for the rare near-tie of three.
SHORTLIST = 4


def distinct_rows(rows: Tensor, count: int, tolerance: float) -> Tensor:
    """The first ``count`` rows of ``rows`` farther than ``tolerance`` from every earlier row.

    Rows are examined in blocks of ``count``; a row is kept when no earlier row of its block and
    no row kept before it lies within ``tolerance`` (Euclidean, computed from differences so
    that rounding cannot make twins look apart). Deterministic: equal inputs give equal picks.

    Args:
        rows: (N, D) float, in the order of preference.
        count: how many rows are wanted at most.
        tolerance: distances up to this count as the same vector.

    Returns:
        (n, D) with n <= ``count``; n < ``count`` only when ``rows`` hold fewer distinct vectors.
    """
    kept = rows[:0]  # (0, D)
    for start in range(0, rows.shape[0], count):
        block = rows[start : start + count]  # (b, D)
        within = torch.cdist(block, block, compute_mode="donot_use_mm_for_euclid_dist")  # (b, b)
        fresh = ~(within <= tolerance).tril(-1).any(1)  # no earlier row of the block is near
        if kept.shape[0] > 0:
            to_kept = torch.cdist(block, kept, compute_mode="donot_use_mm_for_euclid_dist")
            fresh &= to_kept.min(1).values > tolerance  # (b,)
        kept = torch.cat([kept, block[fresh]])
        if kept.shape[0] >= count:
            break
    return kept[:count]


def rotate_to_codes(inputs: Tensor, codes: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick: code vectors in the forward pass, a rotated gradient backwards.

    Each encoder vector e maps onto its code vector q as ``lambda * R e`` where R is the rotation
    (in the plane of e and q) that turns e's direction into q's and lambda = ||q|| / ||e||; both
    are treated as constants, so the output equals q (up to rounding) while the gradient reaching
    e is ``lambda * R^T`` times the gradient at q. With r = (e_hat + q_hat) / ||e_hat + q_hat||,
    R = I - 2 r r^T + 2 q_hat e_hat^T, applied here without forming the D x D matrix.

    Args:
        inputs: (B, D, H, W) encoder outputs e (carrying gradients).
        codes: (B, D, H, W) their code vectors q (no gradient needed).

    Returns:
        (B, D, H, W) tensor equal to ``codes`` whose gradient flows to ``inputs``.
    """
    inputs_norm = inputs.detach().norm(dim=1, keepdim=True).clamp_min(eps)  # (B, 1, H, W)
    codes = codes.detach()
    codes_norm = codes.norm(dim=1, keepdim=True).clamp_min(eps)  # (B, 1, H, W)
    inputs_unit = inputs.detach() / inputs_norm  # (B, D, H, W)
    codes_unit = codes / codes_norm
    bisector = inputs_unit + codes_unit
    bisector = bisector / bisector.norm(dim=1, keepdim=True).clamp_min(eps)  # r, (B, D, H, W)
    rotated = (
        inputs
        - 2 * bisector * (bisector * inputs).sum(1, keepdim=True)
        + 2 * codes_unit * (inputs_unit * inputs).sum(1, keepdim=True)
    )  # R e, (B, D, H, W)
    return rotated * (codes_norm / inputs_norm)


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # (B, D, H, W) float code vectors; gradients flow to the input
    codes: Tensor  # (B, H, W) int64 in [0, K)
    commitment_loss: Tensor  # () float, beta * mean ||sg[e] - z||^2
    perplexity: Tensor  # () float, exp(entropy) of this batch's code histogram
    usage: Tensor  # () float, fraction of the K codes used in this batch


class VectorQuantizerEMA(nn.Module):
    """Nearest-neighbour quantizer whose codebook is an EMA of assigned encoder outputs.

    Args:
        codebook_size: K, number of code vectors.
        embedding_dim: D, dimension of each code vector.
        commitment_weight: beta of the commitment loss.
        decay: gamma of the EMA updates, in [0, 1).
        epsilon: Laplace smoothing added to the EMA cluster counts.
        dead_code_after_steps: re-seed codes unused for this many train steps (0 disables).
        gradient_estimator: "straight_through" (the paper) or "rotation" (see ``rotate_to_codes``).
        reduce_fn: sums a tensor across processes (identity by default); applied to the batch
            counts and sums before the EMA update, so all processes keep the same codebook.
        gather_fn: concatenates a tensor across processes in rank order (identity by default);
            used for the codebook initialisation and dead-code restart candidates.
        seed: seeds the random choice of the encoder outputs that initialise the codebook
            (the same on every process, which all see the same gathered batch).
    """

    def __init__(
        self,
        codebook_size: int,
        embedding_dim: int,
        commitment_weight: float,
        decay: float,
        epsilon: float,
        dead_code_after_steps: int,
        gradient_estimator: str = "straight_through",
        reduce_fn: ReduceFn = identity_reduce,
        gather_fn: GatherFn = identity_reduce,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        self.commitment_weight = commitment_weight
        self.decay = decay
        self.epsilon = epsilon
        self.dead_code_after_steps = dead_code_after_steps
        if gradient_estimator not in GRADIENT_ESTIMATORS:
            raise ValueError(
                f"gradient_estimator must be one of {', '.join(GRADIENT_ESTIMATORS)}, "
                f"got {gradient_estimator!r}"
            )
        self.gradient_estimator = gradient_estimator
        self.reduce_fn = reduce_fn
        self.gather_fn = gather_fn
        self.seed = seed
        codebook = torch.randn(codebook_size, embedding_dim)  # (K, D)
        self.register_buffer("codebook", codebook)
        # EMA state: N_i (counts) and m_i (sums). Starting N at 1 and m at the codebook makes
        # e = m / N stable for codes that are never chosen, instead of blowing up as m / eps.
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,)
        self.register_buffer("embed_sum", codebook.clone())  # (K, D)
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))  # (K,)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Batch statistics held back inside ``deferred_updates`` (None: update at once).
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None

    @contextmanager
    def deferred_updates(self) -> Iterator[None]:
        """Hold the codebook still while several batches pass, then update it once for all.

        Inside, train-mode calls quantize with the codebook as it is and keep their statistics;
        on a normal exit one EMA update and one dead-code check cover all of them, as if they
        had been one batch. Gradient accumulation uses it so that a step of micro-batches
        moves the codebook as the whole batch would (and ``dead_code_after_steps`` counts
        optimiser steps). Only the very first batch, which seeds the codebook, differs: the
        first micro-batch seeds it alone.
        """
        if self._pending is not None:
            raise RuntimeError("deferred_updates is already active")
        self._pending = []
        try:
            yield
            pending = self._pending
        finally:
            self._pending = None
        if pending:
            counts, sums, inputs, distances = zip(*pending, strict=True)
            self._update(sum(counts), sum(sums), torch.cat(inputs), torch.cat(distances))

    @torch.no_grad()
    def _update(
        self, batch_counts: Tensor, batch_sums: Tensor, flat_inputs: Tensor, min_distances: Tensor
    ) -> None:
        """One EMA step from a batch's code counts (K,) and sums (K, D) (summed over processes),
        then the dead-code restart with its inputs (N, D) and their code distances (N,)."""
        self._ema_update(self.reduce_fn(batch_counts), self.reduce_fn(batch_sums))
        if self.dead_code_after_steps > 0:
            self._restart_dead_codes(flat_inputs, min_distances)

    def nearest_codes(self, flat_inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Index and squared distance of the nearest code for each row of ``flat_inputs``.

        A matrix product shortlists the ``SHORTLIST`` nearest codes of each row; their distances
        are then taken again from differences, and the nearest of them wins (the lowest index
        among exact ties). The product's rounding (about 1e-7 of ||x||^2, and different for
        other batch shapes) thus decides no choice: a batch split over processes picks the
        codes that one process picks for the whole batch.

        Args:
            flat_inputs: (N, D) float.

        Returns:
            codes (N,) int64 and their squared distances (N,) float32.
        """
        flat_inputs = flat_inputs.float()
        codebook = self.codebook.float()
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 is the same for every code of a row
        approximate = codebook.pow(2).sum(1)[None, :] - 2 * flat_inputs @ codebook.t()  # (N, K)
        shortlist = min(SHORTLIST, self.codebook_size)
        candidates = approximate.topk(shortlist, dim=1, largest=False).indices  # (N, S)
        candidates = candidates.sort(dim=1).values  # index order, so that ties go to the lowest
        differences = flat_inputs[:, None, :] - codebook[candidates]  # (N, S, D)
        min_distances, best = differences.pow(2).sum(2).min(dim=1)  # (N,), (N,)
        codes = candidates.gather(1, best[:, None]).squeeze(1)  # (N,)
        return codes, min_distances

    def lookup(self, codes: Tensor) -> Tensor:
        """Code vectors for integer codes.

        Args:
            codes: (B, H, W) int64 in [0, K).

        Returns:
            (B, D, H, W) float code vectors.
        """
        vectors = F.embedding(codes, self.codebook)  # (B, H, W, D)
        return rearrange(vectors, "b h w d -> b d h w")

    def forward(self, inputs: Tensor) -> QuantizerOutput:
        """Quantize encoder outputs; in train mode also update the codebook.

        Args:
            inputs: (B, D, H, W) float encoder output z.
        """
        batch, dim, height, width = inputs.shape
        if dim != self.embedding_dim:
            raise ValueError(f"quantizer expects {self.embedding_dim} channels, got {dim}")
        flat_inputs = rearrange(inputs, "b d h w -> (b h w) d").detach().float()  # (N, D)

        # Distances and EMA statistics stay in float32 under bf16 autocast: nearest-neighbour
        # choices and running averages are what low precision breaks first.
        with torch.autocast(inputs.device.type, enabled=False):
            if self.training and not bool(self.initialized):
                self._initialize_from(flat_inputs)
            codes, min_distances = self.nearest_codes(flat_inputs)  # (N,), (N,)
            batch_counts = torch.bincount(codes, minlength=self.codebook_size).float()  # (K,)
            # The code vectors as they stand before this batch moves the codebook.
            quantized = self.lookup(codes.view(batch, height, width)).to(inputs.dtype)
            if self.training:
                batch_sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat_inputs)
                statistics = (batch_counts, batch_sums, flat_inputs, min_distances)
                if self._pending is None:
                    self._update(*statistics)
                else:
                    self._pending.append(statistics)
        commitment_loss = self.commitment_weight * F.mse_loss(inputs, quantized.detach())
        if inputs.requires_grad and torch.is_grad_enabled():  # else the code vectors as they are
            if self.gradient_estimator == "rotation":
                quantized = rotate_to_codes(inputs, quantized)
            else:
                quantized = inputs + (quantized - inputs).detach()  # straight-through estimator

        probabilities = batch_counts / batch_counts.sum()
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-10))).sum()
        return QuantizerOutput(
            quantized=quantized,
            codes=codes.view(batch, height, width),
            commitment_loss=commitment_loss,
            perplexity=entropy.exp(),
            usage=(batch_counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _initialize_from(self, flat_inputs: Tensor) -> None:
        """Seed the codebook with distinct rows of the first (global) training batch, taken in a
        seeded random order (not evenly spaced rows: at paper shapes those all fall in one
        column of the latent map).

        A row within ``DISTINCT_TOLERANCE`` of an earlier row of that order is passed over, so
        no two seeds are twins (equal rows, such as the encoder outputs of a padded border,
        would split their inputs by float rounding). A batch with fewer than K distinct rows
        seeds that many codes; the others keep the random vectors drawn at construction (as
        distinct as random draws are) until the dead-code restart re-seeds them from data.
        """
        all_inputs = self.gather_fn(flat_inputs)  # (N_global, D), the same on every process
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(all_inputs.shape[0], generator=generator).to(all_inputs.device)
        tolerance = DISTINCT_TOLERANCE * float(all_inputs.pow(2).sum(1).mean().sqrt())
        seeds = distinct_rows(all_inputs[order], self.codebook_size, tolerance)  # (n <= K, D)
        self.codebook[: seeds.shape[0]] = seeds
        self.embed_sum.copy_(self.codebook)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """N <- gamma N + (1 - gamma) n;  m <- gamma m + (1 - gamma) sum;  e <- m / N~.

        N~ is the Laplace-smoothed count (N + eps) / (total + K eps) * total.
        """
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (
            (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        )
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        used = counts > 0
        self.steps_unused.add_(1).masked_fill_(used, 0)

    @torch.no_grad()
    def _restart_dead_codes(self, flat_inputs: Tensor, min_distances: Tensor) -> None:
        """Re-seed codes unused for too long with the worst-quantized inputs of the global batch.

        Each process offers its n worst-served inputs (n = number of dead codes); the n worst of
        all offers are the n worst of the global batch, and stable sorts order ties by global
        position, so every process, and a single process on the same batch, picks the same.
        """
        # steps_unused comes from reduced counts, so every process takes this branch together.
        dead = torch.nonzero(self.steps_unused >= self.dead_code_after_steps).flatten()  # (n,)
        if dead.numel() == 0:
            return
        offered = min(dead.numel(), min_distances.numel())
        order = torch.sort(min_distances, descending=True, stable=True).indices[:offered]
        candidates = self.gather_fn(flat_inputs[order])  # (P * offered, D), worst first per rank
        candidate_distances = self.gather_fn(min_distances[order])  # (P * offered,)
        ranking = torch.sort(candidate_distances, descending=True, stable=True).indices
        picks = ranking[torch.arange(dead.numel(), device=ranking.device) % ranking.numel()]
        seeds = candidates[picks]  # (n, D)
        self.codebook[dead] = seeds
        self.embed_sum[dead] = seeds
        self.cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0
