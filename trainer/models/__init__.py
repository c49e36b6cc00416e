"""The method registry: name -> config class, model class and training loss.

Each method lives in its own package (`trainer.models.<name>`) exposing
`METHOD`, a `Method`. A method's model takes a normalised (B, 3, H, W) batch;
`forward` returns what its loss needs, `anomaly_map` the raw map
(B, 1, H/4, W/4), and `trainable_parameters` what the optimizer may touch.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

METHOD_NAMES = ("stfpm", "rd", "us")


class MethodNotAvailable(ValueError):
    """A method that this build does not provide (yet)."""


@dataclass(frozen=True)
class Method:
    name: str
    config: type                                   # a dataclass with a ClassVar `method`
    model: Callable[..., nn.Module]                # model(cfg, pretrained=True)
    loss: Callable[..., Tensor]                    # loss(*model(x)) -> scalar
    # optional passes over the normal training images (normalised batches, one pass, no_grad, eval mode):
    # `prepare` before the first epoch, `finalize` on the best model once training ends
    prepare: Callable[[nn.Module, Iterable[Tensor]], None] | None = None
    finalize: Callable[[nn.Module, Iterable[Tensor]], None] | None = None

    def training_loss(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.loss(*model(x))


def get_method(name: str) -> Method:
    """The registered method `name`; MethodNotAvailable for known names not built yet."""
    if name not in METHOD_NAMES:
        raise MethodNotAvailable(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    try:
        module = importlib.import_module(f"trainer.models.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"trainer.models.{name}":
            raise
        raise MethodNotAvailable(f"method {name!r} is not available yet in this build; "
                                 f"use --method stfpm") from None
    return module.METHOD


def available_methods() -> list[str]:
    out = []
    for name in METHOD_NAMES:
        try:
            get_method(name)
            out.append(name)
        except MethodNotAvailable:
            pass
    return out


def model_config(method: str, values: dict[str, Any] | None = None) -> Any:
    """A method's config from a plain dict (e.g. a checkpoint's); unknown keys are refused."""
    cls = get_method(method).config
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{method} config: unknown key(s) {unknown}; allowed: {sorted(names)}")
    return cls(**values)


def build_model(cfg: Any, pretrained: bool = True) -> nn.Module:
    """Build the model a method config describes; `pretrained=False` skips loading teacher weights
    (for rebuilding from a checkpoint, which carries them)."""
    return get_method(type(cfg).method).model(cfg, pretrained=pretrained)
