"""STFPM (Wang et al., 2021): a frozen pretrained teacher and a student that learns its features.

The student learns, on normal images only, to reproduce the teacher's
features at a few levels; where it fails (anything it never saw) the image
is anomalous. Two students (`STFPMConfig.student`):

- "stem" (the default): the student reads the teacher's own stride-4
  features and predicts its deeper levels with plain convolutions, two of
  them dilated at stride 16 so its view spans about the teacher's there.
  It starts from features the teacher already understands, so its capacity
  goes into the mapping a defect breaks, and it trains several times faster
  on a CPU than a depthwise network (measured: 0.29 s vs 1.2 s a batch).
- "backbone": the paper's: the teacher's architecture, randomly
  initialised, from the image.

The targets come from `trainer.models.teacher`: locally averaged and
standardised per channel ("standardised"), or the paper's unit-length
features ("unit", raw levels without averaging make sense there).
The paper's recipe is one config away: student "backbone", strides
(4, 8, 16), pool 1, target "unit", hard 0, combine "product".
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.backbone import BACKBONES, STRIDES, build_backbone, init_random
from trainer.models.stfpm.anomaly_map import COMBINE, combine_maps, level_maps
from trainer.models.teacher import STEM_STRIDE, Teacher

STUDENTS = ("stem", "backbone")
TARGETS = ("standardised", "unit")


@dataclass
class STFPMConfig:
    method: ClassVar[str] = "stfpm"

    backbone: str = "efficientnet_lite0"   # ReLU6, no SE: the edge teacher that quantizes well
    strides: tuple[int, ...] = (8, 16)     # mid levels: stride 4 is fine texture noise, 32 too coarse for pits
    pool: int = 3                          # local aggregation of the targets (PatchCore's): a patch, not a pixel
    student: str = "stem"                  # see the module docstring
    width: int = 64                        # "stem" student channels at stride 4 (x2 at 8, x4 at 16)
    target: str = "standardised"           # per-channel standardised levels; "unit": the paper's
    hard: float = 0.99                     # loss over errors at or above this quantile; 0: every error
    combine: str = "sum"                   # levels' maps added; "product": the paper's
    weights: str | None = None             # local teacher weights file; None: the backbone's weights package

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if (not self.strides or any(s not in STRIDES for s in self.strides)
                or list(self.strides) != sorted(set(self.strides))):
            raise ValueError(f"strides must increase through {STRIDES}, got {self.strides}")
        if self.student not in STUDENTS:
            raise ValueError(f"student must be one of {STUDENTS}, got {self.student!r}")
        if self.student == "stem" and (self.strides[0] <= STEM_STRIDE or any(s > 16 for s in self.strides)):
            raise ValueError(f"a 'stem' student predicts levels deeper than its stride-4 input, up to 16; "
                             f"got strides {self.strides}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        if self.pool < 1 or self.pool % 2 == 0 or self.width < 8 or not 0 <= self.hard < 1:
            raise ValueError("pool must be a positive odd size, width at least 8 and hard in [0, 1)")


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class StemStudent(nn.Module):
    """The teacher's standardised stride-4 features -> its levels at `strides` (8 and/or 16).

    (B, C_4, H/4, W/4) -> 3x3 convs at stride 4, 8 (x2 width) and 16 (x4 width, then two dilated
    convolutions, dilation 2 and 4, for context) -> a linear 1 x 1 head per level (standardised
    targets are signed, which a ReLU could not match).
    """

    def __init__(self, cin: int, width: int, strides: tuple[int, ...], channels: list[int]) -> None:
        super().__init__()
        w = width
        self.strides = strides
        self.s8 = nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, 2 * w, 2), conv_bn_relu(2 * w, 2 * w))
        self.s16 = nn.Sequential(conv_bn_relu(2 * w, 4 * w, 2), conv_bn_relu(4 * w, 4 * w),
                                 conv_bn_relu(4 * w, 4 * w, dilation=2), conv_bn_relu(4 * w, 4 * w, dilation=4))
        self.heads = nn.ModuleList(nn.Conv2d({8: 2 * w, 16: 4 * w}[s], c, 1)
                                   for s, c in zip(strides, channels, strict=True))

    def forward(self, stem: Tensor) -> list[Tensor]:
        a = self.s8(stem)                                         # (B, 2w, H/8, W/8)
        feats = {8: a}
        if 16 in self.strides:
            feats[16] = self.s16(a)                               # (B, 4w, H/16, W/16)
        return [head(feats[s]) for s, head in zip(self.strides, self.heads, strict=True)]


class STFPM(nn.Module):
    """forward(x) -> (teacher_feats, student_feats); anomaly_map(x) -> (B, 1, H/4, W/4)."""

    def __init__(self, cfg: STFPMConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = Teacher(cfg.backbone, cfg.strides, cfg.pool, pretrained=pretrained, weights=cfg.weights)
        if cfg.student == "stem":
            self.student = StemStudent(self.teacher.stem_channels, cfg.width, cfg.strides, self.teacher.channels)
            init_random(self.student)
        else:
            self.student = build_backbone(cfg.backbone, cfg.strides, pretrained=False)

    def train(self, mode: bool = True) -> STFPM:
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters())

    def loss_options(self, validation: bool = False) -> dict[str, Any]:
        """Training mines the hardest errors; validation averages them all (the top 1 % of a few
        held-out images is too noisy to pick a checkpoint by)."""
        return {"target": self.cfg.target, "hard": 0.0 if validation else self.cfg.hard}

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """x: normalised (B, 3, H, W) -> per level (B, C_i, H/s_i, W/s_i) for teacher and student."""
        with torch.no_grad():
            stem, levels = self.teacher(x)
            if self.cfg.target == "unit":
                levels = self.teacher.raw(x)[1]
        if self.cfg.student == "stem":
            return levels, self.student(stem)
        feats = self.student(x)
        if self.cfg.pool > 1:
            feats = [F.avg_pool2d(f, self.cfg.pool, 1, self.cfg.pool // 2, count_include_pad=False) for f in feats]
        return levels, feats

    def anomaly_map(self, x: Tensor) -> Tensor:
        """x: normalised (B, 3, H, W) -> raw, unsmoothed map (B, 1, H/4, W/4)."""
        t, s = self(x)
        return combine_maps(level_maps(t, s, self.cfg.target), list(self.cfg.strides), self.cfg.combine)


def prepare(model: STFPM, batches: Iterable[Tensor]) -> None:
    """Before training: the teacher's per-channel statistics over the training images."""
    model.teacher.fit(batches)
