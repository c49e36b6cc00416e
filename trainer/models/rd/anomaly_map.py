"""Reverse Distillation's anomaly map: per-level cosine distance, upsampled to stride 4 and summed.

The sum (the paper's choice) keeps a defect that only one level sees: a
missing part shows at stride 16, a fine scratch at stride 4.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from trainer.models.rd.loss import cosine_distance


def level_maps(encoder_feats: list[Tensor], decoder_feats: list[Tensor]) -> list[Tensor]:
    """One (B, 1, h_i, w_i) cosine-distance map per feature level."""
    return [cosine_distance(t, s) for t, s in zip(encoder_feats, decoder_feats, strict=True)]


def sum_maps(maps: list[Tensor], strides: list[int]) -> Tensor:
    """Upsample each level's map to the first level's stride (4) and add: (B, 1, H/4, W/4).

    Constant scale factors keep the exported Resize nodes static.
    """
    out = maps[0]
    for m, s in zip(maps[1:], strides[1:], strict=True):
        out = out + F.interpolate(m, scale_factor=s // strides[0], mode="bilinear", align_corners=False)
    return out
