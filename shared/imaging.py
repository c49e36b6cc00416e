"""Image I/O and the one pre-processing step that training and the agent share.

Frames are resized to the model's square input keeping their aspect ratio
(letterbox with reflected borders), so images of any size or shape reach the
network undistorted. `Placement` remembers where the frame landed, so a map can
be cut back to the frame's own region.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


class ImageError(ValueError):
    """An image that cannot be read or decoded."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a frame sits inside the letterboxed square: rows y0:y0+h, cols x0:x0+w."""

    y0: int
    x0: int
    h: int
    w: int


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); grey images are expanded to 3 channels."""
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{path}: empty file")
    return decode_image(data.tobytes(), name=str(path))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) to RGB uint8 (H, W, 3)."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f"{name}: not a decodable image (corrupt or truncated?)")
    if img.dtype != np.uint8:  # 16-bit PNGs and the like
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1, int(img.max())))
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ImageError(f"{path}: not a readable mask image")
    return img > 127


def letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, Placement]:
    """Resize `img` (H, W[, C]) to fit a size x size square keeping its aspect ratio.

    The free border is filled by reflection, which keeps textures continuous and
    adds no artificial edges for the network to flag.
    """
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(img, (nw, nh), interpolation=interp)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    if (nh, nw) == (size, size):
        return resized, Placement(0, 0, size, size)
    out = cv2.copyMakeBorder(
        resized, y0, size - nh - y0, x0, size - nw - x0, cv2.BORDER_REFLECT_101
    )
    return out, Placement(y0, x0, nh, nw)


def unletterbox(amap: np.ndarray, placement: Placement, size: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Cut a map (h, w) computed on the letterboxed square back to the frame, at `out_hw`."""
    mh, mw = amap.shape[:2]
    sy, sx = mh / size, mw / size
    y0, y1 = round(placement.y0 * sy), round((placement.y0 + placement.h) * sy)
    x0, x1 = round(placement.x0 * sx), round((placement.x0 + placement.w) * sx)
    region = amap[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    return cv2.resize(region.astype(np.float32), (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """Encode an RGB uint8 image as JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(img: np.ndarray) -> bytes:
    """Encode a grey (H, W) or RGB (H, W, 3) uint8 image as PNG bytes."""
    arr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()


def write_image(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB (or grey) uint8 image; the format follows the file suffix."""
    arr = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), arr):
        raise ImageError(f"{path}: could not write image")
