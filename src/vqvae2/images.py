"""One image as the models take it: a file or array of any size and mode -> uint8 (C, S, S).

Pillow's modes (16-bit and float grey, transparency, palettes, EXIF orientation) are turned into
8-bit grey or RGB, then the image is fitted to the model's square side S: resized by its short
side and cropped (centred, or at a drawn place for random crops), or for arrays that fit, padded
centred on black (as Fashion-MNIST's 28x28 is padded to 32x32). The datasets of ``data.py`` and
the codec's file layer (``compress.py``) read their images through these functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor


def _short_side(size: int, scale: float) -> int:
    """The short side an image is resized to before a ``size`` crop (``scale`` > 1: a margin)."""
    return max(size, round(size * scale))


def resize_and_crop(
    image: Image.Image, size: int, scale: float = 1.0, place: tuple[float, float] | None = None
) -> Image.Image:
    """Resize ``image`` so its short side is ``round(size * scale)``, then crop ``size`` x
    ``size`` from it: centred, or at ``place`` = (x, y), fractions in [0, 1] of the room left."""
    short = _short_side(size, scale)
    width, height = image.size
    new_width = max(short, round(width * short / min(width, height)))
    new_height = max(short, round(height * short / min(width, height)))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    x, y = place if place is not None else (0.5, 0.5)
    left, top = round(x * (new_width - size)), round(y * (new_height - size))
    return image.crop((left, top, left + size, top + size))


SIXTEEN_BIT_MAX = 65535  # integer grey (I;16, I) is read as 16-bit: this is white
UINT8_MAX = 255


def to_grey_or_rgb(image: Image.Image, channels: int) -> Image.Image:
    """An image of any Pillow mode as 8-bit grey (``L``, ``channels`` 1) or ``RGB`` (3).

    - Integer grey (``I;16*``, from 16-bit PNGs and TIFFs, and ``I``) is read as 16-bit:
      [0, 65535] -> [0, 255], values beyond clipped (Pillow's own conversion clips at 255).
    - Float grey (``F``) is read as [0, 1], like float ``.npz`` arrays: clipped, NaN as 0.
    - Transparency (``LA``, ``RGBA``, ``PA``, a palette or colour key with transparent
      entries) is composited over black: each colour times alpha / 255.
    - Everything else (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``) is Pillow's conversion;
      RGB to grey is the ITU-R 601-2 luma.
    """
    target = "L" if channels == 1 else "RGB"
    if image.mode == "F" or image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        if image.mode == "F":
            values = np.nan_to_num(values, nan=0.0) * UINT8_MAX
        else:
            values = values * UINT8_MAX / SIXTEEN_BIT_MAX
        grey = np.clip(np.rint(values), 0, UINT8_MAX).astype(np.uint8)
        return Image.fromarray(grey).convert(target)
    if "A" in image.mode or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)  # (H, W, 4)
        composited = rgba[..., :3] * rgba[..., 3:] / UINT8_MAX  # over black
        image = Image.fromarray(np.rint(composited).astype(np.uint8))
    return image.convert(target)


def pil_to_uint8(
    image: Image.Image,
    size: int,
    channels: int,
    scale: float = 1.0,
    place: tuple[float, float] | None = None,
) -> Tensor:
    """PIL image (any mode, as opened) -> uint8 tensor (channels, size, size): turned upright
    by its EXIF orientation, converted by ``to_grey_or_rgb``, then ``resize_and_crop``.

    Large JPEGs are decoded at a reduced scale (``Image.draft``: the decoder's own downscaling
    by 1/2, 1/4 or 1/8, never below the target), much faster than decoding in full and
    different from it only by the decoder's filtering.
    """
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        ratio = _short_side(size, scale) / min(image.size)
        image.draft(image.mode, (round(image.size[0] * ratio), round(image.size[1] * ratio)))
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    image = to_grey_or_rgb(image, channels)
    array = np.asarray(resize_and_crop(image, size, scale, place), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def fit_uint8_array(images: np.ndarray, size: int, channels: int) -> Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> (N, channels, size, size): padded (centred,
    black) when they fit, else resized by the short side and centre-cropped."""
    if images.ndim == 3:
        images = images[..., None]
    count, height, width, source_channels = images.shape
    if source_channels not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels, got {source_channels}")
    tensor = torch.from_numpy(images[..., :3].copy()).permute(0, 3, 1, 2)  # (N, C, H, W)
    if tensor.shape[1] != channels:  # grey <-> RGB
        if channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            tensor = (tensor.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
        else:
            tensor = tensor.expand(-1, 3, -1, -1)
    if height <= size and width <= size:
        top, left = (size - height) // 2, (size - width) // 2
        padded = torch.zeros(count, channels, size, size, dtype=torch.uint8)
        padded[:, :, top : top + height, left : left + width] = tensor
        return padded
    return torch.stack(
        [
            pil_to_uint8(Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()), size, channels)
            for img in tensor
        ]
    )


# Errors Pillow raises on files it cannot decode (SyntaxError: broken PNG chunks; the bomb
# error: over twice Image.MAX_IMAGE_PIXELS): such files are skipped.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(
    path: Path,
    size: int,
    channels: int,
    scale: float = 1.0,
    place: tuple[float, float] | None = None,
) -> Tensor:
    """An image file as uint8 (channels, size, size) by ``pil_to_uint8``.

    Images between once and twice Pillow's ``Image.MAX_IMAGE_PIXELS`` (about 89 to 179
    megapixels: large photos, JPEGs decoded at a reduced scale) are read without Pillow's
    decompression-bomb warning; larger ones raise its error.

    Raises:
        One of ``UNREADABLE``: the file cannot be read or decoded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return pil_to_uint8(image, size, channels, scale, place)
