"""The quantisation report: method x precision x recipe -> accuracy, size and speed on this CPU.

For one checkpoint, `quantize_report` builds the requested variants, scores
each through ONNX Runtime with `trainer.evaluate.evaluate` (the agent's own
scoring: the frame fitted to the square, map, Gaussian smoothing, max), and times each at batch 1
with tuned sessions (runtime.py) next to the same run's PyTorch FP32 eager
graph and, when the openvino package is installed, the same ONNX files under
OpenVINO. Latencies are taken in interleaved rounds (every variant once per
round) so that a burst of load elsewhere hits all of them alike, and each
carries the CPU other processes used meanwhile.

Outputs in `out`: `report.md`, `report.json`, `auroc_vs_size.png`,
`auroc_vs_latency.png`, and under `variants/` the ONNX files and, with
`packages`, one model package per variant, calibrated on its own scores.
"""
from __future__ import annotations

import gc
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from trainer.jsonsafe import json_safe
from trainer.quantize.report_files import write_report
from trainer.quantize import DEFAULT_OBSERVER, DEFAULT_RECIPES, Recipe, parse_recipes
from trainer.quantize import graph as G
from trainer.quantize.calibration import DataSpec, calibration_images
from trainer.quantize.ptq import PTQConfig
from trainer.quantize.qat import QATConfig
from trainer.quantize.runtime import (DEFAULT_THREADS, Latency, machine_load, measure, onnx_map_fn, openvino_map_fn,
                                      torch_map_fn)

METRICS = ("image_auroc", "pixel_auroc", "aupro")
TRADEOFF_KEEPS = (0, 1, 2, 4, 8)


@dataclass
class ReportConfig:
    checkpoint: str
    out: str
    recipes: list[Recipe] = field(default_factory=lambda: parse_recipes(DEFAULT_RECIPES))
    data: str | None = None              # None: the checkpoint's data
    method: str | None = None            # checked against the checkpoint's
    threads: int = DEFAULT_THREADS
    calib_images: int = 32
    calib_seed: int = 0
    observer: str = DEFAULT_OBSERVER     # for ptq recipes that name none
    target: str = "cpu"
    keep: int = 4                        # layers kept FP32 by `mixed` without a count
    sensitivity_images: int = 8          # held-out normal frames the sensitivity is measured on
    qat: QATConfig = field(default_factory=QATConfig)
    latency_runs: int = 40               # per round
    latency_rounds: int = 3
    sigma: float | None = None           # map smoothing; None: evaluation's default
    packages: bool = False


@dataclass
class Variant:
    recipe: Recipe
    path: Path
    detail: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    latency: Latency | None = None
    openvino: Latency | None = None     # the same file timed under OpenVINO, when it is installed
    build_s: float = 0.0


def build_variant(recipe: Recipe, fp32: Path, cfg: ReportConfig, spec: DataSpec, folder: Path,
                  cache: dict[str, Any], say: Callable[[str], None]) -> Variant:
    """Build one recipe's ONNX file from the FP32 export (or, for QAT, from the checkpoint)."""
    from trainer.quantize.fp16 import convert_fp16
    from trainer.quantize.mixed import layer_sensitivity, quantize_mixed, sensitivity_table
    from trainer.quantize.ptq import quantize_ptq
    from trainer.quantize.qat import run_qat

    t0 = time.monotonic()
    path = folder / (recipe.name.replace(":", "_") + ".onnx")

    def frames(strategy: str) -> np.ndarray:
        if strategy not in cache:
            cache[strategy] = calibration_images(strategy, spec, cfg.calib_images, cfg.calib_seed)
        return cache[strategy]

    ptq_cfg = PTQConfig(observer=cfg.observer, target=cfg.target)
    if recipe.kind == "fp32":
        detail: dict[str, Any] = {"graph": "as exported by trainer.export"}
        path = fp32
    elif recipe.kind == "fp32-opt":
        G.optimise_float(fp32, path)
        detail = {"graph": "prepared: BatchNorm folded, strided kernels shrunk, normalisation folded"}
    elif recipe.kind == "fp16":
        detail = convert_fp16(fp32, path).recipe()
    elif recipe.kind in ("ptq", "int4"):
        strategy = recipe.calibration or "train"
        pc = replace(ptq_cfg, observer=recipe.observer or cfg.observer, weight_bits=4 if recipe.kind == "int4" else 8)
        detail = quantize_ptq(fp32, path, frames(strategy), pc).recipe()
        detail["calibration"] = strategy
    elif recipe.kind == "mixed":
        if "sensitivity" not in cache:
            say("measuring per-layer sensitivity")
            cache["sensitivity"] = layer_sensitivity(fp32, frames("train"), sensitivity_frames(spec, cfg, cache),
                                                     ptq_cfg)
        keep = cfg.keep if recipe.keep is None else recipe.keep
        res = quantize_mixed(fp32, path, frames("train"), keep, cache["sensitivity"], ptq_cfg)
        detail = {**res.recipe(), "calibration": "train", "sensitivity_top": sensitivity_table(cache["sensitivity"])}
    elif recipe.kind == "qat":
        float_path = folder / "qat_weights_fp32.onnx"
        res = run_qat(cfg.checkpoint, path, replace(cfg.qat, target=cfg.target), progress=say, float_out=float_path)
        ev = evaluate_variant(float_path, spec.data, list(spec.classes), spec.size, spec.val_fraction,
                              spec.split_seed, cfg.sigma, cfg.threads, spec.resize)
        float_path.unlink()
        detail = {**res.recipe(), "history": res.history,
                  "fine_tuned_fp32": {k: ev["mean"][k] for k in METRICS}}
    else:
        raise ValueError(f"unknown recipe kind {recipe.kind!r}")
    return Variant(recipe, Path(path), detail, build_s=time.monotonic() - t0)


def sensitivity_frames(spec: DataSpec, cfg: ReportConfig, cache: dict[str, Any]) -> np.ndarray:
    if "sensitivity_frames" not in cache:
        cache["sensitivity_frames"] = calibration_images("holdout-normal", spec, cfg.sensitivity_images,
                                                         cfg.calib_seed + 1)
    return cache["sensitivity_frames"]


def evaluate_variant(path: Path, data: str, classes: list[str], size: int, val_fraction: float, seed: int,
                     sigma: float | None, threads: int, resize: str) -> dict[str, Any]:
    """`trainer.evaluate.evaluate` on the ONNX file: it takes ONNX paths as they are, no adapter needed."""
    from trainer.evaluate import DEFAULT_SIGMA, evaluate

    return evaluate(path, data, classes, size, sigma=DEFAULT_SIGMA if sigma is None else sigma,
                    val_fraction=val_fraction, seed=seed, latency_runs=1, threads=threads, resize=resize)


def time_all(fns: dict[str, Callable[[], Callable[[np.ndarray], Any]]], size: int, runs: int, rounds: int
             ) -> dict[str, Latency]:
    """Interleaved rounds: each round builds each runner afresh, warms it, times it, drops it."""
    samples: dict[str, list[Latency]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, make in fns.items():
            run = make()
            samples[name].append(measure(run, size, runs=runs, warmup=5))
            del run
            gc.collect()
            time.sleep(0.2)   # let the previous runtime's spinning threads park
    out = {}
    for name, lats in samples.items():
        p50s = [lat.p50_ms for lat in lats]
        p95s = [lat.p95_ms for lat in lats]
        best = int(np.argmin(p50s))   # the round least disturbed by other processes
        out[name] = Latency(p50s[best], p95s[best], 1000.0 / p50s[best], runs * rounds,
                            float(np.mean([lat.other_cpu for lat in lats])))
    return out


def quantize_report(cfg: ReportConfig, progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build, evaluate and time every recipe for one checkpoint; write the report files; return the report."""
    from trainer.inference_graph import InferenceGraph
    from trainer.models import get_method
    from trainer.checkpoint import load_checkpoint

    say = progress or (lambda _msg: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tcfg, model, _ = load_checkpoint(cfg.checkpoint)
    if cfg.method and cfg.method != tcfg.method:
        raise ValueError(f"--method {cfg.method} but {cfg.checkpoint} holds a {tcfg.method} model")
    data = cfg.data or tcfg.data
    spec = DataSpec.of(tcfg, data)
    load_before = machine_load()

    from trainer.export import check_onnx, export_onnx

    folder = out / "variants"
    folder.mkdir(exist_ok=True)
    fp32 = export_onnx(model, tcfg.size, folder / "fp32.onnx")
    check_onnx(fp32, model, tcfg.size)
    recipes = list(cfg.recipes)
    if Recipe("fp32") not in recipes:
        recipes.insert(0, Recipe("fp32"))   # the reference every drop is measured against
    if not get_method(tcfg.method).trained and any(r.kind == "qat" for r in recipes):
        say(f"{tcfg.method}: no QAT (a fitted method has no training to repeat quantised); PTQ stands for it")
        recipes = [r for r in recipes if r.kind != "qat"]
    cache: dict[str, Any] = {}
    variants: list[Variant] = []
    for r in recipes:
        say(f"{tcfg.method}: building {r.name}")
        v = build_variant(r, fp32, cfg, spec, folder, cache, say)
        say(f"{tcfg.method}: evaluating {r.name}")
        v.evaluation = evaluate_variant(v.path, data, list(tcfg.classes), tcfg.size, tcfg.val_fraction, tcfg.seed,
                                        cfg.sigma, cfg.threads, tcfg.resize)
        v.metrics = {k: v.evaluation["mean"][k] for k in METRICS}
        variants.append(v)

    say(f"{tcfg.method}: timing {len(variants)} variants and PyTorch eager, {cfg.latency_rounds} rounds")
    graph = InferenceGraph(model).eval()
    fns: dict[str, Callable[[], Callable[[np.ndarray], Any]]] = {
        "torch-eager": lambda: torch_map_fn(graph, cfg.threads)}
    openvino = openvino_map_fn(fp32, cfg.threads) is not None
    for v in variants:
        fns[v.recipe.name] = (lambda p=v.path: onnx_map_fn(p, cfg.threads))
        if openvino:   # the same file under the runtime a user might pick instead, in the same rounds
            fns[f"openvino:{v.recipe.name}"] = (lambda p=v.path: openvino_map_fn(p, cfg.threads))
    lat = time_all(fns, tcfg.size, cfg.latency_runs, cfg.latency_rounds)
    for v in variants:
        v.latency = lat[v.recipe.name]
        v.openvino = lat.get(f"openvino:{v.recipe.name}")

    tradeoff = mixed_tradeoff(cfg, cache, fp32, spec, folder, tcfg, variants, say) if "sensitivity" in cache else []
    if cfg.packages:
        reference = next(v for v in variants if v.recipe == Recipe("fp32"))
        for v in variants:
            v.detail["package"] = str(package_variant(v, tcfg, cfg, folder, reference))
    report = assemble(tcfg, cfg, variants, lat["torch-eager"], graph, load_before, tradeoff)
    write_report(report, out)
    return report


def mixed_tradeoff(cfg: ReportConfig, cache: dict[str, Any], fp32: Path, spec: DataSpec, folder: Path, tcfg,
                   variants: list[Variant], say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Layers kept FP32 vs map error, image AUROC, size and latency (fewer timing runs than the table)."""
    from trainer.quantize.mixed import map_error, quantize_mixed

    frames = sensitivity_frames(spec, cfg, cache)
    reference = onnx_map_fn(fp32, cfg.threads)(frames)
    rows = []
    sens = cache["sensitivity"]
    total = sum(s.params for s in sens) or 1
    chosen = {len(v.detail["kept_fp32"]) for v in variants if v.recipe.kind == "mixed"}
    for keep in sorted({*TRADEOFF_KEEPS, *chosen}):
        if keep > len(sens):
            continue
        say(f"{tcfg.method}: mixed trade-off, {keep} layers kept FP32")
        path = folder / f"tradeoff_keep{keep}.onnx"
        quantize_mixed(fp32, path, cache["train"], keep, sens, PTQConfig(observer=cfg.observer, target=cfg.target))
        ev = evaluate_variant(path, spec.data, list(spec.classes), spec.size, spec.val_fraction, spec.split_seed,
                              cfg.sigma, cfg.threads, spec.resize)
        lat = measure(onnx_map_fn(path, cfg.threads), spec.size, runs=cfg.latency_runs)
        rows.append({"keep": keep, "kept": [s.node for s in sens[:keep]],
                     "fp32_param_share": sum(s.params for s in sens[:keep]) / total,
                     "map_error": map_error(onnx_map_fn(path, cfg.threads)(frames), reference),
                     **{k: ev["mean"][k] for k in METRICS}, "size_mb": G.file_mb(path), "p50_ms": lat.p50_ms,
                     "other_cpu": lat.other_cpu})
        path.unlink()
    return rows


def package_variant(v: Variant, tcfg, cfg: ReportConfig, folder: Path, reference: Variant) -> Path:
    """A model package for the variant: its own calibration, metrics (with the drop against the FP32
    `reference` measured in the same run) and golden scores."""
    from shared.package import write_package
    from trainer.evaluate import DEFAULT_SIGMA
    from trainer.runners import onnx_runner
    from trainer.export import build_manifest, golden_images

    sigma = DEFAULT_SIGMA if cfg.sigma is None else cfg.sigma
    ckpt = {"epoch": None, "best_val": None}
    manifest = build_manifest(tcfg, v.evaluation, sigma, "0.1.0",
                              f"{tcfg.method}-{tcfg.model.backbone}-{tcfg.size}-{v.recipe.name.replace(':', '-')}",
                              None, ckpt, precision=v.recipe.precision,
                              quantization=json_safe({k: val for k, val in v.detail.items() if k != "package"}),
                              drop_vs_fp32=json_safe({k: reference.metrics[k] - v.metrics[k] for k in v.metrics}))
    golden = golden_images(onnx_runner(v.path), cfg.data or tcfg.data, manifest)
    return write_package(folder / f"{v.recipe.name.replace(':', '_')}.kdpkg", manifest, v.path, golden)


def assemble(tcfg, cfg: ReportConfig, variants: list[Variant], eager: Latency, graph, load_before: dict[str, float],
             tradeoff: list[dict[str, Any]]) -> dict[str, Any]:
    import onnxruntime
    import torch

    ref = next(v for v in variants if v.recipe.kind == "fp32")
    torch_mb = sum(t.numel() * t.element_size() for t in graph.state_dict().values()) / 2**20
    rows = []
    for v in variants:
        lat = v.latency
        assert lat is not None
        rows.append({
            "method": tcfg.method, "precision": v.recipe.precision, "recipe": v.recipe.name,
            **v.metrics,
            **{f"drop_{k}": ref.metrics[k] - v.metrics[k] for k in METRICS},
            "size_mb": G.file_mb(v.path), "size_ratio": G.file_mb(v.path) / G.file_mb(ref.path),
            "p50_ms": lat.p50_ms, "p95_ms": lat.p95_ms, "images_per_s": lat.images_per_s,
            "speedup_vs_torch": eager.p50_ms / lat.p50_ms, "speedup_vs_ort_fp32": ref.latency.p50_ms / lat.p50_ms,
            "openvino_p50_ms": v.openvino.p50_ms if v.openvino else None,
            "other_cpu": lat.other_cpu, "build_s": v.build_s, "onnx": str(v.path),
        })
    return json_safe({
        "method": tcfg.method, "checkpoint": str(cfg.checkpoint), "data": cfg.data or tcfg.data,
        "classes": list(tcfg.classes), "input_size": tcfg.size, "threads": cfg.threads,
        "calibration_images": cfg.calib_images, "target": cfg.target,
        "torch_eager": {**eager.to_dict(), "size_mb": torch_mb},
        "rows": rows,
        "details": {v.recipe.name: v.detail for v in variants},
        "per_class": {v.recipe.name: {c: {k: m[k] for k in METRICS} for c, m in v.evaluation["classes"].items()}
                      for v in variants},
        "mixed_tradeoff": tradeoff,
        "machine": {"cpu": platform.processor() or platform.machine(), "load_before": load_before,
                    "load_after": machine_load(), "onnxruntime": onnxruntime.__version__,
                    "torch": torch.__version__, "timing": f"batch 1, {cfg.threads} threads, best of "
                    f"{cfg.latency_rounds} interleaved rounds of {cfg.latency_runs} runs"},
    })
