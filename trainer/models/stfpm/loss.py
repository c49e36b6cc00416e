"""STFPM's distillation loss: the student regresses the teacher's levels, hardest errors first.

With `hard` > 0 only the errors at or above that quantile of the batch count
(hard feature mining, as in EfficientAD): most positions of a normal image
are easy, and averaging over them lets the student settle while the rare
normal patterns (a part's rim, a thread's crest) it still gets wrong are
the ones that later pass for defects.
"""
from __future__ import annotations

import torch
from torch import Tensor


def unit(x: Tensor) -> Tensor:
    """Features scaled to unit length along channels (B, C, h, w); written out so the graph has no Expand."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def feature_distance(t: Tensor, s: Tensor) -> Tensor:
    """0.5 * ||t/|t| - s/|s|||^2 over channels, per position: (B, C, h, w) x2 -> (B, 1, h, w), in [0, 2]."""
    return 0.5 * (unit(t) - unit(s)).pow(2).sum(dim=1, keepdim=True)


def squared_error(t: Tensor, s: Tensor) -> Tensor:
    """Mean over channels of (t - s)^2 per position, for standardised levels: (B, C, h, w) x2 -> (B, 1, h, w)."""
    return (t - s).pow(2).mean(dim=1, keepdim=True)


def hardest_mean(errors: Tensor, hard: float) -> Tensor:
    """Mean of the elements of `errors` at or above its `hard` quantile (all of them for hard = 0)."""
    if hard <= 0:
        return errors.mean()
    flat = errors.flatten()
    threshold = torch.quantile(flat.detach()[: 1 << 24], hard)   # quantile's input limit: 16M elements
    return flat[flat >= threshold].mean()


def stfpm_loss(teacher_feats: list[Tensor], student_feats: list[Tensor], target: str = "standardised",
               hard: float = 0.0) -> Tensor:
    """Per level the (hardest) errors' mean, summed over levels (a scalar).

    target "standardised": element-wise squared error of standardised levels;
    "unit": the paper's distance of unit-length features, per position.
    """
    total = torch.zeros(())
    for t, s in zip(teacher_feats, student_feats, strict=True):
        errors = (t - s).pow(2) if target == "standardised" else feature_distance(t, s)
        total = total + hardest_mean(errors, hard)
    return total
