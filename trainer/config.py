"""The training run's settings: what a checkpoint stores and every later step reads back."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from shared.imaging import RESIZE_MODES
from trainer.models import get_method, model_config

# what a method's recipe (`Method.recipe`) does not set: SGD as in the STFPM paper
RECIPE: dict[str, Any] = {"epochs": 10, "optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 1e-4}


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint."""

    data: str                                   # MVTec-layout root folder
    classes: tuple[str, ...] = ()               # empty: every class found under `data`
    method: str = "stfpm"
    model: Any = None                           # the method's config (dataclass or dict); None: its defaults
    size: int = 256                             # the model's square input side; a multiple of 32 for the backbones
    resize: str = "stretch"                     # frames to the square: "stretch" or "letterbox" (shared.imaging)
    # None: the method's own recipe (`Method.recipe`, e.g. trainer/models/stfpm/__init__.py), else RECIPE
    epochs: int | None = None
    batch_size: int = 8                         # BatchNorm needs a few; 16 halved the updates (30 for 48 images x 10)
    optimizer: str | None = None                # "sgd" or "adam"
    lr: float | None = None                     # the peak learning rate
    momentum: float | None = None               # SGD momentum / Adam beta1
    weight_decay: float | None = None
    warmup_epochs: float = 1.0                  # linear warm-up, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.01
    val_fraction: float = 0.2                   # held-out normal images: best checkpoint and calibration
    seed: int = 0
    hflip: bool = False                         # only where orientation is not semantic (textures)
    vflip: bool = False
    brightness: float = 0.1                     # +-10 % gain: lighting drift that stays normal
    out: str = "runs/stfpm"
    threads: int = 0                            # torch CPU threads; 0: torch's default

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        recipe = {**RECIPE, **get_method(self.method).recipe}   # refuses unknown methods early
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.model is None or isinstance(self.model, dict):
            self.model = model_config(self.method, self.model)
        if type(self.model).method != self.method:
            raise ValueError(f"model config is for {type(self.model).method!r}, not {self.method!r}")
        if self.size < 64 or self.size % 32:
            raise ValueError(f"size must be a multiple of 32 and at least 64, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be between 0 and 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr <= 0 or not 0 <= self.brightness < 1:
            raise ValueError("lr must be positive and brightness in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"train config: unknown key(s) {unknown}")
        return cls(**d)
