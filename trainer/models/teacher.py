"""The frozen teacher the distillation methods learn from: what a student is asked to reproduce.

    image -> pretrained backbone (frozen, eval mode)
          -> stride 4: the stem's features, standardised per channel      (B, C_4, H/4, W/4)
          -> each target level (e.g. strides 8 and 16):
             a k x k mean (local aggregation: a descriptor of the patch
             around a position, not of one pixel), standardised per
             channel with its mean and spread over the training images  (B, C_i, H/s_i, W/s_i)

Standardising per channel matters on real images: raw backbone channels
differ in scale by two orders of magnitude, so an unweighted distance is
decided by a handful of loud channels (unit-length features, the STFPM
paper's, share that weakness); standardised, every channel the teacher
learned on ImageNet counts alike. The statistics are buffers fitted once
on the normal training images (`fit`), so checkpoints and exported graphs
carry them.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.backbone import build_backbone

STEM_STRIDE = 4


class Teacher(nn.Module):
    """forward(x) -> (stem (B, C_4, H/4, W/4), [level (B, C_i, H/s_i, W/s_i) for each target stride])."""

    def __init__(self, backbone: str, strides: tuple[int, ...], pool: int, pretrained: bool = True,
                 weights: str | None = None) -> None:
        super().__init__()
        self.strides = tuple(strides)
        taps = tuple(sorted({STEM_STRIDE, *self.strides}))
        self.net = build_backbone(backbone, taps, pretrained=pretrained, weights=weights)
        self.net.requires_grad_(False).eval()
        self.pool = pool
        self._index = [taps.index(s) for s in self.strides]
        self.channels = [self.net.channels[i] for i in self._index]
        self.stem_channels = self.net.channels[taps.index(STEM_STRIDE)]
        for name, c in (("stem", self.stem_channels), *((f"level{i}", c) for i, c in enumerate(self.channels))):
            self.register_buffer(f"{name}_mean", torch.zeros(c))
            self.register_buffer(f"{name}_std", torch.ones(c))

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        self.net.eval()   # its BatchNorm statistics are part of what was pretrained
        return self

    def raw(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The stem and the locally averaged levels, before standardisation."""
        feats = self.net(x)
        stem = feats[0]
        levels = [feats[i] for i in self._index]
        if self.pool > 1:
            levels = [F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=False) for f in levels]
        return stem, levels

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        stem, levels = self.raw(x)
        return (standardise(stem, self.stem_mean, self.stem_std),
                [standardise(f, getattr(self, f"level{i}_mean"), getattr(self, f"level{i}_std"))
                 for i, f in enumerate(levels)])

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor]) -> None:
        """Per-channel mean and standard deviation of the stem and each level over every training position."""
        sums: list[Tensor] | None = None
        for x in batches:
            stem, levels = self.raw(x)
            parts = [stem, *levels]
            moments = [torch.stack([torch.full((f.shape[1],), float(f[:, 0].numel()), dtype=torch.float64),
                                    f.double().sum((0, 2, 3)), f.double().pow(2).sum((0, 2, 3))]) for f in parts]
            sums = moments if sums is None else [a + b for a, b in zip(sums, moments, strict=True)]
        if sums is None or sums[0][0, 0] < 2:
            raise ValueError("the teacher's channel statistics need at least two training positions")
        for name, (n, s, s2) in zip(["stem", *(f"level{i}" for i in range(len(self.channels)))], sums, strict=True):
            mean = s / n
            std = (s2 / n - mean ** 2).clamp_min(1e-12).sqrt()
            getattr(self, f"{name}_mean").copy_(mean.float())
            getattr(self, f"{name}_std").copy_(std.clamp_min(1e-6 * float(std.max())).float())


def standardise(f: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(f - mean) / std per channel: (B, C, h, w) with (C,) statistics."""
    return (f - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
