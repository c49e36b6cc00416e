"""The method registry: name -> config class, model class and training loss (or fitting pass).

Each method lives in its own package (`trainer.models.<name>`) exposing
`METHOD`, a `Method`. A method's model takes a normalised (B, 3, H, W) batch;
`forward` returns what its loss needs, `anomaly_map` the raw map
(B, 1, H/4, W/4), and `trainable_parameters` what the optimizer may touch.

A distillation method trains with its `loss`; a memory-bank method has no
loss and no gradient steps, only a `fit` pass over each class's normal
images. A model whose class attribute `class_conditional` is true takes each
frame's class index as a second argument of `anomaly_map` (and its graph as
a second input): it scores a frame against what it learned of that class only.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from shared.vocabulary import METHODS

METHOD_NAMES = METHODS   # one folder each


class UnknownMethod(ValueError):
    """A method name that is not registered."""


@dataclass(frozen=True)
class Method:
    name: str
    config: type                                   # a dataclass with a ClassVar `method`
    model: Callable[..., nn.Module]                # model(cfg, pretrained=True)
    loss: Callable[..., Tensor] | None = None      # loss(*model(x)) -> scalar; None: nothing to train
    # optional passes over the normal training images (normalised batches, one pass, no_grad, eval mode):
    # `prepare` before the first epoch, `finalize` on the best model once training ends
    prepare: Callable[[nn.Module, Iterable[Tensor]], None] | None = None
    finalize: Callable[[nn.Module, Iterable[Tensor]], None] | None = None
    # a method without a loss: fit(model, {class: () -> normalised batches}, seed, progress) instead of training
    fit: Callable[..., None] | None = None
    # the method's training settings (`trainer.config.TrainConfig` fields: epochs, optimizer, lr, ...), measured
    # for it; what it leaves out comes from `trainer.config.RECIPE`, and any can be overridden per run
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def class_conditional(self) -> bool:
        """True when the model scores each frame against its own class (its graph takes a class index)."""
        return bool(getattr(self.model, "class_conditional", False))

    @property
    def trained(self) -> bool:
        """True for methods trained by gradient steps, False for those fitted in one pass."""
        return self.loss is not None

    def training_loss(self, model: nn.Module, x: Tensor, validation: bool = False) -> Tensor:
        """The loss on a normalised batch; `validation`: the loss that picks the best checkpoint (a model
        may define `loss_options(validation)`, e.g. STFPM averages every error there, not the hardest)."""
        if self.loss is None:
            raise TypeError(f"{self.name} is fitted, not trained: it has no training loss")
        options = model.loss_options(validation) if hasattr(model, "loss_options") else {}
        return self.loss(*model(x), **options)


def get_method(name: str) -> Method:
    """The registered method `name` (its package is imported on first use)."""
    if name not in METHOD_NAMES:
        raise UnknownMethod(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return importlib.import_module(f"trainer.models.{name}").METHOD


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
