"""The configs of the paper's models: ``VQVAEConfig`` (Section 3.1, Table 5), ``PixelSNAILConfig``
(Section 3.2, Tables 3-4) and the small ``ClassifierConfig``, each frozen and validated, and the
checks that priors fit a VQ-VAE and the data they model (Razavi, van den Oord, Vinyals 2019).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ._helpers import check, check_at_least


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and (value & (value - 1)) == 0


@dataclass(frozen=True)
class VQVAEConfig:
    """Hierarchical VQ-VAE (paper Section 3.1, Algorithm 1). Defaults are Table 5 (ImageNet)."""

    image_size: int = 256  # square input side in pixels (Table 5: 256 ImageNet, 1024 FFHQ)
    in_channels: int = 3  # 1 for grey, 3 for RGB
    num_levels: int = 2  # latent maps: 2 for 256x256, 3 for 1024x1024 (Section 3.1)
    hidden_channels: int = 128  # Table 5 "hidden units"
    residual_channels: int = 64  # Table 5 "residual units" (bottleneck of each residual block)
    num_res_blocks: int = 2  # Table 5 "layers": residual blocks per encoder / decoder stack
    codebook_size: int = 512  # K, Table 5 "codebook size"
    embedding_dim: int = 64  # D, Table 5 "codebook dimension"
    commitment_weight: float = 0.25  # beta, eq. 2 and Table 5
    ema_decay: float = 0.99  # gamma of the EMA codebook updates (Section 2.1)
    ema_epsilon: float = 1e-5  # Laplace smoothing of the EMA cluster counts (Sonnet VQ-VAE)
    dead_code_after_steps: int = 100  # re-seed a code unused this many train steps; 0 = never
    bottom_downsample: int = 4  # image -> bottom latent factor (64x64 from 256x256, Fig. 2a)
    encoder_kernel_size: int = 3  # Table 5 "encoder conv filter size"
    upsample_kernel_size: int = 4  # Table 5 "upsampling conv filter size" (transposed convs)
    # Residual blocks (hidden/2 wide) after each intermediate upsampling of the image decoder,
    # i.e. at the finer resolutions the paper's decoder crosses with transposed convs alone.
    decoder_fine_blocks: int = 0
    # Encoder gradient through the quantizer: the paper's straight-through copy, or the rotation
    # trick (Fifty et al. 2024), which rotates and rescales the decoder's gradient from the code
    # vector onto the encoder output. The forward pass is the same either way.
    gradient_estimator: Literal["straight_through", "rotation"] = "straight_through"
    # Not in the paper: the probability that a training image is decoded from a random prefix
    # of its levels (the top alone, the top two, ...), the levels below replaced by each level's
    # learned "absent" vector, which decoding then also puts in place of any level it leaves
    # out; partial hierarchies so decode to whole, coarser images (Fig. 3). 0: zeros stand in.
    level_dropout: float = 0.0
    # Not in the paper: the weight of a level-wise reconstruction target. For the top level
    # alone, the top two, ... a light decoder of its own maps those levels to the image, and
    # the weighted mean of their squared errors joins the loss, so the upper levels must hold
    # what a coarse picture needs; decoding a prefix of the levels then uses its decoder.
    # 0: none (the paper's objective).
    prefix_decoder_weight: float = 0.0

    def __post_init__(self) -> None:
        self._check_architecture()
        self._check_training()

    def _check_architecture(self) -> None:
        """The shapes, widths and kernels of the networks."""
        check(
            self.in_channels in (1, 3), f"model.in_channels must be 1 or 3, got {self.in_channels}"
        )
        check(
            1 <= self.num_levels <= 3, f"model.num_levels must be 1, 2 or 3, got {self.num_levels}"
        )
        check(
            _is_power_of_two(self.bottom_downsample) and self.bottom_downsample >= 2,
            f"model.bottom_downsample must be a power of two >= 2, got {self.bottom_downsample}",
        )
        total = self.total_downsample
        check(
            self.image_size >= total and self.image_size % total == 0,
            f"model.image_size={self.image_size} must be a positive multiple of the total "
            f"downsampling {total} (bottom_downsample {self.bottom_downsample} x 2 per extra level)",
        )
        check(
            self.codebook_size >= 2, f"model.codebook_size must be >= 2, got {self.codebook_size}"
        )
        check_at_least(self, "model", ("hidden_channels", "residual_channels", "embedding_dim"), 1)
        check_at_least(self, "model", ("num_res_blocks", "decoder_fine_blocks"), 0)
        check(
            self.encoder_kernel_size % 2 == 1,
            f"model.encoder_kernel_size must be odd, got {self.encoder_kernel_size}",
        )
        check(
            self.upsample_kernel_size >= 2 and self.upsample_kernel_size % 2 == 0,
            f"model.upsample_kernel_size must be even and >= 2, got {self.upsample_kernel_size}",
        )

    def _check_training(self) -> None:
        """The loss weights, the codebook's updates and the optional training targets."""
        check(
            self.commitment_weight >= 0,
            f"model.commitment_weight must be >= 0, got {self.commitment_weight}",
        )
        check(
            0.0 <= self.ema_decay < 1.0, f"model.ema_decay must be in [0, 1), got {self.ema_decay}"
        )
        check(self.ema_epsilon > 0, f"model.ema_epsilon must be > 0, got {self.ema_epsilon}")
        check(
            0.0 <= self.level_dropout <= 1.0,
            f"model.level_dropout must be in [0, 1], got {self.level_dropout}",
        )
        check(
            self.prefix_decoder_weight >= 0,
            f"model.prefix_decoder_weight must be >= 0, got {self.prefix_decoder_weight}",
        )
        # The prefix decoders decode the top 1 .. num_levels - 1 levels: one level has none.
        check(
            self.prefix_decoder_weight == 0 or self.num_levels >= 2,
            f"model.prefix_decoder_weight={self.prefix_decoder_weight} needs num_levels >= 2 "
            "(it weighs decoders of the top levels without the bottom), got num_levels=1",
        )
        check(
            self.dead_code_after_steps >= 0,
            f"model.dead_code_after_steps must be >= 0, got {self.dead_code_after_steps}",
        )

    @property
    def total_downsample(self) -> int:
        """Image side / top latent side."""
        return self.bottom_downsample * 2 ** (self.num_levels - 1)

    @property
    def latent_sizes(self) -> tuple[int, ...]:
        """Side of each latent map, top level first (e.g. (32, 64) for ImageNet-256)."""
        bottom = self.image_size // self.bottom_downsample
        return tuple(bottom // 2 ** (self.num_levels - 1 - i) for i in range(self.num_levels))

    @property
    def level_names(self) -> tuple[str, ...]:
        """Names of the levels, top first: ('top', 'middle', 'bottom') for three levels."""
        return {1: ("bottom",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}[
            self.num_levels
        ]


@dataclass(frozen=True)
class PixelSNAILConfig:
    """Autoregressive prior over one level's codes (Section 3.2). Defaults: Table 3 top prior.

    ``code_size``, ``codebook_size``, ``condition_sizes`` and ``num_classes`` describe the data
    the prior models; ``train-prior`` fills them in from the VQ-VAE and the dataset.
    """

    code_size: int = 32  # side of this level's code map (Table 3 "input size")
    codebook_size: int = 512  # K of the VQ-VAE level modelled
    hidden_channels: int = 512  # Table 3 "hidden units": width of both streams
    residual_channels: int = 2048  # Table 3 "residual units": inner width of each block
    num_layers: int = 20  # Table 3 "layers": gated residual blocks
    attention_layers: int = 4  # Table 3 "attention layers", spread evenly over the blocks
    attention_heads: int = 8  # Table 3 "attention heads"
    kernel_size: int = 5  # Table 3 "conv filter size"; odd, >= 3
    dropout: float = 0.1  # Table 3 "dropout", after each block and on the attention weights
    output_stack_layers: int = 20  # Table 3 "output stack layers": 1x1 residual blocks
    condition_res_blocks: int = 0  # Table 3 "conditioning stack residual blocks" (lower priors)
    condition_channels: int = 512  # width of the conditioning stack and class embedding
    condition_sizes: tuple[int, ...] = ()  # sides of the upper levels' code maps, top first
    num_classes: int = 0  # > 0 makes the prior class-conditional
    # > 0: also conditioned on which of this many image transforms made the codes (index 0 the
    # identity, used for evaluation and sampling): distribution augmentation (Jun et al., 2020)
    num_augmentations: int = 0

    def __post_init__(self) -> None:
        check_at_least(
            self,
            "prior",
            (
                "code_size",
                "hidden_channels",
                "residual_channels",
                "num_layers",
                "attention_heads",
                "condition_channels",
            ),
            1,
        )
        check(
            self.codebook_size >= 2, f"prior.codebook_size must be >= 2, got {self.codebook_size}"
        )
        check(
            0 <= self.attention_layers <= self.num_layers,
            f"prior.attention_layers must be in [0, num_layers={self.num_layers}], "
            f"got {self.attention_layers}",
        )
        check(
            self.attention_layers == 0 or self.hidden_channels % self.attention_heads == 0,
            f"prior.hidden_channels={self.hidden_channels} must be divisible by "
            f"prior.attention_heads={self.attention_heads}",
        )
        # A 1x1 kernel leaves a blind spot: the vertical stream never reaches column j + 1 of
        # the rows above, and only attention could see it.
        check(
            self.kernel_size >= 3 and self.kernel_size % 2 == 1,
            f"prior.kernel_size must be odd and >= 3, got {self.kernel_size}",
        )
        check(0.0 <= self.dropout < 1.0, f"prior.dropout must be in [0, 1), got {self.dropout}")
        check_at_least(
            self,
            "prior",
            ("output_stack_layers", "condition_res_blocks", "num_classes", "num_augmentations"),
            0,
        )
        check(
            all(size >= 1 for size in self.condition_sizes),
            f"prior.condition_sizes must be positive, got {list(self.condition_sizes)}",
        )

    @property
    def attention_layer_indices(self) -> tuple[int, ...]:
        """Blocks followed by attention: evenly spread, the last block always among them."""
        count, layers = self.attention_layers, self.num_layers
        return tuple((i + 1) * layers // count - 1 for i in range(count))


# Fields of a prior that describe the data it models: train-prior sets them from the VQ-VAE
# and the code store, so a prior's config file or overrides must leave them out.
PRIOR_DATA_FIELDS = (
    "code_size",
    "codebook_size",
    "condition_sizes",
    "num_classes",
    "num_augmentations",
)


@dataclass(frozen=True)
class ClassifierConfig:
    """Small convolutional image classifier (for rejection sampling and the evaluation metrics).

    ``image_size``, ``in_channels`` and ``num_classes`` are filled in from the data.
    """

    image_size: int = 32  # square input side
    in_channels: int = 1  # 1 grey, 3 RGB
    num_classes: int = 10  # output classes
    stage_channels: tuple[int, ...] = (32, 64, 128)  # two 3x3 convs then 2x2 max-pool per stage
    dropout: float = 0.3  # before the final linear layer

    def __post_init__(self) -> None:
        check(
            self.in_channels in (1, 3),
            f"classifier.in_channels must be 1 or 3, got {self.in_channels}",
        )
        check(self.num_classes >= 2, f"classifier.num_classes must be >= 2, got {self.num_classes}")
        check(len(self.stage_channels) >= 1, "classifier.stage_channels must not be empty")
        check(
            self.image_size % 2 ** len(self.stage_channels) == 0,
            f"classifier.image_size={self.image_size} must be divisible by "
            f"2^{len(self.stage_channels)} (one 2x2 pool per stage)",
        )
        check(
            0.0 <= self.dropout < 1.0, f"classifier.dropout must be in [0, 1), got {self.dropout}"
        )


def check_priors_fit(vqvae: VQVAEConfig, priors: Sequence[PixelSNAILConfig]) -> None:
    """Raise ``ValueError`` unless the prior configs (top first) fit the VQ-VAE's levels and
    codebook."""
    if len(priors) != vqvae.num_levels:
        raise ValueError(
            f"the VQ-VAE has {vqvae.num_levels} levels but {len(priors)} priors were given"
        )
    for level, prior in enumerate(priors):
        name, size = vqvae.level_names[level], vqvae.latent_sizes[level]
        if prior.codebook_size != vqvae.codebook_size:
            raise ValueError(
                f"the {name} prior models {prior.codebook_size} codes, the VQ-VAE has "
                f"{vqvae.codebook_size}: it was trained on another VQ-VAE"
            )
        if prior.code_size != size:
            raise ValueError(
                f"the {name} prior models {prior.code_size}x{prior.code_size} maps, "
                f"the VQ-VAE's {name} level is {size}x{size}"
            )
        if tuple(prior.condition_sizes) != tuple(vqvae.latent_sizes[:level]):
            raise ValueError(
                f"the {name} prior is conditioned on other levels than the VQ-VAE has above it"
            )


def prior_for_data(prior: PixelSNAILConfig, from_data: dict[str, Any]) -> PixelSNAILConfig:
    """``prior`` with its data fields (``PRIOR_DATA_FIELDS``) set from the data; a field set by
    hand to another value than both its default and the data's is refused rather than silently
    replaced."""
    defaults = PixelSNAILConfig()
    for name, value in from_data.items():
        given = getattr(prior, name)
        check(
            given == getattr(defaults, name) or given == value,
            f"prior.{name}={given} does not fit the data ({value}): it is set from the "
            "VQ-VAE and the extracted codes, leave it at its default",
        )
    return replace(prior, **from_data)
