"""From a raw anomaly map to what a result carries: scores, verdict, crops, heat map, thumbnails.

The numbers come from `shared.scoring`, the same code the trainer evaluated
and calibrated with, so a station's verdicts match the package's metrics.
Images leave the device small and bounded: thumbnails and overlays of
``thumbnail_px``, crops of ``crop_px``, frames of ``frame_px``, each JPEG
re-encoded smaller until it fits its byte budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from shared.imaging import Placement, encode_jpeg, encode_png, unletterbox
from shared.manifest import Manifest
from shared.messages import MAX_IMAGE, Crop
from shared.scoring import ClassCalibration, find_regions, scale_box, score_map

CROP_BYTES = 96 * 1024      # 8 crops + a frame stay well inside the 2 MiB payload limit
THUMB_BYTES = 48 * 1024
HEAT_SPAN = 2.0             # colour scale of overlays: normalised 0 (typical normal) .. 2 (twice the threshold)


@dataclass(frozen=True, slots=True)
class Scored:
    """One map's verdict."""

    score: float            # image score: max of the smoothed map over the frame (shared.scoring.frame_max)
    norm_score: float       # normalised with the class calibration (threshold ~ 1 by default)
    threshold: float        # raw threshold applied (the config's override or the calibration's)
    anomalous: bool
    smoothed: np.ndarray    # (m, m) float32 smoothed map (after the position reference) over the model's square input


@dataclass(frozen=True, slots=True)
class Rendered:
    """The images a result carries."""

    heatmap: bytes
    thumbnail: bytes
    crops: tuple[Crop, ...]
    frame: bytes


class Scorer:
    """Scores maps and renders the result images for one model package."""

    def __init__(self, manifest: Manifest, thresholds: dict[str, float] | None = None, *,
                 thumbnail_px: int = 128, heatmap_format: str = "jpeg", crop_px: int = 256,
                 max_crops: int = 8, crop_pad: float = 0.25, frame_px: int = 1024) -> None:
        self.sigma = manifest.sigma
        self.input_size = manifest.input_size
        thresholds = thresholds or {}
        unknown = sorted(set(thresholds) - set(manifest.calibration))
        if unknown:
            raise ValueError(f"threshold override(s) for {unknown}: not classes of the model "
                             f"({', '.join(sorted(manifest.calibration))})")
        self.calibration: dict[str, ClassCalibration] = {
            cls: cal.with_threshold(thresholds[cls]) if cls in thresholds else cal
            for cls, cal in manifest.calibration.items()}
        self.thumbnail_px = thumbnail_px
        self.heatmap_format = heatmap_format
        self.crop_px = crop_px
        self.max_crops = max_crops
        self.crop_pad = crop_pad
        self.frame_px = frame_px

    def score(self, amap: np.ndarray, cls: str, placement: Placement | None = None) -> Scored:
        """Score one raw map (m, m) for product class `cls`: standardised by the class's position reference
        when the package has one, smoothed, and with the frame's `placement`, as evaluation does, the
        letterbox border left out of the maximum."""
        cal = self.calibration[cls]
        smoothed, score = score_map(amap, self.sigma, cal.reference, placement, self.input_size)
        return Scored(score, float(cal.normalise(score)), cal.threshold, score > cal.threshold, smoothed)

    def frame_map(self, scored: Scored, cls: str, placement: Placement) -> np.ndarray:
        """The normalised smoothed map cut back to the frame's own region, at map resolution."""
        cal = self.calibration[cls]
        m = scored.smoothed.shape[0]
        out_hw = (max(1, round(placement.h * m / self.input_size)), max(1, round(placement.w * m / self.input_size)))
        region = unletterbox(scored.smoothed, placement, self.input_size, out_hw)
        return np.asarray(cal.normalise(region), dtype=np.float32)

    def render(self, frame: np.ndarray, scored: Scored, cls: str, placement: Placement, *,
               crops: bool, with_frame: bool) -> Rendered:
        """Heat-map overlay and thumbnail always; crops of anomalous regions and the full frame on request."""
        norm = self.frame_map(scored, cls, placement)
        thumb = fit(frame, self.thumbnail_px)
        return Rendered(
            heatmap=self.overlay(thumb, norm),
            thumbnail=bounded_jpeg(thumb, self.thumbnail_px, THUMB_BYTES),
            crops=self.crops(frame, norm, cls) if crops else (),
            frame=bounded_jpeg(frame, self.frame_px, MAX_IMAGE) if with_frame else b"",
        )

    def crops(self, frame: np.ndarray, norm: np.ndarray, cls: str) -> tuple[Crop, ...]:
        """Regions of the normalised frame map above the normalised threshold, as padded frame crops."""
        if self.max_crops == 0:
            return ()
        cal = self.calibration[cls]
        h, w = frame.shape[:2]
        mh, mw = norm.shape
        level = float(cal.normalise(cal.threshold))
        out = []
        for r in find_regions(norm, level, min_area=1, max_regions=self.max_crops):
            x, y, bw, bh = scale_box(r, w / mw, h / mh, self.crop_pad, (h, w))
            jpeg = bounded_jpeg(frame[y:y + bh, x:x + bw], self.crop_px, CROP_BYTES)
            out.append(Crop(x=x, y=y, w=bw, h=bh, score=float(r.peak), jpeg=jpeg))
        return tuple(out)

    def overlay(self, thumb: np.ndarray, norm: np.ndarray) -> bytes:
        """A colour map of the normalised map over the (thumbnail) frame; same colours on every device."""
        th, tw = thumb.shape[:2]
        heat = cv2.resize(norm, (tw, th), interpolation=cv2.INTER_LINEAR)
        level = np.clip(heat / HEAT_SPAN, 0.0, 1.0)
        colour = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)  # BGR
        mixed = cv2.addWeighted(thumb, 0.55, cv2.cvtColor(colour, cv2.COLOR_BGR2RGB), 0.45, 0.0)
        if self.heatmap_format == "png":
            return encode_png(mixed)
        return bounded_jpeg(mixed, self.thumbnail_px, THUMB_BYTES)


def fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longest side is at most `max_side` (never enlarges)."""
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def bounded_jpeg(rgb: np.ndarray, max_side: int, max_bytes: int, quality: int = 85) -> bytes:
    """A JPEG of at most `max_side` pixels and `max_bytes` bytes: lower quality first, then smaller."""
    img = fit(rgb, max_side)
    while True:
        data = encode_jpeg(np.ascontiguousarray(img), quality)
        if len(data) <= max_bytes:
            return data
        if quality > 40:
            quality -= 15
        elif max(img.shape[:2]) > 16:
            img = fit(img, max(img.shape[:2]) // 2)
        else:
            return data  # 16 px cannot exceed any sensible budget; a guard, not a path
