"""Self-describing, atomic, pickle-free checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from vqvae2.checkpoint import LATEST, read_checkpoint, save_checkpoint
from vqvae2.config import VQVAERunConfig
from vqvae2.run import load_vqvae
from vqvae2.vqvae import VQVAE2

from .conftest import tiny_config


def trained_model_and_optimizer():
    config = VQVAERunConfig(model=tiny_config())
    model = VQVAE2(config.model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        output = model(torch.rand(4, 1, 16, 16) * 2 - 1)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    return config, model, optimizer


def test_save_then_load_reproduces_outputs(tmp_path):
    config, model, optimizer = trained_model_and_optimizer()
    save_checkpoint(tmp_path / "vqvae", "vqvae", 3, config, model, optimizer)
    loaded = load_vqvae(tmp_path)
    model.eval()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images).reconstruction, model(images).reconstruction)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, dict(loaded.named_buffers())[name]), name
    assert not loaded.training


def test_optimizer_state_round_trips(tmp_path):
    config, model, optimizer = trained_model_and_optimizer()
    save_checkpoint(tmp_path / "vqvae", "vqvae", 3, config, model, optimizer)
    checkpoint = read_checkpoint(tmp_path, "vqvae", with_optimizer=True)
    fresh = torch.optim.Adam(VQVAE2(config.model).parameters(), lr=1e-3)
    fresh.load_state_dict(checkpoint.optimizer_state)
    original, restored = optimizer.state_dict(), fresh.state_dict()
    assert original["param_groups"][0]["lr"] == restored["param_groups"][0]["lr"]
    assert original["state"] and original["state"].keys() == restored["state"].keys()
    for key, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(restored["state"][key][name])
            )


def test_latest_moves_only_after_a_complete_write_and_old_steps_are_pruned(tmp_path):
    config, model, optimizer = trained_model_and_optimizer()
    kind_dir = tmp_path / "vqvae"
    for step in (1, 2, 3):
        save_checkpoint(kind_dir, "vqvae", step, config, model, keep=2)
    assert (kind_dir / LATEST).read_text().strip() == "step-00000003"
    assert sorted(p.name for p in kind_dir.iterdir() if p.is_dir()) == [
        "step-00000002",
        "step-00000003",
    ]
    # A half-written temporary folder (a killed save) is ignored by the loader.
    (kind_dir / ".step-00000004.tmp").mkdir()
    assert read_checkpoint(tmp_path, "vqvae").step == 3
    files = {p.name for p in (kind_dir / "step-00000003").iterdir()}
    assert files == {"meta.json", "model.safetensors"}


def test_foreign_checkpoints_are_refused(tmp_path):
    config, model, _ = trained_model_and_optimizer()
    step_dir = save_checkpoint(tmp_path / "vqvae", "vqvae", 1, config, model)
    with pytest.raises(ValueError, match="holds a 'vqvae' model, expected 'prior'"):
        read_checkpoint(step_dir, "prior")
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["format_version"] = 99
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99"):
        load_vqvae(tmp_path)
    (step_dir / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_vqvae(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_vqvae(tmp_path / "nothing-here")


def test_weights_of_another_shape_are_refused(tmp_path):
    config, model, _ = trained_model_and_optimizer()
    step_dir = save_checkpoint(tmp_path / "vqvae", "vqvae", 1, config, model)
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["config"]["model"]["hidden_channels"] = 12
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit the model"):
        load_vqvae(tmp_path)
