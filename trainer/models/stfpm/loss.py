"""STFPM's distillation loss: the student's normalised features regress the teacher's."""
from __future__ import annotations

from torch import Tensor


def unit(x: Tensor) -> Tensor:
    """Features scaled to unit length along channels (B, C, h, w); written out so the graph has no Expand."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def feature_distance(t: Tensor, s: Tensor) -> Tensor:
    """0.5 * ||t/|t| - s/|s|||^2 over channels, per position: (B, C, h, w) x2 -> (B, 1, h, w), in [0, 2]."""
    return 0.5 * (unit(t) - unit(s)).pow(2).sum(dim=1, keepdim=True)


def stfpm_loss(teacher_feats: list[Tensor], student_feats: list[Tensor]) -> Tensor:
    """Distance per level averaged over batch and positions, summed over levels (a scalar)."""
    return sum(feature_distance(t, s).mean() for t, s in zip(teacher_feats, student_feats, strict=True))
