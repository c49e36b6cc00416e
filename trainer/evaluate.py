"""Evaluation of a model (torch module, checkpoint, ONNX file or package) on an MVTec-layout set.

Per class and mean: image AUROC, pixel AUROC, AUPRO (FPR limit 0.3) and F1-max
on the test split, and per class the image AUROC of each defect type (which
kinds of defect a model misses); latency per image (batch 1, this CPU, FP32
unless the ONNX says otherwise) and model size.

Scoring follows the agent exactly: frames are letterboxed, the map is
smoothed (`sigma` in map pixels) and the image score is its maximum over
the frame's own region, the letterbox border left out
(`shared.scoring.image_score`). For pixel metrics the smoothed map is cut back
to each image's own frame (`unletterbox`) at most `pixel_side` pixels on its
long side, and the mask is resized to the same grid.

Position reference: per class, `shared.scoring.fit_reference` on the raw maps
of up to `reference_images` normal training images (evenly spread); every map
of that class is standardised with it before smoothing, in evaluation as in
the agent. `reference_images=0` scores the raw maps.

Calibration: per class, `shared.scoring.calibrate` on the image scores of the
held-out normal validation images (the same train/validation split as
training, so never trained on). MVTec-layout sets have no labelled
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
import torch

from shared.imaging import read_mask, unletterbox
from shared.scoring import (REFERENCE_IMAGES, ClassCalibration, PositionReference, calibrate, fit_reference,
                            image_score, smooth)
from trainer.inference_graph import INPUT_NAME, MAP_STRIDE, InferenceGraph

DEFAULT_SIGMA = 1.0   # 4 px at full resolution, in stride-4 map pixels


# -- runners: uint8 (N, S, S, 3) -> float32 (N, 1, S/4, S/4) --------------------

@dataclass
class Runner:
    """A callable that maps letterboxed frames to raw anomaly maps, with what is known about it."""

    run: Callable[[np.ndarray], np.ndarray]
    size: int
    runtime: str          # "torch" or "onnxruntime"
    size_bytes: int       # weights (torch) or the ONNX file
    meta: dict[str, Any]  # what the source says about itself (checkpoint config, manifest)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)


def torch_runner(graph: torch.nn.Module, size: int, meta: dict[str, Any] | None = None) -> Runner:
    graph = graph.eval()

    @torch.no_grad()
    def run(images: np.ndarray) -> np.ndarray:
        return graph(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    n_bytes = sum(t.numel() * t.element_size() for t in list(graph.parameters()) + list(graph.buffers()))
    return Runner(run, size, "torch", n_bytes, meta or {})


def onnx_runner(model: bytes | str | Path, meta: dict[str, Any] | None = None, threads: int = 0) -> Runner:
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape   # [N, S, S, 3]
    size = int(shape[1])

    def run(images: np.ndarray) -> np.ndarray:
        return sess.run(None, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})[0]

    return Runner(run, size, "onnxruntime", len(data), meta or {})


def make_runner(source: Any, size: int | None = None, threads: int = 0) -> Runner:
    """A Runner from an InferenceGraph, a method model, a checkpoint (.pt), an ONNX file or a package."""
    if isinstance(source, Runner):
        return source
    if isinstance(source, torch.nn.Module):
        graph = source if isinstance(source, InferenceGraph) else InferenceGraph(source)
        if size is None:
            raise ValueError("evaluating a torch module needs the input size")
        return torch_runner(graph, size)
    path = Path(source)
    if path.suffix == ".onnx":
        return onnx_runner(path, {}, threads)
    if path.suffix == ".kdpkg":
        from shared.package import read_package

        pkg = read_package(path)
        return onnx_runner(pkg.model, {"manifest": pkg.manifest}, threads)
    from trainer.train import load_checkpoint

    cfg, model, _ = load_checkpoint(path)
    return torch_runner(InferenceGraph(model), size or cfg.size, {"config": cfg.to_dict()})


def run_batched(runner: Runner, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Maps (N, h, w) for uint8 frames (N, S, S, 3)."""
    if len(images) == 0:
        return np.zeros((0, runner.size // MAP_STRIDE, runner.size // MAP_STRIDE), np.float32)
    return np.concatenate([runner(images[i:i + batch_size])[:, 0] for i in range(0, len(images), batch_size)])


def measure_latency(runner: Runner, runs: int = 20) -> float:
    """Median milliseconds for one frame (batch 1), after two warm-up runs."""
    frame = np.random.default_rng(0).integers(0, 256, (1, runner.size, runner.size, 3), dtype=np.uint8)
    for _ in range(2):
        runner(frame)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runner(frame)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


# -- evaluation ----------------------------------------------------------------

def pixel_grid(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) scaled down so the long side is at most `side`."""
    s = min(1.0, side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def raw_maps(runner: Runner, paths: list[str], batch_size: int = 8, threads: int = 2) -> np.ndarray:
    """The runner's raw maps (N, h, w) of the images at `paths` (at least one)."""
    from trainer.train import load_frames

    return np.concatenate([run_batched(runner, load_frames(paths[i:i + 32], runner.size, threads)[0], batch_size)
                           for i in range(0, len(paths), 32)])


def reference_for(runner: Runner, paths: list[str], n: int, batch_size: int = 8,
                  threads: int = 2) -> PositionReference | None:
    """The position reference from up to `n` of the normal images at `paths` (evenly spread); None if n < 2."""
    if n < 2 or len(paths) < 2:
        return None
    picks = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, min(n, len(paths))).round())]
    return fit_reference(raw_maps(runner, picks, batch_size, threads))


def score_images(runner: Runner, paths: list[str], sigma: float, batch_size: int = 8,
                 pixel_side: int | None = None, threads: int = 2,
                 reference: PositionReference | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores (N,) and, with `pixel_side`, smoothed maps cut back to each frame's bounded grid;
    maps standardised with `reference` first when one is given."""
    from trainer.train import load_frames

    scores, frames = [], []
    for i in range(0, len(paths), 32):   # bounded memory for large sets
        images, places, shapes = load_frames(paths[i:i + 32], runner.size, threads)
        maps = run_batched(runner, images, batch_size)
        for amap, place, (h, w) in zip(maps, places, shapes, strict=True):
            if reference is not None:
                amap = reference.standardise(amap)
            scores.append(image_score(amap, sigma, place, runner.size))
            if pixel_side:
                frames.append(unletterbox(smooth(amap, sigma), place, runner.size, pixel_grid(h, w, pixel_side)))
    return np.asarray(scores, np.float64), frames


def load_masks(samples: list, grids: list[tuple[int, int]]) -> list[np.ndarray]:
    """Ground-truth masks resized (nearest) to each map's grid; all-false for normal images."""
    out = []
    for s, (h, w) in zip(samples, grids, strict=True):
        if s.label == 0 or not s.mask_path:
            out.append(np.zeros((h, w), bool))
        else:
            m = read_mask(s.mask_path).astype(np.uint8)
            out.append(cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool))
    return out


def evaluate(model_or_onnx: Any, data_root: str | Path, classes: list[str] | None = None,
             size: int | None = None, *, sigma: float = DEFAULT_SIGMA, val_fraction: float | None = None,
             seed: int | None = None, pixel_side: int = 256, batch_size: int = 8, latency_runs: int = 20,
             threads: int = 2, details: bool = False, worst: int = 0,
             reference_images: int = REFERENCE_IMAGES,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Metrics per class and mean, calibration per class, latency and size.

    model_or_onnx: an InferenceGraph or method model (give `size`), a checkpoint
    path (.pt), an ONNX file or a .kdpkg. The validation split (`val_fraction`,
    `seed`) defaults to the checkpoint's, else 0.2 and 0. With `details`, each
    class also carries its per-image scores, labels and paths. `reference_images`:
    normal training images behind each class's position reference (0: none,
    raw maps). With `worst`,
    each class keeps its `worst` highest-scored normal and lowest-scored
    anomalous test images with their maps and masks (numpy, for figures).
    `progress` hears one line per class.
    """
    from shared.metrics import aupro, auroc, f1_max, pixel_auroc
    from trainer.data.mvtec import discover_classes, load_samples
    from trainer.train import split_normal

    runner = make_runner(model_or_onnx, size, threads)
    cfg = runner.meta.get("config", {})
    manifest = runner.meta.get("manifest", {})
    if manifest:
        sigma = float(manifest.get("sigma", sigma))
    val_fraction = val_fraction if val_fraction is not None else cfg.get("val_fraction", 0.2)
    seed = seed if seed is not None else cfg.get("seed", 0)
    classes = list(classes or cfg.get("classes") or manifest.get("classes") or discover_classes(data_root))

    per_class: dict[str, dict[str, Any]] = {}
    for i, cls in enumerate(classes):
        if progress:
            progress(f"class {cls} ({i + 1}/{len(classes)})")
        test = load_samples(data_root, [cls], "test")
        train, val = split_normal(data_root, [cls], val_fraction, seed)
        ref = reference_for(runner, [s.path for s in train], reference_images, batch_size, threads)
        val_scores, _ = score_images(runner, [s.path for s in val], sigma, batch_size, None, threads, ref)
        cal = calibrate(val_scores, reference=ref)
        scores, maps = score_images(runner, [s.path for s in test], sigma, batch_size, pixel_side, threads, ref)
        labels = np.array([int(s.label != 0) for s in test])
        masks = load_masks(test, [m.shape for m in maps])
        per_class[cls] = class_metrics(scores, labels, maps, masks, cal, auroc, pixel_auroc, aupro, f1_max)
        per_class[cls]["defects"] = defect_aurocs(scores, labels, [s.defect for s in test], auroc)
        per_class[cls]["n_val"] = len(val)
        if details:
            per_class[cls]["scores"] = scores.tolist()
            per_class[cls]["labels"] = labels.tolist()
            per_class[cls]["val_scores"] = val_scores.tolist()
            per_class[cls]["paths"] = [str(s.path) for s in test]
        if worst and maps:
            per_class[cls]["worst"] = worst_misses(test, scores, labels, maps, masks, worst)

    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fpr_at_threshold", "tpr_at_threshold")
    mean = {k: float(np.nanmean([m[k] for m in per_class.values()])) for k in keys}
    return {
        "classes": per_class,
        "mean": mean,
        "calibration": {c: m["calibration"] for c, m in per_class.items()},
        "calibration_source": "held-out normal validation images (shared.scoring.calibrate)",
        "latency_ms": measure_latency(runner, latency_runs),
        "size_mb": runner.size_bytes / 2**20,
        "runtime": runner.runtime,
        "input_size": runner.size,
        "sigma": sigma,
    }


def class_metrics(scores: np.ndarray, labels: np.ndarray, maps: list[np.ndarray], masks: list[np.ndarray],
                  cal: ClassCalibration, auroc, pixel_auroc, aupro, f1_max) -> dict[str, Any]:
    both = 0 < labels.sum() < len(labels)
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
