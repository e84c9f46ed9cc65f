"""InceptionV3 as used for FID (Heusel et al. 2017) and the Inception Score, with weights from a
local file.

This is the network of TensorFlow's 2015-12-05 Inception graph that the FID and IS reference code
runs, in the PyTorch layout of the widely used weights file ``pt_inception-2015-12-05-6726825d.pth``
(pytorch-fid, torch-fidelity): torchvision's InceptionV3 module names, 1008 output classes, no
auxiliary head, and three differences from torchvision's InceptionV3 that the TensorFlow graph
has: average pools inside the blocks ignore the zero padding, and the last block pools its fourth
branch with a max pool instead of an average pool. Nothing is downloaded: the user supplies the
file. No reference weights were available when this was written, so the outputs have **not** been
checked against published FID values; the structure and key names follow the public
implementations' layer shapes.

Preprocessing follows pytorch-fid: [-1, 1] images, grey repeated to RGB, bilinear resize to
299x299 (torch-fidelity resizes with a TensorFlow-1-compatible kernel instead, which moves FID
slightly).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ._helpers import state_mismatch

INPUT_SIZE = 299  # side the network was trained at
NUM_FEATURES = 2048  # width of the final average pool ("pool3"): the FID features
NUM_LOGITS = 1008  # classes of the 2015-12-05 graph (1000 ImageNet classes + 8 unused)
BATCH_NORM_EPSILON = 1e-3  # TensorFlow's batch-norm epsilon in this graph
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class InceptionOutput(NamedTuple):
    logits: Tensor  # (B, 1008) class logits without the bias, as in the original IS code
    features: Tensor  # (B, 2048) final average-pool features (FID, precision/recall)


class ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU (``conv`` / ``bn`` as in the weights file)."""

    def __init__(self, in_channels: int, out_channels: int, **conv_options) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_options)
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPSILON)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        return F.relu(self.bn(self.conv(x)))


def _average_pool(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that, like TensorFlow's, does not count the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_channels: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = ConvBN(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = ConvBN(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, kernel_size=3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 35, 35) -> (B, 224 + pool, 35, 35)
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                double,
                self.branch_pool(_average_pool(x)),
            ],
            dim=1,
        )


class BlockB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (B, 288, 35, 35) -> (B, 768, 17, 17)
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat(
            [self.branch3x3(x), double, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1
        )


class BlockC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7 convolutions of ``width`` channels."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = ConvBN(in_channels, width, kernel_size=1)
        self.branch7x7_2 = ConvBN(width, width, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(width, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, width, kernel_size=1)
        self.branch7x7dbl_2 = ConvBN(width, width, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(width, width, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(width, width, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(width, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 768, 17, 17) -> (B, 768, 17, 17)
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            double = layer(double)
        return torch.cat(
            [self.branch1x1(x), single, double, self.branch_pool(_average_pool(x))], dim=1
        )


class BlockD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = ConvBN(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = ConvBN(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (B, 768, 17, 17) -> (B, 1280, 8, 8)
        seven = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                seven,
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class BlockE(nn.Module):
    """8x8 block (Mixed_7b, 7c) with split 1x3 / 3x1 branches.

    ``pool``: ``average`` for Mixed_7b; ``max`` for Mixed_7c, as in the FID graph.
    """

    def __init__(self, in_channels: int, pool: Literal["average", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = ConvBN(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = ConvBN(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 8, 8) -> (B, 2048, 8, 8)
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _average_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class InceptionV3(nn.Module):
    """The FID InceptionV3 (random weights until ``load_inception`` fills them in)."""

    num_features = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, kernel_size=3)
        self.Mixed_5b = BlockA(192, pool_channels=32)
        self.Mixed_5c = BlockA(256, pool_channels=64)
        self.Mixed_5d = BlockA(288, pool_channels=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, width=128)
        self.Mixed_6c = BlockC(768, width=160)
        self.Mixed_6d = BlockC(768, width=160)
        self.Mixed_6e = BlockC(768, width=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="average")
        self.Mixed_7c = BlockE(2048, pool="max")
        self.fc = nn.Linear(NUM_FEATURES, NUM_LOGITS)

    def forward(self, images: Tensor) -> InceptionOutput:
        """Images (B, 1 or 3, H, W) float in [-1, 1], any size -> pool features and logits."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"InceptionV3 expects images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}"
            )
        x = images.expand(-1, 3, -1, -1)  # grey -> RGB: (B, 3, H, W)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)  # ends at (B, 2048, 8, 8)
        features = x.mean(dim=(2, 3))  # (B, 2048)
        return InceptionOutput(logits=features @ self.fc.weight.T, features=features)


def _is_batch_count(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BatchNorm bookkeeping; some files lack it


def load_inception(path: str | Path, map_location: str | torch.device = "cpu") -> InceptionV3:
    """The FID InceptionV3 with weights from a local file, in eval mode.

    Args:
        path: ``pt_inception-2015-12-05-6726825d.pth`` (read with ``torch.load(weights_only=True)``,
            which runs no code from the file) or the same state dict saved as ``.safetensors``.
        map_location: device of the returned network.

    Raises:
        ValueError: the file is missing or unreadable, or holds the weights of another network
            (keys or shapes differ from the FID InceptionV3).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Inception weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot read Inception weights {path}: {message}") from None
    wrong = f"{path} does not hold the FID InceptionV3 weights ({WEIGHTS_NAME})"
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{wrong}: it is not a state dict of tensors")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model = InceptionV3()
    expected = {k: v for k, v in model.state_dict().items() if not _is_batch_count(k)}
    given = {k: v for k, v in state.items() if not _is_batch_count(k)}
    problem = state_mismatch(expected, given, listed=2)
    if problem is not None:
        raise ValueError(f"{wrong}: weights file of another network, {problem}")
    model.load_state_dict(given, strict=False)  # only the batch counters may be absent
    return model.to(map_location).eval()
