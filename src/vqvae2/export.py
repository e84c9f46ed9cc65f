"""Trained models in the Hugging Face Hub layout, and a run's models exported as one folder.

One model is a folder with ``config.json`` (its config dataclass as JSON, plus ``_class_name``
and ``_format_version``) and ``model.safetensors`` (its ``state_dict``): the layout of the
Hub's ``PyTorchModelHubMixin`` and of diffusers' pipeline folders, written here directly (see
docs/formats.md for why the mixin is not used). A run exports as::

    OUT/README.md              model card: YAML header the Hub reads, the run's logged figures
    OUT/model_index.json       which sub-folder holds which model
    OUT/vqvae/                 VQVAE2
    OUT/prior-<level>/         PixelSNAIL, one per level (top first in model_index.json)
    OUT/classifier/            Classifier (when the run has one)

Loading needs nothing but the folder. ``load_pretrained`` also takes a Hub name; only then is
``huggingface_hub`` imported (an optional dependency), so importing this module touches no
network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from ._helpers import load_state_checked
from .checkpoint import write_text_atomic
from .classifier import Classifier
from .config import DataConfig, config_from_dict, config_to_dict
from .model_card import model_card
from .model_configs import ClassifierConfig, PixelSNAILConfig, VQVAEConfig
from .pixelsnail import PixelSNAIL
from .run import CLASSIFIER_KIND, VQVAE_KIND, Run, prior_kind
from .sampling import check_hierarchy
from .vqvae import VQVAE2

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model_index.json"
CARD_FILE = "README.md"
CLASS_KEY = "_class_name"
VERSION_KEY = "_format_version"
FORMAT_NAME = "vqvae2-export"
FORMAT_VERSION = 1
# class name in config.json -> (model class, its config dataclass)
MODEL_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "VQVAE2": (VQVAE2, VQVAEConfig),
    "PixelSNAIL": (PixelSNAIL, PixelSNAILConfig),
    "Classifier": (Classifier, ClassifierConfig),
}
HUB_FILES = [INDEX_FILE, CARD_FILE, f"*/{CONFIG_FILE}", f"*/{WEIGHTS_FILE}"]  # nothing else
HUB_TIMEOUT_SECONDS = 10.0  # each Hub request's connection and read timeout
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class PretrainedModels:
    """The models of an exported run, in eval mode."""

    vqvae: VQVAE2
    priors: tuple[PixelSNAIL, ...]  # one per level, top first
    classifier: Classifier | None  # the run's rejection scorer, when it had one
    path: Path  # the folder they were read from
    data_config: DataConfig  # how the run cut its data into splits
    data_path = None  # an export names no data of its own

    @property
    def level_names(self) -> tuple[str, ...]:
        return self.vqvae.config.level_names

    # The loaders of a run (``vqvae2.run.Run``), so that sampling, reconstruction and the codec
    # take either.
    def load_vqvae(self, device: str | torch.device = "cpu") -> VQVAE2:
        return self.vqvae.to(device)

    def load_hierarchy(self, device: str | torch.device = "cpu") -> tuple[VQVAE2, list[PixelSNAIL]]:
        """The VQ-VAE and the priors (top first) on ``device``."""
        return self.vqvae.to(device), [prior.to(device) for prior in self.priors]

    def has_classifier(self) -> bool:
        return self.classifier is not None

    def load_classifier(self, device: str | torch.device = "cpu") -> Classifier:
        """The exported classifier on ``device``; ``ValueError`` when none was exported."""
        if self.classifier is None:
            raise ValueError(f"{self.path} holds no classifier (its run had none when exported)")
        return self.classifier.to(device)


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``export_run``."""
    return (Path(path) / INDEX_FILE).is_file()


def save_pretrained(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model`` (a ``VQVAE2``, ``PixelSNAIL`` or ``Classifier``) to ``folder`` as
    ``config.json`` + ``model.safetensors``; the folder is made when missing."""
    names = [name for name, (cls, _) in MODEL_CLASSES.items() if type(model) is cls]
    if not names:
        raise ValueError(f"cannot save a {type(model).__name__}: not a vqvae2 model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {CLASS_KEY: names[0], VERSION_KEY: FORMAT_VERSION, **config_to_dict(model.config)}
    write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def from_pretrained(
    folder: str | Path, map_location: str | torch.device = "cpu", expected: type | None = None
) -> nn.Module:
    """The model saved in ``folder`` by ``save_pretrained``, in eval mode on ``map_location``.

    Raises:
        ValueError: a missing or unreadable file, another class than ``expected``, a config
            or weights that do not fit.
    """
    folder = Path(folder)
    config = _read_json(folder / CONFIG_FILE)
    name, version = config.pop(CLASS_KEY, None), config.pop(VERSION_KEY, None)
    if name not in MODEL_CLASSES:
        raise ValueError(f"{folder / CONFIG_FILE} names no vqvae2 model ({CLASS_KEY}: {name!r})")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE} has format version {version!r}, this vqvae2 reads "
            f"version {FORMAT_VERSION}"
        )
    model_class, config_class = MODEL_CLASSES[name]
    if expected is not None and model_class is not expected:
        raise ValueError(f"{folder} holds a {name}, expected a {expected.__name__}")
    model = model_class(config_from_dict(config_class, config))
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"cannot read {folder / WEIGHTS_FILE}: {error}") from None
    load_state_checked(model, state, folder)
    return model.to(map_location).eval()


def export_run(run: Run, out_dir: str | Path, report: str | Path | None = None) -> Path:
    """Export a trained run: its VQ-VAE, every prior and (when trained) its classifier, each
    in the Hub layout, with a model card of the figures the run logged.

    The folder is written under a temporary name and renamed into place at the end.

    Args:
        run: a run with a VQ-VAE and a prior for each of its levels.
        out_dir: the folder to write; it must not exist, or be empty.
        report: an evaluation's ``report.json`` whose figures go into the card; default: the
            newest ``report.json`` inside the run folder, if any.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} already exists and is not empty; choose another folder")
    vqvae, priors = run.load_hierarchy()
    classifier = run.load_classifier() if run.has_classifier() else None
    card = model_card(run.path, run.data_path, vqvae, priors, classifier, report)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_models(tmp, vqvae, priors, classifier, run.config.data)
        write_text_atomic(tmp / CARD_FILE, card)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_models(
    folder: Path,
    vqvae: VQVAE2,
    priors: list[PixelSNAIL],
    classifier: Classifier | None,
    data: DataConfig,
) -> None:
    """Each model in its sub-folder, and ``model_index.json`` naming them and holding how the
    run cut its data into splits (``data``, for reconstructing a split)."""
    levels = vqvae.config.level_names
    save_pretrained(vqvae, folder / VQVAE_KIND)
    for level, prior in zip(levels, priors, strict=True):
        save_pretrained(prior, folder / prior_kind(level))
    if classifier is not None:
        save_pretrained(classifier, folder / CLASSIFIER_KIND)
    index = {
        "_format": FORMAT_NAME,
        VERSION_KEY: FORMAT_VERSION,
        "_vqvae2_version": __version__,
        "levels": list(levels),
        VQVAE_KIND: VQVAE_KIND,
        "priors": [prior_kind(level) for level in levels],
        CLASSIFIER_KIND: CLASSIFIER_KIND if classifier is not None else None,
        "data": config_to_dict(data),
    }
    write_text_atomic(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def load_pretrained(
    name_or_folder: str | Path, map_location: str | torch.device = "cpu"
) -> PretrainedModels:
    """The models of an exported run (``export_run``), in eval mode on ``map_location``.

    Args:
        name_or_folder: an exported folder, or the name of a Hugging Face Hub repository
            holding one (``owner/name``; downloaded with ``huggingface_hub``, or taken from
            its cache; ``HF_HUB_OFFLINE=1`` allows the cache alone).

    Raises:
        ValueError: one line: not an exported folder, or a Hub name that cannot be fetched
            (no network, no such repository, ``huggingface_hub`` not installed).
    """
    path = Path(name_or_folder).expanduser()
    folder = path if path.is_dir() else _hub_folder(str(name_or_folder))
    index = _read_index(folder)
    vqvae = from_pretrained(folder / index[VQVAE_KIND], map_location, VQVAE2)
    priors = tuple(
        from_pretrained(folder / name, map_location, PixelSNAIL) for name in index["priors"]
    )
    check_hierarchy(vqvae, priors)
    classifier = (
        from_pretrained(folder / index[CLASSIFIER_KIND], map_location, Classifier)
        if index.get(CLASSIFIER_KIND)
        else None
    )
    data = config_from_dict(DataConfig, index.get("data", {}))
    return PretrainedModels(
        vqvae=vqvae, priors=priors, classifier=classifier, path=folder, data_config=data
    )


def _read_index(folder: Path) -> dict[str, Any]:
    """``model_index.json`` of an exported folder, checked."""
    if not (folder / INDEX_FILE).is_file():
        raise ValueError(
            f"{folder} is not an exported vqvae2 model (no {INDEX_FILE}); "
            "write one with `vqvae2 export RUN OUT`"
        )
    index = _read_json(folder / INDEX_FILE)
    if index.get("_format") != FORMAT_NAME or index.get(VERSION_KEY) != FORMAT_VERSION:
        raise ValueError(
            f"{folder / INDEX_FILE} is not a vqvae2 export of format version {FORMAT_VERSION}"
        )
    priors = index.get("priors")
    if not isinstance(index.get(VQVAE_KIND), str) or not isinstance(priors, list):
        raise ValueError(f"{folder / INDEX_FILE} must name a '{VQVAE_KIND}' folder and 'priors'")
    for name in [index[VQVAE_KIND], *priors, index.get(CLASSIFIER_KIND) or "."]:
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{folder / INDEX_FILE} names a folder outside the export: {name!r}")
    return index


def _hub_folder(name: str) -> Path:
    """The local folder of Hub repository ``name`` (downloaded, or from the cache)."""
    if not REPO_ID.fullmatch(name):
        raise ValueError(f"{name} does not exist (not a folder, nor a Hub name owner/model)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"{name} is no folder here; loading it from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'vqvae2[hub]'"
        ) from None
    try:
        folder = snapshot_download(
            repo_id=name, allow_patterns=HUB_FILES, etag_timeout=HUB_TIMEOUT_SECONDS
        )
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ValueError(
            f"{name} is no folder here, and the Hugging Face Hub did not give it: "
            f"{type(error).__name__}: {reason}"
        ) from None
    return Path(folder)
