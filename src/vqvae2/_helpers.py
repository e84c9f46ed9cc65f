"""Small helpers shared by several modules (one definition each)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

SEED_STRIDE = 1_000_003  # derived seeds: base * stride + offset (step, process rank)


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: the configs' one-line checks."""
    if not condition:
        raise ValueError(message)


def check_at_least(config: object, section: str, names: tuple[str, ...], minimum: int) -> None:
    """``check`` that each field ``names`` of ``config`` is at least ``minimum``; the message
    names it as ``section.name``."""
    for name in names:
        value = getattr(config, name)
        check(value >= minimum, f"{section}.{name} must be >= {minimum}, got {value}")


def uint8_to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], any shape: images as the models take them."""
    return images.float() / 127.5 - 1.0


def float_to_uint8(images: Tensor) -> Tensor:
    """float [-1, 1] (clamped) -> uint8 [0, 255], any shape."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode inside the block and give each back the mode it had."""
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def state_mismatch(
    expected: dict[str, Tensor], given: dict[str, Tensor], listed: int = 3
) -> str | None:
    """Why ``given`` weights do not fit a model whose state is ``expected`` (the first ``listed``
    missing or unexpected keys, or the first shape that differs), or None when they fit."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        return f"missing {missing[:listed]}" if missing else f"unexpected {unexpected[:listed]}"
    for key, value in given.items():
        if value.shape != expected[key].shape:
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
    return None


def load_state_checked(model: nn.Module, state: dict[str, Tensor], where: Path) -> None:
    """``model.load_state_dict(state)`` with a one-line error when the weights do not fit."""
    problem = state_mismatch(model.state_dict(), state)
    if problem is not None:
        raise ValueError(f"weights in {where} do not fit the model: {problem}")
    model.load_state_dict(state)
