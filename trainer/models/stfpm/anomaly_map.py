"""STFPM's anomaly map: the per-level teacher-student distance, combined at stride 4.

Levels are combined by sum (a defect that only one level sees is kept: a
missing part shows at stride 16, a pit at stride 8) or by product (the STFPM
paper's choice: disagreement at every scale, which suppresses the spots
where a single level is noisy). On the real development sets the sum scored
higher (docs/results.md), so it is the default (`STFPMConfig.combine`).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from trainer.models.stfpm.loss import feature_distance, squared_error

COMBINE = ("sum", "product")
MAP_STRIDE = 4   # the graph contract's output stride (trainer.inference_graph)


def level_maps(teacher_feats: list[Tensor], student_feats: list[Tensor], target: str = "standardised"
               ) -> list[Tensor]:
    """One (B, 1, h_i, w_i) distance map per feature level."""
    dist = squared_error if target == "standardised" else feature_distance
    return [dist(t, s) for t, s in zip(teacher_feats, student_feats, strict=True)]


def combine_maps(maps: list[Tensor], strides: list[int], combine: str = "sum") -> Tensor:
    """Upsample each level's map to stride 4 and combine: (B, 1, H/4, W/4).

    Upsampling uses constant scale factors, so the exported graph has static Resize nodes.
    """
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    out = None
    for m, s in zip(maps, strides, strict=True):
        if s > MAP_STRIDE:
            m = F.interpolate(m, scale_factor=s // MAP_STRIDE, mode="bilinear", align_corners=False)
        out = m if out is None else (out * m if combine == "product" else out + m)
    return out
