"""Opt-in runtime choices: bf16 autocast (quantizer kept in float32), channels-last, compile,
and the split of the global batch over processes and micro-batches."""

from __future__ import annotations

import pytest
import torch

from vqvae2.batches import micro_batch_size
from vqvae2.config import RuntimeConfig, TrainConfig, VQVAERunConfig, load_config
from vqvae2.distributed import DistributedContext
from vqvae2.loop import prepare_step_module
from vqvae2.quantize import VectorQuantizerEMA
from vqvae2.train import train_vqvae

from .conftest import assert_states_close

TINY = ["model.image_size=16", "train.batch_size=8", "train.val_every=1000"]


def near_ties(codebook: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Points almost halfway between two codes, nudged towards the first: (count, D)."""
    first = torch.randint(0, len(codebook), (count,), generator=generator)
    second = (first + 1 + torch.randint(0, len(codebook) - 1, (count,), generator=generator)) % len(
        codebook
    )
    middle = (codebook[first] + codebook[second]) / 2
    return middle + 2e-3 * (codebook[first] - codebook[second])


def test_quantizer_distances_stay_float32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    quantizer = VectorQuantizerEMA(64, 8, 0.25, 0.99, 1e-5, dead_code_after_steps=0).eval()
    quantizer.codebook.copy_(torch.randn(64, 8, generator=generator) * 4 + 10)
    points = near_ties(quantizer.codebook, 2048, generator)  # (N, D)
    exact = torch.cdist(points.double(), quantizer.codebook.double()).argmin(1)
    # The check can fail: the same distance formula in bfloat16 picks other codes for some.
    low = points.bfloat16()
    low_distances = (
        low.pow(2).sum(1, keepdim=True)
        - 2 * low @ quantizer.codebook.bfloat16().t()
        + quantizer.codebook.bfloat16().pow(2).sum(1)
    )
    assert (low_distances.argmin(1) != exact).any()
    inputs = points.t().reshape(1, 8, 32, 64)  # (B, D, H, W) with the N points in raster order
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = quantizer(inputs).codes.flatten()
    assert torch.equal(codes, exact)


def test_bf16_training_keeps_float32_weights_and_codebooks(tmp_path, npz_data):
    config = load_config(VQVAERunConfig, "tiny", [*TINY, "train.max_steps=2"])
    result = train_vqvae(
        config, npz_data, tmp_path / "run", progress=False, runtime=RuntimeConfig(precision="bf16")
    )
    full = train_vqvae(config, npz_data, tmp_path / "float32", progress=False)
    # The same two steps in float32 end at nearly the same validation MSE (relative difference 2e-5 here).
    assert result.metrics["mse"] == pytest.approx(full.metrics["mse"], rel=1e-3)
    assert all(value.dtype == torch.float32 for value in result.model.parameters())
    assert all(q.codebook.dtype == torch.float32 for q in result.model.quantizers)


def test_channels_last_training_matches_the_default_layout(tmp_path, npz_data):
    config = load_config(VQVAERunConfig, "tiny", [*TINY, "train.max_steps=3"])
    default = train_vqvae(config, npz_data, tmp_path / "default", progress=False).model
    nhwc = train_vqvae(
        config,
        npz_data,
        tmp_path / "nhwc",
        progress=False,
        runtime=RuntimeConfig(channels_last=True),
    ).model
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert_states_close(default.state_dict(), nhwc.state_dict(), atol=1e-4)


def test_compile_wraps_the_training_forward(monkeypatch):
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = torch.nn.Linear(2, 2)
    step_module = prepare_step_module(model, DistributedContext(), RuntimeConfig(compile=True))
    assert compiled == [model] and step_module.forward is model and step_module.ddp is None
    plain = prepare_step_module(torch.nn.Linear(2, 2), DistributedContext(), RuntimeConfig())
    assert len(compiled) == 1 and plain.forward is plain.model


def test_global_batch_splits_over_processes_and_micro_batches():
    train = TrainConfig(batch_size=16, grad_accum_steps=2)
    assert micro_batch_size(train, DistributedContext(world_size=4)) == 2
    assert micro_batch_size(train, DistributedContext()) == 8
    with pytest.raises(ValueError, match="does not split evenly over 3 process"):
        micro_batch_size(train, DistributedContext(world_size=3))


def test_shard_ranges_cover_a_range_exactly_once():
    contexts = [DistributedContext(rank=r, world_size=3) for r in range(3)]
    ranges = [c.shard_range(10) for c in contexts]
    assert [list(r) for r in ranges] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_bad_runtime_choices_are_named():
    with pytest.raises(ValueError, match="precision must be float32 or bf16"):
        RuntimeConfig(precision="fp8")
    from vqvae2.distributed import pick_device, runtime_context

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        pick_device("gpu")
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        runtime_context(RuntimeConfig(device="gpu"))  # the training commands' path
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            runtime_context(RuntimeConfig(device="cuda"))
        with pytest.raises(ValueError, match="--device cuda:0: CUDA is not available"):
            pick_device("cuda:0")
