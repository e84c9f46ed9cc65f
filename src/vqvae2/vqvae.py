"""Hierarchical VQ-VAE, stage 1 of VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019, Section 3.1).

The bottom encoder downsamples the image by ``bottom_downsample`` (4 in the paper: 256 -> 64) with
strided convolutions and residual blocks; each higher level halves the resolution again (64 -> 32
for the top of ImageNet-256; FFHQ-1024 adds a middle level). Quantization runs top first: the top
code is quantized, decoded back to the resolution of the level below and concatenated with that
level's encoder features before it is quantized in turn (Algorithm 1, line 3: E_bottom(x, e_top)).
One feed-forward decoder takes every level, upsamples the higher ones to the bottom resolution
with transposed convolutions and maps them back to pixels. Two options outside the paper
make the upper levels decodable on their own (docs/levels.md): level dropout and prefix
decoders (a light decoder per prefix of the levels, trained beside the main one).

Levels are always ordered top first. Images are float in [-1, 1], shape (B, C, H, W).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .model_configs import VQVAEConfig
from .quantize import GatherFn, QuantizerOutput, ReduceFn, VectorQuantizerEMA, identity_reduce

LEVEL_DROPOUT_STREAM = 1  # tags level dropout's random stream (see ``draw_kept_levels``)


class ResBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))): the residual unit of Table 5 (hidden -> residual -> hidden).

    With ``recompute_in_backward`` (``VQVAE2.set_activation_checkpointing``), a training pass
    with gradients keeps only x and recomputes the branch in the backward pass.
    """

    def __init__(self, channels: int, residual_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, residual_channels, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.Conv2d(residual_channels, channels, 1),
        )
        self.recompute_in_backward = False

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.recompute_in_backward and self.training and torch.is_grad_enabled():
            return x + checkpoint(self.block, x, use_reentrant=False)
        return x + self.block(x)


def _res_stack(config: VQVAEConfig) -> list[nn.Module]:
    """``num_res_blocks`` residual blocks at ``hidden_channels`` followed by a ReLU."""
    blocks: list[nn.Module] = [
        ResBlock(config.hidden_channels, config.residual_channels, config.encoder_kernel_size)
        for _ in range(config.num_res_blocks)
    ]
    return [*blocks, nn.ReLU()]


def _downsample_conv(in_channels: int, out_channels: int, config: VQVAEConfig) -> nn.Conv2d:
    """Strided convolution that halves the resolution exactly (kernel k, stride 2, pad k/2-1)."""
    kernel = config.upsample_kernel_size
    return nn.Conv2d(in_channels, out_channels, kernel, stride=2, padding=kernel // 2 - 1)


def _upsample_conv(in_channels: int, out_channels: int, config: VQVAEConfig) -> nn.ConvTranspose2d:
    """Transposed convolution that doubles the resolution exactly (Table 5 filter size 4)."""
    kernel = config.upsample_kernel_size
    return nn.ConvTranspose2d(in_channels, out_channels, kernel, stride=2, padding=kernel // 2 - 1)


def _same_conv(in_channels: int, out_channels: int, config: VQVAEConfig) -> nn.Conv2d:
    kernel = config.encoder_kernel_size
    return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)


class BottomEncoder(nn.Module):
    """Image (B, C, H, W) -> features (B, hidden, H/f, W/f) with f = ``bottom_downsample``."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        hidden = config.hidden_channels
        steps = config.bottom_downsample.bit_length() - 1  # log2 of the factor
        layers: list[nn.Module] = []
        channels = config.in_channels
        for step in range(steps):
            out = hidden if step == steps - 1 else hidden // 2
            layers += [_downsample_conv(channels, out, config), nn.ReLU()]
            channels = out
        layers += [_same_conv(hidden, hidden, config), *_res_stack(config)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class DownEncoder(nn.Module):
    """Features of one level (B, hidden, h, w) -> features of the level above (B, hidden, h/2, w/2)."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        hidden = config.hidden_channels
        self.layers = nn.Sequential(
            _downsample_conv(hidden, hidden // 2, config),
            nn.ReLU(),
            _same_conv(hidden // 2, hidden, config),
            *_res_stack(config),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class Decoder(nn.Module):
    """Stack of (conv, residual blocks, ``num_upsamples`` transposed convs): (B, in, h, w) -> (B, out, h*2^u, w*2^u).

    With ``fine_blocks`` > 0, that many residual blocks (hidden/2 wide, residual/2 inner) follow
    each intermediate transposed conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_upsamples: int,
        config: VQVAEConfig,
        fine_blocks: int = 0,
    ) -> None:
        super().__init__()
        hidden = config.hidden_channels
        layers: list[nn.Module] = [_same_conv(in_channels, hidden, config), *_res_stack(config)]
        channels = hidden
        for step in range(num_upsamples):
            last = step == num_upsamples - 1
            out = out_channels if last else hidden // 2
            layers.append(_upsample_conv(channels, out, config))
            if not last:
                layers += [
                    ResBlock(out, max(config.residual_channels // 2, 1), config.encoder_kernel_size)
                    for _ in range(fine_blocks)
                ]
                layers.append(nn.ReLU())
            channels = out
        if num_upsamples == 0:
            layers.append(nn.Conv2d(channels, out_channels, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class PrefixDecoder(nn.Module):
    """Light decoder from the top ``kept`` levels to the image (``prefix_decoder_weight``).

    The kept levels are brought to the resolution of the last of them (nearest neighbour),
    concatenated and decoded by a ``Decoder`` half as wide as the model's:
    per level (B, D, h_l, w_l), l < kept -> (B, C, H, W).
    """

    def __init__(self, config: VQVAEConfig, kept: int) -> None:
        super().__init__()
        self.side = config.latent_sizes[kept - 1]
        light = replace(
            config,
            hidden_channels=max(config.hidden_channels // 2, 2),
            residual_channels=max(config.residual_channels // 2, 1),
        )
        upsamples = (config.image_size // self.side).bit_length() - 1
        self.decoder = Decoder(kept * config.embedding_dim, config.in_channels, upsamples, light)

    def forward(self, quantized: Sequence[Tensor]) -> Tensor:
        same_size = [
            nn.functional.interpolate(q, size=self.side, mode="nearest") for q in quantized
        ]  # per level (B, D, side, side)
        return self.decoder(torch.cat(same_size, dim=1))


class VQVAEOutput(NamedTuple):
    reconstruction: Tensor  # (B, C, H, W) float, images in about [-1, 1]
    loss: Tensor  # () reconstruction MSE + sum of commitment losses (eq. 2 with EMA codebooks)
    reconstruction_loss: Tensor  # () MSE in the [-1, 1] image scale
    commitment_loss: Tensor  # () summed over levels
    prefix_loss: Tensor  # () mean MSE of the prefix decoders (0 without them), weighted in loss
    codes: list[Tensor]  # per level, top first: (B, h_l, w_l) int64
    perplexity: list[Tensor]  # per level: () batch code perplexity
    usage: list[Tensor]  # per level: () fraction of codes used in the batch


def _level_upsamplers(config: VQVAEConfig) -> nn.ModuleList:
    """One upsampler per level above the bottom, bringing its quantized map (B, D, h, w) to the
    bottom resolution: level i is 2^(L-1-i) smaller, so it takes that many x2 upsamplings."""
    levels, dim = config.num_levels, config.embedding_dim
    upsamplers = nn.ModuleList()
    for i in range(levels - 1):
        steps = levels - 1 - i
        layers: list[nn.Module] = []
        for step in range(steps):
            layers.append(_upsample_conv(dim, dim, config))
            if step < steps - 1:
                layers.append(nn.ReLU())
        upsamplers.append(nn.Sequential(*layers))
    return upsamplers


class VQVAE2(nn.Module):
    """Hierarchical VQ-VAE with 1 to 3 levels, levels indexed top first.

    Args:
        config: architecture and quantizer settings.
        reduce_fn: sums EMA statistics across processes (identity for one process).
        gather_fn: concatenates tensors across processes in rank order (identity for one
            process); the quantizers' initialisation and dead-code restarts use it.
        seed: seeds the quantizers' random choice of first-batch encoder outputs as initial
            code vectors (level l uses ``seed * num_levels + l``).
    """

    def __init__(
        self,
        config: VQVAEConfig,
        reduce_fn: ReduceFn = identity_reduce,
        gather_fn: GatherFn = identity_reduce,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        levels = config.num_levels
        hidden, dim = config.hidden_channels, config.embedding_dim
        self.bottom_encoder = BottomEncoder(config)
        # up_encoders[i] takes the features of level i+1 (one below) to level i; the bottom has none.
        self.up_encoders = nn.ModuleList(DownEncoder(config) for _ in range(levels - 1))
        # Level i (below the top) sees its encoder features and the decoded code of level i-1.
        self.pre_quantize = nn.ModuleList(
            nn.Conv2d(hidden + (dim if i > 0 else 0), dim, 1) for i in range(levels)
        )
        self.condition_decoders = nn.ModuleList(
            Decoder(dim, dim, num_upsamples=1, config=config) for _ in range(levels - 1)
        )
        self.quantizers = nn.ModuleList(
            VectorQuantizerEMA(
                codebook_size=config.codebook_size,
                embedding_dim=dim,
                commitment_weight=config.commitment_weight,
                decay=config.ema_decay,
                epsilon=config.ema_epsilon,
                dead_code_after_steps=config.dead_code_after_steps,
                gradient_estimator=config.gradient_estimator,
                reduce_fn=reduce_fn,
                gather_fn=gather_fn,
                seed=seed * levels + level,
            )
            for level in range(levels)
        )
        self.upsamplers = _level_upsamplers(config)
        # The stand-in for a level left out of decoding (level_dropout > 0): one learned vector
        # per level, the same at every position; zeros otherwise (the paper's Fig. 3).
        self.absent = nn.Parameter(torch.zeros(levels, dim)) if config.level_dropout > 0 else None
        # prefix_decoders[k - 1] decodes the top k levels alone (prefix_decoder_weight > 0).
        self.prefix_decoders = (
            nn.ModuleList(PrefixDecoder(config, kept) for kept in range(1, levels))
            if config.prefix_decoder_weight > 0
            else None
        )
        self.decoder = Decoder(
            levels * dim,
            config.in_channels,
            num_upsamples=config.bottom_downsample.bit_length() - 1,
            config=config,
            fine_blocks=config.decoder_fine_blocks,
        )

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every residual block (encoders, decoders, prefix decoders) in the backward
        pass instead of keeping its intermediate maps, in training with gradients on. The
        blocks hold no randomness and no state, so the gradients equal the plain pass's; the
        quantizers are outside them and take their EMA step once."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                module.recompute_in_backward = enabled

    # ------------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )

    def quantize(self, images: Tensor) -> list[QuantizerOutput]:
        """Run the encoders and quantizers (Algorithm 1, lines 1-4).

        Args:
            images: (B, C, H, W) float in [-1, 1].

        Returns:
            One ``QuantizerOutput`` per level, top first.
        """
        self._check_images(images)
        features = [self.bottom_encoder(images)]  # bottom first while building: (B, hidden, h, w)
        for encoder in reversed(self.up_encoders):  # climb from the bottom to the top
            features.append(encoder(features[-1]))
        features.reverse()  # top first
        outputs: list[QuantizerOutput] = []
        for level in range(self.config.num_levels):
            inputs = features[level]
            if level > 0:  # condition on the quantized code of the level above
                condition = self.condition_decoders[level - 1](outputs[-1].quantized)
                inputs = torch.cat([inputs, condition], dim=1)  # (B, hidden + D, h, w)
            z = self.pre_quantize[level](inputs)  # (B, D, h, w)
            outputs.append(self.quantizers[level](z))
        return outputs

    def encode(self, images: Tensor) -> list[Tensor]:
        """Codes of each level, top first: a list of (B, h_l, w_l) int64 in [0, K)."""
        return [output.codes for output in self.quantize(images)]

    def decode(self, quantized: Sequence[Tensor | None]) -> Tensor:
        """Decode quantized vectors of every level (top first) to images (Algorithm 1, line 5).

        A level given as ``None`` is left out, which shows what the other levels contribute
        (paper Fig. 3): zero vectors stand in for it, or its learned absent vector in a model
        trained with ``level_dropout``. A model with prefix decoders decodes the top k levels
        alone (the rest ``None``) with its own decoder for them.

        Args:
            quantized: per level, (B, D, h_l, w_l) float or None; at least one tensor.

        Returns:
            (B, C, H, W) float images in about [-1, 1].
        """
        if len(quantized) != self.config.num_levels:
            raise ValueError(
                f"expected {self.config.num_levels} levels of quantized vectors, got {len(quantized)}"
            )
        present = [q for q in quantized if q is not None]
        if not present:
            raise ValueError("decode needs at least one level")
        kept = len(present)
        if (
            self.prefix_decoders is not None
            and kept < len(quantized)
            and all(q is not None for q in quantized[:kept])
        ):
            return self.prefix_decoders[kept - 1](present)
        batch = present[0].shape[0]
        upsampled = []
        for level, vectors in enumerate(quantized):
            if vectors is None:
                vectors = self._absent(level, batch, present[0])  # (B, D, h_l, w_l)
            if level < self.config.num_levels - 1:
                vectors = self.upsamplers[level](vectors)  # (B, D, h_bottom, w_bottom)
            upsampled.append(vectors)
        return self.decoder(torch.cat(upsampled, dim=1))  # (B, L*D, h, w) -> (B, C, H, W)

    def _absent(self, level: int, batch: int, like: Tensor) -> Tensor:
        """What stands in for a left-out ``level``: (B, D, h_l, w_l) of ``like``'s dtype."""
        side = self.config.latent_sizes[level]
        if self.absent is None:
            return like.new_zeros(batch, self.config.embedding_dim, side, side)
        vector = self.absent[level].to(like.dtype)[None, :, None, None]  # (1, D, 1, 1)
        return vector.expand(batch, -1, side, side)

    def draw_kept_levels(self, keys: Sequence[int], seed: int) -> Tensor:
        """Level dropout's draw for each image of a training batch: how many levels (top first)
        it is decoded from, all L or, with probability ``level_dropout``, a prefix of 1 to L - 1
        chosen uniformly.

        Image b's draw depends only on (``seed``, ``keys[b]``), its key being its position in
        the run's sequence of training images: the same whichever process holds the image and
        whether or not the run was resumed.

        Args:
            keys: one int per image, >= 0.
            seed: the run's seed.

        Returns:
            (B,) int64 in [1, L].
        """
        levels, probability = self.config.num_levels, self.config.level_dropout
        kept = []
        for key in keys:
            # The trailing stream tag keeps these draws apart from data.py's (seed, key) ones.
            drop, prefix = np.random.default_rng([seed, key, LEVEL_DROPOUT_STREAM]).random(2)
            dropped = levels > 1 and drop < probability
            kept.append(1 + int(prefix * (levels - 1)) if dropped else levels)
        return torch.tensor(kept, dtype=torch.long)

    def drop_lower_levels(self, quantized: list[Tensor], kept_levels: Tensor) -> list[Tensor]:
        """Replace the levels below each image's kept prefix with absent vectors.

        Args:
            quantized: per level (B, D, h_l, w_l), top first.
            kept_levels: (B,) int64 in [1, L], the levels kept per image (``draw_kept_levels``).

        Returns:
            The same shapes, the left-out levels replaced (by the learned absent vectors in a
            model trained with ``level_dropout``, else zeros).
        """
        levels, batch = self.config.num_levels, quantized[0].shape[0]
        if tuple(kept_levels.shape) != (batch,) or kept_levels.dtype != torch.long:
            raise ValueError(
                f"kept_levels must be int64 of shape ({batch},), got {kept_levels.dtype} "
                f"{tuple(kept_levels.shape)}"
            )
        if batch and not (int(kept_levels.min()) >= 1 and int(kept_levels.max()) <= levels):
            raise ValueError(f"kept_levels must lie in [1, {levels}]")
        kept_levels = kept_levels.to(quantized[0].device)
        result = [quantized[0]]
        for level in range(1, levels):
            absent = level >= kept_levels  # (B,)
            stand_in = self._absent(level, batch, quantized[level])
            result.append(torch.where(absent[:, None, None, None], stand_in, quantized[level]))
        return result

    @contextmanager
    def deferred_codebook_updates(self) -> Iterator[None]:
        """Every level's codebook holds still inside and takes one EMA update on exit, for all
        the batches that passed (``VectorQuantizerEMA.deferred_updates``): gradient
        accumulation then moves the codebooks as one whole batch would."""
        with ExitStack() as stack:
            for quantizer in self.quantizers:
                stack.enter_context(quantizer.deferred_updates())
            yield

    def decode_codes(
        self, codes: Sequence[Tensor], keep_levels: Sequence[int] | None = None
    ) -> Tensor:
        """Decode integer codes (top first) to images.

        Args:
            codes: per level, (B, h_l, w_l) int64 in [0, K).
            keep_levels: indices (top = 0) of the levels to use; the others are left out.
                ``None`` uses all levels.

        Returns:
            (B, C, H, W) float images in about [-1, 1].
        """
        self.check_codes(codes)
        keep = set(range(self.config.num_levels) if keep_levels is None else keep_levels)
        quantized = [
            self.quantizers[level].lookup(level_codes) if level in keep else None
            for level, level_codes in enumerate(codes)
        ]
        return self.decode(quantized)

    def check_codes(self, codes: Sequence[Tensor]) -> None:
        """Raise ``ValueError`` unless ``codes`` fit this model's levels, shapes and codebook."""
        if len(codes) != self.config.num_levels:
            raise ValueError(
                f"expected codes for {self.config.num_levels} levels, got {len(codes)}"
            )
        for level, (level_codes, side) in enumerate(
            zip(codes, self.config.latent_sizes, strict=True)
        ):
            name = self.config.level_names[level]
            if level_codes.dim() != 3 or tuple(level_codes.shape[1:]) != (side, side):
                raise ValueError(
                    f"{name} codes must have shape (B, {side}, {side}), got {tuple(level_codes.shape)}"
                )
            if level_codes.numel() and (
                int(level_codes.min()) < 0 or int(level_codes.max()) >= self.config.codebook_size
            ):
                raise ValueError(f"{name} codes must lie in [0, {self.config.codebook_size})")

    def forward(self, images: Tensor, kept_levels: Tensor | None = None) -> VQVAEOutput:
        """Encode, quantize, decode; in train mode the codebooks take one EMA step.

        Args:
            images: (B, C, H, W) float in [-1, 1].
            kept_levels: (B,) int64 in [1, L]: decode image b from its top ``kept_levels[b]``
                levels alone (level dropout in training: ``draw_kept_levels``). None decodes
                every level.
        """
        outputs = self.quantize(images)
        quantized = [output.quantized for output in outputs]
        if kept_levels is not None:
            quantized = self.drop_lower_levels(quantized, kept_levels)
        reconstruction = self.decode(quantized)
        reconstruction_loss = torch.mean((reconstruction - images) ** 2)
        commitment_loss = torch.stack([output.commitment_loss for output in outputs]).sum()
        prefix_loss = self._prefix_loss([output.quantized for output in outputs], images)
        weight = self.config.prefix_decoder_weight
        return VQVAEOutput(
            reconstruction=reconstruction,
            loss=reconstruction_loss + commitment_loss + weight * prefix_loss,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=commitment_loss,
            prefix_loss=prefix_loss,
            codes=[output.codes for output in outputs],
            perplexity=[output.perplexity for output in outputs],
            usage=[output.usage for output in outputs],
        )

    def _prefix_loss(self, quantized: list[Tensor], images: Tensor) -> Tensor:
        """Mean over the prefix decoders of their MSE to ``images`` (B, C, H, W); its gradient
        reaches the kept levels' encoders through the straight-through codes. 0 without them."""
        if self.prefix_decoders is None:
            return images.new_zeros(())
        errors = [
            torch.mean((decoder(quantized[: kept + 1]) - images) ** 2)
            for kept, decoder in enumerate(self.prefix_decoders)
        ]
        return torch.stack(errors).mean()
