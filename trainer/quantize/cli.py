"""`kdfleet quantize`: build FP16 / INT8 variants of a checkpoint and write the comparison report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.quantize import DEFAULT_OBSERVER, DEFAULT_RECIPES, KINDS, OBSERVERS, TARGETS, parse_recipes
from trainer.models import METHOD_NAMES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdfleet quantize",
        description="Build reduced-precision variants of a trained model and compare accuracy, size and "
                    "latency on this CPU (Markdown + JSON report, plots).",
        epilog="recipes: " + ", ".join(KINDS) + "; ptq:<train|random-normal|holdout-normal|mixed>"
               "[:<minmax|percentile|entropy>], mixed:<layers kept FP32>")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt)")
    p.add_argument("--method", help=f"{', '.join(METHOD_NAMES)}; checked against the checkpoint")
    p.add_argument("--data", help="MVTec-layout data root (default: the checkpoint's)")
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated (default: {DEFAULT_RECIPES})")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for timing and evaluation (default 2)")
    p.add_argument("--calib-images", type=int, default=32, help="calibration frames per strategy (default 32)")
    p.add_argument("--observer", default=DEFAULT_OBSERVER, choices=OBSERVERS,
                   help="PTQ observer for recipes that name none (default %(default)s)")
    p.add_argument("--target", default="cpu", choices=TARGETS,
                   help="cpu: uint8 activations for ONNX Runtime; tensorrt: int8 symmetric (default cpu)")
    p.add_argument("--keep", type=int, default=4, help="layers `mixed` keeps FP32 (default 4)")
    p.add_argument("--qat-epochs", type=int, default=3, help="QAT fine-tuning epochs (default 3)")
    p.add_argument("--qat-lr-ratio", type=float,
                   help="QAT lr as a fraction of training's peak lr (default: training's final lr)")
    p.add_argument("--latency-runs", type=int, default=40, help="timed runs per round (default 40)")
    p.add_argument("--latency-rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--sigma", type=float, help="map smoothing in map pixels (default: evaluation's)")
    p.add_argument("--packages", action="store_true", help="also write a model package per variant")
    return p


def quantize_main(argv: list[str] | None = None) -> int:
    from trainer.quantize.qat import QATConfig
    from trainer.quantize.report import ReportConfig, quantize_report
    from trainer.quantize.report_files import format_table

    args = parser().parse_args(argv)
    try:
        recipes = parse_recipes(args.recipes)
    except ValueError as exc:
        print(f"kdfleet quantize: {exc}", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).is_file():
        print(f"kdfleet quantize: checkpoint {args.checkpoint} not found", file=sys.stderr)
        return 2
    cfg = ReportConfig(
        checkpoint=args.checkpoint, out=args.out, recipes=recipes, data=args.data, method=args.method,
        threads=args.threads, calib_images=args.calib_images, observer=args.observer, target=args.target,
        keep=args.keep, qat=QATConfig(epochs=args.qat_epochs, lr_ratio=args.qat_lr_ratio, target=args.target),
        latency_runs=args.latency_runs, latency_rounds=args.latency_rounds, sigma=args.sigma,
        packages=args.packages)
    try:
        report = quantize_report(cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as exc:
        print(f"kdfleet quantize: {exc}", file=sys.stderr)
        return 2
    print(format_table([report]))
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(quantize_main())
