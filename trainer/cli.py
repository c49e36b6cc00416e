"""The trainer's commands: `kdfleet data | train | evaluate | export` (and `demo-model` for the demo).

Each `*_main(argv)` parses its own arguments and returns an exit code; results
a script may want (checkpoint and package paths) go to stdout, the last line
being the main one; progress and messages go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer.models import METHOD_NAMES, MethodNotAvailable

EPILOG_DATA = "The set follows the MVTec AD layout: OUT/CLASS/{train/good, test/<defect>, ground_truth/<defect>}."


THREADS_HELP = ("CPU threads for torch (default: one per core); use 1 when other work shares the cores: "
                "busy cores make multi-threaded steps several times slower")


def fail(prog: str, msg: str) -> int:
    print(f"{prog}: {msg}", file=sys.stderr)
    return 2


def parse_classes(text: str) -> tuple[str, ...]:
    return () if text == "all" else tuple(c.strip() for c in text.split(",") if c.strip())


# -- data -----------------------------------------------------------------------

def data_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kdfleet data", description="Make data sets.", epilog=EPILOG_DATA)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("synth", help="generate the synthetic MVTec-layout set (normal and defective images)",
                        epilog=EPILOG_DATA)
    sp.add_argument("out", type=Path, help="output folder")
    sp.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same set (default 0)")
    sp.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    args = ap.parse_args(argv)
    from trainer.data.synth import generate

    path = generate(args.out, seed=args.seed, size=args.size)
    print(path or args.out)
    return 0


# -- train ----------------------------------------------------------------------

def train_main(argv: list[str] | None = None) -> int:
    from trainer.train import TrainConfig, one_class_configs, train

    d = TrainConfig.__dataclass_fields__
    ap = argparse.ArgumentParser(
        prog="kdfleet train",
        description="Train a knowledge-distillation anomaly model on normal images. "
                    "unified: one model for all the chosen classes; one-class: one model per class.",
        epilog="Checkpoints: OUT/best.pt (lowest validation loss) and OUT/last.pt (for --resume); "
               "one-class mode writes OUT/CLASS/. Prints the best checkpoint path(s).")
    ap.add_argument("--method", choices=METHOD_NAMES, default="stfpm", help="distillation method (default stfpm)")
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout data root")
    ap.add_argument("--classes", default="all", help="'all' or a comma-separated list (default all)")
    ap.add_argument("--mode", choices=("unified", "one-class"), default="unified", help="default unified")
    ap.add_argument("--epochs", type=int, default=d["epochs"].default, help="default %(default)s")
    ap.add_argument("--size", type=int, default=d["size"].default,
                    help="letterboxed input side, a multiple of 32 (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="default %(default)s")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default=d["optimizer"].default,
                    help="default %(default)s")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the optimizer's)")
    ap.add_argument("--backbone", default=None, help="teacher: efficientnet_lite0|1|2, resnet18, wide_resnet50")
    ap.add_argument("--weights", default=None, help="local teacher weights file (required for the ResNets)")
    ap.add_argument("--hflip", action="store_true", help="random horizontal flips (only where orientation "
                                                          "does not matter, e.g. textures)")
    ap.add_argument("--vflip", action="store_true", help="random vertical flips (same caveat)")
    ap.add_argument("--brightness", type=float, default=d["brightness"].default,
                    help="brightness jitter, fraction (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/METHOD-MODE)")
    ap.add_argument("--seed", type=int, default=0, help="default 0")
    ap.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt when present")
    args = ap.parse_args(argv)

    model: dict[str, Any] = {}
    if args.backbone:
        model["backbone"] = args.backbone
    if args.weights:
        model["weights"] = args.weights
    kw: dict[str, Any] = {}
    if args.lr is not None:
        kw["lr"] = args.lr
    elif args.optimizer == "adam":
        kw["lr"] = ADAM_LR
    try:
        cfg = TrainConfig(
            data=str(args.data), classes=parse_classes(args.classes), method=args.method, model=model,
            size=args.size, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
            seed=args.seed, hflip=args.hflip, vflip=args.vflip, brightness=args.brightness,
            out=str(args.out or Path("runs") / f"{args.method}-{args.mode}"), threads=args.threads, **kw)
        configs = one_class_configs(cfg) if args.mode == "one-class" else [cfg]
        for c in configs:
            print(f"training {c.method} on {', '.join(c.classes) or 'all classes'} -> {c.out}", file=sys.stderr)
            print(train(c, resume=args.resume), flush=True)
    except MethodNotAvailable as exc:
        return fail("kdfleet train", str(exc))
    except (ValueError, FileNotFoundError) as exc:   # DatasetError and BackboneError are ValueErrors
        return fail("kdfleet train", str(exc))
    return 0


ADAM_LR = 1e-3


# -- evaluate -------------------------------------------------------------------

def evaluate_main(argv: list[str] | None = None) -> int:
    from trainer.evaluate import evaluate, format_table

    ap = argparse.ArgumentParser(
        prog="kdfleet evaluate",
        description="Evaluate models on an MVTec-layout set: image/pixel AUROC, AUPRO@0.3, F1-max per class "
                    "and mean, per-class calibration, latency and size.",
        epilog="Give several one-class checkpoints to evaluate each on its own class(es). "
               "--yardstick adds the training-free kNN baseline on the same teacher.")
    ap.add_argument("models", nargs="+", type=Path, help="checkpoint (.pt), ONNX (.onnx) or package (.kdpkg)")
    ap.add_argument("--data", type=Path, default=None, help="data root (default: the checkpoint's)")
    ap.add_argument("--classes", default=None, help="comma-separated classes (default: the model's)")
    ap.add_argument("--size", type=int, default=None, help="input side (default: the model's)")
    ap.add_argument("--yardstick", action="store_true", help="also evaluate the kNN yardstick")
    ap.add_argument("--json", type=Path, default=None, help="write the full results as JSON here")
    ap.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    classes = list(parse_classes(args.classes)) if args.classes else None
    results: dict[str, Any] = {}
    try:
        for m in args.models:
            data = args.data or model_data(m)
            if data is None:
                return fail("kdfleet evaluate", f"{m}: give --data (the model does not say where its data is)")
            r = evaluate(m, data, classes, args.size, threads=args.threads or 2)
            results[str(m)] = r
            print(f"## {m}\n\n{format_table(r)}\n")
            if args.yardstick:
                from trainer.yardstick import yardstick_report

                y = yardstick_report(str(data), list(r["classes"]), r["input_size"], threads=args.threads or 2)
                results[f"{m} (kNN yardstick)"] = y
                print(f"## kNN yardstick (same classes, {r['input_size']} px)\n\n{format_table(y)}\n")
    except (ValueError, FileNotFoundError) as exc:
        return fail("kdfleet evaluate", str(exc))
    if args.json:
        from trainer.export import json_safe

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(results), indent=2))
    return 0


def model_data(path: Path) -> str | None:
    """The data root a checkpoint was trained on (None for ONNX files and packages)."""
    if path.suffix in (".onnx", ".kdpkg"):
        return None
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["config"]["data"]


# -- export ---------------------------------------------------------------------

def export_main(argv: list[str] | None = None) -> int:
    from trainer.export import export_onnx, export_package

    ap = argparse.ArgumentParser(
        prog="kdfleet export",
        description="Export a checkpoint to the ONNX inference graph (uint8 NHWC image -> anomaly map at "
                    "stride 4), check it against torch, calibrate and evaluate it through ONNX Runtime, "
                    "and write a model package (.kdpkg) with golden self-test images.")
    ap.add_argument("checkpoint", type=Path, help="a training checkpoint (best.pt)")
    ap.add_argument("--out", type=Path, required=True, help="package path (.kdpkg), or .onnx with --onnx-only")
    ap.add_argument("--data", type=Path, default=None, help="data for calibration (default: the training data)")
    ap.add_argument("--version", default="0.1.0", help="semantic version of the model (default 0.1.0)")
    ap.add_argument("--model-id", default=None, help="model id (default METHOD-BACKBONE-SCOPE-SIZE)")
    ap.add_argument("--parent", default=None, help="version this model derives from")
    ap.add_argument("--key", type=Path, default=None, help="Ed25519 private key (PEM) to sign the package")
    ap.add_argument("--onnx-only", action="store_true", help="write only the checked ONNX graph")
    args = ap.parse_args(argv)
    try:
        if args.onnx_only:
            from trainer.export import check_onnx
            from trainer.train import load_checkpoint

            cfg, model, _ = load_checkpoint(args.checkpoint)
            path = export_onnx(model, cfg.size, args.out)
            check_onnx(path, model, cfg.size)
        else:
            key = None
            if args.key:
                from shared.package import load_private_key

                key = load_private_key(args.key)
            path = export_package(args.checkpoint, args.out, args.data, version=args.version,
                                  model_id=args.model_id, parent=args.parent, key=key)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return fail("kdfleet export", str(exc))
    print(path)
    return 0


# -- demo -----------------------------------------------------------------------

def demo_model_main(argv: list[str] | None = None) -> int:
    from trainer.export import quick_package
    from trainer.train import print_progress

    ap = argparse.ArgumentParser(
        prog="kdfleet trainer demo-model",
        description="The demo's model: a small unified STFPM on every class (128 px, a few epochs), "
                    "calibrated, exported and packed; reused while data and settings are unchanged.")
    ap.add_argument("data", type=Path, help="MVTec-layout data root")
    ap.add_argument("out", type=Path, help="cache folder for runs and packages")
    args = ap.parse_args(argv)
    try:
        path = quick_package(args.data, args.out, progress=print_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return fail("kdfleet trainer demo-model", str(exc))
    print(path)
    return 0
