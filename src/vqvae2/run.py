"""A run folder: where each part of a run lives, and loading a run's models and configs.

Every command reads and writes one folder::

    RUN_DIR/config.yaml, metrics.csv       stage 1's resolved config and training log
    RUN_DIR/reconstructions/               stage 1's validation grids
    RUN_DIR/vqvae/step-*/                  stage 1's checkpoints (``vqvae2.checkpoint``)
    RUN_DIR/codes/{train,val}/             extract-codes (``vqvae2.codes``)
    RUN_DIR/codes/train-augmented/         extract-codes --augment
    RUN_DIR/prior-<level>/                 train-prior: config.yaml, metrics.csv, step-*/
    RUN_DIR/classifier/                    train-classifier --run: the rejection scorer
    RUN_DIR/feature-classifier/            evaluate's feature network (another seed)

A command opens the folder once as a typed ``Run`` (``Run.open(path)``): stage 1's config, its
levels, data source and preset as fields, the paths of its parts, and loading of its models;
the stages take that object. Models load in eval mode with nothing but the folder: each
checkpoint describes itself. A trainer may be writing the run meanwhile: each model comes whole
from one step folder (``checkpoint.held_checkpoint_dir``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._helpers import load_state_checked
from .checkpoint import LATEST, Checkpoint, read_checkpoint, read_meta, run_facts
from .classifier import Classifier
from .codes import CodeDataset
from .config import (
    ClassifierRunConfig,
    DataConfig,
    PriorRunConfig,
    VQVAERunConfig,
    config_from_dict,
    list_presets,
)
from .model_configs import check_priors_fit
from .pixelsnail import PixelSNAIL
from .vqvae import VQVAE2

VQVAE_KIND = "vqvae"
CLASSIFIER_KIND = "classifier"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
RECONSTRUCTIONS_DIR = "reconstructions"
CODES_DIR = "codes"
AUGMENTED_CODES = "train-augmented"  # store of the codes of transformed training images
FEATURE_CLASSIFIER_DIR = "feature-classifier"


def prior_kind(level: str) -> str:
    """Checkpoint kind and folder name of a level's prior: ``prior-top``, ``prior-bottom``, ..."""
    return f"prior-{level}"


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` (a kind folder such as ``RUN_DIR/prior-top``) holds a checkpoint."""
    return (Path(folder) / LATEST).is_file()


def load_run_config(path: str | Path, kind: str, config_class: type) -> Any:
    """The run config saved with a ``kind`` checkpoint (reads only the JSON metadata)."""
    return config_from_dict(config_class, read_meta(Path(path), kind)[1]["config"])


def level_names(run_dir: str | Path) -> tuple[str, ...]:
    """Names of the run's latent levels, top first."""
    return load_run_config(run_dir, VQVAE_KIND, VQVAERunConfig).model.level_names


def load_vqvae(path: str | Path, map_location: str | torch.device = "cpu") -> VQVAE2:
    """Load a trained VQ-VAE from a run folder or checkpoint folder, in eval mode.

    Args:
        path: ``RUN_DIR``, ``RUN_DIR/vqvae`` or a ``step-*`` folder.
        map_location: device for the weights.
    """
    return vqvae_from_checkpoint(read_checkpoint(Path(path), VQVAE_KIND), map_location)


def vqvae_from_checkpoint(
    checkpoint: Checkpoint, map_location: str | torch.device = "cpu"
) -> VQVAE2:
    """The VQ-VAE of a checkpoint already read (its step and config then come from the same
    folder as its weights), in eval mode."""
    model = VQVAE2(config_from_dict(VQVAERunConfig, checkpoint.config).model)
    load_state_checked(model, checkpoint.model_state, checkpoint.path)
    return model.to(map_location).eval()


def load_prior(
    run_dir: str | Path, level: str, map_location: str | torch.device = "cpu"
) -> PixelSNAIL:
    """Load the trained prior of ``level`` ('top', 'middle', 'bottom') from a run folder (or
    the prior's own kind or step folder), in eval mode."""
    checkpoint = read_checkpoint(Path(run_dir), prior_kind(level))
    prior = PixelSNAIL(config_from_dict(PriorRunConfig, checkpoint.config).prior)
    load_state_checked(prior, checkpoint.model_state, checkpoint.path)
    return prior.to(map_location).eval()


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """Load a trained classifier from its folder (or a run folder holding ``classifier/``)."""
    return classifier_from_checkpoint(read_checkpoint(Path(path), CLASSIFIER_KIND), map_location)


def classifier_from_checkpoint(
    checkpoint: Checkpoint, map_location: str | torch.device = "cpu"
) -> Classifier:
    """The classifier of a checkpoint already read, in eval mode."""
    classifier = Classifier(config_from_dict(ClassifierRunConfig, checkpoint.config).model)
    load_state_checked(classifier, checkpoint.model_state, checkpoint.path)
    return classifier.to(map_location).eval()


def load_hierarchy(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[VQVAE2, list[PixelSNAIL]]:
    """The VQ-VAE and one trained prior per level (top first) of a run on ``device``, checked
    to fit each other."""
    run_dir = Path(run_dir)
    vqvae = load_vqvae(run_dir, map_location=device)
    priors = []
    for level in vqvae.config.level_names:
        if not has_checkpoint(run_dir / prior_kind(level)):
            raise ValueError(
                f"{run_dir} has no trained {level} prior; run "
                f"`vqvae2 train-prior {run_dir} --level {level}`"
            )
        priors.append(load_prior(run_dir, level, map_location=device))
    check_priors_fit(vqvae.config, [prior.config for prior in priors])
    return vqvae, priors


@dataclass(frozen=True)
class Run:
    """A run folder opened once: stage 1's config and facts, where its parts live, and loading
    of its models. Stages take a ``Run``; ``Run.open`` reads stage 1's metadata (JSON only).

    Attributes:
        path: the run folder.
        config: stage 1's run config (model, data, train).
        data_path: the absolute image source stage 1 trained on, or None when not recorded.
        preset: the preset stage 1's config came from (later commands pick matching prior and
            classifier presets by it), or None for a YAML file or a config built in Python.
        vqvae_step: the step of stage 1's latest checkpoint when the run was opened.
    """

    path: Path
    config: VQVAERunConfig
    data_path: Path | None
    preset: str | None
    vqvae_step: int

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Open the run in ``path``; ``ValueError`` unless it holds a trained VQ-VAE."""
        path = Path(path)
        step_dir, meta = read_meta(path, VQVAE_KIND)
        facts = run_facts(meta, step_dir)
        return cls(
            path=path,
            config=config_from_dict(VQVAERunConfig, meta["config"]),
            data_path=None if facts.data_path is None else Path(facts.data_path),
            preset=facts.preset,
            vqvae_step=meta["step"],
        )

    @property
    def level_names(self) -> tuple[str, ...]:
        """Names of the latent levels, top first."""
        return self.config.model.level_names

    def preset_for(self, stage: str) -> str:
        """The preset ``<stage>-<this run's preset>`` (``prior-top-fashion-mnist-32``,
        ``classifier-fashion-mnist-32``) that a later stage defaults to; ``ValueError`` when the
        run was not trained from a preset that has one."""
        name = f"{stage}-{self.preset}"
        if self.preset is None:
            raise ValueError("this run was not trained from a preset; pass --config PRESET_OR_YAML")
        if name not in list_presets():
            raise ValueError(f"no preset '{name}' for this run; pass --config PRESET_OR_YAML")
        return name

    def level_index(self, level: str) -> int:
        """Index (top = 0) of ``level``; ``ValueError`` if the VQ-VAE has no such level."""
        if level not in self.level_names:
            raise ValueError(
                f"the VQ-VAE in {self.path} has levels {', '.join(self.level_names)}; "
                f"there is no '{level}' level"
            )
        return self.level_names.index(level)

    @property
    def num_classes(self) -> int | None:
        """Classes of the training split, as its code store records; None before
        ``extract_codes``."""
        store = self.codes_dir / "train"
        return CodeDataset(store).num_classes if (store / "meta.json").is_file() else None

    @property
    def vqvae_dir(self) -> Path:
        return self.path / VQVAE_KIND

    @property
    def codes_dir(self) -> Path:
        """``codes/{train,val,train-augmented}``: the code stores of ``extract_codes``."""
        return self.path / CODES_DIR

    @property
    def reconstructions_dir(self) -> Path:
        return self.path / RECONSTRUCTIONS_DIR

    def prior_dir(self, level: str) -> Path:
        """Checkpoints, config and log of ``level``'s prior."""
        return self.path / prior_kind(level)

    @property
    def classifier_dir(self) -> Path:
        """The run's classifier: rejection sampling's scorer."""
        return self.path / CLASSIFIER_KIND

    @property
    def feature_classifier_dir(self) -> Path:
        """The evaluation's feature network (a second classifier, another seed)."""
        return self.path / FEATURE_CLASSIFIER_DIR

    @property
    def data_config(self) -> DataConfig:
        """How stage 1 cut its data into splits."""
        return self.config.data

    def has_prior(self, level: str) -> bool:
        return has_checkpoint(self.prior_dir(level))

    def has_classifier(self) -> bool:
        return has_checkpoint(self.classifier_dir)

    def load_vqvae(self, device: str | torch.device = "cpu") -> VQVAE2:
        """The trained VQ-VAE on ``device``, in eval mode."""
        return load_vqvae(self.path, map_location=device)

    def load_prior(self, level: str, device: str | torch.device = "cpu") -> PixelSNAIL:
        """The trained prior of ``level`` on ``device``, in eval mode."""
        self.level_index(level)
        return load_prior(self.path, level, map_location=device)

    def load_hierarchy(self, device: str | torch.device = "cpu") -> tuple[VQVAE2, list[PixelSNAIL]]:
        """The VQ-VAE and one prior per level (top first), checked to fit each other."""
        return load_hierarchy(self.path, device)

    def load_classifier(self, device: str | torch.device = "cpu") -> Classifier:
        """The run's classifier (``RUN_DIR/classifier``), in eval mode."""
        return load_classifier(self.path, map_location=device)
