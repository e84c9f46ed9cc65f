"""Activation checkpointing (``train.activation_checkpointing``): blocks recomputed in the
backward pass give the plain pass's loss and gradients, dropout masks included, and keep fewer
activations."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from vqvae2.config import (
    ClassifierRunConfig,
    PriorRunConfig,
    TrainConfig,
    VQVAERunConfig,
    load_config,
)
from vqvae2.model_configs import PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.run import Run
from vqvae2.train import train_classifier, train_prior, train_vqvae
from vqvae2.vqvae import VQVAE2

from .conftest import assert_states_close, tiny_config, train_tiny_run

# Every kind of block: gated (with class and upper-level conditioning), attention,
# conditioning stack, output stack; dropout on everywhere it exists.
PRIOR = PixelSNAILConfig(
    code_size=6,
    codebook_size=13,
    hidden_channels=8,
    residual_channels=12,
    num_layers=3,
    attention_layers=1,
    attention_heads=2,
    kernel_size=3,
    dropout=0.3,
    output_stack_layers=2,
    condition_res_blocks=2,
    condition_channels=6,
    condition_sizes=(3,),
    num_classes=4,
)


def prior_inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 13, (batch, 6, 6), generator=generator)
    labels = torch.randint(0, 4, (batch,), generator=generator)
    upper = [torch.randint(0, 13, (batch, 3, 3), generator=generator)]
    return codes, labels, upper


def loss_and_gradients(model: nn.Module, loss_fn, rng_state: torch.Tensor):
    """The loss and every parameter's gradient of one backward pass started from
    ``rng_state``, and the generator's state after it."""
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng_state)
    loss = loss_fn(model)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), gradients, torch.get_rng_state()


def saved_activation_bytes(loss_fn, model: nn.Module) -> int:
    """Bytes the autograd graph keeps for the backward pass, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(model)
    return sum(kept.values())


def prior_loss(prior: PixelSNAIL) -> torch.Tensor:
    return prior(*prior_inputs()).loss


def test_prior_gradients_equal_the_plain_pass_with_dropout_on():
    prior = PixelSNAIL(PRIOR).train()
    start = torch.get_rng_state()
    plain = loss_and_gradients(prior, prior_loss, start)
    prior.set_activation_checkpointing(True)
    checkpointed = loss_and_gradients(prior, prior_loss, start)

    assert torch.equal(plain[0], checkpointed[0])
    assert plain[1].keys() == checkpointed[1].keys() and len(plain[1]) > 40
    for name, gradient in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], gradient, rtol=1e-6, atol=1e-7, msg=name)
    # The recomputation replays the saved generator state and hands the generator back where
    # the plain pass leaves it, so whatever draws next draws the same.
    assert torch.equal(plain[2], checkpointed[2])
    # Dropout is live: another generator state gives another loss, so equal masks mattered.
    torch.manual_seed(123)
    other = loss_and_gradients(prior, prior_loss, torch.get_rng_state())
    assert abs(other[0].item() - plain[0].item()) > 1e-4


def test_prior_keeps_fewer_activations_only_in_training_with_gradients():
    prior = PixelSNAIL(PRIOR).train()
    plain = saved_activation_bytes(prior_loss, prior)
    prior.set_activation_checkpointing(True)
    checkpointed = saved_activation_bytes(prior_loss, prior)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)
    prior.eval()  # evaluation passes are not checkpointed
    evaluated = saved_activation_bytes(prior_loss, prior)
    prior.set_activation_checkpointing(False)
    assert evaluated == saved_activation_bytes(prior_loss, prior)


def vqvae_loss(model: VQVAE2) -> torch.Tensor:
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return model(images).loss


def test_vqvae_gradients_and_codebooks_equal_the_plain_pass():
    """Stage 1 with two residual blocks per stack and fine decoder blocks: the same loss and
    gradients, and each codebook takes its EMA step once, as in the plain pass."""
    plain_model = VQVAE2(tiny_config(num_res_blocks=2, decoder_fine_blocks=1)).train()
    checkpointed_model = copy.deepcopy(plain_model)
    checkpointed_model.set_activation_checkpointing(True)
    start = torch.get_rng_state()
    plain = loss_and_gradients(plain_model, vqvae_loss, start)
    checkpointed = loss_and_gradients(checkpointed_model, vqvae_loss, start)

    assert torch.equal(plain[0], checkpointed[0])
    for name, gradient in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], gradient, rtol=1e-6, atol=1e-7, msg=name)
    assert_states_close(plain_model.state_dict(), checkpointed_model.state_dict(), atol=0.0)
    assert saved_activation_bytes(vqvae_loss, checkpointed_model) < saved_activation_bytes(
        vqvae_loss, plain_model
    )


def test_the_switch_is_off_by_default():
    assert TrainConfig().activation_checkpointing is False
    assert PixelSNAIL(PRIOR).activation_checkpointing is False
    assert not any(
        getattr(module, "recompute_in_backward", False)
        for module in VQVAE2(tiny_config()).modules()
    )
    with pytest.raises(ValueError, match="activation_checkpointing must be true or false"):
        TrainConfig(activation_checkpointing="yes")


@pytest.fixture(scope="module")
def run_with_codes(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("checkpointing"), vqvae_steps=2, codes=True)


ONE_ACCUMULATED_STEP = ["train.max_steps=1", "train.grad_accum_steps=2", "train.batch_size=8"]


def test_prior_trainer_takes_the_same_step(run_with_codes, tmp_path):
    """One step of the bottom prior (dropout on, conditioning stack) in two micro-batches:
    the same weights after Adam's step with and without checkpointing."""
    run, _ = run_with_codes
    states = {}
    for flag in ("false", "true"):
        copied = tmp_path / flag
        shutil.copytree(run, copied)
        config = load_config(
            PriorRunConfig,
            "prior-bottom-tiny",
            [*ONE_ACCUMULATED_STEP, "prior.dropout=0.3", f"train.activation_checkpointing={flag}"],
        )
        result = train_prior(Run.open(copied), "bottom", config, progress=False)
        assert result.model.activation_checkpointing is (flag == "true")
        states[flag] = result.model.state_dict()
    assert_states_close(states["false"], states["true"], atol=1e-7)


def test_vqvae_trainer_takes_the_same_step(run_with_codes, tmp_path):
    _, data = run_with_codes
    states = {}
    for flag in ("false", "true"):
        config = load_config(
            VQVAERunConfig,
            "tiny",
            [
                "model.image_size=16",
                *ONE_ACCUMULATED_STEP,
                f"train.activation_checkpointing={flag}",
            ],
        )
        states[flag] = train_vqvae(config, data, tmp_path / flag, progress=False).model.state_dict()
    assert_states_close(states["false"], states["true"], atol=1e-7)


def test_classifier_refuses_the_switch(run_with_codes, tmp_path):
    _, data = run_with_codes
    config = load_config(
        ClassifierRunConfig, "classifier-tiny", ["train.activation_checkpointing=true"]
    )
    with pytest.raises(ValueError, match="not available for the classifier"):
        train_classifier(config, data, tmp_path / "classifier", progress=False)
