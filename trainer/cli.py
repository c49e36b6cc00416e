"""The trainer's commands: `kdfleet data | train | evaluate | compare | export` (and `demo-model` for the demo).

Each `*_main(argv)` parses its own arguments and returns an exit code; results
a script may want (checkpoint and package paths) go to stdout, the last line
being the main one; progress and messages go to stderr. `compare_main` hands
over to compare.py, where `kdfleet compare` trains, evaluates and reports.
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

from shared.imaging import RESIZE_MODES
from shared.scoring import REFERENCE_CHOICES
from trainer.models import METHOD_NAMES

EPILOG_DATA = "The set follows the MVTec AD layout: OUT/CLASS/{train/good, test/<defect>, ground_truth/<defect>}."


THREADS_HELP = ("CPU threads for torch (default: one per core); use 1 when other work shares the cores: "
                "busy cores make multi-threaded steps several times slower")


def fail(prog: str, msg: str) -> int:
    print(f"{prog}: {msg}", file=sys.stderr)
    return 2


def reference_flag(ap: argparse.ArgumentParser) -> None:
    """--reference: whether each class's position reference is used (trainer.evaluate.reference_trial)."""
    ap.add_argument("--reference", choices=REFERENCE_CHOICES, default="auto",
                    help="each class's position reference: auto keeps it where it scores synthetic anomalies on "
                         "held-out normal images better than the raw map; on / off for every class "
                         "(default %(default)s)")


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
    from trainer.config import TrainConfig
    from trainer.train import one_class_configs, train

    d = TrainConfig.__dataclass_fields__
    ap = argparse.ArgumentParser(
        prog="kdfleet train",
        description="Train a knowledge-distillation anomaly model (or fit a PatchCore memory bank) on normal images. "
                    "unified: one model for all the chosen classes; one-class: one model per class.",
        epilog="Checkpoints: OUT/best.pt (lowest validation loss) and OUT/last.pt (for --resume); "
               "one-class mode writes OUT/CLASS/. Prints the best checkpoint path(s).")
    ap.add_argument("--method", choices=METHOD_NAMES, default="stfpm",
                    help="default stfpm; patchcore is fitted in one pass, no epochs")
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout data root")
    ap.add_argument("--classes", default="all", help="'all' or a comma-separated list (default all)")
    ap.add_argument("--mode", choices=("unified", "one-class"), default="unified", help="default unified")
    ap.add_argument("--epochs", type=int, default=None, help="default: the method's recipe (" + ", ".join(
        f"{m} {recipe_of(m)['epochs']}" for m in METHOD_NAMES if recipe_of(m).get("epochs")) + ")")
    ap.add_argument("--size", type=int, default=d["size"].default,
                    help="input side, a multiple of 32 (default %(default)s)")
    ap.add_argument("--resize", choices=RESIZE_MODES, default=d["resize"].default,
                    help="how a frame becomes the square input: stretch (every pixel used) or letterbox "
                         "(aspect kept, reflected border); the package tells the agent (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="default %(default)s")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default=None, help="default: the method's recipe")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's recipe)")
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
    try:
        cfg = TrainConfig(
            data=str(args.data), classes=parse_classes(args.classes), method=args.method, model=model,
            size=args.size, resize=args.resize, epochs=args.epochs, batch_size=args.batch_size,
            optimizer=args.optimizer, lr=args.lr,
            seed=args.seed, hflip=args.hflip, vflip=args.vflip, brightness=args.brightness,
            out=str(args.out or Path("runs") / f"{args.method}-{args.mode}"), threads=args.threads)
        configs = one_class_configs(cfg) if args.mode == "one-class" else [cfg]
        for c in configs:
            print(f"training {c.method} on {', '.join(c.classes) or 'all classes'} -> {c.out}", file=sys.stderr)
            print(train(c, progress=expected_time_first(), resume=args.resume), flush=True)
    except (ValueError, FileNotFoundError) as exc:   # UnknownMethod, DatasetError, BackboneError: ValueErrors
        return fail("kdfleet train", str(exc))
    return 0


def recipe_of(method: str) -> dict[str, Any]:
    """A method's training recipe, the general defaults filled in (`trainer.config.RECIPE`)."""
    from trainer.models import get_method
    from trainer.config import RECIPE

    return {**RECIPE, **get_method(method).recipe} if get_method(method).trained else {}


ETA_AFTER_STEPS = 3   # steps timed before the whole run is estimated (the first ones run slow while warming up)


def expected_time_first() -> Any:
    """Progress lines, the first of them the run's expected time once its first steps are timed: a full
    recipe at 256 px takes hours on a small CPU, which nobody should find out at the end."""
    from trainer.train import print_progress

    told = False

    def progress(p: Any) -> None:
        nonlocal told
        if not told and (p.note or p.val_loss is not None or p.step >= ETA_AFTER_STEPS):
            told = True
            what = "fitting" if p.note else f"{p.epochs} epochs of {p.steps} steps"
            print(f"{chr(10) if sys.stderr.isatty() else ''}expected time: about {duration(p.eta_s)} more "
                  f"({what}); fewer --epochs or a smaller --size shorten it (a first look: --epochs 8 --size 128)",
                  file=sys.stderr, flush=True)
        print_progress(p)

    return progress


def duration(seconds: float) -> str:
    """'40 s', '12 min', '1 h 55 min'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


# -- evaluate -------------------------------------------------------------------

def evaluate_main(argv: list[str] | None = None) -> int:
    from trainer.evaluate import evaluate, format_table

    ap = argparse.ArgumentParser(
        prog="kdfleet evaluate",
        description="Evaluate models on an MVTec-layout set: image/pixel AUROC, AUPRO@0.3, F1-max per class "
                    "and mean, per-class calibration, latency and size.",
        epilog="Give several one-class checkpoints to evaluate each on its own class(es). --yardstick adds "
               "the memory-bank yardstick (PatchCore on the same teacher, fitted on the spot) and says where a "
               "trained model falls below it. Progress goes to stderr, tables to stdout.")
    ap.add_argument("models", nargs="+", type=Path, help="checkpoint (.pt), ONNX (.onnx) or package (.kdpkg)")
    ap.add_argument("--data", type=Path, default=None, help="data root (default: the checkpoint's)")
    ap.add_argument("--classes", default=None, help="comma-separated classes (default: the model's)")
    ap.add_argument("--size", type=int, default=None, help="input side (default: the model's)")
    ap.add_argument("--yardstick", action="store_true", help="also evaluate the PatchCore yardstick")
    ap.add_argument("--resize", choices=RESIZE_MODES, default=None,
                    help="how frames become the input of an .onnx file (checkpoints and packages say it themselves; "
                         "default for .onnx: letterbox)")
    ap.add_argument("--json", type=Path, default=None, help="write the full results as JSON here")
    ap.add_argument("--report", type=Path, default=None, metavar="DIR",
                    help="also write a report folder (results.json, report.md, ROC / histogram / worst-miss "
                         "PNGs), as `kdfleet compare` does")
    reference_flag(ap)
    ap.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    classes = list(parse_classes(args.classes)) if args.classes else None
    extra: dict[str, Any] = {"details": True, "worst": WORST} if args.report else {}
    extra["reference"] = args.reference
    if args.resize:
        extra["resize"] = args.resize
    results: dict[str, Any] = {}
    items: list[dict[str, Any]] = []
    try:
        for m in args.models:
            data = args.data or model_data(m)
            if data is None:
                return fail("kdfleet evaluate", f"{m}: give --data (the model does not say where its data is)")
            log(f"evaluating {m} on {data}")
            r = evaluate(m, data, classes, args.size, threads=args.threads or 2,
                         progress=lambda s, m=m: log(f"  {m.name}: {s}"), **extra)
            results[str(m)] = r
            method = describe_model(m)[0] if m.suffix != ".onnx" else m.stem
            items.append({"method": method, "mode": mode_of(r["classes"]), "source": str(m), "result": r})
            print(f"## {m}\n\n{format_table(r)}\n")
            yard = None
            if args.yardstick:
                from trainer.yardstick import yardstick_report

                log(f"fitting the PatchCore yardstick on {', '.join(r['classes'])} at {r['input_size']} px")
                yard = yardstick_report(str(data), list(r["classes"]), r["input_size"], threads=args.threads or 2,
                                        progress=lambda s: log(f"  yardstick: {s}"),
                                        **{**extra, "resize": r["resize"]})
                results[f"{m} (yardstick)"] = yard
                items.append({"method": "patchcore", "mode": mode_of(r["classes"]),
                              "source": f"PatchCore yardstick for {m}", "result": yard})
                print(f"## PatchCore yardstick (same classes, {r['input_size']} px)\n\n{format_table(yard)}\n")
            for line in verdicts(r, yard, method):
                print(line)
        if args.report:
            from trainer.report import group_entries, write_report

            data = args.data or model_data(args.models[0])
            write_report(group_entries(items), args.report, {"data": str(data), "machine": machine_line()}, log)
            print(args.report / "report.md")
    except (ValueError, FileNotFoundError) as exc:
        return fail("kdfleet evaluate", str(exc))
    if args.json:
        from trainer.jsonsafe import json_safe
        from trainer.report import jsonable

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(jsonable(results)), indent=2))
    return 0


# how far below the yardstick a trained model may score before the verdict says so (sampling noise of
# AUROC on a few dozen test images is about this large)
YARDSTICK_SLACK = 0.01


def verdicts(result: dict[str, Any], yardstick: dict[str, Any] | None, method: str) -> list[str]:
    """Plain sentences on what a user should worry about: below the yardstick, thresholds that catch nothing."""
    out = []
    for cls, m in result["classes"].items():
        if m.get("n_anomalous") and m.get("tpr_at_threshold") == 0:
            out.append(f"verdict: class {cls}: the shipped threshold catches none of its {m['n_anomalous']} "
                       f"defective test images (image AUROC {m['image_auroc']:.3f}); lower it with the agent's "
                       f"threshold override or retrain with more normal images")
    if yardstick is not None and method != "patchcore":
        for key, name in (("image_auroc", "image"), ("pixel_auroc", "pixel")):
            mine, ref = result["mean"][key], yardstick["mean"][key]
            if math.isfinite(mine) and math.isfinite(ref) and mine < ref - YARDSTICK_SLACK:
                worst = sorted(((m[key] - yardstick["classes"][c][key], c) for c, m in result["classes"].items()
                                if math.isfinite(m[key]) and math.isfinite(yardstick["classes"][c][key])))[:1]
                where = f"; furthest behind on {worst[0][1]} ({worst[0][0]:+.3f})" if worst else ""
                out.append(f"verdict: {method} scores below the PatchCore yardstick on {name} AUROC "
                           f"({mine:.3f} vs {ref:.3f}){where}: the student has not learned what the teacher's "
                           f"features separate; the yardstick itself is deployable (--method patchcore)")
    if not out:
        out.append("verdict: no class below the yardstick and every shipped threshold catches defects"
                   if yardstick is not None else "verdict: every shipped threshold catches defects")
    return out


def log(msg: str) -> None:
    """A progress line on stderr with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mode_of(classes: Any) -> str:
    from trainer.report import mode_of as _mode_of

    return _mode_of(classes)


def machine_line() -> str:
    import platform

    import torch

    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s){load}")


def describe_model(path: Path) -> tuple[str, list[str], str | None]:
    """(method, classes, data root or None) that a checkpoint or package says about itself."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix == ".kdpkg":
        from shared.package import read_package

        man = read_package(path).manifest
        return man.method, list(man.classes), None
    if path.suffix == ".onnx":
        raise ValueError(f"{path}: an ONNX file does not say its method or classes; give its checkpoint (.pt) "
                         "or package (.kdpkg)")
    import torch

    cfg = torch.load(path, map_location="cpu", weights_only=True)["config"]
    return cfg["method"], list(cfg["classes"]), cfg["data"]


def model_data(path: Path) -> str | None:
    """The data root a checkpoint was trained on (None for ONNX files and packages)."""
    if path.suffix in (".onnx", ".kdpkg"):
        return None
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["config"]["data"]


# -- compare --------------------------------------------------------------------

WORST = 3   # worst misses per class and kind (normal, anomalous) in the overlay grids


def compare_main(argv: list[str] | None = None) -> int:
    """`kdfleet compare`: its parser and its work are in trainer/compare.py."""
    from trainer.compare import main

    return main(argv)


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
            from trainer.checkpoint import load_checkpoint

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
