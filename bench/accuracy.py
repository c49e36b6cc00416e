"""Accuracy benchmark: STFPM, RD and US, unified vs one-class, on the synthetic set, beside the kNN yardstick.

    python -m bench.accuracy                                    # 256 px, every class, 20 epochs (hours on 2 cores)
    python -m bench.accuracy --size 128 --epochs 3 --classes washer,brick

Makes the synthetic set when absent, runs `kdfleet compare --train` (finished
training runs under --work are reused), prints its tables, then the targets:

- unified STFPM and RD: mean image AUROC >= 0.95 and mean pixel AUROC >= 0.95;
- unified within 0.01 of one-class on the class mean (image and pixel AUROC;
  a unified model above its one-class twin passes);
- US at least 1 image/s on this CPU (PyTorch FP32, batch 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TARGET_AUROC = 0.95
TARGET_GAP = 0.01
TARGET_US_IMAGES_PER_S = 1.0
KEYS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_data(root: Path, size: int, seed: int, classes: list[str]) -> Path:
    """The synthetic set at `size` px with `classes`, generating only the classes not there yet."""
    from trainer.data.synth import generate

    missing = [c for c in classes if not (root / c / "test").is_dir()]
    if missing:
        log(f"generating the synthetic set ({', '.join(missing)}) at {size} px in {root}")
        generate(root, seed=seed, size=size, classes=missing)
    return root


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) from compare's results.json; targets whose entries are missing are left out."""
    by = {(e["method"], e["mode"]): e for e in results["entries"]}
    out = []
    for m in ("stfpm", "rd"):
        u = by.get((m, "unified"))
        for key, name in KEYS if u else ():
            v = u["result"]["mean"][key]
            out.append((f"{u['label']}: mean {name} >= {TARGET_AUROC}", fmt(v), v is not None and v >= TARGET_AUROC))
    for m in ("stfpm", "rd", "us"):
        u, o = by.get((m, "unified")), by.get((m, "one-class"))
        for key, name in KEYS if u and o else ():
            a, b = u["result"]["mean"][key], o["result"]["mean"][key]
            ok = a is not None and b is not None and a >= b - TARGET_GAP
            gap = f" ({a - b:+.3f})" if a is not None and b is not None else ""
            out.append((f"{u['label']} within {TARGET_GAP} of one-class: mean {name}",
                        f"{fmt(a)} vs {fmt(b)}{gap}", ok))
    us = by.get(("us", "unified")) or by.get(("us", "one-class"))
    if us:
        ms = us["result"]["latency_ms"]
        out.append((f"US at least {TARGET_US_IMAGES_PER_S:g} image/s on this CPU (FP32, batch 1, "
                    f"{us['result']['input_size']} px)", f"{1000 / ms:.1f} images/s ({ms:.0f} ms)",
                    1000 / ms >= TARGET_US_IMAGES_PER_S))
    return out


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    from trainer.cli import compare_main
    from trainer.data.synth import CLASSES
    from trainer.export import quick_threads

    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/bench-accuracy", help="data, checkpoints and the report go here")
    p.add_argument("--data", help="an MVTec-layout set to use instead of the synthetic one")
    p.add_argument("--size", type=int, default=256, help="default %(default)s")
    p.add_argument("--epochs", type=int, default=20, help="default %(default)s")
    p.add_argument("--classes", default=",".join(CLASSES), help="comma-separated (default: every synthetic class)")
    p.add_argument("--methods", default="stfpm,rd,us", help="default %(default)s")
    p.add_argument("--modes", default="unified,one-class", help="default %(default)s")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores when idle, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-images", type=int, default=None, metavar="N",
                   help="normal images per class behind its position reference (default: evaluate's; 0: raw maps)")
    args = p.parse_args(argv)

    t0 = time.monotonic()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    work = Path(args.work)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    data = Path(args.data) if args.data else ensure_data(work / f"synth-{args.size}px-seed{args.seed}", args.size,
                                                         args.seed, classes)
    threads = args.threads or quick_threads()
    out = work / f"report-{args.size}px-{args.epochs}ep"
    rc = compare_main(["--train", "--data", str(data), "--classes", ",".join(classes), "--methods", args.methods,
                       "--modes", args.modes, "--size", str(args.size), "--epochs", str(args.epochs),
                       "--seed", str(args.seed), "--threads", str(threads), "--out", str(out),
                       "--work", str(work / f"runs-{args.size}px-{args.epochs}ep"),
                       *(["--reference-images", str(args.reference_images)] if args.reference_images is not None
                         else [])])
    if rc:
        return rc
    results = json.loads((out / "results.json").read_text())
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{len(classes)} classes at {args.size} px, {args.epochs} epochs, {threads} torch thread(s); "
          f"{time.monotonic() - t0:.0f} s in all (training runs reused from earlier count as 0); "
          f"load average {load_before:.1f} before, {load_after:.1f} after")
    print("\ntargets:")
    for name, value, met in targets(results):
        print(f"  {'MET    ' if met else 'not met'}  {name}: {value}")
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
