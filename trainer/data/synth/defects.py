"""Surface defects of the synthetic set: holes, stains and scratches, on a whole scene or inside a part.

Each takes a scene and the defect's own random stream and returns the changed
scene with the defect's mask; nothing outside the mask changes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from .draw import (
    Rendered,
    _blob,
    _curve,
    _lerp,
    _noise,
    _pick,
    _severity,
    _shift,
    _stroke,
    _stroke_mask,
)


def _hole(rgb: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None) -> Rendered:
    """A pit: a dark, softer floor, shadowed under the rim on the light's side, lit on the far wall."""
    h, w = rgb.shape[:2]
    s, size = _severity(rng), min(h, w)
    r = _lerp(0.012, 0.055, max(s, rng.uniform() * 0.6)) * size
    x, y = _pick(rng, h, w, region)
    a = _blob(h, w, x, y, r, rng, irregular=0.3, elong=rng.uniform(1.0, 1.7), soft=1.0)
    if region is not None:
        a *= region
    depth = _lerp(0.15, 0.75, s)
    k = max(1.0, 0.3 * r)
    lx, ly = math.cos(rng.uniform(0.6, 1.0)), math.sin(rng.uniform(0.6, 1.0))  # light from the upper left
    shadow = a * (1 - _shift(a, k * lx, k * ly))   # the rim facing the light hides the floor behind it
    lit = a * (1 - _shift(a, -k * lx, -k * ly))     # the far wall faces the light
    floor = cv2.GaussianBlur(rgb, (0, 0), 1.2) * (1 - depth)
    out = rgb + a[..., None] * (floor - rgb)
    out *= (1 - 0.6 * depth * shadow)[..., None]
    out += (0.25 * depth * lit)[..., None] * rgb
    return out, a >= 0.5


def _stain(rgb: np.ndarray, rng: np.random.Generator, tint, region: np.ndarray | None = None,
           scale: float = 1.0) -> Rendered:
    """A soft, uneven discolouration (water, oil, rust) with an occasional darker drying ring."""
    h, w = rgb.shape[:2]
    s, size = _severity(rng), min(h, w)
    r = _lerp(0.03, 0.11, rng.uniform()) * size * scale
    x, y = _pick(rng, h, w, region)
    soft = _lerp(0.45, 0.2, s) * r
    a = _blob(h, w, x, y, r, rng, irregular=0.4, elong=rng.uniform(1.0, 1.8), soft=soft)
    if region is not None:
        a *= region
    uneven = np.clip(1 + 0.35 * _noise(h, w, rng, max(3.0, r / 3)), 0.3, 1.7)
    strength = _lerp(0.2, 0.7, s)
    ring = 4 * a * (1 - a) * rng.uniform(0, 0.7)
    effect = np.clip((a * uneven + ring) * strength, 0, 1)
    out = rgb * (1 - effect[..., None] * (1 - np.asarray(tint, np.float32)))
    return out, a >= 0.5


def _scratch(rgb: np.ndarray, rng: np.random.Generator, *, bright: bool, region: np.ndarray | None = None,
             length: tuple[float, float] = (0.1, 0.45), wiggle: float = 0.12, branch: float = 0.0,
             colour: Sequence[float] | None = None) -> Rendered:
    """A thin line: a crack (dark), a scratch through a polish (bright or dark) or a coating (`colour` beneath)."""
    h, w = rgb.shape[:2]
    s, size = _severity(rng), min(h, w)
    x, y = _pick(rng, h, w, region)
    pts = _curve(x, y, rng.uniform(0, 2 * math.pi), _lerp(*length, rng.uniform()) * size, rng, wiggle)
    t = np.linspace(0, 1, len(pts) - 1)
    width = _lerp(0.9, 2.4, s) * size / 256
    cov = _stroke(h, w, pts, width * (0.35 + 0.65 * np.sin(np.pi * t)) * rng.uniform(0.8, 1.2, len(t)))
    if rng.random() < branch:   # cracks fork
        j = int(rng.integers(len(pts) // 4, max(len(pts) // 4 + 1, 3 * len(pts) // 4)))
        sub = _curve(*pts[j], rng.uniform(0, 2 * math.pi), 0.3 * len(pts) * 2.5, rng, wiggle)
        sub = sub - sub[0] + pts[j]
        cov = np.maximum(cov, _stroke(h, w, sub, np.linspace(width * 0.7, width * 0.25, len(sub) - 1)))
    if region is not None:
        cov *= region
    strength = _lerp(0.3, 0.85, s)
    if colour is not None:
        target = np.asarray(colour, np.float32)
    else:
        target = np.minimum(rgb * 1.5 + 0.25, 1.0) if bright else rgb * 0.2
    out = rgb + (cov * strength)[..., None] * (target - rgb)
    return out, _stroke_mask(cov) & ((region > 0.5) if region is not None else True)



def _surface_defect(rgb: np.ndarray, rng: np.random.Generator, defect: str | None, part: np.ndarray,
                    mask: np.ndarray | None) -> Rendered:
    """Scratch or stain on a part (inside its coverage); geometric defects arrive with their mask."""
    if defect in (None, "missing", "extra"):
        return rgb, mask
    inner = cv2.erode(part, np.ones((5, 5), np.uint8))   # keep surface defects off the silhouette
    for _ in range(20):
        if defect == "scratch":
            out, m = _scratch(rgb, rng, bright=rng.random() < 0.7, region=inner, length=(0.04, 0.25), wiggle=0.05)
        elif defect == "stain":
            tint = (0.72, 0.42, 0.22) if rng.random() < 0.6 else (0.55, 0.55, 0.58)   # rust or oil
            out, m = _stain(rgb, rng, tint, region=inner, scale=0.6)
        else:
            raise ValueError(f"unknown surface defect {defect!r}")
        if m.sum() >= 6 * (rgb.shape[0] / 256) ** 2:
            return out, m
    raise RuntimeError(f"could not place a {defect} defect on the part")
