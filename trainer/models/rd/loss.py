"""Reverse Distillation's loss: 1 - cosine similarity between encoder and decoder features."""
from __future__ import annotations

from torch import Tensor


def cosine_distance(t: Tensor, s: Tensor) -> Tensor:
    """1 - cos(t, s) over channels, per position: (B, C, h, w) x2 -> (B, 1, h, w), in [0, 2].

    Written out (not F.cosine_similarity) so the exported graph is plain Mul/ReduceSum/Div.
    """
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return 1 - (t * s).sum(dim=1, keepdim=True)


def rd_loss(encoder_feats: list[Tensor], decoder_feats: list[Tensor]) -> Tensor:
    """Per level the mean cosine distance over batch and positions, summed over levels (a scalar)."""
    return sum(cosine_distance(t, s).mean() for t, s in zip(encoder_feats, decoder_feats, strict=True))
