"""The numpy scoring core shared by evaluation and the agent.

An anomaly map (h, w) from the network becomes: a smoothed map, an image score
(its maximum over the frame's own region), a score normalised per class, a verdict against the class
threshold, and boxes around the anomalous regions. No torch, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # the core stays numpy-only at run time
    from shared.imaging import Placement


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


def image_score(amap: np.ndarray, sigma: float, placement: Placement | None = None, size: int | None = None) -> float:
    """Image anomaly score: the maximum of the smoothed map over the frame (`frame_max`)."""
    return frame_max(smooth(amap, sigma), placement, size)


@dataclass(frozen=True, slots=True)
class ClassCalibration:
    """Per-class score statistics from held-out normal images, and the decision threshold.

    `center` and `scale` map raw scores to normalised ones (0 = typical normal,
    1 = the threshold's distance from it, for the default threshold).
    """

    center: float
    scale: float
    threshold: float

    def normalise(self, score: float | np.ndarray) -> float | np.ndarray:
        return (score - self.center) / self.scale

    def to_dict(self) -> dict[str, float]:
        return {"center": self.center, "scale": self.scale, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict) -> ClassCalibration:
        return cls(float(d["center"]), float(d["scale"]), float(d["threshold"]))


def calibrate(normal_scores: np.ndarray, quantile: float = 0.99, margin: float = 1.1) -> ClassCalibration:
    """Calibration from the image scores of held-out normal images.

    The threshold sits `margin` times the normal scores' `quantile` away from
    their median, so about 1 % of normal images or fewer are flagged.
    """
    s = np.asarray(normal_scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("calibration needs at least one normal score")
    center = float(np.median(s))
    spread = float(np.quantile(s, quantile) - center)
    scale = max(spread * margin, 1e-6 * max(1.0, abs(center)), 1e-12)
    return ClassCalibration(center=center, scale=scale, threshold=center + scale)


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises F1 of `scores > t` against binary `labels`."""
    from shared.metrics import f1_max  # local: metrics is the heavier module

    return f1_max(scores, labels)[1]


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
