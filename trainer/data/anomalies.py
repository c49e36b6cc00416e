"""Synthetic anomalies painted onto normal images, with their masks.

What decisions that must not see test labels are made on: whether a class
scores better with its position reference (evaluate.py), which checkpoint
of a student to keep (train.py), and the activation ranges a defect produces
(the `mixed` quantisation calibration). Three kinds, each local and placed
inside the frame's own region:

- cut-paste: a patch of another normal image of the class, moved elsewhere
  and brightened or darkened (a foreign or misplaced part);
- scratch: a short thin line of a colour the image has nowhere near it;
- blotch: a soft ellipse of foreign colour (a stain, a missing coat).

Sizes run from about 1/30 to 1/5 of the frame's short side, so small pits
and large missing parts are both represented.
"""
from __future__ import annotations

import cv2
import numpy as np

from shared.imaging import Placement

KINDS = ("cutpaste", "scratch", "blotch")


def paint_anomaly(img: np.ndarray, other: np.ndarray, rng: np.random.Generator,
                  region: Placement | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `img` (H, W, 3) uint8 with one synthetic anomaly inside `region`, and its bool mask (H, W).

    `other` is another normal image of the same shape (the source of cut-paste patches).
    """
    h, w = img.shape[:2]
    region = region or Placement(0, 0, h, w)
    side = min(region.h, region.w)
    out = np.ascontiguousarray(img).copy()
    mask = np.zeros((h, w), np.uint8)
    extent = int(rng.integers(max(3, side // 30), max(4, side // 5) + 1))   # the anomaly's size
    cy = int(rng.integers(region.y0, region.y0 + max(1, region.h - extent)))
    cx = int(rng.integers(region.x0, region.x0 + max(1, region.w - extent)))
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "cutpaste":
        ph, pw = extent, int(np.clip(extent * rng.uniform(0.5, 2.0), 3, region.w))
        cx = min(cx, region.x0 + region.w - pw)
        sy = int(rng.integers(region.y0, region.y0 + max(1, region.h - ph)))
        sx = int(rng.integers(region.x0, region.x0 + max(1, region.w - pw)))
        patch = other[sy:sy + ph, sx:sx + pw].astype(np.float32) * rng.uniform(0.6, 1.4)
        out[cy:cy + ph, cx:cx + pw] = np.clip(patch, 0, 255).astype(np.uint8)
        mask[cy:cy + ph, cx:cx + pw] = 1
    elif kind == "scratch":
        angle = rng.uniform(0, np.pi)
        p0 = (cx, cy)
        p1 = (int(np.clip(cx + extent * np.cos(angle), region.x0, region.x0 + region.w - 1)),
              int(np.clip(cy + extent * np.sin(angle), region.y0, region.y0 + region.h - 1)))
        colour = _foreign_colour(img, rng)
        thick = int(rng.integers(1, max(2, side // 96) + 1))
        cv2.line(out, p0, p1, colour, thick, cv2.LINE_AA)
        cv2.line(mask, p0, p1, 1, thick)
    else:
        soft = np.zeros((h, w), np.float32)
        axes = (max(1, extent // 2), max(1, int(extent * rng.uniform(0.3, 1.0)) // 2))
        cv2.ellipse(soft, (cx + extent // 2, cy + extent // 2), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        mask = (soft > 0).astype(np.uint8)
        soft = cv2.GaussianBlur(soft, (0, 0), max(1.0, extent / 8))[..., None] * rng.uniform(0.5, 0.9)
        colour = np.asarray(_foreign_colour(img, rng), np.float32)
        out = np.clip(out * (1 - soft) + colour * soft, 0, 255).astype(np.uint8)
    inside = np.zeros((h, w), bool)
    inside[region.y0:region.y0 + region.h, region.x0:region.x0 + region.w] = True
    return out, mask.astype(bool) & inside


def _foreign_colour(img: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour far from the image's mean colour (at least 80 levels on some channel)."""
    mean = img.reshape(-1, 3).mean(0)
    for _ in range(32):
        c = rng.integers(0, 256, 3)
        if np.abs(c - mean).max() >= 80:
            return int(c[0]), int(c[1]), int(c[2])
    return tuple(int(v) for v in np.where(mean > 127, 0, 255))
