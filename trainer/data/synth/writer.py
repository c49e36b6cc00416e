"""The synthetic data set on disk: every image of the asked classes, in the MVTec AD folder layout."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from shared.imaging import write_image

from .images import _RENDER, CLASSES, DEFECTS, _render_one

MARKER = ".kdfleet-synth.json"                # marks a folder this generator may overwrite


def generate(out: str | Path, seed: int = 0, *, size: int = 256, n_train: int = 60, n_test_good: int = 16,
             n_test_defect: int = 8, classes: Sequence[str] | None = None,
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the synthetic data set under `out` in the MVTec AD layout; returns `out`.

    out/{class}/train/good/000.png, out/{class}/test/good/000.png,
    out/{class}/test/{defect}/000.png and out/{class}/ground_truth/{defect}/000_mask.png;
    n_test_defect images per defect type. Deterministic for a seed. A class
    folder this generator wrote before is replaced; any other existing class
    folder is left alone and refused. `progress(done, total)` is called after
    each image.
    """
    out = Path(out)
    names = list(CLASSES if classes is None else dict.fromkeys(classes))
    unknown = [c for c in names if c not in _RENDER]
    if unknown:
        raise ValueError(f"unknown class(es) {', '.join(map(repr, unknown))}; classes: {', '.join(CLASSES)}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("n_train must be at least 1 and the test counts non-negative")
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        taken = [c for c in names if (out / c).exists()]
        if taken:
            raise FileExistsError(f"{out}: class folder(s) {', '.join(taken)} already exist and were not written "
                                  "by this generator; choose an empty folder")
    marker.write_text(json.dumps({"generator": "kdfleet synthetic MVTec AD layout", "seed": seed, "size": size,
                                  "n_train": n_train, "n_test_good": n_test_good,
                                  "n_test_defect": n_test_defect, "classes": names}, indent=2) + "\n")
    jobs_of = {c: [("train", "good", n_train), ("test", "good", n_test_good)]
               + [("test", d, n_test_defect) for d in DEFECTS[c]] for c in names}
    total = sum(n for c in names for _, _, n in jobs_of[c])
    done = 0
    for cls in names:
        tmp = out / f".{cls}.partial"   # a class appears complete or not at all
        shutil.rmtree(tmp, ignore_errors=True)
        for split, category, n in jobs_of[cls]:
            digits = max(3, len(str(n - 1)))
            (tmp / split / category).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, mask = _render_one(cls, split, category, i, seed, size)
                write_image(tmp / split / category / f"{i:0{digits}d}.png", img)
                if mask is not None:
                    write_image(tmp / "ground_truth" / category / f"{i:0{digits}d}_mask.png",
                                mask.astype(np.uint8) * 255)
                done += 1
                if progress is not None:
                    progress(done, total)
        if (out / cls).exists():
            shutil.rmtree(out / cls)
        tmp.rename(out / cls)
    return out
