"""Ancestral sampling through the hierarchy (Razavi et al. 2019, Algorithm 2, lines 10-13).

Top codes are drawn from the top prior, each lower level from its prior given the levels above,
then the VQ-VAE decoder maps all levels to pixels in one pass. Randomness comes only from the
``torch.Generator`` passed in, so a seed reproduces a batch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

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
    """Check the sampling inputs, put the prior in eval mode; (B, H, W) int64 zeros to fill."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    prior.eval()
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
        prior: the level's prior (put in eval mode here).
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

    Same arguments and result as ``sample_level_reference``; with dropout off and the same
    generator state it draws the same codes, at about the cost of one forward pass.
    """
    codes = _empty_codes(prior, batch_size, labels, condition_codes, temperature)
    side = prior.config.code_size
    state = IncrementalSampler(prior, batch_size, prior.condition(labels, condition_codes))
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
            position); both give the same codes for the same generator state.

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
        Images (B, C, H, W) float in about [-1, 1] and the codes per level, top first.
    """
    check_hierarchy(vqvae, priors)
    codes = sample_codes(priors, batch_size, labels, temperature, generator, sampler)
    vqvae.eval()
    return vqvae.decode_codes(codes), codes
