"""The PixelSNAIL prior: causality in every configuration, shapes, conditioning, loss."""

from __future__ import annotations

import dataclasses
import itertools
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vqvae2.model_configs import PixelSNAILConfig
from vqvae2.pixelsnail import CausalSelfAttention, PixelSNAIL
from vqvae2.sampling import sample_level_cached

from .conftest import tiny_prior_config as small_config

SIDE, K = 5, 7  # the code side and codebook size of small_config


def inputs_for(config: PixelSNAILConfig, batch: int = 2):
    codes = torch.randint(0, K, (batch, SIDE, SIDE))
    labels = torch.arange(batch) % config.num_classes if config.num_classes else None
    upper = [torch.randint(0, K, (batch, s, s)) for s in config.condition_sizes] or None
    return codes, labels, upper


CONFIGURATIONS = [
    dict(
        attention_layers=attention,
        num_classes=classes,
        condition_sizes=conditions,
        condition_res_blocks=2 if conditions else 0,
    )
    for attention, classes, conditions in itertools.product((0, 2), (0, 3), ((), (2,), (2, 3)))
] + [
    dict(attention_layers=2, num_augmentations=3),
    dict(num_classes=3, condition_sizes=(2,), condition_res_blocks=2, num_augmentations=3),
]


@pytest.mark.parametrize("changes", CONFIGURATIONS, ids=str)
def test_logits_depend_only_on_earlier_codes(changes):
    """Changing the code at raster position p leaves the logits at positions <= p unchanged and
    changes logits somewhere after p (and, with 3 layers of 3x3 kernels, at every later position)."""
    config = small_config(**changes)
    prior = PixelSNAIL(config).eval()
    codes, labels, upper = inputs_for(config)
    if config.num_augmentations:  # a transform other than the identity for one image
        prior = partial(prior, augmentations=torch.tensor([0, config.num_augmentations - 1]))
    with torch.no_grad():
        base = prior(codes, labels, upper).logits
        for position in range(SIDE * SIDE):
            row, column = divmod(position, SIDE)
            changed = codes.clone()
            changed[:, row, column] = (changed[:, row, column] + 1) % K
            difference = (prior(changed, labels, upper).logits - base).abs()
            per_position = difference.amax(dim=(0, 1)).flatten()  # (H*W,)
            assert per_position[: position + 1].max() == 0, f"position {position} leaks"
            if position < SIDE * SIDE - 1:
                assert per_position[position + 1 :].min() > 0, f"blind spot after {position}"


def test_shapes_and_loss_is_cross_entropy():
    config = small_config(
        attention_layers=1, num_classes=3, condition_sizes=(2,), condition_res_blocks=1
    )
    prior = PixelSNAIL(config).eval()
    codes, labels, upper = inputs_for(config, batch=4)
    output = prior(codes, labels, upper)
    assert output.logits.shape == (4, K, SIDE, SIDE)
    manual = -torch.log_softmax(output.logits, dim=1).gather(1, codes[:, None]).mean()
    torch.testing.assert_close(output.loss, manual)


def test_class_label_and_upper_codes_change_the_logits():
    config = small_config(num_classes=3, condition_sizes=(2,), condition_res_blocks=1)
    prior = PixelSNAIL(config).eval()
    codes, labels, upper = inputs_for(config)
    with torch.no_grad():
        base = prior(codes, labels, upper).logits
        other_class = prior(codes, (labels + 1) % 3, upper).logits
        other_upper = prior(codes, labels, [(upper[0] + 1) % K]).logits
    # The label and the upper codes reach even the first position, which sees no codes.
    assert (base - other_class)[:, :, 0, 0].abs().max() > 0
    assert (base - other_upper)[:, :, 0, 0].abs().max() > 0


def test_dropout_is_active_in_train_mode_only():
    prior = PixelSNAIL(small_config(dropout=0.5, attention_layers=1))
    codes, _, _ = inputs_for(prior.config)
    prior.train()
    assert not torch.equal(prior(codes).logits, prior(codes).logits)
    prior.eval()
    assert torch.equal(prior(codes).logits, prior(codes).logits)


def test_bad_inputs_are_named():
    prior = PixelSNAIL(small_config(num_classes=3, condition_sizes=(2,), condition_res_blocks=1))
    codes, labels, upper = inputs_for(prior.config)
    with pytest.raises(ValueError, match="shape"):
        prior(codes[:, :4], labels, upper)
    with pytest.raises(ValueError, match="give class labels"):
        prior(codes, None, upper)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        prior(codes, labels + 3, upper)
    with pytest.raises(ValueError, match="1 upper level"):
        prior(codes, labels, None)
    with pytest.raises(ValueError, match="upper-level codes must have shape"):
        prior(codes, labels, [torch.zeros(2, 3, 3, dtype=torch.long)])


def test_class_labels_of_another_shape_or_type_are_refused():
    """A label tensor that is not (B,) integers would broadcast one class over the batch."""
    prior = PixelSNAIL(small_config(num_classes=3)).eval()
    codes, labels, _ = inputs_for(prior.config, batch=3)  # labels 0, 1, 2
    for bad, got in [
        (labels[:1], "int64 of shape (1,) in [0, 0]"),  # one class for the batch
        (labels[:, None], "int64 of shape (3, 1) in [0, 2]"),
        (torch.tensor(1), "int64 of shape () in [1, 1]"),
        (labels.float(), "float32 of shape (3,) in [0, 2]"),
        (labels - 1, "int64 of shape (3,) in [-1, 1]"),
        ([0, 1, 2], "list"),
    ]:
        with pytest.raises(ValueError) as error:
            prior(codes, bad)
        assert str(error.value) == (
            f"class labels must be an int64 tensor of shape (3,) with values in [0, 3), got {got}"
        )
    with pytest.raises(ValueError, match=r"shape \(3,\) .* got int64 of shape \(1,\)"):
        sample_level_cached(prior, 3, labels[:1], generator=torch.Generator().manual_seed(0))
    assert prior(codes, labels.int()).logits.shape == (3, K, SIDE, SIDE)  # int32 is taken


def test_attention_layers_are_spread_over_the_blocks():
    assert small_config(num_layers=6, attention_layers=2).attention_layer_indices == (2, 5)
    assert small_config(num_layers=4, attention_layers=4).attention_layer_indices == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="divisible"):
        small_config(hidden_channels=9, attention_layers=1, attention_heads=2)


def test_augmentation_conditioning_defaults_to_the_identity_and_is_checked():
    config = small_config(num_classes=3, num_augmentations=4)
    prior = PixelSNAIL(config).eval()
    codes, labels, _ = inputs_for(config)
    with torch.no_grad():
        default = prior(codes, labels).logits
        identity = prior(codes, labels, augmentations=torch.zeros(2, dtype=torch.long)).logits
        flipped = prior(codes, labels, augmentations=torch.tensor([2, 2])).logits
    assert torch.equal(default, identity)
    assert (flipped - default)[:, :, 0, 0].abs().max() > 0  # reaches the first position
    with pytest.raises(ValueError, match=r"augmentation indices must .* lie in \[0, 4\)"):
        prior(codes, labels, augmentations=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="augmentation indices"):
        PixelSNAIL(small_config())(codes, augmentations=torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Fused causal attention


def explicit_attention(self: CausalSelfAttention, horizontal: torch.Tensor) -> torch.Tensor:
    """The attention before it was fused: the (T, T) scores, masked, softmax, dropout."""
    batch, _, height, width = horizontal.shape
    rows = torch.linspace(-1, 1, height, dtype=horizontal.dtype)
    cols = torch.linspace(-1, 1, width, dtype=horizontal.dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)
    features = torch.cat([F.elu(horizontal), grid.expand(batch, -1, -1, -1)], dim=1)
    tokens = rearrange(features, "b c h w -> b (h w) c")  # (B, T, C + 2)
    query, key, value = (
        rearrange(proj(tokens), "b t (n d) -> b n t d", n=self.heads)
        for proj in (self.query, self.key, self.value)
    )
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # (B, heads, T, T)
    positions = height * width
    allowed = torch.ones(positions, positions, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
    attended = rearrange(weights @ value, "b n t d -> b t (n d)")  # (B, T, C)
    return rearrange(self.output(attended), "b (h w) c -> b c h w", h=height, w=width)


def test_fused_attention_matches_the_explicit_formula(monkeypatch):
    """Module outputs on a non-square map, then a whole prior's logits, agree to 1e-5."""
    attention = CausalSelfAttention(small_config(attention_layers=1, hidden_channels=12)).eval()
    attention.heads = 3  # d = 4
    horizontal = torch.randn(2, 12, 4, 7)
    with torch.no_grad():
        torch.testing.assert_close(
            attention(horizontal), explicit_attention(attention, horizontal), rtol=0, atol=1e-5
        )
    config = small_config(attention_layers=2, num_classes=3, condition_sizes=(2,))
    prior = PixelSNAIL(dataclasses.replace(config, condition_res_blocks=1)).eval()
    codes, labels, upper = inputs_for(prior.config)
    with torch.no_grad():
        fused = prior(codes, labels, upper).logits
        monkeypatch.setattr(CausalSelfAttention, "forward", explicit_attention)
        explicit = prior(codes, labels, upper).logits
    assert not torch.equal(fused, explicit)  # two computations, not one
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_fused_attention_sees_exactly_the_positions_up_to_its_own(training):
    """Perturbing the features at position p changes the attention output at every position
    >= p (no blind spot) and at none before it (no leak), with dropout drawn the same way."""
    config = small_config(attention_layers=1, hidden_channels=12, dropout=0.3)
    attention = CausalSelfAttention(config).train(training)
    height, width = 3, 5
    horizontal = torch.randn(2, 12, height, width)

    def output(features: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout mask for both calls
        with torch.no_grad():
            return rearrange(attention(features), "b c h w -> (h w) b c")  # (T, B, C)

    base = output(horizontal)
    for position in range(height * width):
        row, column = divmod(position, width)
        changed = horizontal.clone()
        changed[:, :, row, column] += 1.0
        difference = (output(changed) - base).abs().amax(dim=(1, 2))  # (T,)
        assert torch.all(difference[:position] == 0), f"position {position} leaks"
        assert difference[position:].min() > 0, f"blind spot at or after {position}"


def test_attention_dropout_drops_whole_weights_in_training():
    """At the first position each head attends to one key with weight 1: dropout on the weights
    gives that head's value scaled by 1 / (1 - p) or zeros, as a whole; eval mode never drops."""
    probability, heads, head_dim = 0.5, 4, 3
    config = small_config(attention_layers=1, hidden_channels=heads * head_dim)
    attention = CausalSelfAttention(dataclasses.replace(config, dropout=probability))
    attention.heads = heads
    with torch.no_grad():
        attention.output.weight.copy_(torch.eye(heads * head_dim))
        attention.output.bias.zero_()
    horizontal = torch.randn(64, heads * head_dim, 2, 2)
    tokens = torch.cat([F.elu(horizontal[:, :, 0, 0]), torch.full((64, 2), -1.0)], dim=1)
    value = rearrange(attention.value(tokens), "b (n d) -> b n d", n=heads).detach()
    with torch.no_grad():
        attention.train()
        first = rearrange(attention(horizontal)[:, :, 0, 0], "b (n d) -> b n d", n=heads)
        attention.eval()
        kept = rearrange(attention(horizontal)[:, :, 0, 0], "b (n d) -> b n d", n=heads)
    torch.testing.assert_close(kept, value, rtol=0, atol=1e-6)
    dropped = first.abs().amax(dim=-1) == 0  # (B, heads)
    torch.testing.assert_close(
        first[~dropped], value[~dropped] / (1 - probability), rtol=0, atol=1e-5
    )
    assert 0.3 < dropped.float().mean() < 0.7  # 256 heads, p = 0.5


def test_condition_per_image_equals_the_batched_condition():
    config = small_config(num_classes=3, condition_sizes=(2, 3), condition_res_blocks=2)
    prior = PixelSNAIL(dataclasses.replace(config, num_augmentations=2)).eval()
    _, labels, upper = inputs_for(prior.config, batch=4)
    with torch.no_grad():
        batched = prior.condition(labels, upper)
        per_image = prior.condition_per_image(labels, upper)
    assert per_image.shape == batched.shape == (4, 4, SIDE, SIDE)
    torch.testing.assert_close(per_image, batched, rtol=0, atol=1e-6)
    assert (per_image[0] - per_image[1]).abs().max() > 0  # images differ: no broadcasting slip
