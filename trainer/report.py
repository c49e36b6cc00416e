"""The comparison report: evaluate()'s results for several models -> results.json, report.md and figures.

An entry is one method in one mode: {"method", "mode", "label", "sources",
"models", "train_s", "result"}, where `result` has evaluate()'s shape (one
evaluate() call for a unified model; the per-class results of one-class
models merged by `merge_one_class`). Figures need evaluate(details=True,
worst=K): ROC curves and score histograms per class, and per entry a grid of
heat-map overlays of its worst misses. Matplotlib draws on `Figure` objects
(the Agg canvas, no pyplot state), so this runs headless.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from shared.imaging import read_image
from shared.vocabulary import METHODS

METHOD_LABELS = {"stfpm": "STFPM", "rd": "RD", "us": "US", "patchcore": "PatchCore"}
ORDER = METHODS    # trained methods first, the yardstick beside them
MODES = ("one-class", "unified")
METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"))
MEAN_ROW = "**mean**"


def mode_of(classes: Iterable[str]) -> str:
    """A model trained on several classes is unified; on one, one-class."""
    return "unified" if len(list(classes)) > 1 else "one-class"


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the finite values; NaN when there are none (no warning)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def merge_one_class(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from per-class models: classes joined, mean recomputed, median latency, summed size."""
    classes: dict[str, Any] = {}
    for r in results:
        for cls, m in r["classes"].items():
            if cls in classes:
                raise ValueError(f"class {cls!r} is covered by two one-class models; give one model per class")
            classes[cls] = m
    merged = dict(results[0])
    merged.update(
        classes=classes,
        mean={k: nanmean(m[k] for m in classes.values()) for k in results[0]["mean"]},
        calibration={c: m["calibration"] for c, m in classes.items()},
        latency_ms=float(np.median([r["latency_ms"] for r in results])),
        size_mb=float(sum(r["size_mb"] for r in results)),
    )
    return merged


def group_entries(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries from evaluated models {"method", "mode", "source", "result", "train_s"?}, one per method x mode."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for it in items:
        groups.setdefault((it["method"], it["mode"]), []).append(it)
    entries = []
    for (method, mode), group in groups.items():
        if mode == "unified" and len(group) > 1:
            raise ValueError(f"{len(group)} unified {method} models ({', '.join(g['source'] for g in group)}); "
                             "give one per method")
        result = group[0]["result"] if mode == "unified" else merge_one_class([g["result"] for g in group])
        train = [g.get("train_s") for g in group]
        entries.append({
            "method": method, "mode": mode, "label": f"{METHOD_LABELS.get(method, method)} {mode}",
            "sources": [g["source"] for g in group], "models": len(group),
            "train_s": None if None in train else float(sum(train)), "result": result,
        })
    return sorted(entries, key=entry_key)


def entry_key(e: dict[str, Any]) -> tuple[int, int]:
    m = ORDER.index(e["method"]) if e["method"] in ORDER else len(ORDER)
    return m, MODES.index(e["mode"])


def class_names(entries: list[dict[str, Any]]) -> list[str]:
    """Every class any entry covers, in first-seen order."""
    return list(dict.fromkeys(c for e in entries for c in e["result"]["classes"]))


# -- tables ----------------------------------------------------------------------

def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def accuracy_columns(entries: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(entry index, metric key, header) for every entry x metric, in table order."""
    return [(i, k, f"{e['label']}: {name}") for i, e in enumerate(entries) for k, name in METRICS]


def accuracy_rows(entries: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Row name -> the values of `accuracy_columns`, classes then the mean; None where a class is not covered."""
    rows = {}
    for cls in [*class_names(entries), MEAN_ROW]:
        vals = []
        for i, key, _ in accuracy_columns(entries):
            r = entries[i]["result"]
            m = r["mean"] if cls == MEAN_ROW else r["classes"].get(cls)
            vals.append(None if m is None else m[key])
        rows[cls] = vals
    return rows


def accuracy_table(entries: list[dict[str, Any]]) -> str:
    """Per-class Markdown table: rows classes + mean, columns method x mode x {image AUROC, pixel AUROC, AUPRO}."""
    heads = [h for _, _, h in accuracy_columns(entries)]
    lines = ["| class | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    lines += [f"| {cls} | " + " | ".join(fmt(v) for v in vals) + " |" for cls, vals in accuracy_rows(entries).items()]
    return "\n".join(lines)


def defect_table(entries: list[dict[str, Any]]) -> str:
    """Image AUROC per class and defect type (rows), one column per entry; `–` where an entry lacks the class."""
    kinds: dict[tuple[str, str], int] = {}
    for e in entries:
        for cls, m in e["result"]["classes"].items():
            for kind, d in m.get("defects", {}).items():
                kinds.setdefault((cls, kind), d["n"])
    lines = ["| class | defect | images | " + " | ".join(e["label"] for e in entries) + " |",
             "|---|---|---:|" + "---:|" * len(entries)]
    for (cls, kind), n in kinds.items():
        vals = [e["result"]["classes"].get(cls, {}).get("defects", {}).get(kind, {}).get("image_auroc")
                for e in entries]
        lines.append(f"| {cls} | {kind} | {n} | " + " | ".join(fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def summary_table(entries: list[dict[str, Any]]) -> str:
    """One row per entry: the class means of every metric."""
    keys = (*METRICS, ("f1_max", "F1-max"))
    lines = ["| model | " + " | ".join(name for _, name in keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {e['label']} | " + " | ".join(fmt(e["result"]["mean"][k]) for k, _ in keys) + " |" for e in entries]
    return "\n".join(lines)


def cost_table(entries: list[dict[str, Any]]) -> str:
    """Latency per image (batch 1), throughput, model size and training time per entry."""
    lines = ["| model | models | runtime | input px | latency ms/image | images/s | size MB | train s |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for e in entries:
        r = e["result"]
        lines.append(f"| {e['label']} | {e['models']} | {r['runtime']} FP32 | {r['input_size']} | "
                     f"{fmt(r['latency_ms'], 1)} | {fmt(1000 / r['latency_ms'], 1)} | {fmt(r['size_mb'], 1)} | "
                     f"{fmt(e['train_s'], 1)} |")
    return "\n".join(lines)


# -- figures -----------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.figure import Figure   # Agg canvas on savefig; no pyplot, no global state

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def has_both(m: dict[str, Any]) -> bool:
    labels = m.get("labels") or []
    return 0 < sum(labels) < len(labels)


def plot_roc(entries: list[dict[str, Any]], cls: str, path: Path) -> Path:
    """ROC curves of every entry on one class's test images."""
    from shared.metrics import roc_curve

    fig = _figure(5.5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    for e in entries:
        m = e["result"]["classes"].get(cls)
        if m and has_both(m):
            fpr, tpr, _ = roc_curve(m["scores"], m["labels"])
            ax.plot(fpr, tpr, lw=1.5, label=f"{e['label']} ({fmt(m['image_auroc'])})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (normal images flagged)",
           ylabel="true-positive rate (anomalies flagged)", title=f"{cls}: image-level ROC (AUROC)")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path)
    return path


def plot_histograms(entries: list[dict[str, Any]], cls: str, path: Path) -> Path:
    """One panel per entry: normal vs anomalous image scores, the calibrated threshold as a line."""
    shown = [e for e in entries if cls in e["result"]["classes"] and "scores" in e["result"]["classes"][cls]]
    cols = min(3, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, e in zip(axes, shown, strict=False):
        m = e["result"]["classes"][cls]
        s, y = np.asarray(m["scores"]), np.asarray(m["labels"])
        thr = m["calibration"]["threshold"]
        bins = np.linspace(min(s.min(), thr), max(s.max(), thr), 25)
        ax.hist(s[y == 0], bins, alpha=0.6, color="tab:blue", label=f"normal ({(y == 0).sum()})")
        ax.hist(s[y == 1], bins, alpha=0.6, color="tab:red", label=f"anomalous ({(y == 1).sum()})")
        ax.axvline(thr, color="black", ls="--", lw=1.2, label="calibrated threshold")
        ax.set(title=e["label"], xlabel="image score", ylabel="images")
        ax.legend(fontsize=7)
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    fig.suptitle(f"{cls}: image scores on the test split")
    fig.savefig(path)
    return path


def overlay(sample: dict[str, Any], calibration: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The test image resized to its map's grid, and the map scaled so the threshold sits at 0.5."""
    amap = np.asarray(sample["map"], np.float32)
    h, w = amap.shape
    img = cv2.resize(read_image(sample["path"]), (w, h), interpolation=cv2.INTER_AREA)
    lo, scale = calibration["center"], max(calibration["scale"], 1e-12)
    return img, np.clip((amap - lo) / (2 * scale), 0, 1)


def plot_worst(entry: dict[str, Any], path: Path) -> Path | None:
    """Rows: classes; columns: the highest-scored normals, then the lowest-scored anomalies, heat maps overlaid."""
    classes = {c: m["worst"] for c, m in entry["result"]["classes"].items() if m.get("worst")}
    if not classes:
        return None
    from matplotlib import colormaps

    cols = max(len(w) for w in classes.values())
    fig = _figure(2.2 * cols, 2.4 * len(classes))
    axes = np.array(fig.subplots(len(classes), cols, squeeze=False))
    for row, (cls, worst) in zip(axes, classes.items(), strict=True):
        cal = entry["result"]["classes"][cls]["calibration"]
        for ax, s in zip(row, worst, strict=False):
            img, heat = overlay(s, cal)
            rgba = colormaps["jet"](heat)
            rgba[..., 3] = 0.7 * heat            # low scores transparent: the image shows where all is normal
            ax.imshow(img)
            ax.imshow(rgba)
            mask = np.asarray(s["mask"])
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
            missed = (s["score"] > cal["threshold"]) != bool(s["label"])
            ax.set_title(f"{cls} {s['defect']}\n{s['score']:.3g} (thr {cal['threshold']:.3g})"
                         f"{' miss' if missed else ''}", fontsize=7,
                         color="red" if missed else "black")
        for ax in row:
            ax.set_axis_off()
    fig.suptitle(f"{entry['label']}: highest-scored normals, lowest-scored anomalies (red: wrong side of the "
                 "threshold; heat 0.5 = threshold; green: true defect)", fontsize=8)
    fig.savefig(path)
    return path


def write_figures(entries: list[dict[str, Any]], out: Path,
                  progress: Callable[[str], None] | None = None) -> list[str]:
    """ROC and histogram PNGs per class, a worst-misses grid per entry; returns the file names."""
    names = []
    for cls in class_names(entries):
        if progress:
            progress(f"figures for {cls}")
        if any(has_both(e["result"]["classes"].get(cls, {})) for e in entries):
            names.append(plot_roc(entries, cls, out / f"roc-{cls}.png").name)
        if any("scores" in e["result"]["classes"].get(cls, {}) for e in entries):
            names.append(plot_histograms(entries, cls, out / f"hist-{cls}.png").name)
    for e in entries:
        p = plot_worst(e, out / f"worst-{e['method']}-{e['mode']}.png")
        if p:
            names.append(p.name)
    return names


# -- the folder ------------------------------------------------------------------

def jsonable(x: Any) -> Any:
    """Strict JSON: NaN/inf to None, numpy scalars to Python; arrays (maps, masks) left out."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items() if not isinstance(v, np.ndarray)}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def report_markdown(results: dict[str, Any]) -> str:
    """report.md from the results.json dict."""
    entries = results["entries"]
    figs = results["figures"]
    lines = [
        "# Per-class comparison: unified vs one-class, beside the PatchCore yardstick", "",
        f"Data `{results['data']}`, test split; {results['created']}. Machine: {results['machine']}.", "",
        "## Accuracy", "",
        "Image AUROC, pixel AUROC and AUPRO (FPR limit 0.3) per class and their mean over classes. "
        "PatchCore is the memory-bank yardstick on the same frozen teacher (one bank per class, so its "
        "unified and one-class rows are one model).", "",
        accuracy_table(entries), "",
        "Class means, and F1-max (the best F1 over thresholds chosen on the test labels, so not a "
        "deployable figure):", "",
        summary_table(entries), "",
        "Image AUROC per defect type: each type's images against all normal test images of their class.", "",
        defect_table(entries), "",
        "## Cost", "",
        "Latency: median of single-image runs (batch 1) on this CPU, FP32. One-class size is the sum over "
        "its models.", "",
        cost_table(entries), "",
        "## Figures", "",
        "Thresholds are the shipped ones: calibrated per class on held-out normal training images, "
        "never on the test labels.", "",
    ]
    lines += [f"![{f}]({f})" for f in figs if f.startswith(("roc-", "hist-", "worst-"))]
    return "\n".join(lines) + "\n"


def write_report(entries: list[dict[str, Any]], out: str | Path, meta: dict[str, Any],
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write results.json, report.md and the PNGs under `out`; returns the results.json dict.

    meta: at least "data" and "machine" (a one-line description).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(entries, out, progress)
    results = jsonable({"created": time.strftime("%Y-%m-%d %H:%M:%S"), **meta,
                        "columns": [h for _, _, h in accuracy_columns(entries)],
                        "entries": entries, "figures": figures})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report_markdown(results))
    return results
