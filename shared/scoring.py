"""The numpy scoring core shared by evaluation and the agent.

An anomaly map (h, w) from the network becomes: a map standardised by its
class's position reference, a smoothed map, an image score (its maximum over
the frame's own region), a score normalised per class, a verdict against the
class threshold, and boxes around the anomalous regions. No torch, no I/O.

`score_map` is that order up to the image score, the one path every scorer
takes: the agent's (`agent.scoring.Scorer`), evaluation and calibration
(`trainer.evaluate`), and the golden images' expected scores and the agent's
self-test (`package_score`).

The position reference is what a fixed camera makes possible: where a class's
normal images always run high (a busy background, the image border, a
part's edges), the map is discounted by that position's normal spread, so the
image score compares each position with its own normal self.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:   # the core stays numpy-only at run time
    from shared.imaging import Placement
    from shared.manifest import Manifest

REFERENCE_GRID = 16    # cells per side of a position reference: 16 px cells at 256 px, as good as per pixel here
SPREAD_FLOOR = 0.5     # no cell's spread below half the median cell's: calm areas must not amplify noise
REFERENCE_IMAGES = 64  # normal training images per class behind its reference, evenly spread over the set
# whether a class's position reference is used: on trial (kept where it scores better), always, never
REFERENCE_CHOICES = ("auto", "on", "off")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """1-D normalised Gaussian kernel truncated at 4 sigma."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth(amap: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth a 2-D map (separable, reflected borders); sigma <= 0 returns it as is."""
    amap = np.asarray(amap, dtype=np.float32)
    if sigma <= 0:
        return amap
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    padded = np.pad(amap, r, mode="reflect") if min(amap.shape) > r else np.pad(amap, r, mode="edge")
    # rows then columns, each as a sum of shifted copies: fast for small kernels
    tmp = sum(k[i] * padded[:, i : i + amap.shape[1]] for i in range(len(k)))
    return sum(k[i] * tmp[i : i + amap.shape[0], :] for i in range(len(k))).astype(np.float32)


def frame_slices(shape: tuple[int, ...], placement: Placement, size: int) -> tuple[slice, slice]:
    """Rows and columns of a map (h, w) over the letterboxed square that the frame itself covers.

    `placement` is where the frame landed in the `size` x `size` square
    (`shared.imaging.Placement`: y0, x0, h, w); rounding as `unletterbox`.
    """
    mh, mw = shape[:2]
    sy, sx = mh / size, mw / size
    y0, y1 = round(placement.y0 * sy), round((placement.y0 + placement.h) * sy)
    x0, x1 = round(placement.x0 * sx), round((placement.x0 + placement.w) * sx)
    return slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))


def frame_max(smoothed: np.ndarray, placement: Placement | None = None, size: int | None = None) -> float:
    """The maximum of a smoothed map over the frame's own region (the whole map without a placement).

    The letterbox border is a reflection of the frame, not part of it: a peak
    there would count a defect twice or flag a mirrored edge, so it is left out.
    """
    if placement is None:
        return float(smoothed.max())
    if size is None:
        raise ValueError("a placement needs the letterboxed input size")
    return float(smoothed[frame_slices(smoothed.shape, placement, size)].max())


def score_map(amap: np.ndarray, sigma: float, reference: PositionReference | None = None,
              placement: Placement | None = None, size: int | None = None) -> tuple[np.ndarray, float]:
    """(smoothed map, image score) of one raw map: standardised by the class's position `reference`
    when there is one, smoothed with `sigma`, its maximum over the frame (`frame_max`: the letterbox
    border left out when `placement` and the input `size` are given)."""
    standardised = np.asarray(amap, np.float32) if reference is None else reference.standardise(amap)
    smoothed = smooth(standardised, sigma)
    return smoothed, frame_max(smoothed, placement, size)


def image_score(amap: np.ndarray, sigma: float, placement: Placement | None = None, size: int | None = None) -> float:
    """Image anomaly score of a map without a position reference (`score_map`)."""
    return score_map(amap, sigma, None, placement, size)[1]


def package_score(amap: np.ndarray, manifest: Manifest, cls: str) -> float:
    """The image score a model package defines for a whole map of class `cls` (its position
    reference, its sigma): what golden images record and self-tests check."""
    return score_map(amap, manifest.sigma, manifest.calibration[cls].reference)[1]


def _block_means(a: np.ndarray, grid: int) -> np.ndarray:
    """Area-average a 2-D array down to (grid, grid); uneven blocks where the side is not a multiple."""
    h, w = a.shape
    if h < grid or w < grid:
        raise ValueError(f"a {h}x{w} map is smaller than the {grid}x{grid} reference grid")
    ys, xs = np.linspace(0, h, grid + 1).astype(int), np.linspace(0, w, grid + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(a, ys[:-1], axis=0), xs[:-1], axis=1)
    return (sums / np.outer(np.diff(ys), np.diff(xs))).astype(np.float32)


def _upsample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a coarse grid (g, g) to `shape`, cell centres aligned, edges held."""
    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)

    y0, y1, fy = axis(shape[0], a.shape[0])
    x0, x1, fx = axis(shape[1], a.shape[1])
    rows = a[y0] * (1 - fy)[:, None] + a[y1] * fy[:, None]
    return (rows[:, x0] * (1 - fx) + rows[:, x1] * fx).astype(np.float32)


@dataclass(frozen=True, slots=True, eq=False)   # arrays: compared by identity
class PositionReference:
    """Mean and spread of a class's normal raw maps at each position, on a coarse grid (g, g)."""

    mean: np.ndarray
    spread: np.ndarray
    _resized: dict = dataclasses.field(default_factory=dict, init=False, repr=False)   # map shape -> grids

    def standardise(self, amap: np.ndarray) -> np.ndarray:
        """(map - mean) / spread, the grid resized to the map: 0 = typical normal at that position."""
        amap = np.asarray(amap, dtype=np.float32)
        if amap.shape not in self._resized:   # once per map shape: an agent sees one
            self._resized[amap.shape] = (_upsample(self.mean, amap.shape), 1.0 / _upsample(self.spread, amap.shape))
        mean, inv_spread = self._resized[amap.shape]
        return (amap - mean) * inv_spread

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {"mean": np.round(self.mean.astype(float), 6).tolist(),
                "spread": np.round(self.spread.astype(float), 6).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PositionReference:
        mean, spread = np.asarray(d["mean"], np.float32), np.asarray(d["spread"], np.float32)
        if mean.ndim != 2 or mean.shape != spread.shape or min(mean.shape) < 1:
            raise ValueError(f"a position reference needs two equal 2-D grids, got {mean.shape} and {spread.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(spread).all() and (spread > 0).all()):
            raise ValueError("a position reference needs finite values and a positive spread")
        return cls(mean, spread)


def fit_reference(normal_maps: np.ndarray, grid: int = REFERENCE_GRID) -> PositionReference:
    """The position reference of a class from its normal raw maps (N, h, w), N >= 2."""
    maps = np.asarray(normal_maps, dtype=np.float64)
    if maps.ndim != 3 or len(maps) < 2:
        raise ValueError(f"a position reference needs at least two normal maps (N, h, w), got {maps.shape}")
    mean = _block_means(maps.mean(0), grid)
    spread = _block_means(maps.std(0), grid)
    floor = max(SPREAD_FLOOR * float(np.median(spread)), 1e-6 * max(float(np.abs(mean).max()), 1e-6))
    return PositionReference(mean, np.maximum(spread, floor).astype(np.float32))


@dataclass(frozen=True, slots=True)
class ClassCalibration:
    """Per-class score statistics from held-out normal images, the decision threshold, and
    optionally the class's position reference (applied to the raw map before anything else).

    `center` and `scale` map image scores to normalised ones (0 = typical normal,
    1 = the threshold's distance from it, for the default threshold).
    """

    center: float
    scale: float
    threshold: float
    reference: PositionReference | None = None

    def normalise(self, score: float | np.ndarray) -> float | np.ndarray:
        return (score - self.center) / self.scale

    def standardise(self, amap: np.ndarray) -> np.ndarray:
        """The raw map against the position reference; unchanged without one."""
        return np.asarray(amap, np.float32) if self.reference is None else self.reference.standardise(amap)

    def with_threshold(self, threshold: float) -> ClassCalibration:
        return dataclasses.replace(self, threshold=float(threshold))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"center": self.center, "scale": self.scale, "threshold": self.threshold}
        if self.reference is not None:
            d["reference"] = self.reference.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClassCalibration:
        ref = PositionReference.from_dict(d["reference"]) if d.get("reference") is not None else None
        return cls(float(d["center"]), float(d["scale"]), float(d["threshold"]), ref)


def calibrate(normal_scores: np.ndarray, quantile: float = 0.99, margin: float = 1.1,
              reference: PositionReference | None = None) -> ClassCalibration:
    """Calibration from the image scores of held-out normal images (scored with `reference`, if any).

    The threshold sits `margin` times the normal scores' `quantile` away from
    their median, so about 1 % of normal images or fewer are flagged.
    """
    s = np.asarray(normal_scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("calibration needs at least one normal score")
    center = float(np.median(s))
    spread = float(np.quantile(s, quantile) - center)
    scale = max(spread * margin, 1e-6 * max(1.0, abs(center)), 1e-12)
    return ClassCalibration(center=center, scale=scale, threshold=center + scale, reference=reference)


@dataclass(frozen=True, slots=True)
class Region:
    """An anomalous region: box in map pixels (x, y, w, h) and its peak value."""

    x: int
    y: int
    w: int
    h: int
    peak: float
    area: int


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labelling of a bool mask; returns (labels, count), 0 = background."""
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = 0
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist(), strict=True):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = n
                    stack.append((ny, nx))
    return labels, n


def find_regions(amap: np.ndarray, threshold: float, min_area: int = 2, max_regions: int = 8) -> list[Region]:
    """Connected regions of `amap > threshold`, largest peak first."""
    labels, n = label_components(amap > threshold)
    regions = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        if ys.size < min_area:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        peak = float(amap[ys, xs].max())
        regions.append(Region(int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1), peak, int(ys.size)))
    regions.sort(key=lambda r: r.peak, reverse=True)
    return regions[:max_regions]


def scale_box(r: Region, sx: float, sy: float, pad: float, bounds: tuple[int, int]) -> tuple[int, int, int, int]:
    """A region's box scaled from map to frame pixels, padded by `pad` of its size, clipped to bounds (h, w)."""
    bh, bw = bounds
    px, py = r.w * sx * pad, r.h * sy * pad
    x0 = max(0, int(np.floor(r.x * sx - px)))
    y0 = max(0, int(np.floor(r.y * sy - py)))
    x1 = min(bw, int(np.ceil((r.x + r.w) * sx + px)))
    y1 = min(bh, int(np.ceil((r.y + r.h) * sy + py)))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)
