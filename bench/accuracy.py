"""Accuracy benchmark: the students, unified vs one-class, beside the PatchCore memory bank and a plain kNN.

    python -m bench.accuracy                           # the real development sets (--preset real), ~1 h on 2 cores
    python -m bench.accuracy --methods stfpm,rd,us --epochs 0   # US too, each method's full recipe (hours)
    python -m bench.accuracy --data PATH               # any MVTec-layout root: its own classes
    python -m bench.accuracy --preset synthetic --size 128 --epochs 3 --classes washer,brick

Runs `kdfleet compare --train` (finished training runs under --work are
reused) for STFPM and RD at 10 epochs each by default: on the real sets that
is about 100 CPU-minutes of training and evaluation, an hour on 2 idle cores
(--epochs 0: each method's own recipe, RD's being 20), the plain kNN baseline (`bench.plain_knn`) and an INT8 (PTQ)
variant of the best unified model, then prints the tables and the targets,
each MET or not met with the figures:

- the best deployable unified model in INT8: mean image AUROC >= 0.97 and
  mean pixel AUROC >= 0.95;
- the memory-bank method (PatchCore) at least as good as the plain kNN on
  every class (image and pixel AUROC);
- STFPM and RD unified within 0.03 of the memory bank on every class
  (image and pixel AUROC);
- unified within 0.01 of one-class (mean image AUROC) for STFPM and RD.

Quantisation per method (FP32, FP16, each PTQ calibration, QAT) is
`python -m bench.quantization --preset real`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

TARGET_INT8 = {"image_auroc": 0.97, "pixel_auroc": 0.95}
TARGET_STUDENT_GAP = 0.03
TARGET_UNIFIED_GAP = 0.01
KEYS = (("image_auroc", "image"), ("pixel_auroc", "pixel"))
STUDENTS = ("stfpm", "rd")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def real_sets() -> Path:
    """The real development sets: $KDFLEET_DATASETS, else ../shared/datasets beside the project."""
    root = Path(os.environ.get("KDFLEET_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder; set KDFLEET_DATASETS to an MVTec-layout root or give --data")
    return root


def ensure_synthetic(root: Path, size: int, seed: int, classes: list[str]) -> Path:
    """The synthetic set at `size` px with `classes`, generating only the classes not there yet."""
    from trainer.data.synth import generate

    missing = [c for c in classes if not (root / c / "test").is_dir()]
    if missing:
        log(f"generating the synthetic set ({', '.join(missing)}) at {size} px in {root}")
        generate(root, seed=seed, size=size, classes=missing)
    return root


def fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def targets(results: dict[str, Any], plain: dict[str, Any] | None, int8: dict[str, Any] | None
            ) -> list[tuple[str, str, bool]]:
    """(target, measured, met); a target whose figures are missing (a method not run) is left out."""
    by = {(e["method"], e["mode"]): e["result"] for e in results["entries"]}
    bank = by.get(("patchcore", "unified")) or by.get(("patchcore", "one-class"))
    out = []
    if int8:
        for key, name in KEYS:
            v = int8["result"]["mean"][key]
            out.append((f"best unified model in INT8 ({int8['label']}): mean {name} AUROC >= {TARGET_INT8[key]}",
                        fmt(v), finite(v) and v >= TARGET_INT8[key]))
    if bank and plain:
        for cls, p in plain["classes"].items():
            for key, name in KEYS:
                a, b = bank["classes"].get(cls, {}).get(key), p[key]
                if finite(a, b):
                    out.append((f"PatchCore >= plain kNN, {cls} {name} AUROC", f"{fmt(a)} vs {fmt(b)}", a >= b))
    for m in STUDENTS:
        u = by.get((m, "unified"))
        if u and bank:
            for cls, mine in u["classes"].items():
                for key, name in KEYS:
                    a, b = mine[key], bank["classes"].get(cls, {}).get(key)
                    if finite(a, b):
                        out.append((f"{m.upper()} unified within {TARGET_STUDENT_GAP} of PatchCore, {cls} {name}",
                                    f"{fmt(a)} vs {fmt(b)} ({a - b:+.3f})", a >= b - TARGET_STUDENT_GAP))
        o = by.get((m, "one-class"))
        if u and o:
            a, b = u["mean"]["image_auroc"], o["mean"]["image_auroc"]
            if finite(a, b):
                out.append((f"{m.upper()} unified within {TARGET_UNIFIED_GAP} of one-class, mean image AUROC",
                            f"{fmt(a)} vs {fmt(b)} ({a - b:+.3f})", a >= b - TARGET_UNIFIED_GAP))
    return out


def best_unified(results: dict[str, Any]) -> dict[str, Any] | None:
    """The unified entry with the highest mean image AUROC (pixel AUROC breaks ties)."""
    unified = [e for e in results["entries"] if e["mode"] == "unified" and len(e["sources"]) == 1
               and Path(e["sources"][0]).suffix == ".pt"]
    if not unified:
        return None
    return max(unified, key=lambda e: (e["result"]["mean"]["image_auroc"], e["result"]["mean"]["pixel_auroc"] or 0))


def int8_variant(entry: dict[str, Any], data: Path, out: Path, threads: int) -> dict[str, Any]:
    """PTQ INT8 of a unified checkpoint, evaluated like every model. Calibrated on random-normal frames
    (`trainer.quantize.calibration`) with the default (percentile) observer: the recipe that lost least
    in the quantisation reports on the real sets (docs/results.md)."""
    from trainer.evaluate import evaluate
    from trainer.export import export_onnx
    from trainer.quantize.calibration import DataSpec, calibration_images
    from trainer.quantize.ptq import quantize_ptq
    from trainer.checkpoint import load_checkpoint

    ckpt = Path(entry["sources"][0])
    tcfg, model, _ = load_checkpoint(ckpt)
    fp32 = export_onnx(model, tcfg.size, out / "int8" / "fp32.onnx")
    frames = calibration_images("random-normal", DataSpec.of(tcfg, data), 32)
    res = quantize_ptq(fp32, out / "int8" / "ptq_random-normal.onnx", frames)
    log(f"evaluating {entry['label']} INT8 (PTQ, random-normal calibration)")
    result = evaluate(res.path, data, list(tcfg.classes), tcfg.size, val_fraction=tcfg.val_fraction, seed=tcfg.seed,
                      threads=threads, latency_runs=20, resize=tcfg.resize, progress=lambda s: log(f"  INT8: {s}"))
    result["model_classes"] = list(tcfg.classes)
    return {"label": f"{entry['label']} INT8", "source": str(res.path), "result": result}


def main(argv: list[str] | None = None) -> int:
    from trainer.cli import compare_main
    from trainer.data.mvtec import discover_classes
    from trainer.export import quick_threads
    from trainer.jsonsafe import json_safe

    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("real", "synthetic"), default="real",
                   help="real: every set in ../shared/datasets ($KDFLEET_DATASETS); synthetic: the generated set "
                        "(default %(default)s; --data overrides both)")
    p.add_argument("--data", help="an MVTec-layout root; its classes are the default")
    p.add_argument("--work", default="runs/bench-accuracy", help="data, checkpoints and reports go here")
    p.add_argument("--size", type=int, default=256, help="default %(default)s")
    p.add_argument("--epochs", type=int, default=10,
                   help="training epochs of every method (default %(default)s; 0: each method's own recipe)")
    p.add_argument("--classes", default=None, help="comma-separated (default: every class of the data)")
    p.add_argument("--methods", default="stfpm,rd", help="default %(default)s (PatchCore always runs beside)")
    p.add_argument("--modes", default="unified,one-class", help="default %(default)s")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores when idle, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-int8", action="store_true", help="leave out the INT8 variant of the best unified model")
    args = p.parse_args(argv)

    t0 = time.monotonic()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    work = Path(args.work)
    if args.data:
        data = Path(args.data)
    elif args.preset == "real":
        data = real_sets()
    else:
        from trainer.data.synth import CLASSES

        data = ensure_synthetic(work / f"synth-{args.size}px-seed{args.seed}", args.size, args.seed,
                                args.classes.split(",") if args.classes else list(CLASSES))
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else discover_classes(data)
    threads = args.threads or quick_threads()
    tag = f"{data.name}-{args.size}px-{args.epochs or 'recipe'}ep"
    out = work / f"report-{tag}"
    log(f"{len(classes)} classes of {data} ({', '.join(classes)}), {args.methods} x {args.modes}, "
        f"{threads} torch thread(s)")
    rc = compare_main(["--train", "--data", str(data), "--classes", ",".join(classes), "--methods", args.methods,
                       "--modes", args.modes, "--size", str(args.size), "--seed", str(args.seed),
                       "--threads", str(threads), "--out", str(out), "--work", str(work / f"runs-{tag}"),
                       *(["--epochs", str(args.epochs)] if args.epochs else [])])
    if rc:
        return rc
    results = json.loads((out / "results.json").read_text())
    log("the plain kNN baseline (random 16384-patch bank per class, squashed frames)")
    from bench.plain_knn import plain_knn

    plain = plain_knn(str(data), classes, args.size, args.seed, threads)
    int8 = None
    best = best_unified(results)
    if best and not args.no_int8:
        int8 = int8_variant(best, data, out, threads)
    (out / "bench.json").write_text(json.dumps(json_safe({"plain_knn": plain, "int8": int8}), indent=2))

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("\nplain kNN (image / pixel AUROC):")
    for cls, m in plain["classes"].items():
        print(f"  {cls:14s} {fmt(m['image_auroc'])} / {fmt(m['pixel_auroc'])}")
    if int8:
        m = int8["result"]["mean"]
        print(f"\n{int8['label']}: mean image {fmt(m['image_auroc'])} / pixel {fmt(m['pixel_auroc'])}, "
              f"{int8['result']['latency_ms']:.1f} ms/frame (ONNX Runtime, batch 1)")
    print(f"\n{len(classes)} classes at {args.size} px, {threads} torch thread(s); "
          f"{time.monotonic() - t0:.0f} s in all (training runs reused from earlier count as 0); "
          f"load average {load_before:.1f} before, {load_after:.1f} after")
    print("\ntargets:")
    for name, value, met in targets(results, plain, int8):
        print(f"  {'MET    ' if met else 'not met'}  {name}: {value}")
    print(f"\nreport: {out / 'report.md'}; baselines: {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
