"""A tiny MVTec-layout set with obvious defects, for fast training tests.

Two classes: `disc` (an object, frames 80x64: not square, so the letterbox
matters) and `stripes` (a texture). Defects are dark spots and bright
scratches a few pixels wide, with exact masks.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def _disc(rng: np.random.Generator) -> np.ndarray:
    img = np.clip(rng.normal(70, 4, (64, 80, 3)), 0, 255).astype(np.uint8)
    cx, cy = 40 + int(rng.integers(-3, 4)), 32 + int(rng.integers(-3, 4))
    cv2.circle(img, (cx, cy), 22, (200, 170, 60), -1)
    cv2.circle(img, (cx, cy), 8, (70, 70, 70), -1)
    return img


def _stripes(rng: np.random.Generator) -> np.ndarray:
    x = np.arange(64)
    phase = rng.uniform(0, 2 * np.pi)
    base = 120 + 50 * np.sin(x[None, :] * 0.8 + phase) * np.ones((64, 1))
    img = np.stack([base, base * 0.8, base * 0.6], -1) + rng.normal(0, 4, (64, 64, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _defect(img: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    img, (h, w) = img.copy(), img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    x, y = int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4))
    if kind == "spot":
        cv2.circle(img, (x, y), 5, (20, 20, 120), -1)
        cv2.circle(mask, (x, y), 5, 255, -1)
    else:
        cv2.line(img, (x - 10, y - 6), (x + 10, y + 6), (250, 250, 250), 2)
        cv2.line(mask, (x - 10, y - 6), (x + 10, y + 6), 255, 2)
    return img, mask


def make_tiny_set(root: Path, seed: int = 0, n_train: int = 30, n_good: int = 8, n_defect: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for cls, draw in (("disc", _disc), ("stripes", _stripes)):
        for split, n in (("train", n_train), ("test", n_good)):
            d = root / cls / split / "good"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(d / f"{i:03d}.png"), draw(rng))
        for kind in ("spot", "scratch"):
            d, g = root / cls / "test" / kind, root / cls / "ground_truth" / kind
            d.mkdir(parents=True)
            g.mkdir(parents=True)
            for i in range(n_defect):
                img, mask = _defect(draw(rng), rng, kind)
                cv2.imwrite(str(d / f"{i:03d}.png"), img)
                cv2.imwrite(str(g / f"{i:03d}_mask.png"), mask)
    return root
