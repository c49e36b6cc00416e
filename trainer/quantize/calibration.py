"""Calibration data for static quantisation, selectable by name.

Every strategy yields what the deployed graph eats: square uint8 frames (fitted as the model's `resize` says)
(N, S, S, 3), RGB. Which images set the activation ranges is the one choice
PTQ has; these are the ones the report compares:

- `train`: normal training images, the ones the student learned on.
- `holdout-normal`: the held-out normal images (the validation split that
  also calibrates the thresholds; never trained on, never tested on).
- `random-normal`: no data at all. Each pixel is drawn from N(0, 1) in the
  network's normalised space and mapped back through the inverse of the
  graph's normalisation: pixel = clip(round(255 * (mean_c + std_c * z)), 0, 255),
  i.e. i.i.d. noise with the mean and standard deviation per channel that
  the backbone expects (for ImageNet's statistics about 1-2 % of the draws
  clip at 0 or 255; for EfficientNet-Lite's (x - 127) / 128 about a third do).
- `mixed`: half good training images lightly augmented (flips, gain, sensor
  noise), half the same with a synthetic anomaly painted in
  (`trainer.data.anomalies`: a patch cut from another image and pasted
  elsewhere, a scratch, or a blotch of foreign colour), so the ranges also
  cover the activations a defect produces.

Images are sampled evenly over the classes and deterministically for a seed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.anomalies import paint_anomaly
from trainer.data.frames import load_square
from trainer.inference_graph import INPUT_NAME
from trainer.models.backbone import input_normalization

STRATEGIES = ("train", "random-normal", "holdout-normal", "mixed")


@dataclass(frozen=True, slots=True)
class DataSpec:
    """Where the images are and how training split them (from the checkpoint's config)."""

    data: str
    classes: tuple[str, ...]
    size: int
    backbone: str                 # its input normalisation shapes the random-normal frames
    val_fraction: float = 0.2
    split_seed: int = 0
    resize: str = "stretch"       # how frames become the square input (shared.imaging.fit_square)

    @classmethod
    def of(cls, tcfg, data: str | None = None) -> DataSpec:
        """The spec of a training config (`trainer.config.TrainConfig`), optionally on other data."""
        return cls(str(data or tcfg.data), tuple(tcfg.classes), tcfg.size, tcfg.model.backbone,
                   tcfg.val_fraction, tcfg.seed, tcfg.resize)


def calibration_images(strategy: str, spec: DataSpec, n: int = 32, seed: int = 0) -> np.ndarray:
    """`n` frames uint8 (n, S, S, 3) for `strategy` (one of STRATEGIES)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown calibration strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise ValueError("calibration needs at least one image")
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
    if strategy == "random-normal":
        return random_normal_images(n, spec.size, spec.backbone, rng)
    train, val = normal_paths(spec)
    if strategy == "holdout-normal":
        return load_square(spread(val, n, rng), spec.size, resize=spec.resize)[0]
    frames = load_square(spread(train, n, rng), spec.size, resize=spec.resize)[0]
    if strategy == "mixed":
        frames = mixed_images(frames, rng)
    return frames


def normal_paths(spec: DataSpec) -> tuple[list[Path], list[Path]]:
    """(training, held-out) normal image paths, split exactly as training split them."""
    from trainer.data.mvtec import split_normal

    train, val = split_normal(spec.data, list(spec.classes), spec.val_fraction, spec.split_seed)
    return [s.path for s in train], [s.path for s in val]


def spread(paths: list[Path], n: int, rng: np.random.Generator) -> list[Path]:
    """`n` paths spread evenly over the (class-sorted) list, repeating only when there are fewer."""
    if not paths:
        raise ValueError("no images to calibrate with")
    if n >= len(paths):
        return [paths[i % len(paths)] for i in range(n)]
    edges = np.linspace(0, len(paths), n + 1)
    return [paths[int(rng.integers(int(a), max(int(a) + 1, int(b))))] for a, b in itertools.pairwise(edges)]


def random_normal_images(n: int, size: int, backbone: str, rng: np.random.Generator) -> np.ndarray:
    """N(0, 1) in the backbone's normalised space, mapped back to uint8 pixels through the inverse normalisation."""
    z = rng.standard_normal((n, size, size, 3), dtype=np.float32)
    mean, std = (np.asarray(v, np.float32) for v in input_normalization(backbone))
    return np.clip(np.rint(255.0 * (mean + std * z)), 0, 255).astype(np.uint8)


def mixed_images(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Augment every frame; paint a synthetic anomaly into every second one."""
    out = frames.copy()
    for i in range(len(out)):
        img = augment(out[i], rng)
        if i % 2:
            img, _ = paint_anomaly(img, frames[(i + 1) % len(frames)], rng)
        out[i] = img
    return out


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips, a +-15 % gain and mild sensor noise: a normal image stays normal."""
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.5:
        img = img[::-1]
    x = img.astype(np.float32) * rng.uniform(0.85, 1.15) + rng.normal(0.0, 2.0, img.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class FrameReader:
    """An ONNX Runtime `CalibrationDataReader` over frames, `batch_size` per call.

    Supports `len` and `set_range`, so quantize_static can calibrate in chunks
    (`CalibStridedMinMax`) and never holds every activation of every frame at once.
    """

    def __init__(self, frames: np.ndarray, batch_size: int = 1, input_name: str = INPUT_NAME,
                 class_input: str | None = None) -> None:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (N, S, S, 3), got {frames.dtype} {frames.shape}")
        self.frames = frames
        self.batch_size = batch_size
        self.input_name = input_name
        # a class-conditional graph: the class only picks a bank for the float distance head, so every
        # frame runs as class 0 (the quantised layers' activations do not depend on it)
        self.class_input = class_input
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.frames) // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        i = self._next * self.batch_size
        self._next += 1
        batch = self.frames[i:i + self.batch_size]
        if self.class_input is None:
            return {self.input_name: batch}
        return {self.input_name: batch, self.class_input: np.zeros(len(batch), np.int32)}

    def rewind(self) -> None:
        self.set_range(0, len(self))
