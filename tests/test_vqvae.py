"""Properties of the hierarchical VQ-VAE (Section 3.1, Algorithm 1)."""

from __future__ import annotations

import pytest
import torch

from vqvae2.config import VQVAERunConfig, load_config
from vqvae2.vqvae import VQVAE2, ResBlock

from .conftest import tiny_config


@pytest.mark.parametrize(
    ("num_levels", "image_size", "expected"),
    [(1, 16, [(4, 4)]), (2, 16, [(2, 2), (4, 4)]), (3, 32, [(2, 2), (4, 4), (8, 8)])],
)
def test_latent_shapes_per_level(num_levels, image_size, expected):
    config = tiny_config(num_levels=num_levels, image_size=image_size)
    model = VQVAE2(config)
    images = torch.rand(2, 1, image_size, image_size) * 2 - 1
    output = model(images)
    assert [tuple(c.shape[1:]) for c in output.codes] == expected
    assert output.reconstruction.shape == images.shape
    assert list(config.latent_sizes) == [side for side, _ in expected]


def test_decode_codes_of_encode_equals_eval_forward():
    model = VQVAE2(tiny_config(num_levels=3, image_size=32)).eval()
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        forward = model(images).reconstruction
        decoded = model.decode_codes(model.encode(images))
    torch.testing.assert_close(decoded, forward, rtol=0, atol=1e-5)


def test_decoder_fine_blocks_sit_at_the_intermediate_resolution():
    """decoder_fine_blocks adds residual blocks after the decoder's intermediate upsampling."""
    plain = VQVAE2(tiny_config(image_size=16))
    model = VQVAE2(tiny_config(image_size=16, decoder_fine_blocks=2)).eval()
    hidden = model.config.hidden_channels
    seen: list[tuple[int, ...]] = []
    for module in model.decoder.modules():
        if isinstance(module, ResBlock):
            module.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[1:])))
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        output = model(images)
        decoded = model.decode_codes(model.encode(images))
    # Per decoder pass: the residual stack at the bottom latent (one block, 4x4, hidden wide),
    # then the two fine blocks at 8x8.
    assert seen == ([(hidden, 4, 4)] + [(hidden // 2, 8, 8)] * 2) * 2
    assert output.reconstruction.shape == images.shape
    torch.testing.assert_close(decoded, output.reconstruction, rtol=0, atol=1e-5)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    half, inner = hidden // 2, max(model.config.residual_channels // 2, 1)
    assert extra == 2 * (half * inner * 9 + inner + inner * half + half)


@pytest.mark.parametrize("estimator", ["straight_through", "rotation"])
def test_gradient_reaches_every_encoder(estimator):
    model = VQVAE2(tiny_config(num_levels=3, image_size=32, gradient_estimator=estimator)).train()
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    output = model(images)
    output.reconstruction_loss.backward()  # reconstruction only: gradient must cross the codes
    first_conv = model.bottom_encoder.layers[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    for level, pre in enumerate(model.pre_quantize):
        assert pre.weight.grad.abs().sum() > 0, f"level {level} got no gradient"
    for encoder in model.up_encoders:
        assert encoder.layers[0].weight.grad.abs().sum() > 0


def test_rotation_trick_changes_only_the_encoder_gradients():
    """Same forward pass and decoder gradients as straight-through; other encoder gradients."""
    torch.manual_seed(0)
    straight = VQVAE2(tiny_config()).train()
    rotation = VQVAE2(tiny_config(gradient_estimator="rotation")).train()
    rotation.load_state_dict(straight.state_dict())
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    outputs = [model(images) for model in (straight, rotation)]
    for output in outputs:
        output.reconstruction_loss.backward()
    torch.testing.assert_close(outputs[1].reconstruction, outputs[0].reconstruction)
    decoder_names = []
    for (name, p_straight), p_rotation in zip(
        straight.named_parameters(), rotation.parameters(), strict=True
    ):
        if name.startswith("decoder."):
            torch.testing.assert_close(p_rotation.grad, p_straight.grad, rtol=1e-4, atol=1e-6)
            decoder_names.append(name)
    assert len(decoder_names) >= 4
    first_straight = straight.bottom_encoder.layers[0].weight.grad
    first_rotation = rotation.bottom_encoder.layers[0].weight.grad
    assert not torch.allclose(first_rotation, first_straight, rtol=1e-2, atol=1e-6)


def test_accumulated_micro_batches_match_the_whole_batch():
    """Two half batches under deferred codebook updates: the gradients and the codebooks after
    the step are those of the whole batch (the codebooks already seeded)."""
    torch.manual_seed(0)
    whole = VQVAE2(tiny_config(dead_code_after_steps=1)).train()
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        whole(images)  # seeds and moves the codebooks once
    split = VQVAE2(tiny_config(dead_code_after_steps=1)).train()
    split.load_state_dict(whole.state_dict())
    whole(images).loss.backward()
    with split.deferred_codebook_updates():
        for half in (images[:4], images[4:]):
            (split(half).loss / 2).backward()
    split_parameters = dict(split.named_parameters())
    for name, parameter in whole.named_parameters():
        torch.testing.assert_close(split_parameters[name].grad, parameter.grad, msg=name)
    split_buffers = dict(split.named_buffers())
    for name, buffer in whole.named_buffers():
        torch.testing.assert_close(split_buffers[name], buffer, msg=name)


def test_leaving_levels_out_uses_zero_vectors():
    model = VQVAE2(tiny_config()).eval()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = model.encode(images)
        top_only = model.decode_codes(codes, keep_levels=[0])
        top = model.quantizers[0].lookup(codes[0])
        manual = model.decode([top, torch.zeros(2, 6, 4, 4)])
        full = model.decode_codes(codes)
    torch.testing.assert_close(top_only, manual)
    assert not torch.allclose(top_only, full)


def test_bottom_encoder_is_conditioned_on_the_top_code():
    """Algorithm 1 line 3: E_bottom(x, e_top). Changing the top codebook changes z_bottom."""
    model = VQVAE2(tiny_config()).eval()
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    captured = []
    model.pre_quantize[1].register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        model.encode(images)
        model.quantizers[0].codebook.mul_(-3.0)
        model.encode(images)
    z_before, z_after = captured
    assert z_before.shape == (8, 6, 4, 4)
    assert (z_before - z_after).abs().max() > 1e-4


def test_bad_inputs_are_rejected_with_clear_errors():
    model = VQVAE2(tiny_config())
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        model.decode_codes([torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 4, 4), 13)])
    with pytest.raises(ValueError, match="2 levels"):
        model.decode_codes([torch.zeros(1, 2, 2, dtype=torch.long)])


@pytest.mark.parametrize(
    ("preset", "latents"), [("imagenet-256", [32, 64]), ("ffhq-1024", [32, 64, 128])]
)
def test_paper_presets_forward_backward_at_batch_one(preset, latents):
    """The paper's image sizes, levels and downsampling, at narrow widths (K = 13, D = 6)."""
    narrow = [
        "model.hidden_channels=8",
        "model.residual_channels=4",
        "model.num_res_blocks=1",
        "model.codebook_size=13",
        "model.embedding_dim=6",
    ]
    config = load_config(VQVAERunConfig, preset, narrow).model
    model = VQVAE2(config).train()
    images = torch.rand(1, 3, config.image_size, config.image_size) * 2 - 1
    output = model(images)
    output.loss.backward()
    assert [c.shape[-1] for c in output.codes] == latents
    assert [c.shape[-2] for c in output.codes] == latents
    assert output.reconstruction.shape == images.shape
    assert model.bottom_encoder.layers[0].weight.grad.abs().sum() > 0


def test_level_dropout_is_off_by_default_and_zeros_stand_in_for_left_out_levels():
    model = VQVAE2(tiny_config()).eval()
    assert model.absent is None
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = model.encode(images)
        top = model.quantizers[0].lookup(codes[0])
        zeros = torch.zeros(3, 6, 4, 4)  # the bottom map: D = 6, 4x4
        torch.testing.assert_close(
            model.decode_codes(codes, keep_levels=[0]), model.decode([top, zeros])
        )


def test_level_dropout_decodes_prefixes_with_learned_absent_vectors():
    """With level_dropout 1 every training image of a 2-level model is decoded from its top
    level alone, the bottom replaced by the learned absent vector; the top-only decode then
    depends on the top codes and not on the bottom ones."""
    with pytest.raises(ValueError, match=r"level_dropout must be in \[0, 1\]"):
        tiny_config(level_dropout=1.5)
    model = VQVAE2(tiny_config(level_dropout=1.0))
    assert tuple(model.absent.shape) == (2, 6)  # (levels, D)
    with torch.no_grad():
        model.absent.copy_(torch.randn(2, 6))
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    kept_levels = model.draw_kept_levels(range(4), seed=0)
    assert kept_levels.tolist() == [1, 1, 1, 1]  # with probability 1 only the top is kept
    output = model.train()(images, kept_levels)
    output.loss.backward()
    assert model.absent.grad is not None and float(model.absent.grad[1].abs().sum()) > 0
    assert float(model.absent.grad[0].abs().sum()) == 0  # the top level is never left out
    model.eval()
    with torch.no_grad():
        top_only = model.decode_codes(output.codes, keep_levels=[0])
        torch.testing.assert_close(output.reconstruction, top_only, rtol=0, atol=1e-5)
        other_bottom = [output.codes[0], (output.codes[1] + 1) % 13]
        torch.testing.assert_close(model.decode_codes(other_bottom, keep_levels=[0]), top_only)
        other_top = [(output.codes[0] + 1) % 13, output.codes[1]]
        assert (model.decode_codes(other_top, keep_levels=[0]) - top_only).abs().max() > 1e-5
        # Evaluation decodes every level: the bottom codes matter again.
        assert (
            model.decode_codes(other_bottom) - model.decode_codes(output.codes)
        ).abs().max() > 1e-3


def test_level_dropout_keeps_a_random_prefix_per_image():
    model = VQVAE2(tiny_config(num_levels=3, image_size=32, level_dropout=0.5))
    kept_levels = model.draw_kept_levels(range(200), seed=0)  # (200,)
    quantized = [torch.randn(200, 6, side, side) for side in (2, 4, 8)]
    dropped = model.drop_lower_levels(quantized, kept_levels)
    assert torch.equal(dropped[0], quantized[0])
    middle_out = ~(dropped[1] == quantized[1]).flatten(1).all(1)  # (200,)
    bottom_out = ~(dropped[2] == quantized[2]).flatten(1).all(1)
    assert torch.equal(middle_out, kept_levels < 2) and torch.equal(bottom_out, kept_levels < 3)
    assert 0.35 < float(bottom_out.float().mean()) < 0.65  # about half the images
    assert 0.1 < float(middle_out.float().mean()) < 0.4  # of those, about half keep the top only
    absent = model.absent[2][None, :, None, None].expand(200, 6, 8, 8)
    assert torch.equal(dropped[2][bottom_out], absent[bottom_out])
    with pytest.raises(ValueError, match=r"kept_levels must lie in \[1, 3\]"):
        model.drop_lower_levels(quantized, torch.zeros(200, dtype=torch.long))


def test_level_dropout_draws_depend_on_each_image_key_alone():
    """An image's draw comes from (seed, its key): the halves of a batch held by two processes
    draw what one process draws for the whole batch, and the global random stream plays no
    part (a resumed run draws the same)."""
    model = VQVAE2(tiny_config(num_levels=3, image_size=32, level_dropout=0.5))
    whole = model.draw_kept_levels(range(100, 164), seed=7)
    torch.manual_seed(123)
    halves = [
        model.draw_kept_levels(range(100, 132), 7),
        model.draw_kept_levels(range(132, 164), 7),
    ]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(halves[0], halves[1])  # neither half repeats the other's pattern
    assert not torch.equal(model.draw_kept_levels(range(100, 164), seed=8), whole)
    assert sorted(set(whole.tolist())) == [1, 2, 3]


def test_prefix_decoders_are_off_by_default_and_add_nothing_to_the_loss():
    with pytest.raises(ValueError, match="prefix_decoder_weight must be >= 0"):
        tiny_config(prefix_decoder_weight=-0.5)
    model = VQVAE2(tiny_config()).train()
    assert model.prefix_decoders is None
    output = model(torch.rand(3, 1, 16, 16) * 2 - 1)
    assert float(output.prefix_loss) == 0.0
    torch.testing.assert_close(output.loss, output.reconstruction_loss + output.commitment_loss)


def test_prefix_decoders_decode_each_prefix_from_its_levels_alone():
    """Three levels, weight 0.5: one light decoder per prefix (top; top + middle), each giving
    whole images from its levels and no others; the full decode is the model's own decoder."""
    model = VQVAE2(tiny_config(num_levels=3, image_size=32, prefix_decoder_weight=0.5))
    assert len(model.prefix_decoders) == 2
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    output = model.train()(images)
    quantized = [model.quantizers[i].lookup(c) for i, c in enumerate(output.codes)]
    errors = [
        torch.mean((model.prefix_decoders[k](quantized[: k + 1]) - images) ** 2) for k in (0, 1)
    ]
    torch.testing.assert_close(output.prefix_loss, torch.stack(errors).mean())
    torch.testing.assert_close(
        output.loss,
        output.reconstruction_loss + output.commitment_loss + 0.5 * output.prefix_loss,
    )
    model.eval()
    with torch.no_grad():
        codes = output.codes
        top_only = model.decode_codes(codes, keep_levels=[0])
        top_two = model.decode_codes(codes, keep_levels=[0, 1])
        assert top_only.shape == top_two.shape == images.shape
        torch.testing.assert_close(top_only, model.prefix_decoders[0](quantized[:1]))
        changed = [
            [(c + 1) % 13 if i == level else c for i, c in enumerate(codes)] for level in (0, 1, 2)
        ]
        assert (model.decode_codes(changed[0], keep_levels=[0]) - top_only).abs().max() > 1e-5
        torch.testing.assert_close(model.decode_codes(changed[1], keep_levels=[0]), top_only)
        torch.testing.assert_close(model.decode_codes(changed[2], keep_levels=[0]), top_only)
        assert (model.decode_codes(changed[1], keep_levels=[0, 1]) - top_two).abs().max() > 1e-5
        torch.testing.assert_close(model.decode_codes(changed[2], keep_levels=[0, 1]), top_two)
        full = model.decode_codes(codes)
        assert (model.decode_codes(changed[2]) - full).abs().max() > 1e-5
        # Not a prefix (the bottom alone): zeros stand in for the others, as without them.
        zeros = [torch.zeros_like(quantized[0]), torch.zeros_like(quantized[1]), quantized[2]]
        torch.testing.assert_close(model.decode_codes(codes, keep_levels=[2]), model.decode(zeros))


def test_prefix_loss_trains_the_upper_encoders_and_not_the_full_decoder():
    model = VQVAE2(tiny_config(prefix_decoder_weight=1.0)).train()
    model(torch.rand(4, 1, 16, 16) * 2 - 1).prefix_loss.backward()
    assert float(model.pre_quantize[0].weight.grad.abs().sum()) > 0  # the top code's encoder
    assert float(model.prefix_decoders[0].decoder.layers[0].weight.grad.abs().sum()) > 0
    assert model.decoder.layers[0].weight.grad is None
