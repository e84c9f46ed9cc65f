"""Ancestral sampling through the hierarchy (Razavi et al. 2019, Algorithm 2, lines 10-13), and
classifier-based rejection sampling (Section 3.3).

Top codes are drawn from the top prior, each lower level from its prior given the levels above,
then the VQ-VAE decoder maps all levels to pixels in one pass. Randomness comes only from the
``torch.Generator`` passed in, so a seed reproduces a batch exactly.

Rejection sampling scores every class-conditional sample by the probability a pre-trained
classifier gives the requested class, and keeps the best-scored share of each class (or those
above a threshold): the paper's way of trading diversity for quality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ._helpers import evaluating
from .classifier import Classifier
from .pixelsnail import IncrementalSampler, PixelSNAIL
from .vqvae import VQVAE2

SamplerName = Literal["cached", "reference"]


def _draw(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One code per row of (B, K) logits, sampled at ``temperature`` -> (B,) int64."""
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


def _empty_codes(
    prior: PixelSNAIL,
    batch_size: int,
    labels: Tensor | None,
    condition_codes: list[Tensor] | None,
    temperature: float,
) -> Tensor:
    """Check the sampling inputs; (B, H, W) int64 zeros to fill."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
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
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one level by running the whole prior once per code position (raster order).

    Args:
        prior: the level's prior (run in eval mode; its mode is restored afterwards).
        batch_size: B.
        labels: (B,) int64 when the prior is class-conditional.
        condition_codes: codes of the upper levels, top first, each (B, h_l, w_l).
        temperature: > 0; divides the logits.
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
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one level position by position with cached activations (``IncrementalSampler``).

    Same arguments and result as ``sample_level_reference``, at about the cost of one forward
    pass. Its logits equal the reference's up to float rounding and both draw from the generator
    alike, so from the same generator state it draws the same codes except where rounding tips a
    near-tie (about 1 in 800 maps at the paper's 64x64 bottom prior, random weights; from there
    on the maps differ; ``bench/bench_sampler_agreement.py``).
    """
    codes = _empty_codes(prior, batch_size, labels, condition_codes, temperature)
    side = prior.config.code_size
    with evaluating(prior):
        condition = prior.condition_per_image(labels, condition_codes)
        state = IncrementalSampler(prior, batch_size, condition)
        for row in range(side):
            for column in range(side):
                codes[:, row, column] = _draw(state.logits_at(row, column), temperature, generator)
                state.set_codes(row, column, codes[:, row, column])
    return codes


SAMPLERS = {"cached": sample_level_cached, "reference": sample_level_reference}


@torch.no_grad()
def sample_codes(
    priors: Sequence[PixelSNAIL],
    batch_size: int,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    sampler: SamplerName = "cached",
) -> list[Tensor]:
    """Draw codes for every level, top first, each level given all levels above it.

    Args:
        sampler: ``cached`` (incremental, default) or ``reference`` (one full forward pass per
            position); both give the same codes for the same generator state except where
            float rounding tips a near-tie (``sample_level_cached``).

    Returns:
        Per level (B, h_l, w_l) int64 codes.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    sample_level = SAMPLERS[sampler]
    codes: list[Tensor] = []
    for prior in priors:
        level_labels = labels if prior.config.num_classes > 0 else None
        conditions = list(codes) if prior.config.condition_sizes else None
        codes.append(
            sample_level(prior, batch_size, level_labels, conditions, temperature, generator)
        )
    return codes


def requested_labels(classes: Sequence[int] | None, count: int, num_classes: int) -> Tensor:
    """(count,) int64 class labels: ``classes`` (all classes when None or empty) in equal
    blocks, in the order given, the last block cut short when ``count`` does not divide evenly.

    Raises:
        ValueError: a class outside [0, num_classes).
    """
    chosen = list(classes) if classes else list(range(num_classes))
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"class {bad[0]} is out of range: the priors know classes 0..{num_classes - 1}"
        )
    return torch.tensor(chosen).repeat_interleave(math.ceil(count / len(chosen)))[:count]


def check_hierarchy(vqvae: VQVAE2, priors: Sequence[PixelSNAIL]) -> None:
    """Raise ``ValueError`` unless ``priors`` (top first) fit the VQ-VAE's levels and codebook."""
    config = vqvae.config
    if len(priors) != config.num_levels:
        raise ValueError(
            f"the VQ-VAE has {config.num_levels} levels but {len(priors)} priors were given"
        )
    for level, prior in enumerate(priors):
        name = config.level_names[level]
        prior_config = prior.config
        if prior_config.codebook_size != config.codebook_size:
            raise ValueError(
                f"the {name} prior models {prior_config.codebook_size} codes, the VQ-VAE has "
                f"{config.codebook_size}: it was trained on another VQ-VAE"
            )
        if prior_config.code_size != config.latent_sizes[level]:
            raise ValueError(
                f"the {name} prior models {prior_config.code_size}x{prior_config.code_size} maps, "
                f"the VQ-VAE's {name} level is {config.latent_sizes[level]}x{config.latent_sizes[level]}"
            )
        if tuple(prior_config.condition_sizes) != tuple(config.latent_sizes[:level]):
            raise ValueError(
                f"the {name} prior is conditioned on other levels than the VQ-VAE has above it"
            )


@torch.no_grad()
def generate(
    vqvae: VQVAE2,
    priors: Sequence[PixelSNAIL],
    batch_size: int,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    sampler: SamplerName = "cached",
) -> tuple[Tensor, list[Tensor]]:
    """Sample images: codes top to bottom, then one decoder pass.

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
        int(label): math.ceil((1.0 - reject_fraction) * int(count))
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
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    sampler: SamplerName = "cached",
    on_batch: Callable[[int], None] | None = None,
) -> RejectionOutput:
    """Class-conditional samples filtered by the classifier (Section 3.3), one per requested label.

    With ``reject_fraction`` F, each class with n requests draws ceil(n / (1 - F)) candidates and
    keeps its n best-scored. With ``accept_threshold`` T, candidates are drawn in batches until
    every class has n samples scored at least T (the first ones reached, in draw order).

    Args:
        labels: (N,) int64 requested classes.
        reject_fraction: in [0, 1); exactly one of it and ``accept_threshold`` is given.
        accept_threshold: in [0, 1].
        max_candidates: stop with ``ValueError`` once this many candidates were drawn.
        batch_size: samples per call of the priors.
        on_batch: called with the size of each drawn batch (a progress bar).

    Returns:
        ``RejectionOutput``; images keep the order of ``labels``.
    """
    if (reject_fraction is None) == (accept_threshold is None):
        raise ValueError("give exactly one of a rejection fraction and an acceptance threshold")
    if priors[0].config.num_classes == 0:
        raise ValueError("rejection sampling needs class-conditional priors")
    if classifier.config.num_classes != priors[0].config.num_classes:
        raise ValueError(
            f"the classifier knows {classifier.config.num_classes} classes, the priors "
            f"{priors[0].config.num_classes}"
        )
    wanted = {
        int(c): int(n) for c, n in zip(*torch.unique(labels, return_counts=True), strict=True)
    }

    def draw(batch_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) labels -> images (B, C, H, W) and their scores (B,), in batches."""
        images = []
        for start in range(0, len(batch_labels), batch_size):
            chunk = batch_labels[start : start + batch_size]
            images.append(
                generate(vqvae, priors, len(chunk), chunk, temperature, generator, sampler)[0].cpu()
            )
            if on_batch is not None:
                on_batch(len(chunk))
        images_all = torch.cat(images)
        return images_all, requested_class_scores(classifier, images_all, batch_labels, batch_size)

    if reject_fraction is not None:
        images, scores, pools, drawn = _reject_fraction(
            draw, wanted, reject_fraction, max_candidates
        )
    else:
        assert accept_threshold is not None
        images, scores, pools, drawn = _accept_threshold(
            draw, wanted, accept_threshold, max_candidates, batch_size
        )
    # Hand the kept samples of each class out in the order the labels were requested.
    order = torch.empty(len(labels), dtype=torch.long)
    for label, members in pools.items():
        order[labels == label] = members
    return RejectionOutput(images[order], labels.clone(), scores[order], drawn)


Draw = Callable[[Tensor], tuple[Tensor, Tensor]]  # (B,) labels -> images, requested-class scores
Kept = tuple[Tensor, Tensor, dict[int, Tensor], int]  # images, scores, kept per class, drawn


def _reject_fraction(
    draw: Draw, wanted: dict[int, int], reject_fraction: float, max_candidates: int
) -> Kept:
    """Draw ceil(n / (1 - F)) candidates of each class wanted n times; keep the n best."""
    if not 0.0 <= reject_fraction < 1.0:
        raise ValueError(f"the rejection fraction must be in [0, 1), got {reject_fraction}")
    per_class = {c: math.ceil(n / (1.0 - reject_fraction)) for c, n in wanted.items()}
    drawn = sum(per_class.values())
    if drawn > max_candidates:
        raise ValueError(
            f"rejecting {reject_fraction:.0%} needs {drawn} candidates, more than the "
            f"limit of {max_candidates}"
        )
    candidate_labels = torch.cat([torch.full((m,), c) for c, m in per_class.items()])
    images, scores = draw(candidate_labels)
    kept = keep_top_per_class(scores, candidate_labels, wanted)
    return images, scores, {c: kept[candidate_labels[kept] == c] for c in wanted}, drawn


def _accept_threshold(
    draw: Draw, wanted: dict[int, int], threshold: float, max_candidates: int, batch_size: int
) -> Kept:
    """Draw batches of the classes still short until each has n candidates scored at least
    ``threshold`` (the first ones reached, in draw order)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the acceptance threshold must be in [0, 1], got {threshold}")
    found: dict[int, list[int]] = {c: [] for c in wanted}
    image_batches, score_batches = [], []
    drawn = 0
    while any(len(found[c]) < n for c, n in wanted.items()):
        short = [c for c, n in wanted.items() if len(found[c]) < n]
        room = max_candidates - drawn
        if room <= 0:
            total = sum(min(len(found[c]), n) for c, n in wanted.items())
            raise ValueError(
                f"only {total} of {sum(wanted.values())} samples reached the acceptance "
                f"threshold {threshold} in {drawn} candidates; lower the threshold"
            )
        batch_labels = torch.tensor(short).repeat(math.ceil(batch_size / len(short)))[:room]
        batch_images, batch_scores = draw(batch_labels)
        for index in accept_above_threshold(batch_scores, threshold).tolist():
            found[int(batch_labels[index])].append(drawn + index)
        image_batches.append(batch_images)
        score_batches.append(batch_scores)
        drawn += len(batch_labels)
    pools = {c: torch.tensor(found[c][:n], dtype=torch.long) for c, n in wanted.items()}
    return torch.cat(image_batches), torch.cat(score_batches), pools, drawn
