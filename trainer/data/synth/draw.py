"""Drawing primitives of the synthetic set: coordinate frames, signed distances, coverage, noise, strokes.

Everything here works on float RGB scenes in [0, 1] and coverage maps in [0, 1];
the renderers of textures, parts and defects are built from these.
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np

Rendered = tuple[np.ndarray, np.ndarray | None]   # scene (H, W, 3) float32 in [0, 1]; defect mask (H, W) bool


def _lerp(a, b, t):
    return a + (b - a) * t


def _severity(rng: np.random.Generator) -> float:
    """0 = barely visible, 1 = obvious; skewed so that most defects are on the subtle side."""
    return float(rng.uniform() ** 1.5)


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def _frame(h: int, w: int, cx: float, cy: float, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a part's own frame: origin (cx, cy), u axis turned by angle_deg."""
    xs, ys = _grid(h, w)
    a = math.radians(angle_deg)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    c, s = np.float32(math.cos(a)), np.float32(math.sin(a))
    return dx * c + dy * s, dy * c - dx * s


def _cover(d: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) to anti-aliased coverage in [0, 1]."""
    return np.clip(0.5 - d, 0.0, 1.0)


def _sd_box(u: np.ndarray, v: np.ndarray, hu: float, hv: float, r: float = 0.0) -> np.ndarray:
    """Signed distance to a box of half sizes (hu, hv) centred at the origin, corners rounded by r."""
    qx, qy = np.abs(u) - (hu - r), np.abs(v) - (hv - r)
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r


def _sd_segment(u: np.ndarray, v: np.ndarray, a: tuple[float, float], b: tuple[float, float], r: float) -> np.ndarray:
    """Signed distance to a capsule of radius r around the segment a-b."""
    bu, bv = b[0] - a[0], b[1] - a[1]
    pu, pv = u - a[0], v - a[1]
    t = np.clip((pu * bu + pv * bv) / max(bu * bu + bv * bv, 1e-9), 0, 1)
    return np.hypot(pu - t * bu, pv - t * bv) - r


def _paint(rgb: np.ndarray, cov: np.ndarray, colour) -> None:
    """Lay `colour` (RGB triple or image) over `rgb` in place, weighted by coverage."""
    rgb += cov[..., None] * (np.asarray(colour, np.float32) - rgb)


def _shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _noise(h: int, w: int, rng: np.random.Generator, cell: float) -> np.ndarray:
    """Smooth random field of unit spread with features about `cell` pixels across."""
    if cell <= 1.5:
        n = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.7)
    else:
        gh, gw = int(h / cell) + 3, int(w / cell) + 3
        coarse = rng.standard_normal((gh, gw), dtype=np.float32)
        n = cv2.resize(coarse, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
        oy, ox = (int(k) for k in rng.integers(0, int(cell), 2))
        n = n[oy:oy + h, ox:ox + w]
    return n / (float(n.std()) + 1e-6)


def _surface(h: int, w: int, rng: np.random.Generator, colour, grain: float, mottle: float,
             cell: float = 24.0) -> np.ndarray:
    """A flat material: a colour with fine grain and soft mottling."""
    c = np.asarray(colour, np.float32) * (1 + rng.normal(0, 0.005, 3)).astype(np.float32)
    shade = 1 + grain * _noise(h, w, rng, 1.0) + mottle * _noise(h, w, rng, cell * h / 256)
    return shade[..., None] * c


def _blob(h: int, w: int, cx: float, cy: float, r: float, rng: np.random.Generator, *,
          irregular: float = 0.3, elong: float = 1.0, soft: float = 1.0) -> np.ndarray:
    """Coverage (H, W) of an irregular blob of mean radius r; coverage 0.5 on its outline, edge `soft` px wide."""
    out = np.zeros((h, w), np.float32)
    ext = r * (1 + 1.5 * irregular) * max(elong, 1.0) + 2 * soft + 2
    x0, x1 = max(0, int(cx - ext)), min(w, int(cx + ext) + 2)
    y0, y1 = max(0, int(cy - ext)), min(h, int(cy + ext) + 2)
    angle = rng.uniform(0, math.pi)
    harmonics = [(k, irregular * rng.uniform(0.3, 1.0) / (k - 1), rng.uniform(0, 2 * math.pi)) for k in range(2, 6)]
    if x0 >= x1 or y0 >= y1:
        return out
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = (dx * c + dy * s) / elong, dy * c - dx * s
    rho, th = np.hypot(u, v), np.arctan2(v, u)
    radius = np.full_like(rho, r)
    for k, amp, phase in harmonics:
        radius += r * amp / 1.3 * np.cos(k * th + phase)
    out[y0:y1, x0:x1] = np.clip(0.5 - (rho - radius) / soft, 0, 1)
    return out


def _curve(x: float, y: float, angle: float, length: float, rng: np.random.Generator,
           wiggle: float, step: float = 2.5) -> np.ndarray:
    """A smooth random path (n, 2) of about `length` pixels centred on (x, y)."""
    n = max(3, int(length / step) + 1)
    heading = angle + np.cumsum(rng.normal(0, wiggle, n - 1))
    steps = np.stack([np.cos(heading), np.sin(heading)], 1) * step
    pts = np.vstack([np.zeros((1, 2)), np.cumsum(steps, 0)])
    return pts - pts.mean(0) + (x, y)


def _stroke(h: int, w: int, pts: np.ndarray, widths: np.ndarray, ss: int = 4) -> np.ndarray:
    """Coverage (H, W) of a polyline with per-segment widths in pixels, drawn 4x supersampled."""
    canvas = np.zeros((h * ss, w * ss), np.uint8)
    q = np.round(((pts + 0.5) * ss - 0.5) * 8).astype(np.int32)   # shift=3: 1/8 px precision
    for i in range(len(q) - 1):
        t = max(1, round(float(widths[i]) * ss))
        cv2.line(canvas, tuple(map(int, q[i])), tuple(map(int, q[i + 1])), 255, t, cv2.LINE_AA, shift=3)
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _stroke_mask(cov: np.ndarray) -> np.ndarray:
    # hand-drawn ground truth for thin defects is a little wider than the defect: do the same
    return cv2.dilate((cov >= 0.25).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def _pick(rng: np.random.Generator, h: int, w: int, region: np.ndarray | None = None,
          margin: float = 0.1) -> tuple[float, float]:
    """A random point, anywhere away from the borders or inside `region` (coverage)."""
    if region is None:
        return rng.uniform(margin * w, (1 - margin) * w), rng.uniform(margin * h, (1 - margin) * h)
    ys, xs = np.nonzero(region > 0.99)
    k = int(rng.integers(len(ys)))
    return float(xs[k]) + rng.uniform(-0.5, 0.5), float(ys[k]) + rng.uniform(-0.5, 0.5)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.float32([0.299, 0.587, 0.114])
