"""vqvae2: VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019) in PyTorch.

The names below load their module on first use, so ``import vqvae2`` stays light: the models,
the trainers and the evaluation are imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ClassifierRunConfig": "config",
    "DataConfig": "config",
    "EvaluateConfig": "config",
    "PixelSNAILConfig": "model_configs",
    "PriorRunConfig": "config",
    "RuntimeConfig": "config",
    "TrainConfig": "config",
    "VQVAEConfig": "model_configs",
    "VQVAERunConfig": "config",
    "load_config": "config",
    "VectorQuantizerEMA": "quantize",
    "QuantizerOutput": "quantize",
    "VQVAE2": "vqvae",
    "VQVAEOutput": "vqvae",
    "PixelSNAIL": "pixelsnail",
    "generate": "sampling",
    "DrawControls": "sampling",
    "sample_codes": "sampling",
    "open_dataset": "data",
    "write_shards": "shards",
    "Run": "run",
    "load_vqvae": "run",
    "load_prior": "run",
    "load_classifier": "run",
    "measure_reconstruction": "measure",
    "measure_nll": "measure",
    "reconstruct": "reconstruct",
    "train_vqvae": "train",
    "extract_codes": "extract",
    "train_prior": "train",
    "train_classifier": "train",
    "sample_from_run": "sample",
    "sample_with_rejection": "sample",
    "evaluate_run": "evaluate",
    "compress_files": "compress",
    "export_run": "export",
    "load_pretrained": "export",
    "save_pretrained": "export",
    "from_pretrained": "export",
    "PretrainedModels": "export",
    "export_onnx": "onnx_export",
    "decompress_files": "compress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqvae2' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
