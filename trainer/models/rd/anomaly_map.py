"""Reverse Distillation's anomaly map: per-level distance, upsampled to stride 4 and summed.

The sum (the paper's choice) keeps a defect that only one level sees: a
missing part shows at stride 16, a fine scratch at stride 4.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from trainer.models.rd.loss import distance

MAP_STRIDE = 4   # the graph contract's output stride (trainer.inference_graph)


def level_maps(encoder_feats: list[Tensor], decoder_feats: list[Tensor], target: str = "standardised"
               ) -> list[Tensor]:
    """One (B, 1, h_i, w_i) distance map per feature level."""
    dist = distance(target)
    return [dist(t, s) for t, s in zip(encoder_feats, decoder_feats, strict=True)]


def sum_maps(maps: list[Tensor], strides: list[int]) -> Tensor:
    """Upsample each level's map to stride 4 and add: (B, 1, H/4, W/4).

    Constant scale factors keep the exported Resize nodes static.
    """
    out = None
    for m, s in zip(maps, strides, strict=True):
        if s > MAP_STRIDE:
            m = F.interpolate(m, scale_factor=s // MAP_STRIDE, mode="bilinear", align_corners=False)
        out = m if out is None else out + m
    return out
