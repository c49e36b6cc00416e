"""STFPM (Wang et al., 2021): a frozen pretrained teacher and a same-architecture student.

The student starts from random weights and learns, on normal images only, to
reproduce the teacher's normalised features at three levels; where it fails
(anything it never saw) the image is anomalous.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from trainer.models.backbone import BACKBONES, STRIDES, build_backbone
from trainer.models.stfpm.anomaly_map import COMBINE, combine_maps, level_maps


@dataclass
class STFPMConfig:
    method: ClassVar[str] = "stfpm"

    backbone: str = "efficientnet_lite0"   # ReLU6, no SE: the edge teacher that quantizes well
    strides: tuple[int, ...] = (4, 8, 16)  # three levels as in the paper; stride 32 is too coarse for small defects
    combine: str = "product"               # the paper's; sum scored within noise of it here (anomaly_map.py)
    weights: str | None = None             # local teacher weights file; None: the backbone's weights package

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if len(self.strides) < 1 or self.strides[0] != 4 or any(s not in STRIDES for s in self.strides):
            raise ValueError(f"strides must start at 4 and come from {STRIDES}, got {self.strides}")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {self.combine!r}")


class STFPM(nn.Module):
    """forward(x) -> (teacher_feats, student_feats); anomaly_map(x) -> (B, 1, H/4, W/4)."""

    def __init__(self, cfg: STFPMConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = build_backbone(cfg.backbone, cfg.strides, pretrained=pretrained, weights=cfg.weights)
        self.student = build_backbone(cfg.backbone, cfg.strides, pretrained=False)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> STFPM:
        super().train(mode)
        self.teacher.eval()   # its BatchNorm statistics are part of what was pretrained
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters())

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """x: normalised (B, 3, H, W) -> per level (B, C_i, H/s_i, W/s_i) for teacher and student."""
        with torch.no_grad():
            t = self.teacher(x)
        return t, self.student(x)

    def anomaly_map(self, x: Tensor) -> Tensor:
        """x: normalised (B, 3, H, W) -> raw, unsmoothed map (B, 1, H/4, W/4)."""
        t, s = self(x)
        return combine_maps(level_maps(t, s), list(self.cfg.strides), self.cfg.combine)
