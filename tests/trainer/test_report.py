"""The comparison report: `kdfleet compare` and `evaluate --report` on tiny checkpoints, tables and figures."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from tests.trainer.tiny_data import make_tiny_set
from trainer.cli import compare_main, evaluate_main
from trainer.report import MEAN_ROW, group_entries, merge_one_class
from trainer.config import TrainConfig
from trainer.train import train

torch.set_num_threads(1)

TINY = dict(size=64, epochs=2, batch_size=8, threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_set(tmp_path_factory.mktemp("tiny"), n_train=12, n_good=4, n_defect=2)


@pytest.fixture(scope="module")
def checkpoints(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A unified STFPM on both classes and a one-class STFPM on `disc` only."""
    run = tmp_path_factory.mktemp("runs")
    unified = train(TrainConfig(data=str(tiny), out=str(run / "unified"), **TINY), progress=None)
    one = train(TrainConfig(data=str(tiny), classes=("disc",), out=str(run / "disc"), **TINY), progress=None)
    return unified, one


@pytest.fixture(scope="module")
def report(checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert compare_main([*map(str, checkpoints), "--out", str(out), "--latency-runs", "2", "--threads", "1",
                         "--worst", "2"]) == 0
    return out


def table_rows(text: str, head: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, rows of cells) of the Markdown table whose header starts with `head`; names may repeat."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[0], rows[2:]


def markdown_table(text: str, head: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, row name -> cells) of the Markdown table whose header line starts with `head`."""
    header, rows = table_rows(text, head)
    return header, {r[0]: r[1:] for r in rows}


def test_compare_writes_the_folder(report: Path) -> None:
    results = json.loads((report / "results.json").read_text())
    assert [(e["method"], e["mode"]) for e in results["entries"]] == [
        ("stfpm", "one-class"), ("stfpm", "unified"), ("patchcore", "one-class"), ("patchcore", "unified")]
    assert (report / "report.md").exists()
    expected = {"roc-disc.png", "roc-stripes.png", "hist-disc.png", "hist-stripes.png", "worst-stfpm-unified.png",
                "worst-stfpm-one-class.png", "worst-patchcore-unified.png", "worst-patchcore-one-class.png"}
    assert set(results["figures"]) == expected
    unified = results["entries"][1]["result"]
    assert set(unified["classes"]) == {"disc", "stripes"} and unified["latency_ms"] > 0 and unified["size_mb"] > 0
    worst = unified["classes"]["disc"]["worst"]
    assert [w["label"] for w in worst] == [0, 0, 1, 1] and "map" not in worst[0]   # arrays stay out of JSON


def test_table_has_the_rows_columns_and_numbers_of_results_json(report: Path) -> None:
    results = json.loads((report / "results.json").read_text())
    head, rows = markdown_table((report / "report.md").read_text(), "| class |")
    assert head[1:] == results["columns"]
    assert len(head) == 1 + 4 * 3
    assert "STFPM one-class: image AUROC" in head and "PatchCore unified: AUPRO" in head
    assert list(rows) == ["disc", "stripes", MEAN_ROW]
    checked = 0
    for e in results["entries"]:
        for key, name in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")):
            col = head.index(f"{e['label']}: {name}") - 1
            for row, cells in rows.items():
                m = e["result"]["mean"] if row == MEAN_ROW else e["result"]["classes"].get(row)
                if m is None or m[key] is None:
                    assert cells[col] == "–"
                else:
                    assert cells[col] == f"{m[key]:.3f}"
                    checked += 1
    assert checked == 3 * (2 + 3 + 2 + 3)   # the one-class entries cover only `disc` (and their mean)
    one_class = results["entries"][0]["result"]
    assert one_class["mean"]["image_auroc"] == one_class["classes"]["disc"]["image_auroc"]
    labels = [e["label"] for e in results["entries"]]
    _, means = markdown_table((report / "report.md").read_text(), "| model | image AUROC |")
    assert list(means) == labels
    assert [r[0] for r in means.values()] == [f"{e['result']['mean']['image_auroc']:.3f}" for e in results["entries"]]
    _, cost = markdown_table((report / "report.md").read_text(), "| model | models |")
    assert list(cost) == labels
    assert [r[3] for r in cost.values()] == [f"{e['result']['latency_ms']:.1f}" for e in results["entries"]]


def test_defect_table_gives_each_defect_type_its_own_auroc(report: Path) -> None:
    results = json.loads((report / "results.json").read_text())
    head, rows = table_rows((report / "report.md").read_text(), "| class | defect |")
    labels = [e["label"] for e in results["entries"]]
    assert head[3:] == labels
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("disc", "scratch", "2"), ("disc", "spot", "2"), ("stripes", "scratch", "2"), ("stripes", "spot", "2")]
    for e in results["entries"]:
        col = 3 + labels.index(e["label"])
        for cls, kind, *_ in rows:
            m = e["result"]["classes"].get(cls)
            want = "–" if m is None else f"{m['defects'][kind]['image_auroc']:.3f}"
            assert [r[col] for r in rows if r[:2] == [cls, kind]] == [want]


def test_defect_aurocs_match_sklearn_per_defect_type() -> None:
    from sklearn.metrics import roc_auc_score

    from shared.metrics import auroc
    from trainer.evaluate import defect_aurocs

    rng = np.random.default_rng(3)
    defects = ["good"] * 20 + ["crack"] * 7 + ["stain"] * 9
    labels = np.array([int(d != "good") for d in defects])
    scores = rng.normal(size=len(defects)) + labels * np.array([0] * 20 + [2] * 7 + [0.3] * 9)
    got = defect_aurocs(scores, labels, defects, auroc)
    assert list(got) == ["crack", "stain"]
    for kind, n in (("crack", 7), ("stain", 9)):
        keep = [i for i, d in enumerate(defects) if d in ("good", kind)]
        assert got[kind]["n"] == n
        assert got[kind]["image_auroc"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]), abs=1e-12)


def test_figures_decode_and_show_something(report: Path) -> None:
    results = json.loads((report / "results.json").read_text())
    for name in results["figures"]:
        img = cv2.imread(str(report / name))
        assert img is not None, name
        assert min(img.shape[:2]) >= 200, (name, img.shape)
        colours = np.unique(img.reshape(-1, 3), axis=0)
        assert img.std() > 10 and len(colours) > 50, name   # not blank: curves, bars or heat maps drawn
        assert f"![{name}]({name})" in (report / "report.md").read_text()


def test_evaluate_report_option(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    assert evaluate_main([str(checkpoints[0]), "--report", str(out), "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [e["label"] for e in results["entries"]] == ["STFPM unified"]
    assert {"roc-disc.png", "hist-stripes.png", "worst-stfpm-unified.png"} <= set(results["figures"])


def result(classes: dict[str, float], latency: float = 10.0) -> dict[str, Any]:
    per = {c: {"image_auroc": v, "pixel_auroc": v, "calibration": {}} for c, v in classes.items()}
    return {"classes": per, "mean": {"image_auroc": 0.0, "pixel_auroc": 0.0}, "latency_ms": latency,
            "size_mb": 2.0, "runtime": "torch", "input_size": 64}


def test_one_class_results_merge_and_conflicts_are_refused() -> None:
    merged = merge_one_class([result({"a": 0.5}, 10.0), result({"b": float("nan")}, 30.0),
                              result({"c": 1.0}, 20.0)])
    assert merged["mean"]["image_auroc"] == 0.75 and merged["latency_ms"] == 20.0 and merged["size_mb"] == 6.0
    assert math.isnan(merged["classes"]["b"]["image_auroc"])
    with pytest.raises(ValueError, match="class 'a' is covered by two"):
        merge_one_class([result({"a": 0.5}), result({"a": 0.6})])
    with pytest.raises(ValueError, match="2 unified rd models"):
        group_entries([{"method": "rd", "mode": "unified", "source": s, "result": result({"a": 1, "b": 1})}
                       for s in ("x.pt", "y.pt")])


def test_compare_refuses_bad_invocations(checkpoints: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert compare_main(["--out", str(tmp_path)]) == 2
    assert "give checkpoints or --train" in capsys.readouterr().err
    assert compare_main([str(tmp_path / "m.onnx"), "--out", str(tmp_path)]) == 2
    assert "no such model file" in capsys.readouterr().err
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert compare_main([str(tmp_path / "m.onnx"), "--out", str(tmp_path)]) == 2
    assert "does not say its method" in capsys.readouterr().err
