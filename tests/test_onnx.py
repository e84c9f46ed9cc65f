"""The VQ-VAE's encoder and decoder as ONNX graphs, run with onnxruntime: the same codes as
PyTorch and the same images within 1e-4, any batch size, and the model handed back as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from vqvae2._helpers import uint8_to_float
from vqvae2.data import open_dataset
from vqvae2.onnx_export import export_onnx
from vqvae2.run import load_vqvae
from vqvae2.vqvae import VQVAE2

from .conftest import tiny_config, tiny_run_config, train_tiny_run

TEST_IMAGES = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[VQVAE2, torch.Tensor]:
    """A tiny VQ-VAE trained on 16x16 blobs, and the 64 images of its data's test split."""
    root = tmp_path_factory.mktemp("onnx")
    run, data = train_tiny_run(root, vqvae_steps=30, images=10 * TEST_IMAGES)  # test: a tenth
    test = open_dataset(data, "test", 16, 1, tiny_run_config().data)
    images = uint8_to_float(torch.stack([test[i][0] for i in range(len(test))]))
    assert len(images) == TEST_IMAGES
    return load_vqvae(run), images


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_codes_and_images(
    encoder: Path, decoder: Path, images: torch.Tensor, levels: tuple[str, ...]
) -> tuple[list[np.ndarray], np.ndarray]:
    codes = session(encoder).run(None, {"images": images.numpy()})
    feeds = {f"codes_{name}": level_codes for name, level_codes in zip(levels, codes, strict=True)}
    return codes, session(decoder).run(None, feeds)[0]


def test_codes_equal_pytorch_s_and_images_lie_within_1e_4_on_64_test_images(trained, tmp_path):
    vqvae, images = trained
    encoder, decoder = export_onnx(vqvae, tmp_path)
    with torch.no_grad():
        codes = vqvae.encode(images)
        decoded = vqvae.decode_codes(codes)
    levels = vqvae.config.level_names
    for batch in (images, images[:1], images[:5]):  # exported with a batch of 2
        onnx_codes, onnx_images = onnx_codes_and_images(encoder, decoder, batch, levels)
        for ours, theirs in zip(onnx_codes, codes, strict=True):
            assert ours.dtype == np.int64
            np.testing.assert_array_equal(ours, theirs[: len(batch)].numpy())
        assert np.abs(onnx_images - decoded[: len(batch)].numpy()).max() <= 1e-4
    assert len(np.unique(onnx_codes_and_images(encoder, decoder, images, levels)[0][1])) > 4


def test_the_nearest_code_search_is_a_matrix_product_and_an_argmin(trained, tmp_path):
    encoder, _ = export_onnx(trained[0], tmp_path)
    operators = {node.op_type for node in onnx.load(str(encoder)).graph.node}
    assert {"MatMul", "TopK", "ArgMin"} <= operators
    assert not operators & {"Loop", "If", "Scan"}  # one straight graph


def test_a_three_level_model_exports_too(tmp_path):
    torch.manual_seed(0)
    vqvae = VQVAE2(tiny_config(num_levels=3, image_size=32)).eval()
    images = torch.rand(6, 1, 32, 32) * 2 - 1
    encoder, decoder = export_onnx(vqvae, tmp_path)
    with torch.no_grad():
        codes = vqvae.encode(images)
        decoded = vqvae.decode_codes(codes)
    onnx_codes, onnx_images = onnx_codes_and_images(
        encoder, decoder, images, vqvae.config.level_names
    )
    assert len(onnx_codes) == 3
    for ours, theirs in zip(onnx_codes, codes, strict=True):
        np.testing.assert_array_equal(ours, theirs.numpy())
    assert np.abs(onnx_images - decoded.numpy()).max() <= 1e-4


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_model_keeps_its_mode_and_weights(trained, tmp_path, mode):
    vqvae, images = trained
    vqvae.train(mode == "train")
    before = {key: value.clone() for key, value in vqvae.state_dict().items()}
    export_onnx(vqvae, tmp_path)
    assert vqvae.training == (mode == "train")
    assert all(m.training == vqvae.training for m in vqvae.modules())
    assert all(torch.equal(before[key], value) for key, value in vqvae.state_dict().items())
    vqvae.eval()
