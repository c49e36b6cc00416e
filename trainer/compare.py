"""`kdfleet compare`: methods unified vs one-class, beside the PatchCore yardstick, into one report folder.

The models are trained first (`--train`, each method's own recipe, finished
runs reused) or given as checkpoints and packages; every one is evaluated on
the same data, the yardstick is fitted once on the classes they cover, and
`trainer.report` writes results.json, report.md and the figures. The command
line entry is `trainer.cli.compare_main`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from trainer.cli import (
    THREADS_HELP,
    WORST,
    describe_model,
    fail,
    log,
    machine_line,
    mode_of,
    parse_classes,
    reference_flag,
)
from trainer.models import METHOD_NAMES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kdfleet compare",
        description="Compare methods unified (one model for all classes) vs one-class (one model per class), "
                    "per class, beside the PatchCore yardstick: writes results.json, report.md (accuracy and cost "
                    "tables) and PNG figures (ROC curves, score histograms, worst-miss heat maps).",
        epilog="Checkpoints trained on several classes count as unified, on one class as one-class; give one "
               "one-class checkpoint per class. With --train, the models are trained first (under --work; a "
               "finished run there is reused) with each method's own recipe (`kdfleet train --help`); "
               "patchcore is fitted, not trained.")
    ap.add_argument("models", nargs="*", type=Path, help="checkpoints (.pt) or packages (.kdpkg)")
    ap.add_argument("--out", type=Path, required=True, help="report folder")
    ap.add_argument("--train", action="store_true", help="train the models instead of taking checkpoints")
    ap.add_argument("--methods", default=",".join(m for m in METHOD_NAMES if m != "patchcore"),
                    help="with --train: default %(default)s (PatchCore is the yardstick beside them)")
    ap.add_argument("--modes", default="unified,one-class", help="with --train: default %(default)s")
    ap.add_argument("--data", type=Path, default=None, help="MVTec-layout root (default: the checkpoints')")
    ap.add_argument("--classes", default="all", help="'all' or a comma-separated list (default all)")
    ap.add_argument("--size", type=int, default=256, help="with --train: input side (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=None, help="with --train: default the method's recipe")
    ap.add_argument("--seed", type=int, default=0, help="training seed and the yardstick's split (default 0)")
    ap.add_argument("--work", type=Path, default=None, help="with --train: runs folder (default OUT/runs)")
    ap.add_argument("--no-yardstick", action="store_true", help="leave out the PatchCore yardstick")
    ap.add_argument("--worst", type=int, default=WORST, help="worst misses shown per class and kind (default "
                                                              "%(default)s)")
    ap.add_argument("--latency-runs", type=int, default=20, help="timed single-image runs (default %(default)s)")
    reference_flag(ap)
    ap.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    args = ap.parse_args(argv)
    if args.train == bool(args.models):
        return fail("kdfleet compare", "give checkpoints or --train (with --data), not both and not neither")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    classes = list(parse_classes(args.classes))
    try:
        if args.train:
            if args.data is None:
                return fail("kdfleet compare", "--train needs --data (an MVTec-layout root)")
            items, data = train_for_compare(args, classes), args.data
        else:
            items, data = checkpoint_items(args.models, args.data, classes)
        command = " ".join(["kdfleet compare", *(sys.argv[1:] if argv is None else argv)])
        meta = {"data": str(data), "machine": machine_line(), "command": command}
        entries = evaluate_items(items, data, classes, args)
        from trainer.report import accuracy_table, cost_table, summary_table, write_report

        write_report(entries, args.out, meta, log)
    except (ValueError, FileNotFoundError) as exc:   # UnknownMethod, DatasetError are ValueErrors
        return fail("kdfleet compare", str(exc))
    print(f"{accuracy_table(entries)}\n\n{summary_table(entries)}\n\n{cost_table(entries)}\n")
    print(args.out / "report.md")
    return 0


def train_for_compare(args: argparse.Namespace, classes: list[str]) -> list[dict[str, Any]]:
    """Train every method x mode (resuming finished runs) and return one item per checkpoint."""
    from trainer.config import TrainConfig
    from trainer.train import one_class_configs, train

    work = args.work or args.out / "runs"
    items = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in METHOD_NAMES:
            raise ValueError(f"--methods: unknown method {method!r}; choose from {', '.join(METHOD_NAMES)}")
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode not in ("unified", "one-class"):
                raise ValueError(f"--modes: unknown mode {mode!r}; choose from unified, one-class")
            cfg = TrainConfig(data=str(args.data), classes=tuple(classes), method=method, size=args.size,
                              epochs=args.epochs, seed=args.seed, threads=args.threads,
                              out=str(work / f"{method}-{mode}"))
            for c in one_class_configs(cfg) if mode == "one-class" else [cfg]:
                tag = f"{method} {mode} ({', '.join(c.classes) or 'all classes'})"
                log(f"training {tag}: {c.epochs} epochs at {c.size} px -> {c.out}")
                t0 = time.monotonic()
                path = train(c, progress=lambda p, tag=tag: p.val_loss is not None and log(
                    f"  {tag}: epoch {p.epoch}/{p.epochs} loss {p.loss:.4f} val {p.val_loss:.4f} "
                    f"eta {p.eta_s:.0f} s"), resume=True)
                items.append({"method": method, "mode": mode, "source": str(path), "path": path,
                              "train_s": time.monotonic() - t0})
    return items


def checkpoint_items(paths: list[Path], data: Path | None,
                     classes: list[str]) -> tuple[list[dict[str, Any]], Path]:
    """One item per given model (method and mode from what it says), and the data root to evaluate on."""
    items, roots = [], set()
    for p in paths:
        method, model_classes, root = describe_model(p)
        if classes and not set(model_classes) & set(classes):
            log(f"skipping {p}: none of its classes ({', '.join(model_classes)}) is among --classes")
            continue
        roots.add(root)
        items.append({"method": method, "mode": mode_of(model_classes), "source": str(p), "path": p,
                      "classes": model_classes})
    if not items:
        raise ValueError("no model covers the chosen --classes")
    if data is None:
        if len(roots) != 1 or None in roots:
            raise ValueError("the models do not name one common data root; give --data")
        data = Path(roots.pop())
    return items, data


def evaluate_items(items: list[dict[str, Any]], data: Path, classes: list[str],
                   args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate every item (and the PatchCore yardstick beside each mode present) into report entries."""
    from trainer.evaluate import evaluate
    from trainer.report import group_entries

    kw = {"details": True, "worst": args.worst, "latency_runs": args.latency_runs, "threads": args.threads or 2,
          "reference": args.reference}
    for n, it in enumerate(items, 1):
        tag = f"{it['method']} {it['mode']} [{n}/{len(items)}]"
        log(f"evaluating {tag}: {it['source']}")
        own = it.get("classes")
        chosen = [c for c in own if c in classes] if classes and own else None
        it["result"] = evaluate(it["path"], data, chosen, None, progress=lambda s, tag=tag: log(f"  {tag}: {s}"),
                                **kw)
    if not args.no_yardstick:
        items += yardstick_items(items, data, args.seed, args.work or args.out / "runs", kw)
    return group_entries([{k: v for k, v in it.items() if k in ("method", "mode", "source", "result", "train_s")}
                          for it in items])


def yardstick_items(items: list[dict[str, Any]], data: Path, seed: int, work: Path,
                    kw: dict[str, Any]) -> list[dict[str, Any]]:
    """The PatchCore yardstick beside every mode present. Its banks are per class, so one fit on every
    covered class is the unified and the one-class model at once: it is fitted (or reused from `work`)
    and evaluated once."""
    from trainer.evaluate import evaluate
    from trainer.config import TrainConfig
    from trainer.train import train

    size = items[0]["result"]["input_size"]
    covered = list(dict.fromkeys(c for it in items for c in it["result"]["classes"]))
    log(f"fitting the PatchCore yardstick on {', '.join(covered)} at {size} px")
    t0 = time.monotonic()
    cfg = TrainConfig(data=str(data), classes=tuple(covered), method="patchcore", size=size, seed=seed,
                      resize=items[0]["result"]["resize"], threads=kw["threads"], out=str(work / "patchcore"))
    path = train(cfg, progress=lambda p: log(f"  yardstick: {p.note}"), resume=True)
    fit_s = time.monotonic() - t0
    r = evaluate(path, data, covered, size, seed=seed, progress=lambda s: log(f"  yardstick: {s}"), **kw)
    out = []
    for mode in dict.fromkeys(it["mode"] for it in items):
        mine = list(dict.fromkeys(c for it in items if it["mode"] == mode for c in it["result"]["classes"]))
        out.append({"method": "patchcore", "mode": mode, "source": str(path), "result": subset(r, mine),
                    "train_s": fit_s})
    return out


def subset(result: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """An evaluation result restricted to `classes`, its means recomputed."""
    from trainer.evaluate import nanmean

    per_class = {c: result["classes"][c] for c in classes}
    mean = {k: nanmean([m[k] for m in per_class.values()]) for k in result["mean"]}
    return {**result, "classes": per_class, "mean": mean,
            "calibration": {c: result["calibration"][c] for c in classes}}
