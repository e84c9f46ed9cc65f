"""A trained VQ-VAE's encoder and decoder as ONNX graphs, for use outside PyTorch.

    OUT/encoder.onnx   images (B, C, S, S) float32 in [-1, 1] -> codes_<level> (B, h, w) int64,
                       one output per level, top first
    OUT/decoder.onnx   codes_<level> (B, h, w) int64, top first -> images (B, C, S, S) float32

The batch size is free (a dynamic axis). The nearest-code search exports as it runs in
PyTorch (``VectorQuantizerEMA.nearest_codes``): a matrix product shortlists the nearest codes,
whose exact distances from differences decide (TopK, Gather, ReduceMin/ArgMin; no ``cdist``).

The priors are not exported: sampling draws one code after another, each from the prior's
output given the codes drawn so far (with the sampler's cache of the layers' states), a loop
of thousands of data-dependent steps rather than one graph; a graph of one teacher-forced pass
would give the logits of given codes but could not sample.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .vqvae import VQVAE2

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
OPSET = 17
BATCH_AXIS = {0: "batch"}


class CodeEncoder(nn.Module):
    """Images to the codes of every level (``VQVAE2.encode`` without the training figures)."""

    def __init__(self, vqvae: VQVAE2) -> None:
        super().__init__()
        self.vqvae = vqvae

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """(B, C, S, S) float -> per level, top first, (B, h_l, w_l) int64."""
        vqvae = self.vqvae
        features = [vqvae.bottom_encoder(images)]  # bottom first while building
        for encoder in reversed(vqvae.up_encoders):
            features.append(encoder(features[-1]))
        features.reverse()  # top first
        codes: list[Tensor] = []
        above: Tensor | None = None  # code vectors of the level above, (B, D, h, w)
        for level, quantizer in enumerate(vqvae.quantizers):
            inputs = features[level]
            if above is not None:
                condition = vqvae.condition_decoders[level - 1](above)
                inputs = torch.cat([inputs, condition], dim=1)  # (B, hidden + D, h, w)
            z = vqvae.pre_quantize[level](inputs)  # (B, D, h, w)
            batch, dim, height, width = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
            level_codes = quantizer.nearest_codes(flat)[0].reshape(batch, height, width)
            codes.append(level_codes)
            above = quantizer.lookup(level_codes)
        return tuple(codes)


class CodeDecoder(nn.Module):
    """Codes of every level to images (``VQVAE2.decode_codes`` without its input checks)."""

    def __init__(self, vqvae: VQVAE2) -> None:
        super().__init__()
        self.vqvae = vqvae

    def forward(self, *codes: Tensor) -> Tensor:
        """Per level, top first, (B, h_l, w_l) int64 -> (B, C, S, S) float."""
        quantizers = self.vqvae.quantizers
        vectors = [quantizer.lookup(c) for quantizer, c in zip(quantizers, codes, strict=True)]
        return self.vqvae.decode(vectors)


def check_onnx_available() -> None:
    """``ValueError`` in one line when the ``onnx`` package (the exporter writes with it) is
    missing."""
    if importlib.util.find_spec("onnx") is None:
        raise ValueError("ONNX export needs the onnx package: pip install 'vqvae2[onnx]'")


def export_onnx(vqvae: VQVAE2, out_dir: str | Path, example_batch: int = 2) -> tuple[Path, Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``vqvae`` to ``out_dir`` (made when
    missing). A CPU copy in eval mode is exported: ``vqvae`` itself keeps its device and mode
    (the exporter hands each wrapper back in its own mode, which would put the model in train
    mode, where encoding moves the codebooks).

    Returns:
        The paths of the encoder and the decoder.

    Raises:
        ValueError: the ``onnx`` package (which the exporter writes with) is not installed.
    """
    check_onnx_available()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(vqvae).cpu()
    encoder, decoder = CodeEncoder(model).eval(), CodeDecoder(model).eval()
    config = model.config
    code_names = [f"codes_{name}" for name in config.level_names]
    images = torch.zeros(example_batch, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        codes = encoder(images)
    encoder_path, decoder_path = out_dir / ENCODER_FILE, out_dir / DECODER_FILE
    _export(encoder, (images,), encoder_path, ["images"], code_names)
    _export(decoder, codes, decoder_path, code_names, ["images"])
    return encoder_path, decoder_path


def _export(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
) -> None:
    """One module to ``path`` with TorchScript tracing, every input and output batch-dynamic.

    The tracing exporter is chosen over the ``torch.export`` one (``dynamo=True``) because it
    needs no ``onnxscript``; its deprecation warning is silenced, as the choice is deliberate.
    """
    axes = {name: BATCH_AXIS for name in [*input_names, *output_names]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
