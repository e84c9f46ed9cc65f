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

``IncrementalSampler`` at the end computes the same logits one position at a time for sampling
(and for entropy coding), holding per block only the rows its convolutions still read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import PixelSNAILConfig


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
            features = self.condition_stack(self.condition_input(torch.cat(maps, dim=1)))
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
            vertical, horizontal = block(vertical, horizontal, condition)
            if str(index) in self.attention:
                horizontal = horizontal + self.attention[str(index)](horizontal)
        return self.output(F.elu(self.output_stack(horizontal)))  # (B, K, H, W)


# ----------------------------------------------------------------------------------------------
# Cached incremental sampling


def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution applied to one position's features: (B, C_in) -> (B, C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _push_row(rows: Tensor, row: Tensor | None, margin: int) -> None:
    """Shift a window of rows (B, C, n, W + 2 * margin) up by one, in place, and put ``row``
    (B, C, 1, W) as its last row between the margins (zeros when None)."""
    rows[:, :, :-1] = rows[:, :, 1:].clone()
    rows[:, :, -1] = 0
    if row is not None:
        rows[:, :, -1:, margin : rows.shape[-1] - margin] = row


class IncrementalSampler:
    """Computes a prior's logits one raster position at a time, keeping only what later positions read.

    The horizontal stream is evaluated at the new position through every block (its convolutions
    read the current row to its left), the vertical stream one whole row at a time once the row's
    codes are known, attention appends the new key and value to its cache, and the conditioning
    features are kept once at the conditioning stack's width and projected into each block's
    gates a row at a time. The result equals the full forward pass (teacher forcing) up to float
    rounding.

    State (k = kernel_size // 2, W the map side, T = W * W positions, C hidden and R residual
    channels, L blocks, C_c conditioning channels, A attention layers with ``heads`` heads):

    ================  ==========================  ===================================================
    ``embedded``      (B, C, k + 1, W + 2k + 1)   code embeddings of rows i-k .. i (the current row
                                                  last; logical column j stored at j + k + 1)
    ``vertical[l]``   (B, C, k + 1, W + 2k)       ELU of the vertical stream entering block l, rows
                                                  i-k .. i (column j at j + k); L of them
    ``horizontal[l]`` (B, C, W + k)               ELU of the horizontal stream entering block l on
                                                  the current row (column j at j + k); L of them
    ``input_above``   (B, C, W)                   what the first horizontal layer takes from the
                                                  row above, plus that layer's bias
    ``above[l]``      (B, R, W)                   the same for block l's horizontal hidden layer
    ``gate_offsets``  (B, 2C, W) per block        the horizontal gates' bias plus the current
                                                  row's conditioning; (B, 2C, 1) for class or
                                                  augmentation conditioning only, none without
    ``condition``     (B, C_c, W, W)              the conditioning features (or (B, C_c, 1, 1))
    ``keys[a]``,      (B, heads, T, C / heads)    attention keys and values of every position so
    ``values[a]``                                 far; A layers
    ================  ==========================  ===================================================

    That is, per image, C(k+1)(W+2k+1) + L C(k+1)(W+2k) + L C(W+k) + C W + L R W elements,
    plus L 2C W + C_c W^2 with upper levels to condition on (L 2C + C_c with only a class or
    augmentation), plus 2 A C T with attention; and a (T, 2) table of coordinates shared by the
    batch. Per block it is linear in W; the terms in T = W^2 are the attention cache and the
    conditioning features, neither per block (float32, batch 1: 29 MiB for the paper's ImageNet
    bottom prior, 53 MiB for the FFHQ bottom prior; ``bench/README.md``).

    Use ``logits_at(row, col)`` then ``set_codes(row, col, codes)`` for every position in raster
    order (``ValueError`` otherwise). Inference only: no gradients flow through the state.
    """

    @torch.no_grad()
    def __init__(self, prior: PixelSNAIL, batch_size: int, condition: Tensor | None) -> None:
        self.prior = prior
        config = prior.config
        self.side = side = config.code_size
        self.half = half = config.kernel_size // 2
        hidden, residual = config.hidden_channels, config.residual_channels
        parameter = next(prior.parameters())

        def zeros(*size: int) -> Tensor:
            return torch.zeros(*size, device=parameter.device, dtype=parameter.dtype)

        self.embedded = zeros(batch_size, hidden, half + 1, side + 2 * half + 1)
        self.vertical = [zeros(batch_size, hidden, half + 1, side + 2 * half) for _ in prior.blocks]
        self.horizontal = [zeros(batch_size, hidden, side + half) for _ in prior.blocks]
        # Row 0 has nothing above it: the 1x1 convolutions of the (zero) shifted vertical stream
        # leave their biases, to which the horizontal convolutions' biases are added once here.
        self.input_above = zeros(batch_size, hidden, side)
        self.input_above += (
            prior.vertical_input_to_horizontal.bias + prior.horizontal_input.conv.bias
        )[:, None]
        self.above = [zeros(batch_size, residual, side) for _ in prior.blocks]
        for above, block in zip(self.above, prior.blocks, strict=True):
            above += (block.vertical_to_horizontal.bias + block.horizontal.conv.bias)[:, None]

        self.condition = condition  # (B, C_c, H, W), (B or 1, C_c, 1, 1) or None
        self.spatial = condition is not None and condition.shape[-1] > 1
        # Each block's conditioning weights, split into the vertical and horizontal gates' parts.
        self.condition_weights = [
            None
            if block.condition is None or condition is None
            else (
                block.condition.weight.split(block.gate_channels),  # (2C or 0, C_c, 1, 1), (2C, ..)
                block.condition.bias.split(block.gate_channels),
            )
            for block in prior.blocks
        ]
        first_row = self._condition_row(0)
        self.gate_offsets = [
            self._horizontal_gate_offsets(index, first_row) for index in range(len(prior.blocks))
        ]  # per block (B, 2C, W) spatial, (B or 1, 2C, 1) constant, (2C, 1) bias only

        attention_layers = dict(prior.attention.items())
        self.attention_after = [attention_layers.get(str(i)) for i in range(len(prior.blocks))]
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        for index, attention in enumerate(self.attention_after):
            if attention is not None:
                cache = (batch_size, attention.heads, side * side, hidden // attention.heads)
                self.keys[index], self.values[index] = zeros(*cache), zeros(*cache)
        self.coordinates = (
            rearrange(coordinate_grid(side, side, parameter), "c h w -> (h w) c")  # (T, 2)
            if prior.attention
            else None
        )
        # Per-position work is tiny, so convolutions become matrix products on flat windows:
        # a (out, in, 1, k) weight flattens in the same (in, k) order as a (B, in, k) window.
        self.input_weight = prior.horizontal_input.conv.weight.flatten(1).t()  # (C(k+1), C)
        self.block_weights = [
            (
                block.horizontal.conv.weight.flatten(1).t(),  # (C(k+1), R)
                block.horizontal_gates.weight.flatten(1).t(),  # (R, 2C)
            )
            for block in prior.blocks
        ]
        self.position = 0  # the next raster position to set
        self.computed = -1  # the last position whose logits (and stream values) were computed

    # ------------------------------------------------------------------------------------------
    def state_tensors(self) -> list[Tensor]:
        """Every tensor the state holds (weights and their views excluded)."""
        tensors = [self.embedded, *self.vertical, *self.horizontal, self.input_above, *self.above]
        if self.condition is not None:
            tensors += [self.condition, *self.gate_offsets]
        tensors += [*self.keys.values(), *self.values.values()]
        if self.coordinates is not None:
            tensors.append(self.coordinates)
        return tensors

    def state_bytes(self) -> int:
        """Bytes of the state (``state_tensors``), numel x element size."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    # ------------------------------------------------------------------------------------------
    def _condition_row(self, row: int) -> Tensor | None:
        """Conditioning features of one row (B, C_c, 1, W), constant (B, C_c, 1, 1), or None."""
        if self.condition is None or not self.spatial:
            return self.condition
        return self.condition[:, :, row : row + 1]

    def _horizontal_gate_offsets(self, index: int, condition_row: Tensor | None) -> Tensor:
        """Block ``index``'s horizontal gates' bias plus the conditioning of one row.

        Returns (B, 2C, W) for spatial conditioning, (B or 1, 2C, 1) for constant, (2C, 1) none.
        """
        bias = self.prior.blocks[index].horizontal_gates.bias[:, None]  # (2C, 1)
        weights = self.condition_weights[index]
        if weights is None or condition_row is None:
            return bias
        condition = F.conv2d(condition_row, weights[0][1], weights[1][1])  # (B, 2C, 1, W or 1)
        return bias + condition[:, :, 0]  # (B, 2C, W or 1)

    def _check_position(self, row: int, col: int) -> int:
        position = row * self.side + col
        if not (0 <= row < self.side and 0 <= col < self.side) or position != self.position:
            expected = divmod(self.position, self.side)
            raise ValueError(
                f"positions go in raster order: expected {expected}, got ({row}, {col})"
            )
        return position

    def _attend(self, index: int, features: Tensor, position: int) -> Tensor:
        """Attention output (B, C) at one position from features (B, C), caching key and value."""
        attention = self.attention_after[index]
        assert attention is not None and self.coordinates is not None
        coordinates = self.coordinates[position].expand(features.shape[0], -1)  # (B, 2)
        token = torch.cat([F.elu(features), coordinates], dim=1)[:, None]  # (B, 1, C + 2)
        query, key, value = attention.project(token)  # (B, heads, 1, d) each
        keys, values = self.keys[index], self.values[index]
        keys[:, :, position : position + 1] = key
        values[:, :, position : position + 1] = value
        attended = F.scaled_dot_product_attention(
            query, keys[:, :, : position + 1], values[:, :, : position + 1]
        )  # (B, heads, 1, d): one query sees every key so far, no mask needed
        return attention.output(rearrange(attended, "b n 1 d -> b (n d)"))  # (B, C)

    @torch.no_grad()
    def logits_at(self, row: int, col: int) -> Tensor:
        """Logits (B, K) of the code at (row, col); every earlier code must have been set."""
        position = self._check_position(row, col)
        prior, half = self.prior, self.half
        window = self.embedded[:, :, half, col : col + half + 1]  # (B, C, k+1): shift_right(x)
        horizontal = torch.addmm(
            self.input_above[:, :, col], window.flatten(1), self.input_weight
        )  # (B, C)
        for index, (conv_weight, gates_weight) in enumerate(self.block_weights):
            stored = self.horizontal[index]  # (B, C, W + k)
            stored[:, :, col + half] = F.elu(horizontal)
            window = stored[:, :, col : col + half + 1].flatten(1)  # (B, C(k+1))
            hidden = torch.addmm(self.above[index][:, :, col], window, conv_weight)  # (B, R)
            offsets = self.gate_offsets[index]
            gates = torch.addmm(
                offsets[..., col if offsets.shape[-1] > 1 else 0], F.elu(hidden), gates_weight
            )  # (B, 2C)
            horizontal = horizontal + gate(gates)
            if self.attention_after[index] is not None:
                horizontal = horizontal + self._attend(index, horizontal, position)
        for block in prior.output_stack:
            horizontal = horizontal + _pointwise(
                block.second, F.elu(_pointwise(block.first, F.elu(horizontal)))
            )
        self.computed = position
        return _pointwise(prior.output, F.elu(horizontal))  # (B, K)

    @torch.no_grad()
    def set_codes(self, row: int, col: int, codes: Tensor) -> None:
        """Record the codes (B,) chosen at (row, col); after a row's last code, advance the
        vertical stream by that row. ``logits_at(row, col)`` must have been called first."""
        position = self._check_position(row, col)
        if self.computed != position:
            raise ValueError(f"call logits_at({row}, {col}) before set_codes({row}, {col}, ...)")
        self.embedded[:, :, self.half, col + self.half + 1] = self.prior.embedding(codes)
        self.position += 1
        if col == self.side - 1 and row < self.side - 1:  # the last row has no reader below
            self._advance_row(row)

    def _advance_row(self, row: int) -> None:
        """The vertical stream over ``row`` (all its codes known), and what row + 1 reads from it."""
        prior, half = self.prior, self.half
        # The embedded rows row-k .. row with their column margins: the input layer's window.
        vertical = prior.vertical_input.conv(self.embedded[:, :, :, 1:])  # (B, C, 1, W)
        self.input_above.copy_(
            prior.vertical_input_to_horizontal(vertical)[:, :, 0]
            + prior.horizontal_input.conv.bias[:, None]
        )  # (B, C, W)
        _push_row(self.embedded, None, half)  # the next row starts empty
        condition_row, next_condition_row = self._condition_row(row), self._condition_row(row + 1)
        for index, block in enumerate(prior.blocks):
            rows = self.vertical[index]  # (B, C, k+1, W + 2k)
            _push_row(rows, F.elu(vertical), half)
            hidden = block.vertical.conv(rows)  # (B, R, 1, W)
            self.above[index].copy_(
                block.vertical_to_horizontal(hidden)[:, :, 0] + block.horizontal.conv.bias[:, None]
            )  # (B, R, W)
            if self.spatial:
                self.gate_offsets[index].copy_(
                    self._horizontal_gate_offsets(index, next_condition_row)
                )
            if block.vertical_gates is None:
                break  # the last block leaves the vertical stream alone
            gates = block.vertical_gates(F.elu(hidden))  # (B, 2C, 1, W)
            weights = self.condition_weights[index]
            if weights is not None and condition_row is not None:
                gates = gates + F.conv2d(condition_row, weights[0][0], weights[1][0])
            vertical = vertical + gate(gates)
