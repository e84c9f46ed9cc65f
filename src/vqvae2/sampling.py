"""Ancestral sampling through the hierarchy (Razavi et al. 2019, Algorithm 2, lines 10-13), and
classifier-based rejection sampling (Section 3.3).

Top codes are drawn from the top prior, each lower level from its prior given the levels above,
then the VQ-VAE decoder maps all levels to pixels in one pass. Randomness comes only from the
``torch.Generator`` passed in, so a seed reproduces a batch exactly.

Each code is drawn from the prior's softmax at a temperature, optionally restricted to the k
most likely codes (top-k, Fan et al. 2018) or to the smallest most-likely set holding probability
p (top-p or nucleus sampling, Holtzman et al. 2020); ``DrawControls`` holds the three, per level.

Rejection sampling scores every class-conditional sample by the probability a pre-trained
classifier gives the requested class, and keeps the best-scored share of each class (or those
above a threshold): the paper's way of trading diversity for quality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ._helpers import evaluating
from .classifier import Classifier
from .config import check_temperature
from .model_configs import check_priors_fit
from .pixelsnail import PixelSNAIL
from .pixelsnail_sampler import IncrementalSampler, StepName
from .vqvae import VQVAE2

SamplerName = Literal["cached", "cached-compiled", "cached-cuda-graph", "reference"]


@dataclass(frozen=True)
class DrawControls:
    """How one level's codes are drawn from its prior's logits: temperature, then filtering.

    Ties are kept whole, so the filters depend only on the logits' values, never on their order:
    top-k keeps every code whose logit reaches the k-th largest, top-p every code at least as
    likely as the least likely member of the nucleus. The most likely code is always kept.
    """

    temperature: float = 1.0  # divides the logits; towards 0 the draw is the most likely code
    top_k: int | None = None  # keep the k most likely codes (Fan et al. 2018); None: all K
    # Keep the smallest set of most likely codes whose probability (after the temperature)
    # reaches p (nucleus sampling, Holtzman et al. 2020); None or 1: all K.
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def check_codebook(self, codebook_size: int) -> None:
        """Raise ``ValueError`` when top-k asks for more codes than the codebook's K."""
        if self.top_k is not None and self.top_k > codebook_size:
            raise ValueError(f"top_k {self.top_k} is more than the prior's {codebook_size} codes")


# One level's draw: a temperature alone or full controls. The hierarchy takes one for every
# level or a sequence of them, one per level, top first.
LevelControls = float | DrawControls
Controls = LevelControls | Sequence[LevelControls]


def as_draw_controls(controls: LevelControls) -> DrawControls:
    """``DrawControls`` for one level; a number is a temperature without filtering."""
    return controls if isinstance(controls, DrawControls) else DrawControls(controls)


def controls_per_level(controls: Controls, num_levels: int) -> list[DrawControls]:
    """One ``DrawControls`` per level, top first: one given for all levels, or one per level.

    Raises:
        ValueError: a sequence whose length is neither 1 nor ``num_levels``, or a bad value.
    """
    if isinstance(controls, DrawControls | int | float):
        return [as_draw_controls(controls)] * num_levels
    given = [as_draw_controls(level) for level in controls]
    if len(given) == 1:
        return given * num_levels
    if len(given) != num_levels:
        raise ValueError(
            f"give one temperature for every level or one per level ({num_levels}), "
            f"got {len(given)}"
        )
    return given


def _filter(scaled: Tensor, controls: DrawControls) -> Tensor:
    """(B, K) tempered logits with the codes outside top-k and the nucleus set to -inf."""
    codebook_size = scaled.shape[-1]
    if controls.top_k is not None and controls.top_k < codebook_size:
        kth = torch.topk(scaled, controls.top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if controls.top_p is not None and controls.top_p < 1.0:
        probabilities = torch.softmax(scaled, dim=-1)  # (B, K)
        descending = torch.sort(probabilities, dim=-1, descending=True).values  # (B, K)
        # The nucleus is the shortest prefix reaching p: the codes before the first cumulative
        # sum >= p, and that one (all K when rounding keeps the sum below p).
        short_of_p = (descending.cumsum(dim=-1) < controls.top_p).sum(dim=-1, keepdim=True)
        size = (short_of_p + 1).clamp(max=codebook_size)  # (B, 1)
        least = descending.gather(-1, size - 1)  # (B, 1), the nucleus's least probability
        scaled = scaled.masked_fill(probabilities < least, -math.inf)
    return scaled


def _draw(logits: Tensor, controls: LevelControls, generator: torch.Generator | None) -> Tensor:
    """One code per row of (B, K) logits, drawn under ``controls`` -> (B,) int64.

    A bare number is a temperature; top-k = K and top-p = 1 draw exactly as no filter.
    """
    controls = as_draw_controls(controls)
    temperature = controls.temperature
    logits = logits.float()
    scaled = logits if temperature == 1 else logits / temperature  # (B, K); x / 1 == x exactly
    if temperature < 1:
        # A small temperature can overflow the division to inf (the softmax is then NaN; at
        # T >= 1 it cannot). The logits shifted to a maximum of 0 cannot overflow: their row
        # goes to the most likely code. Rows whose division stays finite are left as they
        # are, so their draws do not change.
        shifted = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # (B, K), <= 0
        scaled = torch.where(torch.isfinite(scaled).all(dim=-1, keepdim=True), scaled, shifted)
    probabilities = torch.softmax(_filter(scaled, controls), dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


def _empty_codes(
    prior: PixelSNAIL,
    batch_size: int,
    labels: Tensor | None,
    condition_codes: list[Tensor] | None,
    temperature: LevelControls,
) -> Tensor:
    """Check the sampling inputs; (B, H, W) int64 zeros to fill."""
    as_draw_controls(temperature).check_codebook(prior.config.codebook_size)
    side = prior.config.code_size
    device = next(prior.parameters()).device
    codes = torch.zeros(batch_size, side, side, dtype=torch.long, device=device)
    prior.check_inputs(codes, labels, condition_codes)
    return codes


@torch.no_grad()
def sample_level_reference(
    prior: PixelSNAIL,
    batch_size: int,
    labels: Tensor | None = None,
    condition_codes: list[Tensor] | None = None,
    temperature: LevelControls = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one level by running the whole prior once per code position (raster order).

    Args:
        prior: the level's prior (run in eval mode; its mode is restored afterwards).
        batch_size: B.
        labels: (B,) int64 when the prior is class-conditional.
        condition_codes: codes of the upper levels, top first, each (B, h_l, w_l).
        temperature: a temperature (finite, >= ``config.MIN_TEMPERATURE``; divides the logits,
            towards 0 the draw becomes the most likely code) or ``DrawControls`` (a temperature
            with top-k / top-p filtering; top-k at most the prior's K).
        generator: source of randomness (on the prior's device).

    Returns:
        (B, H, W) int64 codes in [0, K).
    """
    codes = _empty_codes(prior, batch_size, labels, condition_codes, temperature)
    side = prior.config.code_size
    with evaluating(prior):
        condition = prior.condition(labels, condition_codes)
        for row in range(side):
            for column in range(side):
                logits = prior.logits(codes, condition)[:, :, row, column]  # (B, K)
                codes[:, row, column] = _draw(logits, temperature, generator)
    return codes


@torch.no_grad()
def sample_level_cached(
    prior: PixelSNAIL,
    batch_size: int,
    labels: Tensor | None = None,
    condition_codes: list[Tensor] | None = None,
    temperature: LevelControls = 1.0,
    generator: torch.Generator | None = None,
    step: StepName = "eager",
) -> Tensor:
    """Sample one level position by position with cached activations (``IncrementalSampler``).

    Same arguments and result as ``sample_level_reference``, at about the cost of one forward
    pass; ``step`` (``eager``, ``compiled`` or ``cuda-graph``) is how each position is computed
    (``pixelsnail_sampler``), with the same draws. Its logits equal the reference's up to float
    rounding and both draw from the generator alike, so from the same generator state it draws
    the same codes except where rounding tips a near-tie (about 1 in 800 maps at the paper's
    64x64 bottom prior, random weights; from there on the maps differ;
    ``bench/bench_sampler_agreement.py``).
    """
    codes = _empty_codes(prior, batch_size, labels, condition_codes, temperature)
    side = prior.config.code_size
    with evaluating(prior):
        condition = prior.condition_per_image(labels, condition_codes)
        state = IncrementalSampler(prior, batch_size, condition, step)
        for row in range(side):
            for column in range(side):
                codes[:, row, column] = _draw(state.logits_at(row, column), temperature, generator)
                state.set_codes(row, column, codes[:, row, column])
    return codes


SAMPLERS = {
    "cached": sample_level_cached,
    "cached-compiled": partial(sample_level_cached, step="compiled"),
    "cached-cuda-graph": partial(sample_level_cached, step="cuda-graph"),
    "reference": sample_level_reference,
}


@torch.no_grad()
def sample_codes(
    priors: Sequence[PixelSNAIL],
    batch_size: int,
    labels: Tensor | None = None,
    temperature: Controls = 1.0,
    generator: torch.Generator | None = None,
    sampler: SamplerName = "cached",
) -> list[Tensor]:
    """Draw codes for every level, top first, each level given all levels above it.

    Args:
        temperature: one temperature or ``DrawControls`` for every level, or a sequence of them
            with one item (for every level) or one per level, top first.
        sampler: ``cached`` (incremental, default; ``cached-compiled`` and ``cached-cuda-graph``
            run its per-position step through ``torch.compile`` or a CUDA graph) or
            ``reference`` (one full forward pass per position); all give the same codes for the
            same generator state except where float rounding tips a near-tie
            (``sample_level_cached``).

    Returns:
        Per level (B, h_l, w_l) int64 codes.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    sample_level = SAMPLERS[sampler]
    level_controls = controls_per_level(temperature, len(priors))
    for prior, controls in zip(priors, level_controls, strict=True):
        controls.check_codebook(prior.config.codebook_size)
    codes: list[Tensor] = []
    for prior, controls in zip(priors, level_controls, strict=True):
        level_labels = labels if prior.config.num_classes > 0 else None
        conditions = list(codes) if prior.config.condition_sizes else None
        codes.append(sample_level(prior, batch_size, level_labels, conditions, controls, generator))
    return codes


def requested_labels(classes: Sequence[int] | None, count: int, num_classes: int) -> Tensor:
    """(count,) int64 class labels: ``classes`` (all classes when None or empty) in blocks, in
    the order given. Each of the k classes gets ``count // k`` samples, and the first
    ``count % k`` of them one more, so no requested class is left out while count >= k.

    Raises:
        ValueError: a class outside [0, num_classes).
    """
    chosen = list(classes) if classes else list(range(num_classes))
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"class {bad[0]} is out of range: the priors know classes 0..{num_classes - 1}"
        )
    share, extra = divmod(count, len(chosen))
    block_sizes = torch.full((len(chosen),), share)  # (k,)
    block_sizes[:extra] += 1
    return torch.tensor(chosen).repeat_interleave(block_sizes)


def check_hierarchy(vqvae: VQVAE2, priors: Sequence[PixelSNAIL]) -> None:
    """Raise ``ValueError`` unless ``priors`` (top first) fit the VQ-VAE's levels and codebook."""
    check_priors_fit(vqvae.config, [prior.config for prior in priors])


@torch.no_grad()
def generate(
    vqvae: VQVAE2,
    priors: Sequence[PixelSNAIL],
    batch_size: int,
    labels: Tensor | None = None,
    temperature: Controls = 1.0,
    generator: torch.Generator | None = None,
    sampler: SamplerName = "cached",
) -> tuple[Tensor, list[Tensor]]:
    """Sample images: codes top to bottom, then one decoder pass.

    ``temperature`` is one temperature or ``DrawControls`` for every level, or one per level
    (``sample_codes``).

    Returns:
        Images (B, C, H, W) float in about [-1, 1] and the codes per level, top first, on the
        models' device (``labels`` may be on any device; ``generator`` must be on the models').
    """
    check_hierarchy(vqvae, priors)
    if labels is not None:
        labels = labels.to(next(priors[0].parameters()).device)
    codes = sample_codes(priors, batch_size, labels, temperature, generator, sampler)
    with evaluating(vqvae):
        return vqvae.decode_codes(codes), codes


# ----------------------------------------------------------------------------------------------
# Classifier-based rejection sampling (Section 3.3)


@torch.no_grad()
def requested_class_scores(
    classifier: Classifier, images: Tensor, labels: Tensor, batch_size: int
) -> Tensor:
    """Probability the classifier gives each image's requested class.

    Args:
        classifier: run in eval mode (its mode is restored afterwards).
        images: (N, C, H, W) float in [-1, 1].
        labels: (N,) int64 requested classes.
        batch_size: images per classifier call.

    Returns:
        (N,) float32 in [0, 1], on the CPU (images and labels may be on any device).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    device = next(classifier.parameters()).device
    with evaluating(classifier):
        scores = [
            torch.softmax(
                classifier(images[start : start + batch_size].to(device)).logits.float(), -1
            )
            .gather(1, labels[start : start + batch_size, None].to(device))
            .squeeze(1)
            .cpu()
            for start in range(0, len(images), batch_size)
        ]
    return torch.cat(scores) if scores else torch.zeros(0)


def keep_top_per_class(scores: Tensor, labels: Tensor, counts: dict[int, int]) -> Tensor:
    """Indices of the ``counts[c]`` best-scored items of each class c.

    Args:
        scores: (N,) float, higher is better; ties go to the earlier item.
        labels: (N,) int64.
        counts: items to keep per class; each at most that class's number of items.

    Returns:
        (M,) int64 indices into the N items, ascending (so the original order is kept).
    """
    kept = []
    for label, count in counts.items():
        members = torch.nonzero(labels == label).squeeze(1)  # (n_c,)
        if count > len(members):
            raise ValueError(f"cannot keep {count} items of class {label}: it has {len(members)}")
        order = torch.sort(scores[members], descending=True, stable=True).indices
        kept.append(members[order[:count]])
    return torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long)


def _decimal(value: float) -> Fraction:
    """A number as the shortest decimal that reads back as it in its own precision (``str`` of
    a Python or NumPy float: 0.3 -> 3/10, ``np.float32(0.41)`` -> 41/100)."""
    return Fraction(str(value.item() if isinstance(value, Tensor) else value))


def kept_count(count: int, reject_fraction: float) -> int:
    """ceil((1 - F) * n): how many of n items rejecting the fraction F keeps.

    Computed on F as the decimal it is written as (``repr``: 0.3 is 3/10), so float rounding
    cannot push an exact product past an integer (in floats, 0.41 of 100 kept 60, not 59).
    """
    return math.ceil((1 - _decimal(reject_fraction)) * count)


def candidates_needed(count: int, reject_fraction: float) -> int:
    """ceil(n / (1 - F)): how many candidates keep n after rejecting the fraction F (the
    decimal F as written, like ``kept_count``: in floats, 21 at 0.3 drew 31, not 30)."""
    return math.ceil(count / (1 - _decimal(reject_fraction)))


def reject_fraction_per_class(scores: Tensor, labels: Tensor, reject_fraction: float) -> Tensor:
    """Drop the worst-scored ``reject_fraction`` of every class, keep the rest.

    A class of n items keeps ceil((1 - reject_fraction) * n) of them (at least one).

    Args:
        scores: (N,) float, higher is better.
        labels: (N,) int64.
        reject_fraction: in [0, 1).

    Returns:
        (M,) int64 ascending indices of the kept items.
    """
    if not 0.0 <= reject_fraction < 1.0:
        raise ValueError(f"the rejection fraction must be in [0, 1), got {reject_fraction}")
    counts = {
        int(label): kept_count(int(count), reject_fraction)
        for label, count in zip(*torch.unique(labels, return_counts=True), strict=True)
    }
    return keep_top_per_class(scores, labels, counts)


def accept_above_threshold(scores: Tensor, threshold: float) -> Tensor:
    """(M,) int64 ascending indices of the items scored at least ``threshold`` (in [0, 1])."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the acceptance threshold must be in [0, 1], got {threshold}")
    return torch.nonzero(scores >= threshold).squeeze(1)


class RejectionOutput(NamedTuple):
    images: Tensor  # (N, C, H, W) float in about [-1, 1], the kept samples, on the CPU
    labels: Tensor  # (N,) int64, the requested labels in the order asked for
    scores: Tensor  # (N,) float, classifier probability of the requested class
    candidates: int  # samples drawn in all (kept and rejected)


@torch.no_grad()
def generate_with_rejection(
    vqvae: VQVAE2,
    priors: Sequence[PixelSNAIL],
    classifier: Classifier,
    labels: Tensor,
    *,
    reject_fraction: float | None = None,
    accept_threshold: float | None = None,
    max_candidates: int,
    batch_size: int,
    temperature: Controls = 1.0,
    generator: torch.Generator | None = None,
    sampler: SamplerName = "cached",
    on_batch: Callable[[int], None] | None = None,
) -> RejectionOutput:
    """Class-conditional samples filtered by the classifier (Section 3.3), one per requested label.

    With ``reject_fraction`` F, each class with n requests draws ceil(n / (1 - F)) candidates and
    keeps its n best-scored. With ``accept_threshold`` T, candidates are drawn in batches until
    every class has n samples scored at least T (the first ones reached, in draw order).
    Candidates are scored batch by batch and only those that can still be kept are held, in
    place in the output: memory holds N images plus one batch, whatever the number drawn.

    Args:
        labels: (N,) int64 requested classes.
        reject_fraction: in [0, 1); exactly one of it and ``accept_threshold`` is given.
        accept_threshold: in [0, 1].
        max_candidates: stop with ``ValueError`` once this many candidates were drawn.
        batch_size: samples per call of the priors.
        temperature: the draw controls, for every level or per level (``sample_codes``).
        on_batch: called with the size of each drawn batch (a progress bar).

    Returns:
        ``RejectionOutput``; images keep the order of ``labels``.
    """
    if (reject_fraction is None) == (accept_threshold is None):
        raise ValueError("give exactly one of a rejection fraction and an acceptance threshold")
    if labels.dim() != 1 or len(labels) == 0:
        raise ValueError(f"labels must have shape (N,) with N >= 1, got {tuple(labels.shape)}")
    if priors[0].config.num_classes == 0:
        raise ValueError("rejection sampling needs class-conditional priors")
    if classifier.config.num_classes != priors[0].config.num_classes:
        raise ValueError(
            f"the classifier knows {classifier.config.num_classes} classes, the priors "
            f"{priors[0].config.num_classes}"
        )

    def draw_batch(batch_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) labels -> images (B, C, H, W) on the CPU and their requested-class scores (B,)."""
        images = generate(
            vqvae, priors, len(batch_labels), batch_labels, temperature, generator, sampler
        )[0].cpu()
        if on_batch is not None:
            on_batch(len(batch_labels))
        return images, requested_class_scores(classifier, images, batch_labels, batch_size)

    def draw(candidate_labels: Tensor, offer: Offer, first: int) -> None:
        """Draw (M,) labels in batches and hand each to ``offer`` with the candidate number of
        its first (``first`` numbers the first of the M); no batch is held once offered."""
        for start in range(0, len(candidate_labels), batch_size):
            batch_labels = candidate_labels[start : start + batch_size]
            offer(first + start, batch_labels, *draw_batch(batch_labels))

    kept = _KeptSamples(labels)
    if reject_fraction is not None:
        drawn = _reject_fraction(draw, kept, reject_fraction, max_candidates)
    else:
        assert accept_threshold is not None
        drawn = _accept_threshold(draw, kept, accept_threshold, max_candidates, batch_size)
    kept.sort_by_draw()
    assert kept.images is not None and bool((kept.draw_index >= 0).all())
    return RejectionOutput(kept.images, labels.clone(), kept.scores, drawn)


# A batch of candidates: the index of its first in the labels drawn, its labels (B,), images
# (B, C, H, W) and requested-class scores (B,).
Offer = Callable[[int, Tensor, Tensor, Tensor], None]
Draw = Callable[[Tensor, Offer, int], None]


class _KeptSamples:
    """The candidates kept so far, held in place in the output of rejection sampling.

    Class c's candidates sit at the output positions where c was requested (its slots), so at
    most N images are held however many candidates are drawn; a new candidate takes a free slot
    or the slot of the one it displaces.

    Args:
        labels: (N,) int64 requested classes.
    """

    def __init__(self, labels: Tensor) -> None:
        self.slots = {int(c): torch.nonzero(labels == c).squeeze(1) for c in torch.unique(labels)}
        self.images: Tensor | None = None  # (N, C, H, W), allocated by the first kept candidate
        self.scores = torch.zeros(len(labels))  # (N,) requested-class scores
        self.draw_index = torch.full((len(labels),), -1)  # (N,) candidate number; -1: free slot

    def filled(self, label: int) -> int:
        """Slots of class ``label`` holding a candidate."""
        return int((self.draw_index[self.slots[label]] >= 0).sum())

    def short_classes(self) -> list[int]:
        """The classes, ascending, with a free slot."""
        return [c for c, slots in self.slots.items() if self.filled(c) < len(slots)]

    def _write(
        self, slots: Tensor, rows: Tensor, first: int, images: Tensor, scores: Tensor
    ) -> None:
        """Put the candidates ``rows`` (S,) of a batch (images (B, C, H, W), scores (B,), the
        first numbered ``first``) in ``slots`` (S,), one image at a time (no copy of the batch)."""
        if self.images is None:
            self.images = images.new_empty(len(self.scores), *images.shape[1:])
        for slot, row in zip(slots.tolist(), rows.tolist(), strict=True):
            self.images[slot] = images[row]
        self.scores[slots] = scores[rows].float()
        self.draw_index[slots] = first + rows

    def offer_first(
        self, first: int, labels: Tensor, images: Tensor, scores: Tensor, threshold: float
    ) -> None:
        """Keep the candidates scored at least ``threshold``, in draw order, while their class
        has free slots. ``first`` numbers the batch's first candidate."""
        for label, slots in self.slots.items():
            free = slots[self.draw_index[slots] < 0]
            accepted = torch.nonzero((labels == label) & (scores >= threshold)).squeeze(1)
            accepted = accepted[: len(free)]
            self._write(free[: len(accepted)], accepted, first, images, scores)

    def offer_best(self, first: int, labels: Tensor, images: Tensor, scores: Tensor) -> None:
        """Keep each class's best-scored candidates so far, a tie going to the earlier drawn."""
        for label, slots in self.slots.items():
            members = torch.nonzero(labels == label).squeeze(1)  # (m,) in the batch
            if len(members) == 0:
                continue
            held = slots[self.draw_index[slots] >= 0]  # (h,)
            pool_index = torch.cat([self.draw_index[held], first + members])  # (h + m,)
            pool_scores = torch.cat([self.scores[held], scores[members].float()])
            by_draw = torch.argsort(pool_index)
            by_score = torch.sort(pool_scores[by_draw], descending=True, stable=True).indices
            best = by_draw[by_score[: len(slots)]]  # pool positions kept, < h: already held
            chosen = best[best >= len(held)] - len(held)  # positions in members
            keep_held = torch.zeros(len(held), dtype=torch.bool)
            keep_held[best[best < len(held)]] = True
            freed = torch.cat([held[~keep_held], slots[self.draw_index[slots] < 0]])
            self.draw_index[freed] = -1
            picked = members[chosen]
            self._write(freed[: len(picked)], picked, first, images, scores)

    def sort_by_draw(self) -> None:
        """Order each class's slots by draw index, moving rows in place (one spare image)."""
        for slots in self.slots.values():
            source = torch.argsort(self.draw_index[slots]).tolist()  # slot j takes source[j]'s
            self.scores[slots] = self.scores[slots[source]]
            self.draw_index[slots] = self.draw_index[slots[source]]
            if self.images is not None:
                _permute_rows(self.images, slots.tolist(), source)


def _permute_rows(rows: Tensor, positions: list[int], source: list[int]) -> None:
    """rows[positions[j]] = (old) rows[positions[source[j]]] for every j, cycle by cycle, with
    one row copied aside per cycle."""
    done = [False] * len(positions)
    for start in range(len(positions)):
        if done[start] or source[start] == start:
            continue
        spare = rows[positions[start]].clone()
        j = start
        while source[j] != start:
            rows[positions[j]] = rows[positions[source[j]]]
            done[j] = True
            j = source[j]
        rows[positions[j]] = spare
        done[j] = True


def _reject_fraction(
    draw: Draw, kept: _KeptSamples, reject_fraction: float, max_candidates: int
) -> int:
    """Draw ceil(n / (1 - F)) candidates of each class wanted n times, keep the n best;
    returns the number drawn."""
    if not 0.0 <= reject_fraction < 1.0:
        raise ValueError(f"the rejection fraction must be in [0, 1), got {reject_fraction}")
    per_class = {
        c: candidates_needed(len(slots), reject_fraction) for c, slots in kept.slots.items()
    }
    drawn = sum(per_class.values())
    if drawn > max_candidates:
        raise ValueError(
            f"rejecting {reject_fraction:.0%} needs {drawn} candidates, more than the "
            f"limit of {max_candidates}"
        )
    candidate_labels = torch.cat([torch.full((m,), c) for c, m in per_class.items()])
    draw(candidate_labels, kept.offer_best, 0)
    return drawn


def _accept_threshold(
    draw: Draw, kept: _KeptSamples, threshold: float, max_candidates: int, batch_size: int
) -> int:
    """Draw rounds of the classes still short until each has n candidates scored at least
    ``threshold`` (the first ones reached, in draw order); returns the number drawn.

    A round draws each short class ``batch_size // classes`` times (at least once), so it is one
    batch, less than ``classes`` short of full, while the short classes fit in a batch.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the acceptance threshold must be in [0, 1], got {threshold}")
    drawn = 0
    while short := kept.short_classes():
        room = max_candidates - drawn
        if room <= 0:
            total = sum(kept.filled(c) for c in kept.slots)
            raise ValueError(
                f"only {total} of {len(kept.scores)} samples reached the acceptance "
                f"threshold {threshold} in {drawn} candidates; lower the threshold"
            )
        # Each short class equally often, in one call of the priors while they fit in a batch.
        round_labels = torch.tensor(short).repeat(max(1, batch_size // len(short)))[:room]
        draw(round_labels, partial(kept.offer_first, threshold=threshold), drawn)
        drawn += len(round_labels)
    return drawn
