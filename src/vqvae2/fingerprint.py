"""Content fingerprints of models: a SHA-256 over each model's config and weights.

The codec's files carry the first bytes of one (which models they were coded with), and an
evaluation report carries one of the models it measured (so a model card shows its figures
only beside those weights). A run and its export fingerprint alike; any change to a weight or a
config changes the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .classifier import Classifier
from .config import config_to_dict
from .pixelsnail import PixelSNAIL
from .vqvae import VQVAE2


def content_digest(parts: Sequence[tuple[Any, dict[str, Tensor]]]) -> bytes:
    """The SHA-256 (32 bytes) of (config dataclass, weights) pairs, in order: each config as JSON
    with sorted keys, then each tensor in key order as its name, dtype, shape and raw
    (little-endian) bytes, every field framed by its length."""
    digest = hashlib.sha256()

    def frame(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "big") + data)

    for config, state in parts:
        frame(json.dumps(config_to_dict(config), sort_keys=True, separators=(",", ":")).encode())
        frame(str(len(state)).encode())
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            frame(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            frame(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def models_digest(models: Sequence[nn.Module]) -> bytes:
    """``content_digest`` of models that carry their config as ``.config``, in order."""
    return content_digest([(model.config, model.state_dict()) for model in models])


def report_fingerprint(
    vqvae: VQVAE2, priors: Sequence[PixelSNAIL], classifier: Classifier | None
) -> str:
    """The hex SHA-256 of the models an evaluation measures (``models_digest`` of the VQ-VAE,
    the priors top first and the classifier): what a report records as ``models_fingerprint``
    and a model card checks before showing its figures."""
    return models_digest([vqvae, *priors, *([classifier] if classifier is not None else [])]).hex()
