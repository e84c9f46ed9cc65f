"""The PixelSNAIL prior: causality in every configuration, shapes, conditioning, loss."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch

from vqvae2.config import PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL

SIDE, K = 5, 7


def small_config(**changes) -> PixelSNAILConfig:
    values = dict(
        code_size=SIDE,
        codebook_size=K,
        hidden_channels=8,
        residual_channels=6,
        num_layers=3,
        attention_layers=0,
        attention_heads=2,
        kernel_size=3,
        dropout=0.0,
        output_stack_layers=1,
        condition_channels=4,
    )
    values.update(changes)
    return PixelSNAILConfig(**values)


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
