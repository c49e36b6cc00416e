"""Evaluation of a model (torch module, checkpoint, ONNX file or package) on an MVTec-layout set.

Per class and mean: image AUROC, pixel AUROC, AUPRO (FPR limit 0.3) and F1-max
on the test split, and per class the image AUROC of each defect type (which
kinds of defect a model misses); latency per image (batch 1, this CPU, FP32
unless the ONNX says otherwise) and model size.

Scoring follows the agent exactly: frames are fitted to the square as the
model's `resize` says (stretched or letterboxed), the map is smoothed
(`sigma` in map pixels) and the image score is its maximum over the
frame's own region, any letterbox border left out
(`shared.scoring.score_map`). For pixel metrics the smoothed map is cut back
to each image's own frame (`unletterbox`) at most `pixel_side` pixels on its
long side, and the mask is resized to the same grid. Defect images without a
mask (image-level labels) count for the image metrics only.

Position reference: per class, `shared.scoring.fit_reference` on the raw maps
of the held-out normal validation images (never trained on, never in a
memory bank), put on trial (`reference_trial`): it is kept only where it
scores synthetic anomalies painted onto those images better than the raw map
does. A kept reference standardises every map of the class before
smoothing, in evaluation as in the agent; both variants' test metrics are
reported.

Calibration: per class, `shared.scoring.calibrate` on the image scores of the
held-out normal validation images (the same train/validation split as
training, so never trained on), each standardised with the reference fitted
on the others, so its score is that of an unseen image. MVTec-layout sets have no labelled
calibration split, and choosing the threshold on the test anomalies would
leak test labels into the shipped threshold, so F1-optimal thresholds appear
only as the F1-max metric. The shipped threshold's false-positive and
detection rates on the test split are reported beside it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import cv2
import numpy as np

from shared.imaging import Placement, read_mask, unletterbox
from shared.scoring import (REFERENCE_CHOICES, ClassCalibration, PositionReference, calibrate, fit_reference,
                            score_map)
from trainer.inference_graph import MAP_STRIDE
from trainer.runners import Runner, make_runner, measure_latency, run_batched

DEFAULT_SIGMA = 1.0   # 4 px at full resolution, in stride-4 map pixels


# -- evaluation ----------------------------------------------------------------

def pixel_grid(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) scaled down so the long side is at most `side`."""
    s = min(1.0, side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


@dataclass
class Inferred:
    """Raw maps of a list of images and where each frame landed in its square."""

    maps: np.ndarray                 # (N, h, w) raw
    places: list[Placement]
    shapes: list[tuple[int, int]]    # each frame's own (H, W)
    frames: np.ndarray | None = None  # the square uint8 frames, when kept

    def scores(self, sigma: float, size: int, references: list[PositionReference | None]) -> np.ndarray:
        """Image scores (N,), each map standardised with its reference first (None: raw)."""
        return np.asarray([score_map(m, sigma, r, p, size)[1]
                           for m, p, r in zip(self.maps, self.places, references, strict=True)], np.float64)

    def frame_maps(self, sigma: float, size: int, reference: PositionReference | None,
                   side: int) -> list[np.ndarray]:
        """Smoothed maps cut back to each frame's own grid, its long side at most `side` pixels."""
        return [unletterbox(score_map(m, sigma, reference)[0], p, size, pixel_grid(h, w, side))
                for m, p, (h, w) in zip(self.maps, self.places, self.shapes, strict=True)]


def infer(runner: Runner, paths: list[str], batch_size: int = 8, threads: int = 2, class_index: int = 0,
          keep_frames: bool = False) -> Inferred:
    """Raw maps of the images at `paths`, read in chunks so memory stays bounded for large sets."""
    from trainer.data.frames import load_frames

    maps, places, shapes, frames = [], [], [], []
    for i in range(0, len(paths), 32):
        images, p, sh = load_frames(paths[i:i + 32], runner.size, threads, runner.resize)
        maps.append(run_batched(runner, images, batch_size, class_index))
        places += p
        shapes += sh
        if keep_frames:
            frames.append(images)
    empty = np.zeros((0, runner.size // MAP_STRIDE, runner.size // MAP_STRIDE), np.float32)
    return Inferred(np.concatenate(maps) if maps else empty, places, shapes,
                    np.concatenate(frames) if frames else None)


def score_images(runner: Runner, paths: list[str], sigma: float, batch_size: int = 8,
                 pixel_side: int | None = None, threads: int = 2,
                 reference: PositionReference | None = None,
                 class_index: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores (N,) and, with `pixel_side`, smoothed maps cut back to each frame's bounded grid;
    maps standardised with `reference` first when one is given."""
    got = infer(runner, paths, batch_size, threads, class_index)
    scores = got.scores(sigma, runner.size, [reference] * len(paths))
    return scores, got.frame_maps(sigma, runner.size, reference, pixel_side) if pixel_side else []


# -- the position reference, on trial per class ------------------------------------

MIN_REFERENCE_IMAGES = 4   # fewer held-out normal images give no usable spread per position


@dataclass
class ReferenceTrial:
    """How a class scores raw and with its position reference on held-out normal images plus synthetic
    anomalies painted onto them (`trainer.data.anomalies`), and which was kept."""

    reference: PositionReference | None        # fitted on every held-out normal map
    normal_refs: list[PositionReference | None]  # per held-out image: the reference fitted without it
    use: bool
    raw: dict[str, float]
    with_reference: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"used": self.use, "synthetic": {"raw": self.raw, "with_reference": self.with_reference}}


def leave_one_out(maps: np.ndarray) -> list[PositionReference]:
    """For each map, the reference fitted on all the others: its scores are those of an unseen image."""
    return [fit_reference(np.delete(maps, i, axis=0)) for i in range(len(maps))]


def reference_trial(runner: Runner, val: Inferred, sigma: float, mode: str, seed: int, class_index: int = 0,
                    batch_size: int = 8, pixel_side: int = 128) -> ReferenceTrial:
    """Fit the class's position reference on its held-out normal maps and decide whether to use it.

    mode "auto" keeps it when the mean of image and pixel AUROC on synthetic
    anomalies (one painted onto each held-out image) is higher with it than
    without; "on" and "off" decide without trial (the figures are still
    measured with "on"). Test labels are never looked at.
    """
    from shared.metrics import auroc, pixel_auroc
    from trainer.data.anomalies import paint_anomaly

    if mode not in REFERENCE_CHOICES:
        raise ValueError(f"reference must be one of {REFERENCE_CHOICES}, got {mode!r}")
    n = len(val.maps)
    if mode == "off" or n < MIN_REFERENCE_IMAGES:
        return ReferenceTrial(None, [None] * n, False, {}, {})
    reference = fit_reference(val.maps)
    loo = leave_one_out(val.maps)
    assert val.frames is not None, "the trial paints onto the held-out frames: infer them with keep_frames"
    rng = np.random.default_rng([seed, 7])
    painted, masks = [], []
    for i in range(n):
        img, mask = paint_anomaly(val.frames[i], val.frames[(i + 1) % n], rng, val.places[i])
        painted.append(img)
        masks.append(mask)
    syn = Inferred(run_batched(runner, np.stack(painted), batch_size, class_index), val.places, val.shapes)
    labels = np.r_[np.zeros(n), np.ones(n)]
    figures = {}
    for name, normal_refs, ref in (("raw", [None] * n, None), ("with_reference", loo, reference)):
        scores = np.r_[val.scores(sigma, runner.size, normal_refs), syn.scores(sigma, runner.size, [ref] * n)]
        maps = syn.frame_maps(sigma, runner.size, ref, pixel_side)
        grid_masks = [cv2.resize(unletterbox(m.astype(np.float32), p, runner.size, g.shape), (g.shape[1], g.shape[0]),
                                 interpolation=cv2.INTER_NEAREST) > 0.5
                      for m, p, g in zip(masks, val.places, maps, strict=True)]
        figures[name] = {"image_auroc": float(auroc(scores, labels)),
                         "pixel_auroc": float(pixel_auroc(maps, grid_masks))}
    gain = (np.mean(list(figures["with_reference"].values())) - np.mean(list(figures["raw"].values())))
    use = bool(mode == "on" or gain > 0)
    return ReferenceTrial(reference, loo if use else [None] * n, use, figures["raw"], figures["with_reference"])


def load_masks(samples: list, grids: list[tuple[int, int]]) -> list[np.ndarray]:
    """Ground-truth masks resized (nearest) to each map's grid; all-false for normal images.

    Anomalous images without a mask (image-level labels) get None: pixel metrics leave them out.
    """
    out = []
    for s, (h, w) in zip(samples, grids, strict=True):
        if s.label == 0:
            out.append(np.zeros((h, w), bool))
        elif not s.mask_path:
            out.append(None)
        else:
            m = read_mask(s.mask_path).astype(np.uint8)
            out.append(cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool))
    return out


def model_classes(runner: Runner) -> list[str]:
    """The classes a model was trained or fitted on, in its own order (a class-conditional graph's indices)."""
    if runner.manifest is not None:
        return list(runner.manifest.classes)
    return list(runner.meta.get("config", {}).get("classes") or [])


def class_index_of(runner: Runner, cls: str, known: list[str]) -> int:
    """Position of `cls` among the classes a class-conditional model was fitted on, `known` (0 otherwise)."""
    if not runner.class_conditional:
        return 0
    if cls not in known:
        raise ValueError(f"the model holds no memory bank for class {cls!r}; it knows {', '.join(known) or 'none'}")
    return known.index(cls)


def evaluate(model_or_onnx: Any, data_root: str | Path, classes: list[str] | None = None,
             size: int | None = None, *, sigma: float = DEFAULT_SIGMA, val_fraction: float | None = None,
             seed: int | None = None, pixel_side: int = 256, batch_size: int = 8, latency_runs: int = 20,
             threads: int = 2, details: bool = False, worst: int = 0, reference: str = "auto",
             resize: str | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Metrics per class and mean, calibration per class, latency and size.

    model_or_onnx: an InferenceGraph or method model (give `size`), a checkpoint
    path (.pt), an ONNX file or a .kdpkg; `resize` how frames become its square
    input, for a module or ONNX file (checkpoints and packages say it themselves). The validation split (`val_fraction`,
    `seed`) defaults to the checkpoint's, else 0.2 and 0. `reference`: "auto"
    puts each class's position reference on trial (`reference_trial`), "on" and
    "off" decide for every class; each class reports the test metrics both
    raw and with its reference. With `details`, each class also carries its
    per-image scores, labels and paths. With `worst`, each class keeps its
    `worst` highest-scored normal and lowest-scored anomalous test images with
    their maps and masks (numpy, for figures). `progress` hears a line per class.
    """
    from shared.metrics import aupro, auroc, f1_max, pixel_auroc
    from trainer.data.mvtec import discover_classes, load_samples
    from trainer.data.mvtec import split_normal

    runner = make_runner(model_or_onnx, size, threads)
    if resize is not None:
        runner.meta.setdefault("resize", resize)
    cfg = runner.meta.get("config", {})
    if runner.manifest is not None:
        sigma = runner.manifest.sigma
    val_fraction = val_fraction if val_fraction is not None else cfg.get("val_fraction", 0.2)
    seed = seed if seed is not None else cfg.get("seed", 0)
    classes = list(classes or model_classes(runner) or discover_classes(data_root))
    known = model_classes(runner) or classes   # a bare module was fitted on the classes it is evaluated on
    metric_fns = (auroc, pixel_auroc, aupro, f1_max)

    per_class: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    for i, cls in enumerate(classes):
        if progress:
            eta = (time.monotonic() - t0) / i * (len(classes) - i) if i else None
            progress(f"class {cls} ({i + 1}/{len(classes)})" + (f", about {eta:.0f} s left" if eta else ""))
        k = class_index_of(runner, cls, known)
        test = load_samples(data_root, [cls], "test")
        _, val = split_normal(data_root, [cls], val_fraction, seed)
        val_got = infer(runner, [s.path for s in val], batch_size, threads, k, keep_frames=True)
        trial = reference_trial(runner, val_got, sigma, reference, seed, k, batch_size)
        val_scores = val_got.scores(sigma, runner.size, trial.normal_refs)
        cal = calibrate(val_scores, reference=trial.reference if trial.use else None)
        test_got = infer(runner, [s.path for s in test], batch_size, threads, k)
        labels = np.array([int(s.label != 0) for s in test])
        both = {}
        for name, ref in (("raw", None), ("with_reference", trial.reference)):
            if name == "with_reference" and ref is None:
                continue
            scores = test_got.scores(sigma, runner.size, [ref] * len(test))
            maps = test_got.frame_maps(sigma, runner.size, ref, pixel_side)
            both[name] = (scores, maps)
        scores, maps = both["with_reference" if trial.use else "raw"]
        masks = load_masks(test, [m.shape for m in maps])
        m = per_class[cls] = class_metrics(scores, labels, maps, masks, cal, *metric_fns)
        m["defects"] = defect_aurocs(scores, labels, [s.defect for s in test], auroc)
        m["n_val"] = len(val)
        m["reference"] = trial.to_dict()
        m["reference"]["test"] = {name: {key: v for key, v in class_metrics(sc, labels, mp, masks, cal,
                                                                            *metric_fns).items()
                                         if key in ("image_auroc", "pixel_auroc")}
                                  for name, (sc, mp) in both.items()}
        if details:
            m["scores"] = scores.tolist()
            m["labels"] = labels.tolist()
            m["val_scores"] = val_scores.tolist()
            m["paths"] = [str(s.path) for s in test]
        if worst and maps:
            m["worst"] = worst_misses(test, scores, labels, maps, masks, worst)

    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fpr_at_threshold", "tpr_at_threshold")
    mean = {k: nanmean([m[k] for m in per_class.values()]) for k in keys}
    return {
        "classes": per_class,
        "mean": mean,
        "calibration": {c: m["calibration"] for c, m in per_class.items()},
        "calibration_source": "held-out normal validation images (shared.scoring.calibrate)",
        "latency_ms": measure_latency(runner, latency_runs),
        "size_mb": runner.size_bytes / 2**20,
        "runtime": runner.runtime,
        "input_size": runner.size,
        "resize": runner.resize,
        "sigma": sigma,
    }


def nanmean(values: list[float]) -> float:
    """Mean of the finite values; NaN when there are none (a metric no class could measure)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def class_metrics(scores: np.ndarray, labels: np.ndarray, maps: list[np.ndarray], masks: list[np.ndarray | None],
                  cal: ClassCalibration, auroc, pixel_auroc, aupro, f1_max) -> dict[str, Any]:
    """Image metrics over every test image; pixel metrics over those with a mask (normal ones: all clear)."""
    both = 0 < labels.sum() < len(labels)
    keep = [i for i, m in enumerate(masks) if m is not None]
    maps, masks = [maps[i] for i in keep], [masks[i] for i in keep]
    has_defect_pixels = any(m.any() for m in masks) and not all(m.all() for m in masks)
    flagged = scores > cal.threshold
    return {
        "image_auroc": float(auroc(scores, labels)) if both else float("nan"),
        "pixel_auroc": float(pixel_auroc(maps, masks)) if has_defect_pixels else float("nan"),
        "aupro": float(aupro(maps, masks, fpr_limit=0.3)) if has_defect_pixels else float("nan"),
        "f1_max": float(f1_max(scores, labels)[0]) if both else float("nan"),
        "fpr_at_threshold": float(flagged[labels == 0].mean()) if (labels == 0).any() else float("nan"),
        "tpr_at_threshold": float(flagged[labels == 1].mean()) if (labels == 1).any() else float("nan"),
        "n_test": len(labels),
        "n_anomalous": int(labels.sum()),
        "n_pixel_labelled": int(sum(1 for i in keep if labels[i])),
        "calibration": cal.to_dict(),
    }


def defect_aurocs(scores: np.ndarray, labels: np.ndarray, defects: list[str], auroc) -> dict[str, dict[str, Any]]:
    """Per defect type: the image AUROC of its images against every normal test image, and its count."""
    normal = scores[labels == 0]
    kinds = np.asarray(defects)
    out = {}
    for kind in sorted(set(kinds[labels == 1])):
        mine = scores[(labels == 1) & (kinds == kind)]
        both = np.concatenate([normal, mine])
        y = np.concatenate([np.zeros(len(normal)), np.ones(len(mine))])
        out[str(kind)] = {"image_auroc": float(auroc(both, y)) if len(normal) else float("nan"), "n": len(mine)}
    return out


def worst_misses(samples: list, scores: np.ndarray, labels: np.ndarray, maps: list[np.ndarray],
                 masks: list[np.ndarray], k: int) -> list[dict[str, Any]]:
    """The k highest-scored normal and k lowest-scored anomalous images: path, label, defect, score, map, mask."""
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    picks = [*normal[np.argsort(-scores[normal], kind="stable")][:k],
             *anomalous[np.argsort(scores[anomalous], kind="stable")][:k]]
    return [{"path": str(samples[i].path), "label": int(labels[i]), "defect": samples[i].defect,
             "score": float(scores[i]), "map": maps[i], "mask": masks[i]} for i in picks]


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the per-class and mean metrics."""
    head = "| class | image AUROC | pixel AUROC | AUPRO@0.3 | F1-max | FPR@thr | TPR@thr |"
    rows = [head, "|" + "---|" * 7]
    for name, m in [*result["classes"].items(), ("**mean**", result["mean"])]:
        rows.append(f"| {name} | " + " | ".join(
            f"{m[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max",
                                    "fpr_at_threshold", "tpr_at_threshold")) + " |")
    rows.append(f"\n{result['runtime']}, {result['input_size']} px: {result['latency_ms']:.1f} ms/image, "
                f"{result['size_mb']:.1f} MB")
    return "\n".join(rows)
