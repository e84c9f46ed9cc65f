"""vqvae2: VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019) in PyTorch."""

from .checkpoint import load_classifier, load_prior, load_vqvae
from .config import (
    ClassifierRunConfig,
    DataConfig,
    PixelSNAILConfig,
    PriorRunConfig,
    TrainConfig,
    VQVAEConfig,
    VQVAERunConfig,
    load_config,
)
from .data import open_dataset
from .pixelsnail import PixelSNAIL
from .quantize import QuantizerOutput, VectorQuantizerEMA
from .sampling import generate, sample_codes
from .train import (
    evaluate_vqvae,
    extract_codes,
    reconstruct,
    sample_from_run,
    train_classifier,
    train_prior,
    train_vqvae,
)
from .vqvae import VQVAE2, VQVAEOutput

__version__ = "0.1.0"

__all__ = [
    "ClassifierRunConfig",
    "PixelSNAIL",
    "PixelSNAILConfig",
    "PriorRunConfig",
    "extract_codes",
    "generate",
    "load_classifier",
    "load_prior",
    "sample_codes",
    "sample_from_run",
    "train_classifier",
    "train_prior",
    "VQVAE2",
    "DataConfig",
    "QuantizerOutput",
    "TrainConfig",
    "VQVAEConfig",
    "VQVAEOutput",
    "VQVAERunConfig",
    "VectorQuantizerEMA",
    "evaluate_vqvae",
    "load_config",
    "load_vqvae",
    "open_dataset",
    "reconstruct",
    "train_vqvae",
]
