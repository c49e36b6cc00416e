"""Loader for data sets in the MVTec AD folder layout (the real MVTec AD and kdfleet's synthetic set).

    ROOT/CLASS/train/good/*.png                     normal training images
    ROOT/CLASS/test/good/*.png                      normal test images
    ROOT/CLASS/test/DEFECT/*.png                    anomalous test images, one folder per defect type
    ROOT/CLASS/ground_truth/DEFECT/STEM_mask.png    their pixel masks (white = defect)

A defect folder without a `ground_truth/DEFECT/` folder is labelled per image
only (as plants often label): its images load without masks and count for
the image metrics only. Where the mask folder exists, every image needs its mask.

Images may be .png, .jpg, .jpeg, .bmp, .tif or .tiff in any letter case. A
malformed folder raises `DatasetError` naming every offending path and what
to do about it, before any training starts.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from shared.imaging import ImageError, read_image, read_mask

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
MASK_SUFFIX = "_mask"
_MAX_LISTED = 12   # problems named in one error message; the rest are counted


class DatasetError(ValueError):
    """A data folder that does not follow the MVTec AD layout, or holds unusable files."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of the data set.

    label: 0 normal, 1 anomalous; defect: "good" or the defect folder's name;
    mask_path: the ground-truth mask of an anomalous test image, else None (normal, or
    labelled per image only).
    """

    path: Path
    cls: str
    label: int
    defect: str
    mask_path: Path | None


def _natural_key(name: str) -> tuple:
    """Sort key that puts 2.png before 10.png."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name))


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: _natural_key(p.name))


def _images_in(folder: Path) -> list[Path]:
    files = (p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    return sorted(files, key=lambda p: _natural_key(p.name))


def _raise(problems: list[str], root: Path) -> None:
    if not problems:
        return
    listed = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise DatasetError(f"{root}: {len(problems)} problem(s) with this MVTec AD layout data set:\n  "
                       + "\n  ".join(listed) + more)


def discover_classes(root: str | Path) -> list[str]:
    """Names of the class folders under `root` (folders holding train/ or test/), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such data folder; give the root of an MVTec AD layout data set "
                           "(ROOT/CLASS/train/good/*.png)")
    classes = [p.name for p in _visible_dirs(root) if (p / "train").is_dir() or (p / "test").is_dir()]
    if not classes:
        raise DatasetError(f"{root}: no class folders found; expected ROOT/CLASS/train/good/ with normal images "
                           "and ROOT/CLASS/test/ (MVTec AD layout)")
    return sorted(classes)


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    """The mask of image `stem`: STEM_mask.* as MVTec AD names them, else STEM.* ."""
    if not gt_dir.is_dir():
        return None
    for name in (stem + MASK_SUFFIX, stem):
        for p in sorted(gt_dir.glob(name + ".*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                return p
    return None


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be an image, from its size and header alone (cheap for large sets)."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not cv2.haveImageReader(str(path)):
        return "not a recognised image (wrong extension or corrupt header)"
    return None


def _verify(sample: Sample) -> list[str]:
    """Decode the image (and mask) fully; report decode failures and mask mismatches."""
    try:
        shape = read_image(sample.path).shape[:2]
    except ImageError as exc:
        return [f"{exc}: replace or remove the file"]
    if sample.mask_path is None:
        return []
    try:
        mask = read_mask(sample.mask_path)
    except ImageError as exc:
        return [f"{exc}: replace the mask"]
    if mask.shape != shape:
        return [f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.path.name} "
                f"is {shape[1]}x{shape[0]}; masks must match their image's size"]
    if not mask.any():
        return [f"{sample.mask_path}: mask is empty (no white pixels) for a defect image; "
                "mark the defect or move the image to test/good"]
    return []


def _load_class(root: Path, cls: str, split: str, problems: list[str]) -> list[Sample]:
    class_dir = root / cls
    split_dir = class_dir / split
    if split == "train" and not (split_dir / GOOD).is_dir():
        problems.append(f"{split_dir / GOOD}: missing; every class needs its normal training images "
                        f"in {cls}/train/good/")
        return []
    if not split_dir.is_dir():
        problems.append(f"{split_dir}: missing; the {split} split needs {cls}/{split}/good/ and, for test, "
                        "one folder per defect type")
        return []
    categories = _visible_dirs(split_dir)
    if not categories:
        problems.append(f"{split_dir}: no category folders; put images in {cls}/{split}/good/ "
                        "(and defect folders for test)")
        return []
    samples: list[Sample] = []
    # good first, then the defect types by name
    for cat in sorted(categories, key=lambda p: (p.name != GOOD, _natural_key(p.name))):
        images = _images_in(cat)
        if not images:
            problems.append(f"{cat}: no images (.png/.jpg/.jpeg/.bmp/.tif/.tiff); add images or remove the folder")
            continue
        label = 0 if cat.name == GOOD else 1
        gt_dir = class_dir / "ground_truth" / cat.name
        for img in images:
            why = _unreadable(img)
            if why:
                problems.append(f"{img}: {why}; replace or remove it")
                continue
            mask = None
            # MVTec AD keeps masks for anomalous test images only; no mask folder: labelled per image
            if label == 1 and split == "test" and gt_dir.is_dir():
                mask = _find_mask(gt_dir, img.stem)
                if mask is None:
                    problems.append(f"{img}: defect image without a mask; expected "
                                    f"{gt_dir / (img.stem + MASK_SUFFIX + '.png')} (white = defect)")
                    continue
                why = _unreadable(mask)
                if why:
                    problems.append(f"{mask}: {why}; replace the mask")
                    continue
            samples.append(Sample(path=img, cls=cls, label=label, defect=cat.name, mask_path=mask))
    return samples


def load_samples(root: str | Path, classes: Sequence[str] | None = None,
                 split: Literal["train", "test"] = "train", *, verify: bool = False) -> list[Sample]:
    """Every image of `split` for `classes` (all classes when None).

    Sorted by class (in the order given), then good before defects, then
    defect name and file name in natural order. Files are checked by size and
    header; `verify` also decodes every image and mask and checks that each
    mask matches its image's size and is not empty (slower: reads everything).
    Raises DatasetError listing every problem found.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    available = discover_classes(root)
    wanted = list(available if classes is None else classes)
    if not wanted:
        raise DatasetError(f"{root}: the class list is empty; name at least one of: {', '.join(available)}")
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DatasetError(f"{root}: no class folder for {', '.join(map(repr, unknown))}; "
                           f"classes here: {', '.join(available)}")
    problems: list[str] = []
    samples: list[Sample] = []
    for cls in dict.fromkeys(wanted):   # a class named twice is loaded once
        samples += _load_class(root, cls, split, problems)
    _raise(problems, root)
    if verify:
        for s in samples:
            problems += _verify(s)
        _raise(problems, root)
    return samples


def _group_rng(seed: int, key: Iterable[str | int]) -> np.random.Generator:
    # crc32 of the group's name: the same class splits the same way whatever else is loaded
    words = [zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng([seed, *words])


def split_train_val(samples: Sequence[Sample], val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of each class (and label) for validation.

    Deterministic for a seed and independent of the input order and of the
    other classes present. Each group of two or more keeps at least one
    sample on each side; the outputs keep the input's order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.cls, s.label), []).append(i)
    held: set[int] = set()
    for (cls, label), idx in groups.items():
        n = len(idx)
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        else:
            n_val = 0
        if n_val == 0:
            continue
        idx = sorted(idx, key=lambda i: str(samples[i].path))   # order-independent
        pick = _group_rng(seed, (cls, label)).permutation(n)[:n_val]
        held.update(idx[j] for j in pick)
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


def split_normal(data: str | Path, classes: list[str], val_fraction: float, seed: int) -> tuple[list, list]:
    """The normal training images of `classes`, split into (train, validation) samples."""
    samples = load_samples(data, classes, "train")
    normal = [s for s in samples if s.label == 0]
    if not normal:
        raise ValueError(f"{data}: no normal training images for {classes}")
    return split_train_val(normal, val_fraction=val_fraction, seed=seed)
