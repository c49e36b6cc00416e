"""Images as a model sees them: read, checked, resized to its square input (`shared.imaging.fit_square`)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from shared.imaging import Placement, fit_square, read_image


def load_frames(paths: list[str | Path], size: int, threads: int = 2, resize: str = "letterbox"
                ) -> tuple[np.ndarray, list[Placement], list[tuple[int, int]]]:
    """uint8 (N, size, size, 3) frames, where each frame landed in its square, and each image's own (H, W)."""
    def one(p: str | Path) -> tuple[np.ndarray, Placement, tuple[int, int]]:
        img = read_image(p)
        return (*fit_square(img, size, resize), img.shape[:2])

    with ThreadPoolExecutor(max(1, threads)) as pool:   # decoding releases the GIL
        done = list(pool.map(one, paths))
    if not done:
        return np.zeros((0, size, size, 3), np.uint8), [], []
    return np.stack([d[0] for d in done]), [d[1] for d in done], [d[2] for d in done]


def load_square(paths: list[str | Path], size: int, threads: int = 2, resize: str = "letterbox"
                ) -> tuple[np.ndarray, list[Placement]]:
    """uint8 (N, size, size, 3) frames and where each landed in its square."""
    images, places, _ = load_frames(paths, size, threads, resize)
    return images, places
