"""A synthetic inspection data set in the MVTec AD layout: textured surfaces and machined parts.

Texture classes are cut from photographs bundled with scikit-image (nothing is
downloaded): random crops, scales, rotations and flips of one material, as a
line camera sees a web of it. Object classes are drawn procedurally: one part
on a background, placed, turned and lit a little differently each time.

Every image is made the same way, good or not:

    scene (float RGB in [0, 1]) -> defect (changes the scene, gives its mask) -> camera -> uint8

so only the defect sets a defect image apart from a good one: gain, gamma,
white balance, light fall-off and sensor noise are drawn from the same ranges
for both, and a global statistic cannot tell them apart. Defect severity is
skewed towards the subtle end (small, low-contrast), with obvious ones mixed
in, so that methods differ in what they find.

Each image draws from its own random streams (scene, defect, camera), keyed
by (seed, class, split, category, index): the same seed gives the same files
whatever classes or counts are asked for. The defect has a stream of its own,
so a defect rendered on a scene changes that scene only where its mask says
(the tests check this against the scene's good twin).
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from shared.imaging import write_image

CLASSES: tuple[str, ...] = ("brick", "grass", "gravel", "screw", "washer", "pcb")
DEFECTS: dict[str, tuple[str, ...]] = {
    "brick": ("crack", "hole", "stain", "foreign"),
    "grass": ("hole", "color", "foreign"),
    "gravel": ("hole", "stain", "foreign"),
    "screw": ("scratch", "missing", "stain"),
    "washer": ("scratch", "missing", "stain"),
    "pcb": ("missing", "extra", "scratch"),
}
ASPECT: dict[str, float] = {"screw": 1.25}   # width / height; every other class is square
MARKER = ".kdfleet-synth.json"                # marks a folder this generator may overwrite

Rendered = tuple[np.ndarray, np.ndarray | None]   # scene (H, W, 3) float32 in [0, 1]; defect mask (H, W) bool

# Texture classes: source photograph, colour it is shown in, and what a foreign patch is made of.
_PHOTO = {"brick": "brick", "grass": "grass", "gravel": "gravel"}
_TINT = {"brick": (1.18, 0.78, 0.60), "grass": (0.80, 1.08, 0.52), "gravel": (1.03, 1.00, 0.94)}
_FOREIGN = {"brick": "gravel", "grass": "gravel", "gravel": "grass"}


def image_shape(cls: str, size: int) -> tuple[int, int]:
    """(height, width) of a class's images for a given base size."""
    return size, round(size * ASPECT.get(cls, 1.0))


# ----------------------------------------------------------------------------- drawing helpers

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


# ----------------------------------------------------------------------------- camera

def _camera(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Expose a scene: gain, gamma, white balance, light fall-off and signal-dependent sensor noise."""
    h, w = scene.shape[:2]
    xs, ys = _grid(h, w)
    gain = rng.uniform(0.9, 1.1)
    gamma = rng.uniform(0.9, 1.12)
    balance = (1 + rng.normal(0, 0.005, 3)).astype(np.float32)
    a, slope = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.08)
    ramp = 1 + slope * ((xs / w - 0.5) * math.cos(a) + (ys / h - 0.5) * math.sin(a))
    img = np.clip(scene * (gain * balance) * ramp[..., None], 0, 1) ** gamma
    read, shot = rng.uniform(0.004, 0.010), rng.uniform(0.0001, 0.0004)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.sqrt(read * read + shot * img)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- surface defects

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


# ----------------------------------------------------------------------------- texture classes

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


# ----------------------------------------------------------------------------- object: screw

def _render_screw(h: int, w: int, rng: np.random.Generator, defect: str | None,
                 drng: np.random.Generator) -> Rendered:
    """A pan-head screw lying on a matte plate, seen from above, pointing left or right."""
    size = h
    px = size / 256
    rgb = _surface(h, w, rng, (0.78, 0.78, 0.76), grain=0.03, mottle=0.015)
    angle = (180.0 if rng.random() < 0.5 else 0.0) + rng.uniform(-20, 20)
    cx, cy = w / 2 + rng.uniform(-0.06, 0.06) * w, h / 2 + rng.uniform(-0.08, 0.08) * h
    u, v = _frame(h, w, cx, cy, angle)
    length = 0.8 * size * rng.uniform(0.985, 1.015)   # part-to-part tolerance
    u0, u1 = -length / 2, length / 2
    lh, rh, r = 0.14 * size, 0.12 * size, 0.052 * size
    neck, tip, pitch = u0 + lh, u1 - 0.12 * size, 0.036 * size
    profile = np.where(u < tip, r, r * (1 - 0.85 * np.clip((u - tip) / (u1 - tip), 0, 1)))
    phase = (u - 0.45 * v) / pitch
    threaded = u > neck + 0.07 * size
    tooth = 2 * np.abs(phase - np.floor(phase) - 0.5)   # 1 on a crest, 0 in a root
    radius = np.where(threaded, profile * (0.9 + 0.12 * tooth), profile)
    d_shaft = np.maximum(np.abs(v) - radius, np.maximum(neck - 1 - u, u - u1))
    d_head = _sd_box(u - (u0 + lh / 2), v, lh / 2, rh, 0.35 * lh)

    def body(d_shaft: np.ndarray, d_head: np.ndarray) -> np.ndarray:
        return _cover(np.minimum(d_shaft, d_head))

    cov = body(d_shaft, d_head)
    mask = None
    if defect == "missing":
        good = cov
        for _ in range(20):
            if drng.random() < 0.6:   # the tip broken off, a jagged fracture across the shaft
                cut = u1 - drng.uniform(0.05, 0.35) * (u1 - neck)
                jag = px * 1.5 * (np.sin(v / (2 * px) + drng.uniform(0, 6)) + 0.5 * np.sin(v / (0.8 * px)))
                cov = body(np.maximum(d_shaft, u - cut - jag), d_head)
            else:                    # a chip out of the head's rim
                rc = drng.uniform(0.02, 0.06) * size
                wobble = drng.uniform(-0.3, 0.3) * rc
                if drng.random() < 0.5:   # on the end face
                    pu, pv = u0 + wobble, drng.uniform(-0.8, 0.8) * rh
                else:                    # on the upper or lower edge
                    pu, pv = u0 + drng.uniform(0.15, 0.85) * lh, (rh if drng.random() < 0.5 else -rh) + wobble
                cov = body(d_shaft, np.maximum(d_head, rc - np.hypot(u - pu, v - pv)))
            mask = (good - cov) >= 0.5
            if mask.sum() >= 6 * px * px:
                break
    # metal: a bright band where the light meets the cylinder, darker flanks, crests lit in the thread
    nv = np.clip(np.where(u < neck, v / rh, v / np.maximum(profile, 1)), -1, 1)
    light = rng.uniform(-0.45, 0.45)
    shade = 0.5 + 0.3 * np.sqrt(1 - nv * nv) + 0.45 * np.exp(-(((nv - light) / 0.3) ** 2))
    crest = 0.5 + 0.5 * np.cos(2 * np.pi * phase)
    shade = np.where(threaded, shade * (0.7 + 0.4 * crest * crest), shade)
    shade = shade * (1 + 0.03 * _noise(h, w, rng, 1.0))
    metal = shade[..., None] * (np.float32([0.6, 0.61, 0.64]) * (1 + rng.normal(0, 0.008, 3)).astype(np.float32))
    shadow = cv2.GaussianBlur(_shift(cov, 3 * px, 4 * px), (0, 0), 3 * px)
    rgb *= (1 - 0.35 * shadow)[..., None]
    _paint(rgb, cov, metal)
    return _surface_defect(rgb, drng, defect, cov, mask)


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


# ----------------------------------------------------------------------------- object: washer

def _render_washer(h: int, w: int, rng: np.random.Generator, defect: str | None,
                  drng: np.random.Generator) -> Rendered:
    """A zinc-plated flat washer on a dark rubber mat, lit from one side."""
    size = min(h, w)
    px = size / 256
    rgb = _surface(h, w, rng, (0.2, 0.21, 0.22), grain=0.08, mottle=0.05, cell=12)
    cx, cy = w / 2 + rng.uniform(-0.07, 0.07) * w, h / 2 + rng.uniform(-0.07, 0.07) * h
    u, v = _frame(h, w, cx, cy, rng.uniform(0, 360))
    rho, th = np.hypot(u, v), np.arctan2(v, u)
    ro, ri = 0.34 * size * rng.uniform(0.99, 1.01), 0.155 * size * rng.uniform(0.99, 1.01)
    d_ring = np.maximum(rho - ro, ri - rho)
    cov = _cover(d_ring)
    mask = None
    if defect == "missing":
        good = cov
        for _ in range(20):
            outer = drng.random() < 0.7
            rc = drng.uniform(0.015, 0.07) * size
            psi = drng.uniform(-math.pi, math.pi)
            at = ro + 0.3 * rc if outer else ri - 0.3 * rc
            pu, pv = at * math.cos(psi), at * math.sin(psi)
            e = drng.uniform(1.0, 1.8)   # an elongated bite along the rim
            du, dv = u - pu, v - pv
            along = (-du * math.sin(psi) + dv * math.cos(psi)) / e
            across = du * math.cos(psi) + dv * math.sin(psi)
            cov = _cover(np.maximum(d_ring, rc - np.hypot(along, across)))
            mask = (good - cov) >= 0.5
            if mask.sum() >= 6 * px * px:
                break
    phi = rng.uniform(-math.pi, math.pi)   # where the light comes from
    rings = cv2.GaussianBlur(rng.standard_normal((1, 256)).astype(np.float32), (0, 0), 1.5).ravel()
    lathe = np.interp(rho, np.linspace(0, ro + 2, 256), 1 + 0.03 * rings / rings.std()).astype(np.float32)
    edge = np.minimum(np.abs(rho - ro), np.abs(rho - ri))
    bevel = np.exp(-((edge / (2.5 * px)) ** 2)) * np.cos(th - phi) * np.sign(rho - (ro + ri) / 2)
    shade = (lathe * (1 + rng.uniform(0.05, 0.12) * np.cos(th - phi)) + 0.25 * bevel).astype(np.float32)
    shade *= 1 + 0.025 * _noise(h, w, rng, 1.0)
    metal = shade[..., None] * (np.float32([0.7, 0.72, 0.76]) * (1 + rng.normal(0, 0.008, 3)).astype(np.float32))
    shadow = cv2.GaussianBlur(_shift(cov, 3 * px, 4 * px), (0, 0), 3 * px)
    rgb *= (1 - 0.5 * shadow)[..., None]
    _paint(rgb, cov, metal)
    return _surface_defect(rgb, drng, defect, cov, mask)


# ----------------------------------------------------------------------------- object: pcb

def _render_pcb(h: int, w: int, rng: np.random.Generator, defect: str | None,
               drng: np.random.Generator) -> Rendered:
    """A small board: an SOIC-14 chip, four 0805 parts, traces, silkscreen and mounting holes."""
    size = min(h, w)
    px = size / 256
    rgb = _surface(h, w, rng, (0.3, 0.3, 0.32), grain=0.06, mottle=0.04, cell=16)
    cx, cy = w / 2 + rng.uniform(-0.035, 0.035) * w, h / 2 + rng.uniform(-0.035, 0.035) * h
    u, v = _frame(h, w, cx, cy, rng.uniform(-2, 2))
    u, v = u / size, v / size   # board units: fractions of the image side

    def cover(d: np.ndarray) -> np.ndarray:
        return _cover(d * size)

    def jitter() -> float:   # placement tolerance of the pick-and-place machine
        return float(rng.normal(0, 0.0015))

    board = cover(_sd_box(u, v, 0.43, 0.35, 0.02))
    shadow = cv2.GaussianBlur(_shift(board, 2 * px, 3 * px), (0, 0), 3 * px)
    rgb *= (1 - 0.45 * shadow)[..., None]
    solder_mask = np.float32([0.1, 0.37, 0.2]) * (1 + rng.normal(0, 0.01, 3)).astype(np.float32)
    sheen = (1 + 0.04 * _noise(h, w, rng, 40 * px) + 0.03 * _noise(h, w, rng, 1.0))[..., None]
    _paint(rgb, board, sheen * solder_mask)

    ic_u, ic_v, pitch, n_pins = -0.12 + jitter(), 0.0 + jitter(), 0.03, 7
    first = ic_u - pitch * (n_pins - 1) / 2
    rows = (-0.095, 0.095)
    pas_u, pas_v = 0.22, np.array([-0.18, -0.06, 0.06, 0.18])
    # traces under the solder mask show as lighter green
    lead = {k: first + k * pitch for k in (0, 4, 6)}
    routes = []
    for sign in (-1, 1):   # mirrored above and below the chip; outer leads to outer parts, no crossings
        routes += [
            [(lead[4], 0.095 * sign), (lead[4], 0.18 * sign), (pas_u - 0.04, 0.18 * sign)],
            [(lead[6], 0.095 * sign), (lead[6], 0.13 * sign), (0.12, 0.13 * sign), (0.12, 0.06 * sign),
             (pas_u - 0.04, 0.06 * sign)],
            [(lead[0], 0.095 * sign), (lead[0], 0.22 * sign), (-0.33, 0.22 * sign)],
        ]
    routes.append([(pas_u + 0.04, -0.3), (pas_u + 0.04, 0.3)])   # a common return under the parts' far pads
    traces = [pair for route in routes for pair in itertools.pairwise(route)]
    d_tr = np.min([_sd_segment(u, v, a, b, 0.006) for a, b in traces], axis=0)
    _paint(rgb, 0.55 * cover(d_tr) * board, sheen * np.float32([0.2, 0.52, 0.28]))

    # silkscreen outlines
    silk = np.float32([0.9, 0.9, 0.86])
    _paint(rgb, cover(np.abs(_sd_box(u - ic_u, v - ic_v, 0.125, 0.125)) - 0.003), silk)
    iv = np.clip(np.round((v - pas_v[0]) / 0.12), 0, 3)
    vp = v - (pas_v[0] + 0.12 * iv)
    _paint(rgb, cover(np.abs(_sd_box(u - pas_u, vp, 0.065, 0.04)) - 0.0025), silk)

    # exposed pads (tinned), then the parts on them
    tin = np.float32([0.78, 0.78, 0.74])
    iu = np.clip(np.round((u - first) / pitch), 0, n_pins - 1)
    up = u - (first + pitch * iu)
    pads = np.min([_sd_box(up, v - (ic_v + row), 0.009, 0.022) for row in rows], axis=0)
    pads = np.minimum(pads, _sd_box(np.abs(u - pas_u) - 0.036, vp, 0.017, 0.026))
    holes = (np.abs(u) - 0.37, np.abs(v) - 0.29)
    _paint(rgb, cover(np.abs(np.hypot(*holes) - 0.026) - 0.01), np.float32([0.85, 0.7, 0.36]))
    _paint(rgb, cover(np.hypot(*holes) - 0.016), np.float32([0.05, 0.05, 0.05]))
    _paint(rgb, cover(pads), tin * (1 + 0.05 * _noise(h, w, rng, 1.0))[..., None])

    missing_pin = missing_part = -1
    if defect == "missing":
        if drng.random() < 0.3:
            missing_pin = int(drng.integers(2 * n_pins))       # one lead, a subtle one
        else:
            missing_part = int(drng.integers(4))

    pin_rows = []
    for r_i, row in enumerate(rows):
        d = _sd_box(up, v - (ic_v + row * 0.92), 0.006, 0.02)
        if missing_pin // n_pins == r_i:
            d = np.where(iu == missing_pin % n_pins, np.inf, d)
        pin_rows.append(d)
    pins = cover(np.min(pin_rows, axis=0))
    body = cover(_sd_box(u - ic_u, v - ic_v, 0.11, 0.075, 0.004))
    grad = (1 + 0.15 * (u - ic_u - (v - ic_v)) / 0.1)[..., None]   # moulded body catches the light
    parts_d = _sd_box(u - pas_u, vp, 0.04, 0.021, 0.003)
    caps_d = _sd_box(np.abs(u - pas_u) - 0.032, vp, 0.009, 0.021, 0.002)
    gone = None
    if missing_part >= 0:
        gone = cover(np.minimum(parts_d, caps_d)) * (iv == missing_part)
        parts_d = np.where(iv == missing_part, np.inf, parts_d)
        caps_d = np.where(iv == missing_part, np.inf, caps_d)
    parts, caps = cover(parts_d), cover(caps_d)
    dot = cover(np.hypot(u - (ic_u - 0.08), v - (ic_v + 0.045)) - 0.008)
    part_colour = np.where((iv % 2 == 0)[..., None], np.float32([0.1, 0.1, 0.1]), np.float32([0.62, 0.5, 0.36]))

    layers = [(pins, tin * 1.05), (body, grad * np.float32([0.1, 0.1, 0.11])), (dot, np.float32([0.3, 0.3, 0.31])),
              (parts, part_colour), (caps, tin)]
    mask = None
    if missing_pin >= 0:
        # the lead's visible part: where it would show beside the body
        full_pins = cover(np.min([_sd_box(up, v - (ic_v + row * 0.92), 0.006, 0.02) for row in rows], axis=0))
        gone = (full_pins - pins) * (1 - body)
    if gone is not None:
        mask = gone >= 0.5
    for cov, colour in layers:
        _paint(rgb, cov, colour)

    if defect == "extra":
        mask = _pcb_extra(rgb, drng, u, v, size, first, pitch, n_pins, ic_v, rows, board, body)
    if defect == "scratch":
        # a scuff through the solder mask: to bare copper when deep, paler green when not
        parts_area = np.maximum(cover(_sd_box(u - ic_u, v - ic_v, 0.13, 0.13)),
                                cover(_sd_box(u - pas_u, v, 0.08, 0.27)))
        free = board * (1 - parts_area)
        free = cv2.erode(free, np.ones((5, 5), np.uint8))
        colour = (0.78, 0.5, 0.3) if drng.random() < 0.5 else (0.3, 0.55, 0.38)
        for _ in range(20):
            out, m = _scratch(rgb, drng, bright=True, region=free, length=(0.05, 0.3), wiggle=0.04, colour=colour)
            if m.sum() >= 6 * px * px:
                return out, m
        raise RuntimeError("could not place a scratch on the board")
    return rgb, mask


def _pcb_extra(rgb: np.ndarray, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, size: int,
               first: float, pitch: float, n_pins: int, ic_v: float, rows: tuple[float, float],
               board: np.ndarray, body: np.ndarray) -> np.ndarray:
    """A solder bridge between two neighbouring leads, or a stray 0402 part dropped on the board."""
    h, w = rgb.shape[:2]
    px = size / 256
    if rng.random() < 0.5:
        k = int(rng.integers(n_pins - 1))
        row = rows[int(rng.integers(2))]
        bu, bv = first + (k + 0.5) * pitch, ic_v + row * rng.uniform(0.85, 1.05)
        half = pitch / 2 + rng.uniform(0.0, 0.008)
        d = _sd_box(u - bu, v - bv, half, rng.uniform(0.006, 0.014), 0.006)
        cov = _cover(d * size)
        glint = 1 + 0.4 * np.exp(-(((u - bu) * size / (2 * px)) ** 2 + ((v - bv) * size / (2 * px)) ** 2))
        _paint(rgb, cov, glint[..., None] * np.float32([0.8, 0.8, 0.77]))
        return cov >= 0.5
    free = cv2.erode(board * (1 - body), np.ones((9, 9), np.uint8))
    for _ in range(20):
        x, y = _pick(rng, h, w, free)
        a = rng.uniform(0, 360)
        uu, vv = _frame(h, w, x, y, a)
        scale = rng.uniform(0.7, 1.1)
        body_d = _sd_box(uu, vv, 0.016 * size * scale, 0.008 * size * scale, px)
        ends = _sd_box(np.abs(uu) - 0.013 * size * scale, vv, 0.004 * size * scale, 0.008 * size * scale, px * 0.5)
        cov = _cover(body_d)
        shadow = cv2.GaussianBlur(_shift(cov, 1.5 * px, 2 * px), (0, 0), 1.5 * px)
        mask = cov >= 0.5
        if mask.sum() >= 6 * px * px:
            rgb *= (1 - 0.4 * shadow)[..., None]
            _paint(rgb, cov, np.float32([0.6, 0.48, 0.34]))
            _paint(rgb, _cover(ends), np.float32([0.78, 0.78, 0.74]))
            return mask
    raise RuntimeError("could not place an extra part on the board")


# ----------------------------------------------------------------------------- the data set

# (height, width, scene stream, defect or None, defect stream) -> (scene, mask). The defect
# draws only from its own stream, so a defect image and its good twin (same scene
# stream) differ only where the defect is.
_RENDER: dict[str, Callable[[int, int, np.random.Generator, str | None, np.random.Generator], Rendered]] = {
    "brick": functools.partial(_render_texture, "brick"),
    "grass": functools.partial(_render_texture, "grass"),
    "gravel": functools.partial(_render_texture, "gravel"),
    "screw": _render_screw,
    "washer": _render_washer,
    "pcb": _render_pcb,
}


def _streams(seed: int, cls: str, split: str, category: str,
             index: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """The scene, defect and camera streams of one image."""
    key = np.random.SeedSequence([seed, *(zlib.crc32(k.encode()) for k in (cls, split, category)), index])
    scene, defect, camera = (np.random.default_rng(s) for s in key.spawn(3))
    return scene, defect, camera


def render(cls: str, defect: str | None, seed: int = 0, index: int = 0,
           size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (H, W, 3) uint8 and its defect mask (H, W) bool (None for a good image).

    The image equals the one `generate` writes for the same seed as
    test/{defect or good}/{index}.png.
    """
    if cls not in _RENDER:
        raise ValueError(f"unknown class {cls!r}; classes: {', '.join(CLASSES)}")
    if defect is not None and defect not in DEFECTS[cls]:
        raise ValueError(f"{cls} has no defect {defect!r}; its defects: {', '.join(DEFECTS[cls])}")
    return _render_one(cls, "test", defect or "good", index, seed, size)


def _render_one(cls: str, split: str, category: str, index: int, seed: int,
                size: int) -> tuple[np.ndarray, np.ndarray | None]:
    scene_rng, defect_rng, camera_rng = _streams(seed, cls, split, category, index)
    h, w = image_shape(cls, size)
    scene, mask = _RENDER[cls](h, w, scene_rng, None if category == "good" else category, defect_rng)
    if mask is not None and not mask.any():
        raise RuntimeError(f"{cls}/{category}/{index}: the defect left an empty mask")
    return _camera(scene, camera_rng), mask


def generate(out: str | Path, seed: int = 0, *, size: int = 256, n_train: int = 60, n_test_good: int = 16,
             n_test_defect: int = 8, classes: Sequence[str] | None = None,
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the synthetic data set under `out` in the MVTec AD layout; returns `out`.

    out/{class}/train/good/000.png, out/{class}/test/good/000.png,
    out/{class}/test/{defect}/000.png and out/{class}/ground_truth/{defect}/000_mask.png;
    n_test_defect images per defect type. Deterministic for a seed. A class
    folder this generator wrote before is replaced; any other existing class
    folder is left alone and refused. `progress(done, total)` is called after
    each image.
    """
    out = Path(out)
    names = list(CLASSES if classes is None else dict.fromkeys(classes))
    unknown = [c for c in names if c not in _RENDER]
    if unknown:
        raise ValueError(f"unknown class(es) {', '.join(map(repr, unknown))}; classes: {', '.join(CLASSES)}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("n_train must be at least 1 and the test counts non-negative")
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        taken = [c for c in names if (out / c).exists()]
        if taken:
            raise FileExistsError(f"{out}: class folder(s) {', '.join(taken)} already exist and were not written "
                                  "by this generator; choose an empty folder")
    marker.write_text(json.dumps({"generator": "kdfleet synthetic MVTec AD layout", "seed": seed, "size": size,
                                  "n_train": n_train, "n_test_good": n_test_good,
                                  "n_test_defect": n_test_defect, "classes": names}, indent=2) + "\n")
    jobs_of = {c: [("train", "good", n_train), ("test", "good", n_test_good)]
               + [("test", d, n_test_defect) for d in DEFECTS[c]] for c in names}
    total = sum(n for c in names for _, _, n in jobs_of[c])
    done = 0
    for cls in names:
        tmp = out / f".{cls}.partial"   # a class appears complete or not at all
        shutil.rmtree(tmp, ignore_errors=True)
        for split, category, n in jobs_of[cls]:
            digits = max(3, len(str(n - 1)))
            (tmp / split / category).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, mask = _render_one(cls, split, category, i, seed, size)
                write_image(tmp / split / category / f"{i:0{digits}d}.png", img)
                if mask is not None:
                    write_image(tmp / "ground_truth" / category / f"{i:0{digits}d}_mask.png",
                                mask.astype(np.uint8) * 255)
                done += 1
                if progress is not None:
                    progress(done, total)
        if (out / cls).exists():
            shutil.rmtree(out / cls)
        tmp.rename(out / cls)
    return out
