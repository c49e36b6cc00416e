"""One synthetic image: the classes and their defects, each image's random streams, the camera.

`render` gives the same image and mask that `generate` writes for the same
seed, class, category and index.
"""
from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable

import numpy as np

from .draw import Rendered, _grid
from .parts import _render_pcb, _render_screw, _render_washer
from .textures import _render_texture

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


def image_shape(cls: str, size: int) -> tuple[int, int]:
    """(height, width) of a class's images for a given base size."""
    return size, round(size * ASPECT.get(cls, 1.0))


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
