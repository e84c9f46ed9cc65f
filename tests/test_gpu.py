"""CUDA checks, skipped without CUDA (conftest.py): a bf16 training step of each model, the
trainers under bf16 autocast, the cached sampler on the GPU (its step eager, compiled and
replayed as a CUDA graph), and the codec's promise to stay on
the CPU (docs/codec.md). One check of that promise needs no GPU and runs everywhere."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vqvae2.codec import decode_batch, decode_images, encode_batch
from vqvae2.compress import compress_files, decompress_files
from vqvae2.config import PriorRunConfig, RuntimeConfig, load_config
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler
from vqvae2.run import Run, load_hierarchy
from vqvae2.sampling import sample_level_cached, sample_level_reference
from vqvae2.train import extract_codes, train_prior, train_vqvae
from vqvae2.vqvae import VQVAE2

from .conftest import metric_values, tiny_config, write_run
from .test_codec import blob_images, write_pngs
from .test_train import tiny_run_config

CUDA = torch.device("cuda")
K = 13
CLASSES = 3


def tiny_prior(dropout: float) -> PixelSNAIL:
    """The tiny bottom prior at K = 13 on an 8x8 map below a 4x4 one, with 3 classes."""
    config = dataclasses.replace(
        load_config(PriorRunConfig, "prior-bottom-tiny").prior,
        code_size=8,
        condition_sizes=(4,),
        num_classes=CLASSES,
        codebook_size=K,
        dropout=dropout,
    )
    return PixelSNAIL(config)


def prior_batch(batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(codes (B, 8, 8), labels (B,), upper codes (B, 4, 4)) for ``tiny_prior``."""
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, K, (batch, 8, 8), generator=generator)
    upper = torch.randint(0, K, (batch, 4, 4), generator=generator)
    labels = torch.arange(batch) % CLASSES
    return codes.to(device), labels.to(device), upper.to(device)


def bf16_step(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor]) -> float:
    """One Adam step under bf16 autocast on the model's device; checks that the gradients are
    finite and that every parameter moved. Returns the loss."""
    device = next(model.parameters()).device
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = loss_of()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.isfinite().all()), name
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged
    return float(loss.detach())


def check_vqvae_bf16_step(device: torch.device) -> None:
    torch.manual_seed(0)
    model = VQVAE2(tiny_config()).to(device).train()
    codebooks = [q.codebook.clone() for q in model.quantizers]
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def loss() -> torch.Tensor:
        output = model(images.to(device))
        assert output.reconstruction.dtype == torch.bfloat16  # autocast took effect
        return output.loss

    assert np.isfinite(bf16_step(model, loss))
    for quantizer, before in zip(model.quantizers, codebooks, strict=True):
        assert quantizer.codebook.dtype == torch.float32  # the quantizer's maths stays fp32
        assert bool(quantizer.codebook.isfinite().all())
        assert not torch.equal(quantizer.codebook, before)  # seeded and EMA-updated


def check_prior_bf16_step(device: torch.device) -> None:
    torch.manual_seed(0)
    prior = tiny_prior(dropout=0.1).to(device).train()
    codes, labels, upper = prior_batch(8, device)

    def loss() -> torch.Tensor:
        output = prior(codes, labels, [upper])
        assert output.logits.dtype == torch.bfloat16  # autocast took effect
        return output.loss

    # Random weights: about log K nats per code (a loss far from it is a broken forward pass).
    assert abs(bf16_step(prior, loss) - np.log(K)) < 1.0


def check_cached_sampler(device: torch.device, step: str = "eager") -> None:
    """Cached logits equal the forward pass's (atol 1e-4) and the cached sampler draws the
    reference sampler's codes from the same seeded generator on ``device``, its per-position
    step run as ``step``."""
    torch.manual_seed(0)
    prior = tiny_prior(dropout=0.0).to(device).eval()
    codes, labels, upper = prior_batch(4, device)
    with torch.no_grad():
        full = prior(codes, labels, [upper]).logits  # (B, K, 8, 8)
        state = IncrementalSampler(prior, 4, prior.condition(labels, [upper]), step)
        cached = torch.empty_like(full)
        for row in range(8):
            for column in range(8):
                cached[:, :, row, column] = state.logits_at(row, column)
                state.set_codes(row, column, codes[:, row, column])
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-4)
    draws = [
        sampler(prior, 4, labels, [upper], 1.0, torch.Generator(device).manual_seed(11))
        for sampler in (sample_level_reference, partial(sample_level_cached, step=step))
    ]
    assert draws[1].device.type == device.type
    assert torch.equal(draws[0], draws[1])
    assert len(torch.unique(draws[1])) >= 4  # 256 codes, not a degenerate draw


@pytest.mark.gpu
def test_a_bf16_training_step_of_a_tiny_vqvae_on_cuda():
    check_vqvae_bf16_step(CUDA)


@pytest.mark.gpu
def test_a_bf16_training_step_of_a_tiny_prior_on_cuda():
    check_prior_bf16_step(CUDA)


@pytest.mark.gpu
def test_the_trainers_train_in_bf16_on_cuda(tmp_path, npz_data):
    """Stage 1 and a prior through the trainers (the runtime's autocast), 3 steps each: finite
    losses that change, finite saved weights."""
    runtime = RuntimeConfig(device="cuda", precision="bf16")
    run = tmp_path / "run"
    train_vqvae(
        tiny_run_config("train.max_steps=3"), npz_data, run, progress=False, runtime=runtime
    )
    extract_codes(Run.open(run), npz_data, progress=False, runtime=runtime)
    config = load_config(
        PriorRunConfig, "prior-top-tiny", ["train.max_steps=3", "train.log_every=1"]
    )
    train_prior(Run.open(run), "top", config, progress=False, runtime=runtime)
    for metrics, name, weights in (
        (run / "metrics.csv", "loss", run / "vqvae"),
        (run / "prior-top" / "metrics.csv", "batch_nll_nats", run / "prior-top"),
    ):
        losses = metric_values(metrics, "train", name)
        assert len(losses) == 3 and np.isfinite(list(losses.values())).all(), metrics
        assert len(set(losses.values())) > 1, metrics
        saved = load_file(str(next(weights.glob("step-*/model.safetensors"))))
        assert all(bool(t.isfinite().all()) for t in saved.values() if t.is_floating_point())


@pytest.mark.gpu
@pytest.mark.parametrize("step", ["eager", "cuda-graph", "compiled"])
def test_the_cached_sampler_on_cuda_draws_the_reference_codes(step):
    check_cached_sampler(CUDA, step)


def test_the_codec_refuses_models_off_the_cpu(tmp_path):
    """A file coded on another device would not decode on the CPU: refused in one line. The
    meta device stands in for a GPU here."""
    vqvae, priors = load_hierarchy(write_run(tmp_path / "run"))
    images, labels = blob_images(2), torch.tensor([0, 1])
    encoded = encode_batch(vqvae, priors, images, labels)
    message = "the codec runs on the CPU .* got a model or tensor on meta"
    with pytest.raises(ValueError, match=message):
        encode_batch(vqvae, priors, images.to("meta"), labels)
    with pytest.raises(ValueError, match=message):
        decode_batch([prior.to("meta") for prior in priors], [e.payload for e in encoded], labels)
    with pytest.raises(ValueError, match=message):
        decode_images(vqvae.to("meta"), encoded[0].codes)


@pytest.mark.gpu
def test_the_codec_stays_on_the_cpu_with_cuda_present(tmp_path):
    """compress / decompress load the models on the CPU, so files round-trip with CUDA
    present and nothing is put on the GPU; models moved to the GPU are refused."""
    run = write_run(tmp_path / "run")
    paths = write_pngs(tmp_path / "in", blob_images(3, seed=5))
    allocated = torch.cuda.memory_allocated()
    compressed = compress_files(Run.open(run), paths, tmp_path / "c", labels=[0, 1, 2])
    decompressed = decompress_files(Run.open(run), [c.file for c in compressed], tmp_path / "d")
    assert torch.cuda.memory_allocated() == allocated
    for before, after in zip(compressed, decompressed, strict=True):
        for level in range(2):
            assert torch.equal(before.encoded.codes[level], after.codes[level])
    vqvae, priors = load_hierarchy(run)
    with pytest.raises(ValueError, match="the codec runs on the CPU .* on cuda"):
        encode_batch(vqvae.to(CUDA), [p.to(CUDA) for p in priors], blob_images(1).to(CUDA), None)
