"""The obvious-defect check every method must pass: a saturated spot pasted on normal test images."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from shared.metrics import auroc
from shared.scoring import calibrate, image_score
from trainer.runners import make_runner
from trainer.data.frames import load_square
from trainer.checkpoint import load_checkpoint
from trainer.data.mvtec import split_normal


def paste_spot(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An obvious defect: a saturated blue spot, a fifth of the side across, in the central half."""
    h, w = img.shape[:2]
    out = img.copy()
    centre = (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)))
    cv2.circle(out, centre, max(2, w // 10), (30, 60, 220), -1)
    return out



def assert_detects_obvious_defect(trained: Path, data: Path, cls: str, size: int) -> None:
    """Normal test images vs the same images with a spot; the threshold comes from held-out normals."""
    cfg, _, _ = load_checkpoint(trained)
    runner = make_runner(trained)
    _, val = split_normal(data, list(cfg.classes), cfg.val_fraction, cfg.seed)
    val_x, _ = load_square([s.path for s in val], size, resize=cfg.resize)
    good_x, _ = load_square(sorted((data / cls / "test" / "good").glob("*.png")), size, resize=cfg.resize)
    rng = np.random.default_rng(0)
    bad_x = np.stack([paste_spot(img, rng) for img in good_x])

    def scores(x: np.ndarray) -> np.ndarray:
        return np.array([image_score(m, 1.0) for m in runner(x)[:, 0]])

    threshold = calibrate(scores(val_x)).threshold
    good, bad = scores(good_x), scores(bad_x)
    assert auroc(np.r_[good, bad], np.r_[np.zeros(len(good)), np.ones(len(bad))]) >= 0.95, (good, bad)
    assert (bad > threshold).mean() >= 0.75, (bad, threshold)
