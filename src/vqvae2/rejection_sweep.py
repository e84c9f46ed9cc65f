"""Fig. 7 of Razavi et al. 2019: sample quality against the rejection rate.

One pool of class-conditional samples is drawn once (split over the processes under torchrun)
and scored by the classifier; at each rejection rate the kept samples of each class are
subsampled to one metric set of the same size and class balance, whose FID, FID*, KID, Inception
Score and precision/recall are measured on features computed once per pool sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ._helpers import SEED_STRIDE
from .config import EvaluateConfig
from .data import float_to_uint8
from .distributed import DistributedContext
from .measure import class_logits, extract_features
from .metrics import frechet_distance, inception_score, kernel_distance, precision_recall
from .pixelsnail import PixelSNAIL
from .sampling import generate, reject_fraction_per_class
from .vqvae import VQVAE2


def pool_batches(count: int, batch_size: int, context: DistributedContext) -> list[int]:
    """Start rows of the pool batches this process draws: every ``world_size``-th batch."""
    return list(range(context.rank * batch_size, count, context.world_size * batch_size))


@torch.no_grad()
def draw_pool(
    vqvae: VQVAE2,
    priors: list[PixelSNAIL],
    labels: Tensor,
    batch_size: int,
    temperature: float,
    seed: int,
    progress: bool,
    context: DistributedContext | None = None,
) -> Tensor:
    """Samples for (N,) requested ``labels``, in batches -> (N, C, H, W) uint8.

    Under torchrun each process draws every ``world_size``-th batch with its own generator
    (seeded ``seed`` on rank 0, so one process reproduces the single-process pool) and the
    batches are gathered, in order, on every process.
    """
    context = context or DistributedContext()
    device = next(vqvae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed + SEED_STRIDE * context.rank)
    starts = pool_batches(len(labels), batch_size, context)
    drawn = {}
    with tqdm(
        total=len(labels), desc="sample", disable=not (progress and context.is_main), unit="img"
    ) as bar:
        for start in starts:
            chunk = labels[start : start + batch_size]
            batch, _ = generate(vqvae, priors, len(chunk), chunk, temperature, generator)
            drawn[start] = float_to_uint8(batch.cpu())
            bar.update(len(chunk) * context.world_size)
    drawn = {
        start: images for part in context.gather_objects(drawn) for start, images in part.items()
    }
    return torch.cat([drawn[start] for start in sorted(drawn)])


def sample_metrics(
    reference: dict[str, Tensor],
    features: Tensor,
    logits: Tensor,
    config: EvaluateConfig,
    kid_subset_size: int,
    with_star: bool = True,
) -> dict[str, float | None]:
    """FID (and FID* against reconstructions), KID, IS and precision/recall of one image set."""
    values: dict[str, float | None] = {
        "fid": frechet_distance(reference["test"], features),
    }
    if with_star:
        values["fid_star"] = frechet_distance(reference["reconstructions"], features)
    kid_mean, kid_std = kernel_distance(
        reference["test"], features, config.kid_subsets, kid_subset_size, config.seed
    )
    score, score_std = inception_score(logits, config.inception_score_splits, config.seed)
    values.update(
        kid=kid_mean,
        kid_std=kid_std,
        inception_score=score,
        inception_score_std=None if math.isnan(score_std) else score_std,
    )
    values.update(precision_recall(reference["test"], features, config.nearest_k)._asdict())
    return values


def metric_sets(
    scores: Tensor, labels: Tensor, config: EvaluateConfig, metric_counts: list[int]
) -> list[Tensor]:
    """Per rejection rate, the pool indices of its metric set: the kept share of each class,
    subsampled to ``metric_counts`` per class (selection seed: seed + 1)."""
    selector = torch.Generator().manual_seed(config.seed + 1)
    selections = []
    for fraction in config.fractions:
        kept = reject_fraction_per_class(scores, labels, fraction)
        chosen = []
        for label, count in enumerate(metric_counts):
            members = kept[labels[kept] == label]
            chosen.append(members[torch.randperm(len(members), generator=selector)[:count]])
        selections.append(torch.sort(torch.cat(chosen)).values)
    return selections


@dataclass
class ScoredPool:
    """The pool scored by the rejection classifier, and the features of its metric sets."""

    scores: Tensor  # (P,) classifier probability of each sample's requested class
    agreement: Tensor  # (P,) bool, the classifier's top class is the requested one
    selections: list[Tensor]  # per rejection rate, the pool indices of its metric set
    features: Tensor  # (M, F) features of the samples in some metric set
    logits: Tensor  # (M, K) the feature network's logits of the same samples
    position: Tensor  # (P,) row of each pool sample in features / logits (-1: in no set)


def score_pool(
    scorer: nn.Module,
    network: nn.Module,
    pool: Tensor,
    pool_labels: Tensor,
    config: EvaluateConfig,
    metric_counts: list[int],
    progress: bool,
) -> ScoredPool:
    """Score every pool sample once with ``scorer`` (the rejection classifier), choose each
    rate's metric set (``metric_counts`` per class), and take the features of the samples that
    some set holds from ``network``."""
    pool_logits = class_logits(scorer, pool, config.batch_size)  # (P, K)
    scores = torch.softmax(pool_logits, dim=-1).gather(1, pool_labels[:, None]).squeeze(1)
    selections = metric_sets(scores, pool_labels, config, metric_counts)
    needed = torch.unique(torch.cat(selections))  # pool indices in some metric set
    position = torch.full((len(pool),), -1, dtype=torch.long)
    position[needed] = torch.arange(len(needed))
    features, logits = extract_features(
        network, pool[needed], config.batch_size, progress, "features: samples"
    )
    return ScoredPool(
        scores=scores,
        agreement=pool_logits.argmax(-1) == pool_labels,
        selections=selections,
        features=features,
        logits=logits,
        position=position,
    )


def rejection_rows(
    scored: ScoredPool,
    references: tuple[dict[str, Tensor], dict[str, Tensor]],
    config: EvaluateConfig,
    kid_subset_size: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fig. 7: the metrics of each rate's metric set, and of the real train images and the
    test reconstructions as references."""
    reference, reference_logits = references
    rows = []
    for fraction, selection in zip(config.fractions, scored.selections, strict=True):
        chosen = scored.position[selection]
        rows.append(
            {
                "reject_fraction": fraction,
                "samples": len(selection),
                "mean_score": float(scored.scores[selection].mean()),
                "class_agreement": float(scored.agreement[selection].float().mean()),
                **sample_metrics(
                    reference,
                    scored.features[chosen],
                    scored.logits[chosen],
                    config,
                    kid_subset_size,
                ),
            }
        )
    train_kid = min(kid_subset_size, len(reference["train"]))
    return rows, {
        "train_images": sample_metrics(
            reference, reference["train"], reference_logits["train"], config, train_kid
        ),
        "test_reconstructions": sample_metrics(
            reference,
            reference["reconstructions"],
            reference_logits["reconstructions"],
            config,
            kid_subset_size,
            with_star=False,
        ),
        "test_images_inception_score": inception_score(
            reference_logits["test"], config.inception_score_splits, config.seed
        )[0],
    }
