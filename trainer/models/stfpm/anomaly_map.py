"""STFPM's anomaly map: the per-level teacher-student distance, combined at stride 4.

Levels are combined by product (the STFPM paper's choice) or by sum. The
product asks for disagreement at every scale, which suppresses the spots where
a single level is noisy (fine texture at stride 4, borders at stride 16); the
sum keeps a defect that only one level sees. `STFPMConfig.combine` (model.py) picks; on the
synthetic set the two differed by less than 0.02 image AUROC, so the default
stays the paper's.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from trainer.models.stfpm.loss import feature_distance

COMBINE = ("product", "sum")


def level_maps(teacher_feats: list[Tensor], student_feats: list[Tensor]) -> list[Tensor]:
    """One (B, 1, h_i, w_i) distance map per feature level."""
    return [feature_distance(t, s) for t, s in zip(teacher_feats, student_feats, strict=True)]


def combine_maps(maps: list[Tensor], strides: list[int], combine: str = "product") -> Tensor:
    """Upsample each level's map to the first level's stride (4) and combine: (B, 1, H/4, W/4).

    Upsampling uses constant scale factors, so the exported graph has static Resize nodes.
    """
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    out = maps[0]
    for m, s in zip(maps[1:], strides[1:], strict=True):
        up = F.interpolate(m, scale_factor=s // strides[0], mode="bilinear", align_corners=False)
        out = out * up if combine == "product" else out + up
    return out
