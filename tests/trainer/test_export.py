"""Export: the ONNX graph contract, ONNX Runtime vs torch, the package, the demo preset and the CLI."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from shared.imaging import decode_image
from shared.package import read_package
from shared.scoring import ClassCalibration, fit_reference, image_score, package_score
from tests.trainer.tiny_data import make_tiny_set
from trainer.evaluate import evaluate, leave_one_out
from trainer.export import OPSET, check_onnx, export_onnx, export_package, quick_package
from trainer.models import build_model, model_config
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.train import train

torch.set_num_threads(1)   # one thread: robust when other processes share the cores (quick_threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_set(tmp_path_factory.mktemp("tiny"), n_train=20, n_good=4, n_defect=2)   # 4 held out


@pytest.fixture(scope="module")
def checkpoint(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(data=str(tiny), out=str(tmp_path_factory.mktemp("run")), size=64, epochs=2,
                      batch_size=8, threads=1)
    return train(cfg, progress=None)


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_graph_contract(tmp_path: Path, combine: str) -> None:
    model = build_model(model_config("stfpm", {"combine": combine}))
    path = export_onnx(model, 96, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [96, 96, 3] and isinstance(dims[0], str)        # dynamic batch
    assert out.name == "anomaly_map" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in out.type.tensor_type.shape.dim][1:] == [1, 24, 24]
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Pad", "Shape", "ConstantOfShape", "If", "Loop"}   # static graph: no shape logic
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        frames = np.random.default_rng(n).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        (amap,) = sess.run(None, {"image": frames})
        assert amap.shape == (n, 1, 24, 24) and amap.dtype == np.float32
    check_onnx(path, model, 96, batch=3)   # raises ExportError beyond 1e-3 of the map's range


def test_onnx_and_torch_evaluate_alike(checkpoint: Path, tiny: Path, tmp_path: Path) -> None:
    cfg, model, _ = load_checkpoint(checkpoint)
    path = export_onnx(model, cfg.size, tmp_path / "m.onnx")
    a = evaluate(checkpoint, tiny, latency_runs=1, details=True)
    b = evaluate(path, tiny, latency_runs=1, details=True, resize=cfg.resize)   # a bare ONNX file does not say
    assert (a["runtime"], b["runtime"]) == ("torch", "onnxruntime")
    for cls in a["classes"]:
        np.testing.assert_allclose(a["classes"][cls]["scores"], b["classes"][cls]["scores"], rtol=1e-4, atol=1e-6)
        for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert a["classes"][cls][k] == pytest.approx(b["classes"][cls][k], abs=1e-3)
        for k in ("center", "threshold"):
            assert a["calibration"][cls][k] == pytest.approx(b["calibration"][cls][k], rel=1e-4)


def test_position_reference_is_per_class_and_on_trial(checkpoint: Path, tiny: Path) -> None:
    on = evaluate(checkpoint, tiny, latency_runs=1, reference="on")
    off = evaluate(checkpoint, tiny, latency_runs=1, reference="off")
    auto = evaluate(checkpoint, tiny, latency_runs=1)
    for cls in ("disc", "stripes"):
        assert "reference" in on["calibration"][cls] and "reference" not in off["calibration"][cls]
        trial = auto["classes"][cls]["reference"]
        raw, ref = trial["synthetic"]["raw"], trial["synthetic"]["with_reference"]
        assert set(raw) == set(ref) == {"image_auroc", "pixel_auroc"}
        assert trial["used"] == (sum(ref.values()) > sum(raw.values()))   # kept only where it helps
        assert ("reference" in auto["calibration"][cls]) == trial["used"]
        assert set(trial["test"]) == {"raw", "with_reference"}            # both reported
        assert trial["test"]["raw"]["image_auroc"] == pytest.approx(off["classes"][cls]["image_auroc"])
    a, b = (ClassCalibration.from_dict(on["calibration"][c]).reference for c in ("disc", "stripes"))
    assert not np.allclose(a.mean, b.mean)   # each class has its own


def test_held_out_images_are_scored_against_references_fitted_without_them() -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(1.0, 0.2, (12, 16, 16)).astype(np.float32)
    maps[3, 4:8, 4:8] += 3.0                             # one held-out image with a bright patch
    full, loo = fit_reference(maps), leave_one_out(maps)
    assert len(loo) == len(maps)
    np.testing.assert_allclose(loo[0].mean, fit_reference(maps[1:]).mean)
    own = image_score(full.standardise(maps[3]), 1.0)
    unseen = image_score(loo[3].standardise(maps[3]), 1.0)
    assert unseen > own                                  # its own patch no longer inflates the spread it is judged by


def test_package(checkpoint: Path, tiny: Path, tmp_path: Path) -> None:
    path = export_package(checkpoint, tmp_path / "m.kdpkg", version="1.2.3", latency_runs=1)
    pkg = read_package(path)
    m = pkg.manifest
    for key in ("model_id", "version", "method", "backbone", "classes", "input_size", "map_size", "sigma",
                "mean", "std", "precision", "quantization", "calibration", "metrics", "parent"):
        assert key in m.to_dict()
    got = (m.version, m.method, m.precision, m.input_size, m.map_size, m.resize)
    assert got == ("1.2.3", "stfpm", "fp32", 64, 16, "stretch")
    assert m.classes == ("disc", "stripes") and set(m.calibration) == {"disc", "stripes"}
    assert 0 <= m.metrics["mean"]["image_auroc"] <= 1
    assert not list(tmp_path.glob("*.onnx"))   # the intermediate file is cleaned up
    sess = ort.InferenceSession(pkg.model, providers=["CPUExecutionProvider"])
    assert {g.cls for g in pkg.golden} == {"disc", "stripes"} and len(pkg.golden) == 4
    for g in pkg.golden:   # what an agent's self-test does
        frame = decode_image(g.png)
        assert frame.shape == (64, 64, 3)
        (amap,) = sess.run(None, {"image": frame[None]})
        assert package_score(amap[0, 0], m, g.cls) == pytest.approx(g.score, rel=1e-5)
    for cls in m.classes:   # a class's reference travels in the manifest exactly where its trial kept it
        ref = m.calibration[cls].reference
        assert (ref is not None) == m.metrics["classes"][cls]["reference_used"]
    on = read_package(export_package(checkpoint, tmp_path / "on.kdpkg", reference="on", latency_runs=1))
    ref = on.manifest.calibration["disc"].reference
    assert ref is not None and ref.mean.shape == (16, 16) and (ref.spread > 0).all()


def test_quick_package_is_cached(tiny: Path, tmp_path: Path) -> None:
    t = time.monotonic()
    first = quick_package(tiny, tmp_path, size=64, epochs=1)
    took = time.monotonic() - t
    t = time.monotonic()
    again = quick_package(tiny, tmp_path, size=64, epochs=1)
    assert again == first and time.monotonic() - t < max(1.0, took / 5)
    assert read_package(first).manifest.classes == ("disc", "stripes")
    other = quick_package(tiny, tmp_path, size=64, epochs=2)   # new settings: a new package
    assert other != first and other.exists()


def test_cli_train_evaluate_export(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from trainer.cli import evaluate_main, export_main, train_main

    assert train_main(["--data", str(tiny), "--classes", "disc", "--epochs", "1", "--size", "64",
                       "--batch-size", "8", "--out", str(tmp_path / "run"), "--threads", "1"]) == 0
    ckpt = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert ckpt.name == "best.pt"
    assert evaluate_main([str(ckpt), "--json", str(tmp_path / "r.json"), "--threads", "1"]) == 0
    assert "image AUROC" in capsys.readouterr().out
    assert "disc" in json.loads((tmp_path / "r.json").read_text())[str(ckpt)]["classes"]
    assert export_main([str(ckpt), "--out", str(tmp_path / "m.kdpkg")]) == 0
    assert read_package(capsys.readouterr().out.strip()).manifest.classes == ("disc",)
    assert train_main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
