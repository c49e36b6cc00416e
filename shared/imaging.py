"""Image I/O and the one pre-processing step that training and the agent share.

Every image is checked before it is decoded: its file size, and the size its
header claims (`shared.image_header`), against `ImageLimits`, so one file
cannot make a decoder allocate gigabytes. Whatever goes wrong while reading
or decoding is an `ImageError` naming the file and the reason.

Frames are resized to the model's square input (`fit_square`): stretched to
fill it, or letterboxed (aspect kept, reflected borders), as the model
package says. `Placement` remembers where the frame landed, so a map can be
cut back to the frame's own region and shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shared.image_header import FORMATS, Header, HeaderError, read_header


class ImageError(ValueError):
    """An image that cannot be read or decoded, or that is over the limits; the message names it."""


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What an image may be before it is decoded; bounds the memory one file can take."""

    # 50 MP: above the largest area-scan cameras (45-48 MP). Decoded as 8-bit RGB that is 150 MB,
    # 400 MB at worst (16-bit RGBA PNG): room to spare on a 4 GB Jetson beside the model
    max_pixels: int = 50_000_000
    # the file is read whole before decoding; a 50 MP JPEG is ~15 MB, a 20 MP PNG ~40 MB
    max_bytes: int = 50 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise ValueError(f"image limits must be positive, not {self.max_pixels} pixels, {self.max_bytes} bytes")


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a frame sits inside the letterboxed square: rows y0:y0+h, cols x0:x0+w."""

    y0: int
    x0: int
    h: int
    w: int


def read_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); grey images are expanded to 3 channels."""
    return decode_image(_read(path, limits), name=str(path), limits=limits)


def _read(path: str | Path, limits: ImageLimits) -> bytes:
    """The file's bytes, never more than the limit: one byte past it is enough to refuse it."""
    with open(path, "rb") as f:
        data = f.read(limits.max_bytes + 1)
    if not data:
        raise ImageError(f"{path}: empty file")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{path}: over the {_mib(limits.max_bytes)} file size limit; refused unread. "
                         "Send smaller files, or raise max_bytes ([image] in the agent config)")
    return data


def check_image(data: bytes, name: str = "image", limits: ImageLimits = DEFAULT_LIMITS) -> Header:
    """The format and size `data` claims, if within `limits`; ImageError otherwise. Decodes nothing."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes, over the {_mib(limits.max_bytes)} limit (max_bytes)")
    try:
        header = read_header(data)
    except HeaderError as exc:
        raise ImageError(f"{name}: {exc}; the file is corrupt or truncated") from None
    if header is None:
        raise ImageError(f"{name}: not a recognised image ({FORMATS}): it starts {bytes(data[:8])!r}, "
                         "so it is corrupt or of another format")
    w, h = header.width, header.height
    if w < 1 or h < 1:
        raise ImageError(f"{name}: {header.kind} header gives {w} x {h} pixels; the file is corrupt")
    if w * h > limits.max_pixels:
        raise ImageError(f"{name}: {header.kind} of {w} x {h} pixels ({w * h / 1e6:.1f} MP) is over the "
                         f"{limits.max_pixels / 1e6:g} MP limit; refused before decoding. Downscale it, or "
                         "raise max_pixels ([image] in the agent config) if frames this large are real")
    return header


def decode_image(data: bytes, name: str = "image", limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) to RGB uint8 (H, W, 3), once `check_image` passes."""
    header = check_image(data, name, limits)
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ImageError(f"{name}: not a decodable {header.kind} image (corrupt or truncated?)")
        return to_rgb(img, bgr=True)
    except (cv2.error, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name}: the {header.kind} decoder failed ({_reason(exc)}); "
                         "the file is corrupt or truncated") from None


def to_rgb(img: np.ndarray, bgr: bool) -> np.ndarray:
    """Any decoded image or video frame as RGB uint8 (H, W, 3): deeper pixels scaled, grey expanded,
    alpha dropped; `bgr` says the colour channels are in OpenCV's order."""
    if img.dtype != np.uint8:  # 16-bit PNGs, float TIFFs and the like
        if img.dtype.kind == "f":
            img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1.0, float(img.max()) if img.size else 0.0))
    if img.ndim == 2 or img.shape[2] in (1, 2):   # grey, or grey with alpha
        return cv2.cvtColor(img if img.ndim == 2 else img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else img


def read_mask(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W)."""
    data = _read(path, limits)
    check_image(data, str(path), limits)
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error as exc:
        raise ImageError(f"{path}: not a readable mask image ({_reason(exc)})") from None
    if img is None:
        raise ImageError(f"{path}: not a readable mask image")
    return img > 127


def _reason(exc: Exception) -> str:
    """The gist of an OpenCV error, without its source file and line."""
    text = getattr(exc, "err", None) or str(exc)
    return " ".join(str(text).split())[:200]


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


RESIZE_MODES = ("stretch", "letterbox")


def fit_square(img: np.ndarray, size: int, mode: str = "letterbox") -> tuple[np.ndarray, Placement]:
    """The frame as a model's size x size input, and where it landed there.

    "stretch" resizes it to fill the square: a station's frames share one
    aspect ratio, so the network always sees the same distortion and every
    input pixel shows the part (a 512 x 208 frame keeps 2.5x the pixels it
    would letterboxed). "letterbox" keeps the aspect ratio (`letterbox`),
    for frames whose shapes vary.
    """
    if mode == "letterbox":
        return letterbox(img, size)
    if mode != "stretch":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp), Placement(0, 0, size, size)


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
    """Cut a map (h, w) computed on the model's square back to the frame's own region and shape, at `out_hw`
    (for a stretched frame the region is the whole square, resized back to the frame's aspect)."""
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
