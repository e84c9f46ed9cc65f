"""The run configs of VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019): data, training, runtime and
evaluation settings, the run config of each trainer around its model's config (those are in
``vqvae2.model_configs``), and YAML I/O: presets, files and ``key=value`` overrides.

Config flows one way: YAML (plain data) -> validated frozen dataclass -> model. Unknown keys
and impossible values raise ``ValueError`` naming the key and the expected range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from ._helpers import check, check_at_least
from .model_configs import (
    PRIOR_DATA_FIELDS,
    ClassifierConfig,
    PixelSNAILConfig,
    VQVAEConfig,
)

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how splits are made (the path itself is given at run time)."""

    val_fraction: float = (
        0.05  # share of the train split held out as validation when the source has none
    )
    test_fraction: float = 0.1  # share held out as test when the source has no test split
    split_seed: int = 0  # seed of the deterministic split permutation
    num_workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    random_flip: bool = False  # mirror training images left-right at random
    # Crop training images at a random place of the image resized with a margin (its short side
    # to image_size * (1 + crop_margin)) instead of the centre of the image resized to fit.
    random_crop: bool = False
    crop_margin: float = 0.125  # with random_crop: how much larger than the crop the image is

    def __post_init__(self) -> None:
        check(
            0.0 <= self.val_fraction < 1.0,
            f"data.val_fraction must be in [0, 1), got {self.val_fraction}",
        )
        check(
            0.0 <= self.test_fraction < 1.0,
            f"data.test_fraction must be in [0, 1), got {self.test_fraction}",
        )
        check(
            self.val_fraction + self.test_fraction < 1.0,
            "data.val_fraction + data.test_fraction must be < 1",
        )
        check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        check(self.split_seed >= 0, f"data.split_seed must be >= 0, got {self.split_seed}")
        check(self.crop_margin > 0, f"data.crop_margin must be > 0, got {self.crop_margin}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of one training run."""

    batch_size: int = 128  # Table 5 "batch size" (global across processes)
    grad_accum_steps: int = 1  # micro-batches per step: each process runs batch/(world*this)
    learning_rate: float = 3e-4  # Adam step size
    adam_beta1: float = 0.9  # Adam first-moment decay
    adam_beta2: float = 0.999  # Adam second-moment decay
    # Step-size schedule after the warm-up; "cosine" and "linear" decay to 0 at max_steps.
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0  # linear ramp from 0 to learning_rate (at most max_steps // 2 steps)
    max_steps: int = 100_000  # optimisation steps (Table 5 trains for 2.2M on ImageNet)
    # Wall-time budget in minutes of training (summed over resumes; 0 = none): the schedule then
    # decays over whichever of max_steps and this budget runs out first, and training stops there.
    schedule_minutes: float = 0.0
    log_every: int = 50  # steps between metric log rows
    val_every: int = 500  # steps between validation passes (and reconstruction grids)
    val_batches: int = 20  # batches per periodic validation pass (the final pass uses all)
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    grid_images: int = 16  # images in each reconstruction grid
    seed: int = 0  # seeds weights, data order and every other random choice
    # A step whose loss is not finite (inf, nan; e.g. an overflow under bf16): "stop" the run
    # with an error naming the step and the last checkpoint, or "skip" the step (no update,
    # buffers as before it) and count it in the log as skipped_nonfinite.
    nonfinite: Literal["stop", "skip"] = "stop"
    # Step Adam parameter by parameter inside the backward pass, as each gradient arrives, and
    # free that gradient at once: the whole model's gradients are never held together, which
    # lowers the peak memory of large priors by up to one model's worth. One process, no
    # gradient accumulation, nonfinite=stop (a step already taken cannot be skipped).
    optimizer_in_backward: bool = False
    # Keep only each residual block's inputs in the forward pass and recompute the rest in the
    # backward pass (the priors' gated, conditioning and output blocks; the VQ-VAE's residual
    # blocks): same gradients, a fraction of the activation memory, about one more forward pass.
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_at_least(
            self,
            "train",
            (
                "batch_size",
                "grad_accum_steps",
                "max_steps",
                "log_every",
                "val_every",
                "val_batches",
                "checkpoint_every",
                "grid_images",
            ),
            1,
        )
        check(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"train.{name} must be in [0, 1), got {value}")
        check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        check(
            self.schedule_minutes >= 0,
            f"train.schedule_minutes must be >= 0, got {self.schedule_minutes}",
        )
        check(
            self.nonfinite in ("stop", "skip"),
            f"train.nonfinite must be stop or skip, got {self.nonfinite!r}",
        )
        check(
            not self.optimizer_in_backward
            or (self.grad_accum_steps == 1 and self.nonfinite == "stop"),
            "train.optimizer_in_backward needs train.grad_accum_steps=1 and train.nonfinite=stop",
        )
        check(
            isinstance(self.activation_checkpointing, bool),
            f"train.activation_checkpointing must be true or false, got {self.activation_checkpointing!r}",
        )


@dataclass(frozen=True)
class RuntimeConfig:
    """How this process runs, not what it learns: chosen per command, never saved in a run.

    Every field is opt-in; the defaults are the CPU-friendly float32 eager path.
    """

    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    precision: Literal["float32", "bf16"] = "float32"  # bf16 autocast; quantizer math stays fp32
    compile: bool = False  # torch.compile the training forward pass
    channels_last: bool = False  # NHWC memory layout for convolutions
    tensorboard: bool = False  # also write the training figures and grids as TensorBoard events

    def __post_init__(self) -> None:
        check(
            self.precision in ("float32", "bf16"),
            f"precision must be float32 or bf16, got {self.precision}",
        )


@dataclass(frozen=True)
class VQVAERunConfig:
    """Everything `vqvae2 train-vqvae` needs besides the data path and output folder."""

    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class PriorRunConfig:
    """Everything `vqvae2 train-prior` needs besides the run folder and level."""

    prior: PixelSNAILConfig = field(default_factory=PixelSNAILConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    class_conditional: bool = True  # condition on the labels when the data has several classes
    # also train on RUN_DIR/codes/train-augmented (extract-codes --augment) when it exists
    augmented_codes: bool = True


@dataclass(frozen=True)
class ClassifierRunConfig:
    """Everything `vqvae2 train-classifier` needs besides the data path and output folder."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# Plain data <-> dataclasses


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass (possibly nested) as plain JSON/YAML data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(config))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        check(value in allowed, f"{key} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        check(isinstance(value, list | tuple), f"{key} must be a list, got {value!r}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if annotation is bool:
        check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        check(
            isinstance(value, int) and not isinstance(value, bool),
            f"{key} must be an integer, got {value!r}",
        )
        return value
    if annotation is float:
        check(
            isinstance(value, int | float) and not isinstance(value, bool),
            f"{key} must be a number, got {value!r}",
        )
        return float(value)
    if annotation is str:
        check(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return config_from_dict(annotation, value, prefix=f"{key}.")
    raise TypeError(f"unsupported config field type {annotation!r} for {key}")


def config_from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from plain data, rejecting unknown keys and wrong types.

    Raises:
        ValueError: naming the offending key, e.g. ``unknown config key 'model.codebok_size'``.
    """
    if data is None:
        data = {}
    where = prefix.rstrip(".") or "config"
    check(isinstance(data, dict), f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    check(
        not unknown,
        f"unknown config key '{prefix}{unknown[0] if unknown else ''}' (known: {', '.join(sorted(names))})",
    )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["model.codebook_size=256", "train.lr_schedule=cosine"]`` into a nested dict.

    Values are parsed as YAML scalars, so ``3e-4`` is a float and ``true`` a bool.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        check(bool(sep) and bool(key), f"override must look like section.key=value, got {item!r}")
        value = yaml.safe_load(raw) if raw else ""
        # YAML 1.1 reads "3e-4" as a string; accept it as the float users mean.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            check(isinstance(node, dict), f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def list_presets() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(preset_or_path: str | Path) -> dict[str, Any]:
    """Plain data from a preset name (``fashion-mnist-32``) or a YAML file path."""
    path = Path(preset_or_path)
    if not path.is_file():
        preset = PRESET_DIR / f"{preset_or_path}.yaml"
        check(
            preset.is_file(),
            f"config '{preset_or_path}' is neither a YAML file nor a preset "
            f"(presets: {', '.join(list_presets())})",
        )
        path = preset
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}".splitlines()[0]) from None
    return data or {}


def with_max_steps(config: Any, max_steps: int | None) -> Any:
    """A run config with ``train.max_steps`` set (unchanged when ``max_steps`` is None)."""
    if max_steps is None:
        return config
    return replace(config, train=replace(config.train, max_steps=max_steps))


def load_config(
    cls: type,
    preset_or_path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Any:
    """Load a run config: preset/YAML data, then ``base`` (nested values, e.g. the image size of
    the run a classifier serves), then ``key=value`` overrides, validated into ``cls``.

    Raises:
        ValueError: an unknown key, a bad value, or a prior config that sets one of the fields
            ``train-prior`` takes from the data (``PRIOR_DATA_FIELDS``).
    """
    data = read_yaml(preset_or_path) if preset_or_path is not None else {}
    override_data = parse_overrides(overrides or [])
    if cls is PriorRunConfig:
        for source, values in ((preset_or_path, data), ("the overrides", override_data)):
            prior = values.get("prior") if isinstance(values, dict) else None
            for name in PRIOR_DATA_FIELDS:
                check(
                    not isinstance(prior, dict) or name not in prior,
                    f"prior.{name} is set from the VQ-VAE and the extracted codes when the prior "
                    f"is trained; remove it from {source}",
                )
    return config_from_dict(cls, _merge(_merge(data, base or {}), override_data))


def save_yaml(config: Any, path: Path) -> None:
    """Write a config dataclass as YAML (the resolved run config beside the checkpoints)."""
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


# The smallest sampling temperature: float32's smallest normal number (about 1.18e-38). The
# logits are divided by the temperature in float32; below it the divisor loses precision, and
# under about 7e-46 it rounds to 0 and the softmax is NaN.
MIN_TEMPERATURE = 2.0**-126


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """Raise ``ValueError`` unless ``temperature`` is finite and at least ``MIN_TEMPERATURE``."""
    check(
        math.isfinite(temperature) and temperature > 0,
        f"{name} must be a finite number > 0, got {temperature}",
    )
    check(
        temperature >= MIN_TEMPERATURE,
        f"{name} {temperature:g} is below the smallest sampling temperature, "
        f"{MIN_TEMPERATURE:.3g} (float32's smallest normal number)",
    )


@dataclass(frozen=True)
class EvaluateConfig:
    """What `vqvae2 evaluate` measures and how many samples it draws (paper Section 5)."""

    num_samples: int = 10_000  # samples in each metric set (FID, KID, IS, precision/recall)
    cas_samples: int = 0  # CAS classifier's training samples; 0 = the real train split's size
    cas_steps: int = 0  # CAS classifier steps; 0 = as many as the run's classifier was trained
    reject_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)  # Fig. 7 rejection rates
    nearest_k: int = 3  # k of the precision/recall manifolds (Kynkaanniemi et al. 2019)
    inception_score_splits: int = 10  # splits of the Inception Score (Salimans et al. 2016)
    kid_subsets: int = 100  # random subsets of KID (Binkowski et al. 2018)
    kid_subset_size: int = 1000  # samples per KID subset (capped by the set sizes)
    temperature: float = 1.0  # softmax temperature of the priors while sampling
    batch_size: int = 256  # samples per prior call, images per feature-network call
    seed: int = 0  # seeds sampling, the subsets drawn and the metrics' random splits

    def __post_init__(self) -> None:
        check(self.num_samples >= 2, f"evaluate.num_samples must be >= 2, got {self.num_samples}")
        check_at_least(self, "evaluate", ("cas_samples", "cas_steps"), 0)
        check(len(self.reject_fractions) >= 1, "evaluate.reject_fractions must not be empty")
        check(
            all(0.0 <= fraction < 1.0 for fraction in self.reject_fractions),
            f"evaluate.reject_fractions must lie in [0, 1), got {list(self.reject_fractions)}",
        )
        check_at_least(
            self,
            "evaluate",
            ("nearest_k", "inception_score_splits", "kid_subsets", "kid_subset_size"),
            1,
        )
        check_temperature(self.temperature, "evaluate.temperature")
        check(self.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        check(
            self.num_samples > self.nearest_k,
            f"evaluate.num_samples={self.num_samples} is too few for precision/recall with "
            f"k={self.nearest_k}: it needs more than k samples",
        )
        check(
            self.num_samples >= self.inception_score_splits,
            f"evaluate.num_samples={self.num_samples} is too few for the Inception Score over "
            f"{self.inception_score_splits} splits",
        )

    @property
    def fractions(self) -> tuple[float, ...]:
        """The rejection fractions, sorted, always starting with 0 (no rejection)."""
        return tuple(sorted({0.0, *self.reject_fractions}))
