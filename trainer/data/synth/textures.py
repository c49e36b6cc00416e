"""Texture classes of the synthetic set (brick, grass, gravel): views of photographs bundled with
scikit-image, tinted, and the defects only a texture has (a foreign patch, a discoloured one).
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from .defects import _hole, _scratch, _stain
from .draw import Rendered, _blob, _lerp, _luma, _noise, _pick, _severity

# Texture classes: source photograph, colour it is shown in, and what a foreign patch is made of.
_PHOTO = {"brick": "brick", "grass": "grass", "gravel": "gravel"}
_TINT = {"brick": (1.18, 0.78, 0.60), "grass": (0.80, 1.08, 0.52), "gravel": (1.03, 1.00, 0.94)}
_FOREIGN = {"brick": "gravel", "grass": "gravel", "gravel": "grass"}


@functools.cache
def _photo(name: str) -> np.ndarray:
    """A grey photograph bundled with scikit-image, its uneven illumination divided out."""
    from skimage import data   # heavy import, and only the texture classes need it

    img = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
    if img.ndim == 3:
        img = img[..., :3].mean(-1)
    # crops from any part of the photograph should look alike: remove its large-scale lighting
    low = cv2.GaussianBlur(img, (0, 0), 32)
    flat = np.clip(img * (float(low.mean()) / np.maximum(low, 1e-3)), 0, 1)
    flat.flags.writeable = False
    return flat


def _texture_crop(name: str, h: int, w: int, rng: np.random.Generator, *,
                  zoom: tuple[float, float] = (0.85, 1.2), aligned: bool = False) -> np.ndarray:
    """A random view (H, W) of a photograph: position, scale, rotation (near 0/180 if aligned), flip.

    The field of view is fixed in source pixels (about 256 across), so a larger
    output size renders the same material at a higher resolution.
    """
    src = _photo(name)
    sh, sw = src.shape
    scale = 256.0 / rng.uniform(*zoom) / max(h, w)   # source pixels per output pixel
    angle = (rng.choice([0.0, 180.0]) + rng.normal(0, 1.5)) if aligned else rng.uniform(0, 360)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    a = math.radians(angle)
    c, s = math.cos(a) * scale, math.sin(a) * scale
    ex, ey = (w - 1) / 2, (h - 1) / 2
    # keep the turned view inside the photograph: reflected borders would add seams
    bx, by = abs(c) * ex + abs(s) * ey, abs(s) * ex + abs(c) * ey
    cx = rng.uniform(bx, sw - 1 - bx) if bx < (sw - 1) / 2 else (sw - 1) / 2
    cy = rng.uniform(by, sh - 1 - by) if by < (sh - 1) / 2 else (sh - 1) / 2
    m = np.float32([[c * flip, -s, cx - c * flip * ex + s * ey], [s * flip, c, cy - s * flip * ex - c * ey]])
    if scale > 1.2:   # shrinking: blur first so fine texture does not alias
        src = cv2.GaussianBlur(src, (0, 0), 0.45 * math.sqrt(scale * scale - 1))
    return cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)


def _tinted(grey: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    tint = np.asarray(_TINT[name], np.float32) * (1 + rng.normal(0, 0.008, 3)).astype(np.float32)
    return grey[..., None] * tint


def _foreign(rgb: np.ndarray, rng: np.random.Generator, cls: str) -> Rendered:
    """A patch of another material; half the time matched in colour and brightness to its host."""
    h, w = rgb.shape[:2]
    size = min(h, w)
    r = _lerp(0.035, 0.1, rng.uniform()) * size
    x, y = _pick(rng, h, w)
    a = _blob(h, w, x, y, r, rng, irregular=0.35, elong=rng.uniform(1.0, 1.6), soft=1.5)
    other = _FOREIGN[cls]
    grey = _texture_crop(_PHOTO[other], h, w, rng, zoom=(0.7, 1.5))
    inside = a >= 0.5
    if rng.random() < 0.5:   # matched: only the texture gives it away
        host = _luma(rgb)[inside]
        g = grey[inside]
        grey = (grey - g.mean()) / (g.std() + 1e-6) * host.std() + host.mean()
        patch = grey[..., None] * (rgb[inside].mean(0) / max(float(host.mean()), 1e-3))
    else:
        patch = _tinted(grey, other, rng)
    return rgb + a[..., None] * (patch - rgb), inside


def _discolour(rgb: np.ndarray, rng: np.random.Generator) -> Rendered:
    """Dry, straw-coloured patch with a soft edge."""
    h, w = rgb.shape[:2]
    s, size = _severity(rng), min(h, w)
    r = _lerp(0.04, 0.12, rng.uniform()) * size
    x, y = _pick(rng, h, w)
    a = _blob(h, w, x, y, r, rng, irregular=0.4, elong=rng.uniform(1.0, 1.7), soft=0.3 * r)
    straw = _luma(rgb)[..., None] * np.float32([1.3, 1.1, 0.55])
    uneven = np.clip(1 + 0.3 * _noise(h, w, rng, max(3.0, r / 3)), 0.3, 1.5)
    k = np.clip(a * uneven * _lerp(0.2, 0.9, s), 0, 1)
    return rgb + k[..., None] * (straw - rgb), a >= 0.5


def _render_texture(cls: str, h: int, w: int, rng: np.random.Generator, defect: str | None,
                    drng: np.random.Generator) -> Rendered:
    grey = _texture_crop(_PHOTO[cls], h, w, rng, aligned=cls == "brick")
    rgb = _tinted(grey, cls, rng)
    if defect is None:
        return rgb, None
    if defect == "crack":
        return _scratch(rgb, drng, bright=False, wiggle=0.18, branch=0.35)
    if defect == "hole":
        return _hole(rgb, drng)
    if defect == "stain":
        tint = (0.55, 0.47, 0.4) if cls == "brick" else (0.5, 0.52, 0.6)   # damp brick; oil on stone
        return _stain(rgb, drng, tint)
    if defect == "foreign":
        return _foreign(rgb, drng, cls)
    if defect == "color":
        return _discolour(rgb, drng)
    raise ValueError(f"{cls}: unknown defect {defect!r}")
