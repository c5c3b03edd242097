"""The training configuration: one typed object whose defaults are the specification's figures."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .io import UserError, write_text

CLASSES = ("female", "male")  # index 0 and 1; the sigmoid output is P(male)
IMAGE_SIZE = 128
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class TrainConfig:
    # model
    weights: str = "imagenet"  # imagenet | none | path to a state-dict file
    dropout: float = 0.3
    freeze_backbone: bool = False
    image_size: int = IMAGE_SIZE
    # optimisation
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 20
    plateau_factor: float = 0.2
    plateau_patience: int = 3
    early_stopping_patience: int = 5
    label_smoothing: float = 0.0
    # distillation (opt-in): a teacher checkpoint's probabilities as soft targets beside the labels
    distill: str = ""  # teacher: a run directory or .safetensors file (e.g. a --kind descriptor run); "" = off
    distill_weight: float = 0.5  # share of the loss on the teacher's soft targets; the rest on the labels
    distill_temperature: float = 2.0  # both logits are divided by it; the soft loss is scaled by its square
    # augmentation (training only)
    hflip: float = 0.5
    rotation: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    # data
    workers: int = 4
    seed: int = 0
    # speed
    pipeline: str = "fast"  # fast | reference
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    deterministic: bool = False  # bit-for-bit repeatable on CUDA too (cuDNN/cuBLAS deterministic kernels)
    device: str = "auto"
    threshold: float = 0.5
    max_train_images: int = 0  # 0 = all; a cap for quick runs
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        choices = {"pipeline": ("fast", "reference"), "precision": ("auto", "fp32", "bf16", "fp16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"config: {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = ("lr", "batch_size", "epochs", "image_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"config: {name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"config: dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.distill_weight <= 1:
            raise UserError(f"config: distill_weight must be in [0, 1], got {self.distill_weight!r}")
        if self.distill_temperature <= 0:
            raise UserError(f"config: distill_temperature must be positive, got {self.distill_temperature!r}")
        if not 0 < self.threshold < 1:
            raise UserError(f"config: threshold must be in (0, 1), got {self.threshold!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, value, default):
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        try:
            return type(default)(value)
        except ValueError:
            raise UserError(f"config: {name}={value!r} is not a number") from None
    if isinstance(default, float):
        return float(value)
    return value


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults, then the YAML file, then explicit overrides (None means "not given")."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({e.__class__.__name__}); fix the file") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    defaults = TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    coerced = {k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()}
    return TrainConfig(**coerced).validate()


def save_config(config: TrainConfig, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
