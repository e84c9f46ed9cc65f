"""Config dataclasses, presets and overrides."""

from __future__ import annotations

import pytest

from vqvae2.config import (
    ClassifierRunConfig,
    PriorRunConfig,
    VQVAERunConfig,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    parse_overrides,
)
from vqvae2.model_configs import VQVAEConfig


def config_class_of(preset: str) -> type:
    if preset.startswith("prior-"):
        return PriorRunConfig
    if preset.startswith("classifier-"):
        return ClassifierRunConfig
    return VQVAERunConfig


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_validates_and_round_trips(preset):
    config_class = config_class_of(preset)
    config = load_config(config_class, preset)
    assert config_from_dict(config_class, config_to_dict(config)) == config


def test_prior_presets_follow_tables_3_and_4():
    top = load_config(PriorRunConfig, "prior-top-imagenet-256").prior
    assert (top.hidden_channels, top.residual_channels, top.num_layers) == (512, 2048, 20)
    assert (top.attention_layers, top.attention_heads, top.kernel_size) == (4, 8, 5)
    assert (top.dropout, top.output_stack_layers) == (0.1, 20)
    bottom = load_config(PriorRunConfig, "prior-bottom-imagenet-256").prior
    assert (bottom.attention_layers, bottom.condition_res_blocks) == (0, 20)
    assert load_config(PriorRunConfig, "prior-bottom-ffhq-1024").prior.num_layers == 10
    assert top.attention_layer_indices == (4, 9, 14, 19)


def test_presets_have_the_papers_latent_shapes():
    assert load_config(VQVAERunConfig, "imagenet-256").model.latent_sizes == (32, 64)
    assert load_config(VQVAERunConfig, "ffhq-1024").model.latent_sizes == (32, 64, 128)
    assert load_config(VQVAERunConfig, "fashion-mnist-32").model.latent_sizes == (4, 8)


def test_defaults_are_table_5():
    config = VQVAEConfig()
    assert (config.hidden_channels, config.residual_channels, config.num_res_blocks) == (128, 64, 2)
    assert (config.codebook_size, config.embedding_dim) == (512, 64)
    assert (config.commitment_weight, config.ema_decay) == (0.25, 0.99)
    assert config.latent_sizes == (32, 64)


def test_overrides_are_typed_and_nested():
    config = load_config(
        VQVAERunConfig,
        "tiny",
        ["model.codebook_size=32", "train.learning_rate=3e-4", "train.lr_schedule=cosine"],
    )
    assert config.model.codebook_size == 32
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.train.lr_schedule == "cosine"
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.codebok_size=4", "unknown config key 'model.codebok_size'"),
        ("model.codebook_size=1", "codebook_size must be >= 2"),
        ("model.image_size=36", "multiple of the total downsampling 8"),
        ("model.num_levels=4", "num_levels must be 1, 2 or 3"),
        ("model.ema_decay=1.5", r"ema_decay must be in \[0, 1\)"),
        ("train.batch_size=abc", "batch_size must be an integer"),
        ("train.lr_schedule=step", "lr_schedule must be one of"),
        ("model.gradient_estimator=gumbel", "gradient_estimator must be one of"),
        ("train.warmup_steps=-1", "warmup_steps must be >= 0"),
        ("train.schedule_minutes=-1", "schedule_minutes must be >= 0"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_values_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(VQVAERunConfig, "tiny", [override])


@pytest.mark.parametrize("kernel_size", [1, 4, -1])
def test_prior_kernel_must_be_odd_and_at_least_3(kernel_size):
    """A 1x1 kernel leaves a blind spot: the vertical stream never sees column j + 1 above."""
    with pytest.raises(ValueError, match=f"kernel_size must be odd and >= 3, got {kernel_size}"):
        load_config(PriorRunConfig, "prior-top-tiny", [f"prior.kernel_size={kernel_size}"])
    assert (
        load_config(PriorRunConfig, "prior-top-tiny", ["prior.kernel_size=3"]).prior.kernel_size
        == 3
    )


def test_prefix_decoders_need_two_levels():
    """One level has no top levels to decode without the bottom: refused at config time
    (the forward pass stacked an empty list of prefix losses)."""
    message = (
        r"model.prefix_decoder_weight=0.5 needs num_levels >= 2 \(it weighs decoders of the "
        r"top levels without the bottom\), got num_levels=1"
    )
    with pytest.raises(ValueError, match=message):
        load_config(
            VQVAERunConfig, "tiny", ["model.num_levels=1", "model.prefix_decoder_weight=0.5"]
        )
    assert load_config(VQVAERunConfig, "tiny", ["model.num_levels=1"]).model.num_levels == 1
    two = load_config(VQVAERunConfig, "tiny", ["model.prefix_decoder_weight=0.5"]).model
    assert (two.num_levels, two.prefix_decoder_weight) == (2, 0.5)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="neither a YAML file nor a preset"):
        load_config(VQVAERunConfig, "no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(VQVAERunConfig, bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  hidden: 3\n")
    with pytest.raises(ValueError, match="unknown config key 'model.hidden'"):
        load_config(VQVAERunConfig, wrong)
