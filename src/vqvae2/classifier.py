"""A small convolutional image classifier.

VQ-VAE-2 uses a pre-trained classifier twice: to score samples for classifier-based rejection
sampling (Section 3.3) and inside the evaluation metrics (Classification Accuracy Score; the
feature extractor of FID/precision/recall when no Inception weights are at hand). No weights can
be downloaded here, so the project trains this one on the dataset itself.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from .model_configs import ClassifierConfig


class ClassifierOutput(NamedTuple):
    logits: Tensor  # (B, num_classes)
    features: Tensor  # (B, F) penultimate-layer features (after global average pooling)


class Classifier(nn.Module):
    """Stages of (conv3x3-BN-ReLU) x 2 + max-pool, global average pool, dropout, linear."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = config.in_channels
        for width in config.stage_channels:
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.stages = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(channels, config.num_classes)

    def forward(self, images: Tensor) -> ClassifierOutput:
        """Images (B, C, S, S) float in [-1, 1] -> logits (B, classes) and features (B, F)."""
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"classifier expects images of shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )
        features = self.stages(images).mean(dim=(2, 3))  # (B, F)
        return ClassifierOutput(logits=self.head(self.dropout(features)), features=features)
