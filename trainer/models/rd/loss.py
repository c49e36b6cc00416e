"""Reverse Distillation's loss: how far the decoder's levels are from the encoder's.

For standardised levels the mean squared error over channels; for raw levels
the paper's 1 - cosine similarity.
"""
from __future__ import annotations

from torch import Tensor


def cosine_distance(t: Tensor, s: Tensor) -> Tensor:
    """1 - cos(t, s) over channels, per position: (B, C, h, w) x2 -> (B, 1, h, w), in [0, 2].

    Written out (not F.cosine_similarity) so the exported graph is plain Mul/ReduceSum/Div.
    """
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return 1 - (t * s).sum(dim=1, keepdim=True)


def squared_error(t: Tensor, s: Tensor) -> Tensor:
    """Mean over channels of (t - s)^2 per position: (B, C, h, w) x2 -> (B, 1, h, w)."""
    return (t - s).pow(2).mean(dim=1, keepdim=True)


def distance(target: str):
    """The per-position distance for a target kind: "standardised" or "unit" (cosine)."""
    return squared_error if target == "standardised" else cosine_distance


def rd_loss(encoder_feats: list[Tensor], decoder_feats: list[Tensor], target: str = "standardised") -> Tensor:
    """Per level the mean distance over batch and positions, summed over levels (a scalar)."""
    dist = distance(target)
    return sum(dist(t, s).mean() for t, s in zip(encoder_feats, decoder_feats, strict=True))
