"""`kdfleet agent bench` end to end on a tiny trained model: both runs, every result delivered, a table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

pytest.importorskip("torch")

from tests.trainer.tiny_data import make_tiny_set
from trainer.export import quick_package


def test_bench_measures_the_agent_against_pytorch_eager(tmp_path: Path, broker) -> None:
    tiny = make_tiny_set(tmp_path / "tiny", n_train=12, n_good=4, n_defect=2)
    package = quick_package(tiny, tmp_path / "models", size=64, epochs=1)
    checkpoint = Path(json.loads(package.with_suffix(".json").read_text())["config"]["out"]) / "best.pt"
    frames = tmp_path / "frames"
    frames.mkdir()
    tests = sorted((tiny / "disc" / "test").rglob("*.png"))
    for i in range(40):
        cv2.imwrite(str(frames / f"{i:03d}.jpg"), cv2.imread(str(tests[i % len(tests)])))
    out = tmp_path / "bench.json"
    # in its own process, as a user runs it: the bench's agents and consumers leave nothing behind here
    bench = subprocess.run([sys.executable, "-m", "bench.agent", "--package", str(package), "--checkpoint",
                            str(checkpoint), "--folder", str(frames), "--cls", "disc", "--threads", "1",
                            "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["runtime"] for r in runs] == ["onnxruntime", "pytorch-fp32-eager"]
    for r in runs:
        assert r["spooled"] == r["frames"] == 40 and r["skipped"] == r["dropped"] == 0
        assert r["fps"] > 0 and 50 < r["peak_rss_mb"] < 4000
        assert set(r["stages"]) == {"decode", "letterbox", "infer", "score", "render", "encode", "spool"}
        assert r["pipeline"]["infer_ms"]["p50"] > 0
    assert runs[1]["peak_rss_mb"] > runs[0]["peak_rss_mb"]   # torch is the heavier process
    table = bench.stdout
    assert "frames/s" in table and "ratio" in table and "peak RSS <= 400 MB" in table
    assert "the targets are stated for int8 at 256 px" in table
