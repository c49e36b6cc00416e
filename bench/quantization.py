"""Quantisation benchmark: FP32 / FP16 / PTQ / QAT / mixed / INT4 variants of every method on this CPU.

    python -m bench.quantization                        # STFPM, RD, US at 256 px (trains what is missing)
    python -m bench.quantization --methods stfpm --epochs 20
    python -m bench.quantization --recipes fp32,ptq:train,qat

Makes the synthetic set (256 px) when absent, trains each method on all its
classes (unified) or reuses a checkpoint trained with the same settings, runs
`kdfleet quantize`'s report for each, and prints one table with ratios
against PyTorch FP32 eager and ONNX Runtime FP32, both timed in the same run,
then the targets:

- QAT INT8 within 0.01 image AUROC of FP32; best PTQ within 0.03;
- INT8 STFPM >= 8x faster than PyTorch FP32 eager and >= 1.5x faster than
  ONNX Runtime FP32, median <= 3.7 ms per 256 px frame (batch 1, 2 threads);
- INT8 file <= 0.3x the FP32 file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

RECIPES = "fp32,fp32-opt,fp16,ptq:train,ptq:random-normal,ptq:holdout-normal,ptq:mixed,ptq:train:percentile," \
          "ptq:train:entropy,mixed,int4,qat"
INT8_KINDS = ("ptq", "qat")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_data(root: Path, size: int, seed: int) -> Path:
    """The synthetic MVTec-layout set, generated once per (size, seed)."""
    from trainer.data.synth import MARKER, generate

    marker = root / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("size") == size and info.get("seed") == seed:
            return root
    log(f"generating the synthetic set at {size} px in {root}")
    return generate(root, seed=seed, size=size)


def ensure_checkpoint(method: str, data: Path, work: Path, size: int, epochs: int, threads: int) -> Path:
    """A unified model of `method` on every class, trained unless a checkpoint with these settings exists."""
    import torch

    from trainer.config import TrainConfig
    from trainer.train import train

    out = work / f"{method}-{size}px-{epochs}ep"
    cfg = TrainConfig(data=str(data), method=method, size=size, epochs=epochs, out=str(out), threads=threads)
    best, last = out / "best.pt", out / "last.pt"
    if best.exists() and last.exists():
        saved = torch.load(last, map_location="cpu", weights_only=True)
        same = all(saved["config"].get(k) == v for k, v in (("data", str(data)), ("size", size),
                                                             ("epochs", epochs), ("method", method)))
        if same and saved["epoch"] >= epochs:   # finished: an interrupted run resumes below instead
            log(f"{method}: reusing {best}")
            return best
    log(f"{method}: training {epochs} epochs at {size} px -> {out}")
    return train(cfg, progress=lambda pr: pr.val_loss is not None and log(
        f"{method}: epoch {pr.epoch}/{pr.epochs} loss {pr.loss:.4f} val {pr.val_loss:.4f}"), resume=True)


def targets(reports: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the benchmark's goals; met is None where a row is missing."""
    out: list[tuple[str, str, bool | None]] = []
    for rep in reports:
        rows = {r["recipe"]: r for r in rep["rows"]}
        m = rep["method"]
        if "qat" in rows:
            d = rows["qat"]["drop_image_auroc"]
            out.append((f"{m}: QAT image AUROC within 0.01 of FP32", f"drop {d:+.3f}", d is not None and d <= 0.01))
        ptq = [r for r in rep["rows"] if r["recipe"].startswith("ptq:") and r["drop_image_auroc"] is not None]
        if ptq:
            best = min(ptq, key=lambda r: r["drop_image_auroc"])
            out.append((f"{m}: best PTQ image AUROC within 0.03 of FP32",
                        f"{best['recipe']} drop {best['drop_image_auroc']:+.3f}", best["drop_image_auroc"] <= 0.03))
        int8 = [r for r in rep["rows"] if r["recipe"].split(":")[0] in INT8_KINDS]
        if not int8:
            continue
        size = min(int8, key=lambda r: r["size_ratio"])
        out.append((f"{m}: INT8 file <= 0.3x FP32", f"{size['recipe']} {size['size_ratio']:.3f}x",
                    size["size_ratio"] <= 0.3))
        if m == "stfpm":
            fast = min(int8, key=lambda r: r["p50_ms"])
            out += [
                ("stfpm: INT8 >= 8x PyTorch FP32 eager", f"{fast['recipe']} {fast['speedup_vs_torch']:.2f}x",
                 fast["speedup_vs_torch"] >= 8),
                ("stfpm: INT8 >= 1.5x ONNX Runtime FP32 (as exported)",
                 f"{fast['recipe']} {fast['speedup_vs_ort_fp32']:.2f}x", fast["speedup_vs_ort_fp32"] >= 1.5),
                ("stfpm: INT8 median <= 3.7 ms (256 px, batch 1, 2 threads)",
                 f"{fast['recipe']} {fast['p50_ms']:.2f} ms", fast["p50_ms"] <= 3.7),
            ]
            if "fp32-opt" in rows:
                opt = rows["fp32-opt"]["p50_ms"]
                out.append(("stfpm: INT8 vs ONNX Runtime FP32 with the same graph rewrites (context)",
                            f"{opt / fast['p50_ms']:.2f}x", None))
    return out


def main(argv: list[str] | None = None) -> int:
    from trainer.models import METHOD_NAMES
    from trainer.quantize import parse_recipes
    from trainer.quantize.qat import QATConfig
    from trainer.quantize.report import ReportConfig, quantize_report
    from trainer.quantize.report_files import format_table, write_report

    p = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/bench-quantization", help="data, checkpoints and reports go here")
    p.add_argument("--data", help="an MVTec-layout set to use instead of the synthetic one")
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated (default: every method)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=20, help="training epochs when a checkpoint is missing")
    p.add_argument("--recipes", default=RECIPES)
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--latency-runs", type=int, default=50)
    p.add_argument("--latency-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-only", action="store_true", help="make the data and checkpoints, then stop")
    args = p.parse_args(argv)

    work = Path(args.work)
    data = Path(args.data) if args.data else ensure_data(work / f"synth-{args.size}", args.size, args.seed)
    recipes = parse_recipes(args.recipes)
    reports = []
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    checkpoints = {m: ensure_checkpoint(m, data, work, args.size, args.epochs, args.threads) for m in methods}
    if args.train_only:
        return 0
    for method, ckpt in checkpoints.items():
        cfg = ReportConfig(checkpoint=str(ckpt), out=str(work / "report" / method), recipes=recipes,
                           data=str(data), threads=args.threads, calib_images=args.calib_images,
                           qat=QATConfig(epochs=args.qat_epochs), latency_runs=args.latency_runs,
                           latency_rounds=args.latency_rounds)
        reports.append(quantize_report(cfg, progress=log))
    write_report(reports, work / "report")
    print(format_table(reports))
    for rep in reports:
        e = rep["torch_eager"]
        fp32 = next(r for r in rep["rows"] if r["recipe"] == "fp32")
        print(f"\n{rep['method']}: PyTorch FP32 eager {e['p50_ms']:.2f} ms, ONNX Runtime FP32 {fp32['p50_ms']:.2f} ms "
              f"({e['p50_ms'] / fp32['p50_ms']:.2f}x), same run")
    m = reports[0]["machine"]
    print(f"\nload average {m['load_before']['loadavg_1m']:.2f} before, {m['load_after']['loadavg_1m']:.2f} after; "
          f"{m['timing']}")
    print("\ntargets:")
    for name, value, met in targets(reports):
        print(f"  {'MET    ' if met else 'not met' if met is False else '       '}  {name}: {value}")
    print(f"\nreport: {work / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
