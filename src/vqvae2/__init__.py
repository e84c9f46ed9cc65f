"""vqvae2: VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019) in PyTorch."""

from .checkpoint import load_vqvae
from .config import DataConfig, TrainConfig, VQVAEConfig, VQVAERunConfig, load_config
from .data import open_dataset
from .quantize import QuantizerOutput, VectorQuantizerEMA
from .train import evaluate_vqvae, reconstruct, train_vqvae
from .vqvae import VQVAE2, VQVAEOutput

__version__ = "0.1.0"

__all__ = [
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
