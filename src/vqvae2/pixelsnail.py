"""Autoregressive prior over VQ-VAE codes, stage 2 of VQ-VAE-2 (Razavi et al. 2019, Section 3.2).

A gated PixelCNN (van den Oord et al. 2016) with PixelSNAIL-style (Chen et al. 2018) causal
multi-head self-attention every few blocks, dropout and a residual stack of 1x1 convolutions on
the output. The same module serves every level: the top prior has attention; a lower prior is
conditioned on the codes of the levels above through a deep residual conditioning stack (no
attention, Table 3). Any prior may also be conditioned on a class label, and on which image
transform produced its training codes (distribution augmentation: the identity, index 0, is what
evaluation and sampling use).

Causality without a blind spot comes from two streams:
  * the vertical stream at row i sees input rows <= i (all columns within its kernel) and is
    only ever passed on shifted down one row, so it brings rows strictly above;
  * the horizontal stream at (i, j) sees its own row left of j (the input shifted right by one
    at the first layer) plus the shifted vertical stream.
The output is read from the horizontal stream, so the logits at (i, j) depend only on codes
strictly before (i, j) in raster order. Attention keys at positions <= p are horizontal-stream
features, which already exclude the code at their own position; the attention is PyTorch's fused
``scaled_dot_product_attention``, which need not hold the (T, T) weights.

``pixelsnail_sampler.IncrementalSampler`` computes the same logits one position at a time for
sampling (and for entropy coding), holding per block only the rows its convolutions still read.

With activation checkpointing on (``set_activation_checkpointing``), a training forward pass
keeps only each residual block's inputs and recomputes the block in the backward pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .model_configs import PixelSNAILConfig


def shift_down(x: Tensor) -> Tensor:
    """(B, C, H, W) -> same shape, row i holds row i-1 (row 0 is zeros)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def shift_right(x: Tensor) -> Tensor:
    """(B, C, H, W) -> same shape, column j holds column j-1 (column 0 is zeros)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def gate(x: Tensor) -> Tensor:
    """Gated activation tanh(a) * sigmoid(b) of the two channel halves: (B, 2C, ...) -> (B, C, ...)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class VerticalConv(nn.Module):
    """Convolution over rows i - k//2 .. i and columns j - k//2 .. j + k//2 (output row i)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.half = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, (self.half + 1, kernel_size))

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        return self.conv(F.pad(x, (self.half, self.half, self.half, 0)))


class HorizontalConv(nn.Module):
    """Convolution over columns j - k//2 .. j of row i (output column j)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.half = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, (1, self.half + 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        return self.conv(F.pad(x, (self.half, 0, 0, 0)))


class GatedBlock(nn.Module):
    """One gated residual block on both streams, with optional conditioning on the gates.

    The last block updates only the horizontal stream: nothing reads the vertical stream after
    it (and parameters without gradients would also stall DDP).
    """

    def __init__(
        self, config: PixelSNAILConfig, condition_channels: int, updates_vertical: bool
    ) -> None:
        super().__init__()
        hidden, residual = config.hidden_channels, config.residual_channels
        self.vertical = VerticalConv(hidden, residual, config.kernel_size)
        self.horizontal = HorizontalConv(hidden, residual, config.kernel_size)
        self.vertical_to_horizontal = nn.Conv2d(residual, residual, 1)
        self.vertical_gates = nn.Conv2d(residual, 2 * hidden, 1) if updates_vertical else None
        self.horizontal_gates = nn.Conv2d(residual, 2 * hidden, 1)
        self.gate_channels = [2 * hidden if updates_vertical else 0, 2 * hidden]  # (v, h)
        self.condition = (
            nn.Conv2d(condition_channels, sum(self.gate_channels), 1)
            if condition_channels > 0
            else None
        )
        self.dropout = nn.Dropout(config.dropout)

    def condition_gates(self, condition: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """What the conditioning adds to the (vertical, horizontal) gates, or None."""
        if self.condition is None or condition is None:
            return None
        vertical, horizontal = self.condition(condition).split(self.gate_channels, dim=1)
        return vertical, horizontal  # (B, 2C or 0, ...), (B, 2C, ...)

    def forward(
        self, vertical: Tensor, horizontal: Tensor, condition: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Streams (B, C, H, W) each; condition (B, C_cond, H, W) or (B, C_cond, 1, 1) or None."""
        v_hidden = self.vertical(F.elu(vertical))  # (B, R, H, W), rows <= i
        h_hidden = self.horizontal(F.elu(horizontal)) + self.vertical_to_horizontal(
            shift_down(v_hidden)
        )  # (B, R, H, W), strictly before (i, j)
        h_gates = self.horizontal_gates(F.elu(h_hidden))  # (B, 2C, H, W)
        conditioning = self.condition_gates(condition)
        if conditioning is not None:
            h_gates = h_gates + conditioning[1]
        horizontal = horizontal + self.dropout(gate(h_gates))
        if self.vertical_gates is not None:
            v_gates = self.vertical_gates(F.elu(v_hidden))  # (B, 2C, H, W)
            if conditioning is not None:
                v_gates = v_gates + conditioning[0]
            vertical = vertical + self.dropout(gate(v_gates))
        return vertical, horizontal


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over raster positions, each query seeing keys at positions <= its own.

    Keys, values and queries come from the horizontal stream (which excludes the code at its own
    position) plus fixed (row, column) coordinates, so attending to position p itself is causal.

    The attention itself is PyTorch's fused ``scaled_dot_product_attention`` with a causal mask
    and, in training, dropout on the attention weights (the paper's dropout, Table 3). The flash
    and memory-efficient kernels (CUDA; the CPU flash kernel when dropout is off, as in
    evaluation and sampling) never hold the (T, T) weights: memory is linear in T = H x W. With
    dropout on, the CPU has no fused kernel and PyTorch falls back to its reference formula,
    which does build them.
    """

    def __init__(self, config: PixelSNAILConfig) -> None:
        super().__init__()
        hidden = config.hidden_channels
        self.heads = config.attention_heads
        inputs = hidden + 2  # features and (row, column) coordinates
        self.query = nn.Linear(inputs, hidden)
        # No key bias: it adds the same q.b to every score of a query, which softmax ignores, so
        # its true gradient is zero and Adam would only amplify rounding noise into it.
        self.key = nn.Linear(inputs, hidden, bias=False)
        self.value = nn.Linear(inputs, hidden)
        self.output = nn.Linear(hidden, hidden)
        self.dropout = config.dropout  # on the attention weights, in training only

    def project(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens (B, T, C + 2) -> query, key, value, each (B, heads, T, C / heads)."""
        query, key, value = (
            rearrange(proj(tokens), "b t (n d) -> b n t d", n=self.heads)  # (B, heads, T, d)
            for proj in (self.query, self.key, self.value)
        )
        return query, key, value

    def forward(self, horizontal: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W) attention output (not yet added to the stream)."""
        batch, _, height, width = horizontal.shape
        grid = coordinate_grid(height, width, horizontal)  # (2, H, W)
        features = torch.cat([F.elu(horizontal), grid.expand(batch, -1, -1, -1)], dim=1)
        tokens = rearrange(features, "b c h w -> b (h w) c")  # (B, T, C + 2)
        query, key, value = self.project(tokens)
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, heads, T, d)
        attended = self.output(rearrange(attended, "b n t d -> b t (n d)"))  # (B, T, C)
        return rearrange(attended, "b (h w) c -> b c h w", h=height, w=width)


def coordinate_grid(height: int, width: int, like: Tensor) -> Tensor:
    """(2, H, W) (row, column) coordinates in [-1, 1], on ``like``'s device and dtype."""
    rows = torch.linspace(-1, 1, height, device=like.device, dtype=like.dtype)
    cols = torch.linspace(-1, 1, width, device=like.device, dtype=like.dtype)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)


class ResBlock1x1(nn.Module):
    """x + Conv1x1(ELU(Conv1x1(ELU(x)))): a position-wise residual block of the output stack."""

    def __init__(self, channels: int, residual_channels: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels, residual_channels, 1)
        self.second = nn.Conv2d(residual_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.second(F.elu(self.first(F.elu(x))))


class ConditionResBlock(nn.Module):
    """Non-causal residual block of the conditioning stack (the upper codes are fully known)."""

    def __init__(self, channels: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.second = nn.Conv2d(channels, 2 * channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(gate(self.second(F.elu(self.first(F.elu(x))))))


class PriorOutput(NamedTuple):
    logits: Tensor  # (B, K, H, W) float, unnormalised log-probabilities of each code
    loss: Tensor  # () mean negative log-likelihood in nats per code


def _describe(value: object) -> str:
    """A tensor's dtype, shape and value range (for error messages); else its type."""
    if not isinstance(value, Tensor):
        return type(value).__name__
    text = f"{str(value.dtype).removeprefix('torch.')} of shape {tuple(value.shape)}"
    if value.numel() > 0 and not value.is_complex() and value.dtype != torch.bool:
        text += f" in [{value.min().item():g}, {value.max().item():g}]"
    return text


def _indices_below(indices: Tensor, upper: int) -> bool:
    """Whether every entry of an integer tensor lies in [0, upper) (true when empty)."""
    return indices.numel() == 0 or (int(indices.min()) >= 0 and int(indices.max()) < upper)


class PixelSNAIL(nn.Module):
    """Prior p(codes | class, upper codes) over one level's code map.

    Args:
        config: architecture; ``config.condition_sizes`` lists the sides of the upper levels'
            code maps (top first) this prior is conditioned on (empty for the top prior).
    """

    def __init__(self, config: PixelSNAILConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_channels
        self.embedding = nn.Embedding(config.codebook_size, hidden)
        self.vertical_input = VerticalConv(hidden, hidden, config.kernel_size)
        self.horizontal_input = HorizontalConv(hidden, hidden, config.kernel_size)
        self.vertical_input_to_horizontal = nn.Conv2d(hidden, hidden, 1)

        condition_channels = 0
        if config.condition_sizes:
            channels = config.condition_channels
            self.condition_embeddings = nn.ModuleList(
                nn.Embedding(config.codebook_size, channels) for _ in config.condition_sizes
            )
            self.condition_input = nn.Conv2d(
                channels * len(config.condition_sizes),
                channels,
                config.kernel_size,
                padding=config.kernel_size // 2,
            )
            self.condition_stack = nn.Sequential(
                *[
                    ConditionResBlock(channels, config.kernel_size, config.dropout)
                    for _ in range(config.condition_res_blocks)
                ]
            )
            condition_channels += channels
        if config.num_classes > 0:
            self.class_embedding = nn.Embedding(config.num_classes, config.condition_channels)
            condition_channels = max(condition_channels, config.condition_channels)
        if config.num_augmentations > 0:
            self.augmentation_embedding = nn.Embedding(
                config.num_augmentations, config.condition_channels
            )
            condition_channels = max(condition_channels, config.condition_channels)

        self.blocks = nn.ModuleList(
            GatedBlock(config, condition_channels, updates_vertical=index < config.num_layers - 1)
            for index in range(config.num_layers)
        )
        attention_layers = set(config.attention_layer_indices)
        self.attention = nn.ModuleDict(
            {str(i): CausalSelfAttention(config) for i in sorted(attention_layers)}
        )
        self.output_stack = nn.Sequential(
            *[
                ResBlock1x1(hidden, config.residual_channels)
                for _ in range(config.output_stack_layers)
            ]
        )
        self.output = nn.Conv2d(hidden, config.codebook_size, 1)
        self.activation_checkpointing = False  # see set_activation_checkpointing

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each residual block (gated, attention, conditioning, output stack) in the
        backward pass instead of keeping its intermediate maps: in training with gradients on,
        only the blocks' inputs stay alive. The global generators' states are saved with each
        block and restored for its recomputation, so dropout draws the same masks and the
        gradients equal the plain pass's; the cost is about one more forward pass."""
        self.activation_checkpointing = enabled

    def _run_block(self, block: nn.Module, *inputs: Tensor | None) -> Any:
        """``block(*inputs)``, checkpointed when asked, in training with gradients on."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    # ------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        codes: Tensor,
        labels: Tensor | None,
        condition_codes: list[Tensor] | None,
        augmentations: Tensor | None = None,
    ) -> None:
        """Raise ``ValueError`` when inputs do not fit this prior."""
        config = self.config
        side = config.code_size
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (side, side):
            raise ValueError(
                f"prior expects codes of shape (B, {side}, {side}), got {tuple(codes.shape)}"
            )
        if config.num_classes > 0:
            if labels is None:
                raise ValueError("this prior is class-conditional: give class labels")
            # A label of another shape would broadcast (one class for the whole batch).
            if (
                not isinstance(labels, Tensor)
                or labels.dtype not in (torch.int64, torch.int32)
                or tuple(labels.shape) != (len(codes),)
                or not _indices_below(labels, config.num_classes)
            ):
                raise ValueError(
                    f"class labels must be an int64 tensor of shape ({len(codes)},) with values "
                    f"in [0, {config.num_classes}), got {_describe(labels)}"
                )
        if augmentations is not None and (
            config.num_augmentations == 0
            or tuple(augmentations.shape) != (len(codes),)
            or not _indices_below(augmentations, config.num_augmentations)
        ):
            raise ValueError(
                f"augmentation indices must have shape ({len(codes)},) and lie in "
                f"[0, {config.num_augmentations})"
            )
        conditions = condition_codes or []
        if len(conditions) != len(config.condition_sizes):
            raise ValueError(
                f"prior expects codes of {len(config.condition_sizes)} upper level(s), got {len(conditions)}"
            )
        for upper, upper_side in zip(conditions, config.condition_sizes, strict=True):
            if tuple(upper.shape[1:]) != (upper_side, upper_side) or len(upper) != len(codes):
                raise ValueError(
                    f"upper-level codes must have shape ({len(codes)}, {upper_side}, {upper_side}), "
                    f"got {tuple(upper.shape)}"
                )

    def condition(
        self,
        labels: Tensor | None,
        condition_codes: list[Tensor] | None,
        augmentations: Tensor | None = None,
    ) -> Tensor | None:
        """Conditioning features (B, C_cond, H, W), (B, C_cond, 1, 1) for labels only, or None.

        ``augmentations`` (B,) int64 names the transform behind each code map; None means the
        identity (index 0). Computed once per image: during sampling it does not change.
        """
        config = self.config
        features = None
        if config.condition_sizes:
            assert condition_codes is not None
            side = config.code_size
            maps = []
            for embedding, upper in zip(self.condition_embeddings, condition_codes, strict=True):
                embedded = rearrange(embedding(upper), "b h w c -> b c h w")  # (B, C_cond, h, w)
                maps.append(F.interpolate(embedded, size=(side, side), mode="nearest"))
            features = self.condition_input(torch.cat(maps, dim=1))  # (B, C_cond, H, W)
            for block in self.condition_stack:
                features = self._run_block(block, features)
        if config.num_classes > 0:
            assert labels is not None
            class_features = self.class_embedding(labels)[:, :, None, None]  # (B, C_cond, 1, 1)
            features = class_features if features is None else features + class_features
        if config.num_augmentations > 0:
            if augmentations is None:  # the identity for every image: (1, C_cond, 1, 1)
                augmentation_features = self.augmentation_embedding.weight[0][None, :, None, None]
            else:  # (B, C_cond, 1, 1)
                augmentation_features = self.augmentation_embedding(augmentations)[:, :, None, None]
            features = (
                augmentation_features if features is None else features + augmentation_features
            )
        return features

    def condition_per_image(
        self, labels: Tensor | None, condition_codes: list[Tensor] | None
    ) -> Tensor | None:
        """``condition`` computed one image at a time into one (B, C_cond, H, W) tensor.

        The conditioning stack's intermediate maps (several per image, each C_cond x H x W)
        then exist for one image only: at the paper's sizes they, not the sampler state, would
        set the largest batch one accelerator can sample (``bench/README.md``). The features
        equal ``condition``'s up to float rounding.
        """
        batch = len(condition_codes[0]) if condition_codes else 0
        if not self.config.condition_sizes or batch <= 1:
            return self.condition(labels, condition_codes)  # embeddings only, or one image
        assert condition_codes is not None
        features = None
        for index in range(batch):
            one = self.condition(
                None if labels is None else labels[index : index + 1],
                [upper[index : index + 1] for upper in condition_codes],
            )  # (1, C_cond, H, W)
            if features is None:
                features = one.new_empty(batch, *one.shape[1:])  # (B, C_cond, H, W)
            features[index : index + 1] = one
        return features

    def forward(
        self,
        codes: Tensor,
        labels: Tensor | None = None,
        condition_codes: list[Tensor] | None = None,
        augmentations: Tensor | None = None,
    ) -> PriorOutput:
        """Logits of every code given the codes before it (teacher forcing) and the loss.

        Args:
            codes: (B, H, W) int64 in [0, K), this level's codes.
            labels: (B,) int64 class labels, required when ``num_classes > 0``.
            condition_codes: codes of the upper levels, top first, each (B, h_l, w_l) int64.
            augmentations: (B,) int64 transform indices for a prior with ``num_augmentations``;
                None means the identity (index 0).

        Returns:
            ``PriorOutput`` with logits (B, K, H, W) and mean NLL in nats per code.
        """
        self.check_inputs(codes, labels, condition_codes, augmentations)
        logits = self.logits(codes, self.condition(labels, condition_codes, augmentations))
        loss = F.cross_entropy(logits, codes)
        return PriorOutput(logits=logits, loss=loss)

    def logits(self, codes: Tensor, condition: Tensor | None) -> Tensor:
        """(B, H, W) codes and precomputed conditioning -> (B, K, H, W) logits."""
        x = rearrange(self.embedding(codes), "b h w c -> b c h w")  # (B, C, H, W)
        vertical = self.vertical_input(x)  # rows <= i
        horizontal = self.horizontal_input(shift_right(x)) + self.vertical_input_to_horizontal(
            shift_down(vertical)
        )  # strictly before (i, j)
        for index, block in enumerate(self.blocks):
            vertical, horizontal = self._run_block(block, vertical, horizontal, condition)
            if str(index) in self.attention:
                horizontal = horizontal + self._run_block(self.attention[str(index)], horizontal)
        for block in self.output_stack:
            horizontal = self._run_block(block, horizontal)
        return self.output(F.elu(horizontal))  # (B, K, H, W)
