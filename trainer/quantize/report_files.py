"""The quantisation report as files: the Markdown tables (one row per method x recipe), the per-class
drops against FP32, report.json and the AUROC-versus-size and -latency plots.

Reads only the report dictionaries `trainer.quantize.report.quantize_report` assembles.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def format_table(reports: list[dict[str, Any]]) -> str:
    """The Tables 4-6 shaped Markdown table over one or more methods' reports."""
    head = ("| method | precision | recipe | image AUROC | pixel AUROC | AUPRO | Δ image | Δ pixel | size MB | "
            "p50 ms | p95 ms | img/s | × torch eager | × ORT FP32 | OpenVINO p50 ms |")
    lines = [head, "|" + "---|" * 15]
    for rep in reports:
        e = rep["torch_eager"]
        lines.append(f"| {rep['method']} | fp32 | torch eager | = fp32 | = fp32 | = fp32 | | | {e['size_mb']:.2f} | "
                     f"{e['p50_ms']:.2f} | {e['p95_ms']:.2f} | {e['images_per_s']:.0f} | 1.00 | | |")
        for r in rep["rows"]:
            lines.append(
                f"| {r['method']} | {r['precision']} | {r['recipe']} | {_f(r['image_auroc'], '.3f')} | "
                f"{_f(r['pixel_auroc'], '.3f')} | {_f(r['aupro'], '.3f')} | {_f(r['drop_image_auroc'], '+.3f')} | "
                f"{_f(r['drop_pixel_auroc'], '+.3f')} | {r['size_mb']:.2f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                f"{r['images_per_s']:.0f} | {r['speedup_vs_torch']:.2f} | {r['speedup_vs_ort_fp32']:.2f} | "
                f"{_f(r.get('openvino_p50_ms'), '.2f')} |")
    return "\n".join(lines)


def format_markdown(reports: list[dict[str, Any]]) -> str:
    """The whole report: header with the machine's load, the table, mixed-precision trade-off, QAT history."""
    first = reports[0]
    m = first["machine"]
    others = [r["other_cpu"] for rep in reports for r in rep["rows"] if r["other_cpu"] is not None]
    other = float(np.mean(others)) if others else float("nan")
    parts = [
        "# Quantisation report", "",
        f"Input {first['input_size']} px, classes {', '.join(first['classes'])}; {m['timing']}; "
        f"ONNX Runtime {m['onnxruntime']}, PyTorch {m['torch']}; CPU {m['cpu']}.",
        f"Load average before {m['load_before']['loadavg_1m']:.2f}, after {m['load_after']['loadavg_1m']:.2f} "
        f"({m['load_before']['cpus']:.0f} CPUs); other processes used {other:.2f} "
        "cores on average while variants were timed.",
        "Δ = FP32 (ONNX Runtime) minus the variant: positive is a loss. × = median latency ratio (higher is faster).",
        "", format_table(reports), "",
    ]
    for rep in reports:
        parts += per_class_drops(rep)
        if rep["mixed_tradeoff"]:
            parts += [f"## {rep['method']}: layers kept FP32 (mixed precision)", "",
                      "| kept | FP32 params | map error | image AUROC | pixel AUROC | size MB | p50 ms |",
                      "|" + "---|" * 7]
            for t in rep["mixed_tradeoff"]:
                parts.append(f"| {t['keep']} | {t['fp32_param_share']:.1%} | {t['map_error']:.4f} | "
                             f"{_f(t['image_auroc'], '.3f')} | {_f(t['pixel_auroc'], '.3f')} | {t['size_mb']:.2f} | "
                             f"{t['p50_ms']:.2f} |")
            parts.append("")
        qat = rep["details"].get("qat")
        if qat:
            hist = ", ".join(f"{h['epoch']}: {_f(h['val_loss'], '.4f')}" for h in qat["history"])
            ft = qat["fine_tuned_fp32"]
            parts += [f"## {rep['method']}: QAT", "",
                      f"Validation loss per epoch (0 = calibrated, before fine-tuning): {hist}.",
                      f"The fine-tuned weights with fake-quant off: image AUROC {_f(ft['image_auroc'], '.3f')}, "
                      f"pixel AUROC {_f(ft['pixel_auroc'], '.3f')}, AUPRO {_f(ft['aupro'], '.3f')} (the part of "
                      "the change that is the fine-tune's, not quantisation's).", ""]
        int4 = rep["details"].get("int4")
        if int4 and "int4_weights" in int4:
            w = int4["int4_weights"]
            parts += [f"## {rep['method']}: INT4 weights (accuracy experiment)", "",
                      f"{w['layers_4bit']} convolutions on a 4-bit grid, stored and run as int8 (same speed and file "
                      f"as INT8); packed 4-bit weights would take {w['int4_weight_mb']:.2f} MB instead of "
                      f"{w['int8_weight_mb']:.2f} MB.", ""]
    return "\n".join(parts)


def per_class_drops(rep: dict[str, Any]) -> list[str]:
    """Each variant's image / pixel AUROC per class with its drop against FP32: a mean can hide one class."""
    per, classes = rep["per_class"], rep["classes"]
    if len(classes) < 2 or "fp32" not in per:
        return []
    lines = [f"## {rep['method']}: per class, image / pixel AUROC (Δ against FP32)", "",
             "| recipe | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    for recipe, got in per.items():
        cells = []
        for c in classes:
            m, f = got.get(c, {}), per["fp32"].get(c, {})
            cell = f"{_f(m.get('image_auroc'), '.3f')} / {_f(m.get('pixel_auroc'), '.3f')}"
            if recipe != "fp32" and m.get("image_auroc") is not None and f.get("image_auroc") is not None:
                dp = ("" if m.get("pixel_auroc") is None or f.get("pixel_auroc") is None
                      else f" / {f['pixel_auroc'] - m['pixel_auroc']:+.3f}")
                cell += f" ({f['image_auroc'] - m['image_auroc']:+.3f}{dp})"
            cells.append(cell)
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(reports: list[dict[str, Any]], out: Path) -> list[Path]:
    """AUROC vs size and AUROC vs latency scatter plots, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, name in (("size_mb", "model size (MB)", "auroc_vs_size.png"),
                               ("p50_ms", "median latency, batch 1 (ms)", "auroc_vs_latency.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for rep in reports:
            rows = [r for r in rep["rows"] if r["image_auroc"] is not None]
            pts = ax.scatter([r[xkey] for r in rows], [r["image_auroc"] for r in rows], label=rep["method"])
            for r in rows:
                ax.annotate(r["recipe"], (r[xkey], r["image_auroc"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=pts.get_facecolor()[0])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("image AUROC")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def write_report(report: dict[str, Any] | list[dict[str, Any]], out: str | Path) -> None:
    """report.md, report.json and the two plots for one report or several methods' reports."""
    out = Path(out)
    reports = report if isinstance(report, list) else [report]
    (out / "report.json").write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    (out / "report.md").write_text(format_markdown(reports) + "\n")
    plot(reports, out)
