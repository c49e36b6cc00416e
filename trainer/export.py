"""Export: checkpoint -> ONNX inference graph -> model package (.kdpkg).

The graph (`trainer.inference_graph`) is exported at the checkpoint's input
size with a dynamic batch, checked against torch on ONNX Runtime, then
evaluated *through ONNX Runtime* on the data set: the per-class calibration,
the metrics and the golden images' expected scores in the manifest are the
numbers the agent's runtime will reproduce, not torch's.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from shared.imaging import encode_png
from shared.manifest import Manifest
from shared.package import GoldenImage, write_package
from trainer.evaluate import DEFAULT_SIGMA, evaluate
from trainer.runners import onnx_runner, torch_runner
from trainer.jsonsafe import json_safe
from trainer.inference_graph import CLASS_INPUT_NAME, INPUT_NAME, MAP_STRIDE, OUTPUT_NAME, InferenceGraph
from trainer.models import get_method
from trainer.models.backbone import input_normalization
from trainer.data.frames import load_square
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.train import Progress, train

OPSET = 17


class ExportError(RuntimeError):
    """The exported graph disagrees with torch, or breaks the graph contract."""


def export_onnx(model: torch.nn.Module, size: int, path: str | Path, opset: int = OPSET) -> Path:
    """Write the inference graph of `model` (a method model or an InferenceGraph) to `path`.

    Input `image` uint8 (N, size, size, 3) (and `class_index` int32 (N,) for a
    class-conditional model), output `anomaly_map` float32 (N, 1, size/4, size/4).
    """
    import onnx

    graph = (model if isinstance(model, InferenceGraph) else InferenceGraph(model)).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example: tuple[torch.Tensor, ...] = (torch.zeros(1, size, size, 3, dtype=torch.uint8),)
    names = [INPUT_NAME]
    if graph.class_conditional:
        example += (torch.zeros(1, dtype=torch.int32),)   # int32: TensorRT 8 has no int64 inputs
        names.append(CLASS_INPUT_NAME)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated but needs no extra packages; its output is plain ONNX
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example, str(path), input_names=names, output_names=[OUTPUT_NAME],
                          dynamic_axes={**{n: {0: "N"} for n in names}, OUTPUT_NAME: {0: "N"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(path))
    dims = proto.graph.output[0].type.tensor_type.shape.dim   # the exporter leaves H/4, W/4 symbolic
    for d, v in zip(dims[1:], (1, size // MAP_STRIDE, size // MAP_STRIDE), strict=True):
        d.Clear()
        d.dim_value = v
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def check_onnx(path: str | Path, model: torch.nn.Module, size: int, atol: float = 1e-3,
               batch: int = 2, seed: int = 0) -> float:
    """Largest |ORT - torch| on random frames (batch != the export's); ExportError beyond `atol`
    relative to the map's range."""
    graph = model if isinstance(model, InferenceGraph) else InferenceGraph(model)
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    classes = np.arange(batch) % max(1, getattr(graph.model, "n_classes", 1))   # each frame its own bank
    ort_map = onnx_runner(path)(frames, classes)
    ref = torch_runner(graph, size)(frames, classes)
    if ort_map.shape != ref.shape or ort_map.dtype != np.float32:
        raise ExportError(f"ONNX output {ort_map.shape} {ort_map.dtype} != torch {ref.shape} float32")
    err = float(np.abs(ort_map - ref).max())
    scale = max(1e-6, float(np.abs(ref).max()))
    if err > atol * scale:
        raise ExportError(f"ONNX Runtime and torch disagree: max |diff| {err:.3g} (map max {scale:.3g})")
    return err


def golden_images(runner, data: str | Path, manifest: Manifest, per_class: int = 2) -> list[GoldenImage]:
    """Per class of `manifest`, the first normal and the first anomalous test images (square PNGs, fitted
    as the model's `resize` says) and the scores the manifest's own scoring gives them."""
    from shared.scoring import package_score
    from trainer.data.mvtec import load_samples

    picks = []
    for cls in manifest.classes:
        test = load_samples(data, [cls], "test")
        normal = [s for s in test if s.label == 0][: (per_class + 1) // 2]
        anomalous = [s for s in test if s.label == 1][: per_class // 2]
        picks += normal + anomalous
    images, _ = load_square([s.path for s in picks], runner.size, resize=manifest.resize)
    out = []
    for s, img in zip(picks, images, strict=True):
        amap = runner(img[None], manifest.classes.index(s.cls))[0, 0]
        name = f"{s.cls}-{s.defect}-{Path(s.path).stem}.png"
        out.append(GoldenImage(name, encode_png(img), s.cls, package_score(amap, manifest, s.cls)))
    return out


def export_package(checkpoint: str | Path, out: str | Path, data: str | Path | None = None, *,
                   version: str = "0.1.0", model_id: str | None = None, parent: str | None = None,
                   sigma: float = DEFAULT_SIGMA, golden_per_class: int = 2, key=None,
                   latency_runs: int = 20, reference: str = "auto") -> Path:
    """Export a checkpoint to ONNX, check it, evaluate it through ONNX Runtime and write the package.

    data: the MVTec-layout set for calibration, metrics and golden images;
    defaults to the one the checkpoint was trained on. reference: each class's
    position reference, "auto" (on trial), "on" or "off" (`trainer.evaluate`).
    """
    cfg, model, ckpt = load_checkpoint(checkpoint)
    data = Path(data or cfg.data)
    out = Path(out)
    onnx_path = out.with_suffix(".onnx")
    export_onnx(model, cfg.size, onnx_path)
    check_onnx(onnx_path, model, cfg.size)

    result = evaluate(onnx_path, data, list(cfg.classes), cfg.size, sigma=sigma, val_fraction=cfg.val_fraction,
                      seed=cfg.seed, latency_runs=latency_runs, reference=reference, resize=cfg.resize)
    manifest = build_manifest(cfg, result, sigma, version, model_id, parent, ckpt)
    golden = golden_images(onnx_runner(onnx_path), data, manifest, golden_per_class)
    path = write_package(out, manifest, onnx_path, golden, key=key)
    onnx_path.unlink()
    return path


def build_manifest(cfg: TrainConfig, result: dict[str, Any], sigma: float, version: str,
                   model_id: str | None, parent: str | None, ckpt: dict[str, Any], *, precision: str = "fp32",
                   quantization: dict[str, Any] | None = None, drop_vs_fp32: dict[str, float] | None = None
                   ) -> Manifest:
    """The manifest of a model evaluated as `result` (trainer.evaluate): its identity, input, calibration
    and metrics; `precision` and the `quantization` recipe for a quantised graph, with its `drop_vs_fp32`."""
    scope = "unified" if len(cfg.classes) > 1 else cfg.classes[0]
    keep = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fpr_at_threshold", "tpr_at_threshold")
    metrics = {
        "mean": {k: result["mean"][k] for k in keep},
        "classes": {c: {**{k: m[k] for k in keep}, "reference_used": m["reference"]["used"]}
                    for c, m in result["classes"].items()},
        "latency_ms": result["latency_ms"], "size_mb": result["size_mb"], "runtime": result["runtime"],
        "epochs": ckpt["epoch"], "val_loss": ckpt["best_val"],
    }
    if drop_vs_fp32 is not None:
        metrics["drop_vs_fp32"] = drop_vs_fp32
    return Manifest.from_dict(json_safe({
        "model_id": model_id or f"{cfg.method}-{cfg.model.backbone}-{scope}-{cfg.size}",
        "version": version,
        "method": cfg.method,
        "backbone": cfg.model.backbone,
        "classes": list(cfg.classes),
        "input_size": cfg.size,
        "resize": cfg.resize,
        "map_size": cfg.size // MAP_STRIDE,
        "sigma": sigma,
        "mean": list(input_normalization(cfg.model.backbone)[0]),
        "std": list(input_normalization(cfg.model.backbone)[1]),
        "precision": precision,
        "quantization": quantization,
        "class_input": CLASS_INPUT_NAME if get_method(cfg.method).class_conditional else None,
        "calibration": result["calibration"],
        "metrics": metrics,
        "parent": parent,
    }))


# -- the demo's preset ----------------------------------------------------------

# The demo's model: PatchCore (fitted in one pass, no epochs), the most accurate method on the synthetic
# set as on the real ones (docs/results.md); about a minute on 2 idle cores, and the demo waits on it.
QUICK = {"method": "patchcore", "size": 256, "batch_size": 16}


def data_fingerprint(data: str | Path) -> str:
    """sha256 over every file's relative path, size and mtime under `data`: cheap and change-sensitive."""
    root = Path(data)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def quick_threads() -> int:
    """Torch threads for the preset: all cores on an idle machine, one when others are busy.

    Measured here: with the 2 cores already loaded, a training step with 2
    OpenMP threads ran 9x slower than with 1 (the threads spin waiting for
    each other); on idle cores 2 threads are faster.
    """
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if busy >= 1.0 else cores


def quick_package(data_root: str | Path, out_dir: str | Path,
                  progress: Callable[[Progress], None] | None = None, **overrides: Any) -> Path:
    """Train (or fit) a unified model on every class (`QUICK`, then `overrides`), calibrate, export and
    pack; cached in `out_dir`.

    The cache key covers the data files and the settings, so changed data or
    settings train anew and an unchanged pair returns the existing package.
    """
    settings = {**QUICK, **overrides}
    out_dir = Path(out_dir)
    key = hashlib.sha256(json.dumps([data_fingerprint(data_root), settings], sort_keys=True).encode())
    tag = key.hexdigest()[:12]
    package = out_dir / f"quick-{tag}.kdpkg"
    if package.exists():
        return package
    cfg = TrainConfig(data=str(data_root), out=str(out_dir / f"run-{tag}"), threads=quick_threads(), **settings)
    t0 = time.monotonic()
    ckpt = train(cfg, progress=progress)
    path = export_package(ckpt, package, data_root, model_id=f"quick-{cfg.method}-unified-{cfg.size}",
                          latency_runs=5)
    (out_dir / f"quick-{tag}.json").write_text(json.dumps(
        {"package": path.name, "settings": settings, "seconds": round(time.monotonic() - t0, 1),
         "config": json_safe(asdict(cfg))}, indent=2))
    return path
