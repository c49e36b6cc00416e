"""The yardstick in every report: PatchCore on the students' own teacher, fitted on the spot.

A memory bank of the frozen teacher's normal patches shows what the
teacher's features can separate without any training; a distillation method
that scores below it has a student that has not learned what the teacher
knows. The bank holds one coreset per class (`trainer.models.patchcore`),
so its unified and one-class results are the same model.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from trainer.models.patchcore import PatchCore, PatchCoreConfig
from trainer.data.frames import load_square
from trainer.config import TrainConfig
from trainer.data.mvtec import split_normal
from trainer.train import fit_once, Progress


def fit_yardstick(data: str, classes: list[str], size: int, cfg: PatchCoreConfig | None = None,
                  val_fraction: float = 0.2, seed: int = 0, threads: int = 2,
                  progress: Callable[[Progress], None] | None = None, resize: str = "stretch") -> PatchCore:
    """PatchCore fitted on the normal training images of `classes` (the same split the methods train on)."""
    tcfg = TrainConfig(data=str(data), classes=tuple(classes), method="patchcore", size=size, resize=resize,
                       model=dataclasses.asdict(cfg) if cfg else None, val_fraction=val_fraction, seed=seed,
                       threads=threads)
    from trainer.models import build_model

    train_s, _ = split_normal(data, list(classes), val_fraction, seed)
    images, _ = load_square([s.path for s in train_s], size, threads, resize)
    return fit_once(tcfg, build_model(tcfg.model), train_s, images, progress)


def yardstick_report(data: str, classes: list[str], size: int, cfg: PatchCoreConfig | None = None,
                     val_fraction: float = 0.2, seed: int = 0, threads: int = 2, resize: str = "stretch",
                     **eval_kw: Any) -> dict:
    """Fit the yardstick on `classes` and evaluate it with the methods' evaluation code (`fit_s` added)."""
    from trainer.evaluate import evaluate

    t0 = time.monotonic()
    model = fit_yardstick(data, classes, size, cfg, val_fraction, seed, threads, resize=resize)
    fit_s = time.monotonic() - t0
    result = evaluate(model, data, classes, size, val_fraction=val_fraction, seed=seed, threads=threads,
                      resize=resize, **eval_kw)
    return {**result, "fit_s": fit_s}
