"""The deployable graph: square uint8 frames in, raw anomaly map at stride 4 out.

Input `image` uint8 (N, S, S, 3) RGB; the normalisation happens inside, with
the statistics the model's backbone was pretrained with
(`trainer.models.backbone.input_normalization`), so the agent feeds frames as
they come from `shared.imaging.letterbox`. A class-conditional model (one
memory bank per class) takes a second input, `class_index` int32 (N,): each
frame's position in the package's class list. Output `anomaly_map` float32
(N, 1, S/4, S/4), unsmoothed and unthresholded: scoring (`shared.scoring`)
stays outside, where a threshold can change without a new model.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.models.backbone import input_normalization

INPUT_NAME = "image"
CLASS_INPUT_NAME = "class_index"
OUTPUT_NAME = "anomaly_map"
MAP_STRIDE = 4


class Normalize(nn.Module):
    """(N, 3, H, W) float in [0, 255] -> (x / 255 - mean) / std, as one multiply-add."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * s), persistent=False)
        self.register_buffer("shift", -m / s, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    @classmethod
    def for_model(cls, model: nn.Module) -> Normalize:
        """The normalisation a method model's backbone expects (every method config names its backbone)."""
        return cls(*input_normalization(model.cfg.backbone))


def to_float_nchw(image: Tensor) -> Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), values still 0..255."""
    return image.permute(0, 3, 1, 2).to(torch.float32)


def is_class_conditional(model: nn.Module) -> bool:
    """True for a model that scores each frame against its own class (its graph takes `class_index`)."""
    inner = model.model if isinstance(model, InferenceGraph) else model
    return bool(getattr(inner, "class_conditional", False))


class InferenceGraph(nn.Module):
    """Wraps any registered method's model: forward(image uint8 NHWC[, class_index (N,)]) -> (N, 1, S/4, S/4)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.normalize = Normalize.for_model(model)
        self.class_conditional = is_class_conditional(model)

    def forward(self, image: Tensor, class_index: Tensor | None = None) -> Tensor:
        x = self.normalize(to_float_nchw(image))   # (N, 3, S, S)
        if not self.class_conditional:
            return self.model.anomaly_map(x)       # (N, 1, S/4, S/4)
        if class_index is None:
            raise ValueError("this model scores each frame against its class: give class_index (N,)")
        return self.model.anomaly_map(x, class_index.reshape(-1).long())
