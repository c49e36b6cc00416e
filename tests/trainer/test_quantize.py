"""Quantisation: graph rewrites, FP16, PTQ (each calibration strategy), QAT export, mixed precision, report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from tests.trainer.tiny_data import make_tiny_set
from trainer.export import export_onnx
from trainer.inference_graph import Normalize, to_float_nchw
from trainer.models import METHOD_NAMES, build_model, get_method, model_config
from trainer.models.backbone import input_normalization
from trainer.quantize import Recipe, parse_recipes
from trainer.quantize import graph as G
from trainer.quantize.calibration import STRATEGIES, DataSpec, FrameReader, calibration_images
from trainer.quantize.fp16 import convert_fp16
from trainer.quantize.input_fold import find_input_normalisation
from trainer.quantize.int4 import requantize_weights
from trainer.quantize.mixed import LayerSensitivity, quantize_mixed
from trainer.quantize.ptq import PTQConfig, quantize_ptq
from trainer.quantize.qat import QATConfig, calibrate, export_qat, prepare_qat, run_qat
from trainer.quantize.runtime import make_session, measure, onnx_map_fn
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.train import train

torch.set_num_threads(2)
SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_set(tmp_path_factory.mktemp("tiny"), n_train=12, n_good=4, n_defect=2)


@pytest.fixture(scope="module")
def checkpoint(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(data=str(tiny), out=str(tmp_path_factory.mktemp("run")), size=SIZE, epochs=3,
                      batch_size=8, threads=2)
    return train(cfg, progress=None)


@pytest.fixture(scope="module")
def fp32(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, model, _ = load_checkpoint(checkpoint)
    return export_onnx(model, SIZE, tmp_path_factory.mktemp("onnx") / "fp32.onnx")


@pytest.fixture(scope="module")
def spec(checkpoint: Path) -> DataSpec:
    cfg, _, _ = load_checkpoint(checkpoint)
    return DataSpec.of(cfg)


@pytest.fixture(scope="module")
def frames(spec: DataSpec) -> np.ndarray:
    """Held-out normal frames plus a few with painted anomalies: what the maps are compared on."""
    return np.concatenate([calibration_images("holdout-normal", spec, 4, seed=5),
                           calibration_images("mixed", spec, 4, seed=5)])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def activation_scales(path: Path) -> dict[str, float]:
    """Scale of every per-tensor QuantizeLinear, keyed by the tensor it quantises."""
    model = onnx.load(str(path))
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            s = G.constant_value(model, n.input[1])
            if s is not None and s.size == 1:
                out[n.input[0]] = float(s)
    return out


def zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    return [G.constant_value(model, n.input[2]) for n in model.graph.node
            if n.op_type in G.QDQ_OPS and len(n.input) > 2 and n.input[2]]


# -- recipes and graph rewrites ----------------------------------------------------------

def test_recipes_parse_and_refuse_unknown_ones() -> None:
    got = parse_recipes("fp32, ptq:train:entropy,mixed:3,qat,fp32")
    assert [r.name for r in got] == ["fp32", "ptq:train:entropy", "mixed:3", "qat"]
    assert got[1] == Recipe("ptq", "train", "entropy") and got[2].precision == "mixed"
    for bad in ("ptq", "ptq:somewhere", "ptq:train:median", "int3", "qat:5", "mixed:x", ""):
        with pytest.raises(ValueError):
            parse_recipes(bad)


def test_partition_keeps_input_conversion_and_map_arithmetic_apart(fp32: Path, tmp_path: Path) -> None:
    model = G.load(G.prepare(fp32, tmp_path / "pre.onnx"))
    part = G.partition(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {ops[n] for n in part.pre} >= {"Transpose", "Cast", "Mul", "Add"}
    assert {"Sub", "Pow", "ReduceMean", "Resize"} <= {ops[n] for n in part.head}
    assert "Conv" not in {ops[n] for n in part.pre + part.head}
    assert sum(ops[n] == "Conv" for n in part.body) == sum(v == "Conv" for v in ops.values())


def test_float_rewrites_are_exact(fp32: Path, tmp_path: Path) -> None:
    opt = G.optimise_float(fp32, tmp_path / "opt.onnx")
    model = G.load(opt)
    assert find_input_normalisation(model) is None              # normalisation folded away
    kernels = [G.attributes(n)["kernel_shape"] for n in model.graph.node if n.op_type == "Conv"]
    assert max(k[0] for k in kernels) == 5                        # no zero-grown 4x4 / 6x6 kernels left
    x = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    ref, got = onnx_map_fn(fp32)(x), onnx_map_fn(opt)(x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


# -- calibration -------------------------------------------------------------------------------

def test_each_calibration_strategy_gives_frames_and_its_own_scales(fp32: Path, spec: DataSpec,
                                                                    tmp_path: Path) -> None:
    scales = {}
    for strategy in STRATEGIES:
        frames = calibration_images(strategy, spec, 4, seed=1)
        assert frames.shape == (4, SIZE, SIZE, 3) and frames.dtype == np.uint8
        res = quantize_ptq(fp32, tmp_path / f"{strategy}.onnx", frames, PTQConfig(fold_input=False))
        scales[strategy] = activation_scales(res.path)
    tensors = set.intersection(*(set(s) for s in scales.values()))
    assert len(tensors) > 20
    vectors = {k: np.array([s[t] for t in sorted(tensors)]) for k, s in scales.items()}
    names = list(vectors)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.allclose(vectors[a], vectors[b], rtol=1e-3), f"{a} and {b} calibrate alike"


def test_random_normal_frames_follow_the_inverse_normalisation(spec: DataSpec) -> None:
    frames = calibration_images("random-normal", spec, 8).astype(np.float64)
    mean, std = input_normalization(spec.backbone)
    z = (frames / 255 - np.asarray(mean)) / np.asarray(std)          # back in the network's normalised space
    unclipped = (frames > 0) & (frames < 255)
    assert abs(np.median(z)) < 0.05                                 # centred where the network expects
    assert 0.25 < unclipped.mean() < 1                              # N(0, 1) reaches past 0..255 for wide stds
    assert np.all(np.abs(z[unclipped]) < 5)


def test_frame_reader_serves_chunks() -> None:
    reader = FrameReader(np.zeros((5, 8, 8, 3), np.uint8), batch_size=2)
    assert len(reader) == 3
    reader.set_range(1, 3)
    assert [reader.get_next()["image"].shape[0] for _ in range(2)] == [2, 1]
    assert reader.get_next() is None
    reader.rewind()
    assert reader.get_next()["image"].shape == (2, 8, 8, 3)


# -- PTQ -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_ptq_int8_runs_in_onnxruntime_and_follows_fp32(fp32: Path, spec: DataSpec, frames: np.ndarray,
                                                       tmp_path: Path, observer: str) -> None:
    calib = calibration_images("train", spec, 8)
    res = quantize_ptq(fp32, tmp_path / "int8.onnx", calib, PTQConfig(observer=observer))
    model = G.load(res.path)
    counts = G.op_counts(model)
    assert counts["QuantizeLinear"] > 20 and counts["DequantizeLinear"] > 40
    assert res.summary["input_folded"] and res.summary["weight_dtypes"]["int8"] == counts["Conv"]
    assert G.file_mb(res.path) < 0.3 * G.file_mb(fp32)
    maps = onnx_map_fn(res.path)(frames)
    assert maps.shape == (len(frames), 1, SIZE // 4, SIZE // 4) and maps.dtype == np.float32
    assert pearson(maps, onnx_map_fn(fp32)(frames)) >= 0.9
    # the head never sees integers: its first nodes read dequantised features
    head = set(G.partition(G.load(G.prepare(fp32, tmp_path / "pre.onnx"))).head)
    assert all(n.op_type not in G.QDQ_OPS for n in model.graph.node if n.name in head)


def test_folding_the_input_keeps_the_int8_maps(fp32: Path, spec: DataSpec, frames: np.ndarray,
                                               tmp_path: Path) -> None:
    calib = calibration_images("train", spec, 8)
    folded = quantize_ptq(fp32, tmp_path / "folded.onnx", calib)
    plain = quantize_ptq(fp32, tmp_path / "plain.onnx", calib, PTQConfig(fold_input=False))
    assert find_input_normalisation(G.load(folded.path)) is None
    assert find_input_normalisation(G.load(plain.path)) is not None
    assert pearson(onnx_map_fn(folded.path)(frames), onnx_map_fn(plain.path)(frames)) >= 0.98


def test_tensorrt_target_uses_int8_zero_point_zero(fp32: Path, spec: DataSpec, frames: np.ndarray,
                                                  tmp_path: Path) -> None:
    res = quantize_ptq(fp32, tmp_path / "trt.onnx", calibration_images("train", spec, 8),
                       PTQConfig(target="tensorrt"))
    zps = zero_points(G.load(res.path))
    assert zps and all(z.dtype == np.int8 and not np.any(z) for z in zps)
    assert pearson(onnx_map_fn(res.path)(frames), onnx_map_fn(fp32)(frames)) >= 0.9


# -- FP16 -------------------------------------------------------------------------------------------

def test_fp16_runs_and_agrees_with_fp32(fp32: Path, frames: np.ndarray, tmp_path: Path) -> None:
    res = convert_fp16(fp32, tmp_path / "fp16.onnx")
    model = G.load(res.path)
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) >= sum(n.op_type == "Conv" for n in model.graph.node)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    kept = {n.op_type for n in model.graph.node if n.name in set(res.fp32_nodes)}
    assert {"Sub", "Pow", "ReduceMean", "Resize"} <= kept
    ref, got = onnx_map_fn(fp32)(frames), onnx_map_fn(res.path)(frames)
    assert pearson(got, ref) >= 0.999
    assert float(np.abs(got - ref).max()) <= 0.02 * float(np.abs(ref).max())


# -- QAT ----------------------------------------------------------------------------------------------

def test_qat_export_is_qdq_int8_and_runs(checkpoint: Path, fp32: Path, frames: np.ndarray, tmp_path: Path) -> None:
    res = run_qat(checkpoint, tmp_path / "qat.onnx", QATConfig(epochs=1, calib_images=8))
    model = G.load(res.path)
    counts = G.op_counts(model)
    assert counts["QuantizeLinear"] > 20 and counts["DequantizeLinear"] > 40
    assert res.summary["int8_weights"] == counts["Conv"] and res.summary["input_folded"]
    assert len(res.history) == 2 and all(np.isfinite(h["val_loss"]) for h in res.history)
    assert G.file_mb(res.path) < 0.3 * G.file_mb(fp32)
    assert pearson(onnx_map_fn(res.path)(frames), onnx_map_fn(fp32)(frames)) >= 0.9


def test_qat_teacher_is_calibrated_not_trained(checkpoint: Path) -> None:
    _, model, _ = load_checkpoint(checkpoint)
    q = prepare_qat(model)
    assert not any(p.requires_grad for p in q.teacher.parameters())
    assert all(p.requires_grad for p in q.trainable_parameters())
    assert any(type(m).__name__ == "FakeQuant" for m in q.teacher.modules())


def test_qat_tensorrt_flavour_is_explicitly_quantised(checkpoint: Path, frames: np.ndarray, tmp_path: Path) -> None:
    _, model, _ = load_checkpoint(checkpoint)
    q = prepare_qat(model, "tensorrt")
    calibrate(q, frames, 4)
    path, _ = export_qat(q, SIZE, tmp_path / "trt.onnx", "tensorrt")
    graph = G.load(path)
    zps = zero_points(graph)
    assert zps and all(z.dtype == np.int8 and not np.any(z) for z in zps)
    assert all(numpy_helper.to_array(t).dtype != np.uint8 for t in graph.graph.initializer)
    make_session(path).run(None, {"image": frames})


# -- mixed precision and INT4 ---------------------------------------------------------------------------

def test_mixed_keeps_the_chosen_layers_float(fp32: Path, spec: DataSpec, frames: np.ndarray, tmp_path: Path) -> None:
    pre = G.load(G.prepare(fp32, tmp_path / "pre.onnx"))
    convs = [n.name for n in pre.graph.node if n.op_type == "Conv"]
    # a depthwise layer between two quantised ones: the case ONNX Runtime would re-quantise on its own
    sens = [LayerSensitivity(name, "Conv", 1, 1.0 / (i + 1)) for i, name in enumerate(convs[4:6])]
    res = quantize_mixed(fp32, tmp_path / "mixed.onnx", calibration_images("train", spec, 8), 1, sens)
    model = G.load(res.path)
    inits = G.initializers(model)
    kept = [n for n in model.graph.node if n.name in res.kept]
    assert len(kept) == 1 and inits[kept[0].input[1]].data_type == onnx.TensorProto.FLOAT
    assert pearson(onnx_map_fn(res.path)(frames), onnx_map_fn(fp32)(frames)) >= 0.9
    # what ONNX Runtime actually runs: one float convolution, the rest integer
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(res.path), opts, providers=["CPUExecutionProvider"])
    assert G.op_counts(G.load(tmp_path / "optimised.onnx"))["QLinearConv"] == len(convs) - 1


def test_int4_weights_sit_on_a_4bit_grid(fp32: Path, spec: DataSpec, tmp_path: Path) -> None:
    res = quantize_ptq(fp32, tmp_path / "int8.onnx", calibration_images("train", spec, 8))
    model = G.load(res.path)
    info = requantize_weights(model, bits=4)
    assert info["layers_4bit"] > 0 and info["int4_weight_mb"] < info["int8_weight_mb"]
    prod, inits = G.producers(model), G.initializers(model)
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] in prod:
            q = numpy_helper.to_array(inits[prod[n.input[1]].input[0]])
            depthwise = G.attributes(n).get("group", 1) == q.shape[0] > 1
            assert depthwise or np.abs(q).max() <= 7


# -- every method, every precision ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("method", "precision"), [(m, p) for m in METHOD_NAMES for p in ("fp16", "ptq", "qat")
                                                   if get_method(m).trained or p != "qat"])
def test_every_method_quantises(method: str, precision: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(model_config(method)).eval()
    x = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    if not get_method(method).trained:   # a memory bank, fitted on other frames: on its own ones every map is ~0
        bank = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
        model.fit({"all": lambda: [Normalize.for_model(model)(to_float_nchw(torch.from_numpy(bank)))]})
    path = export_onnx(model, SIZE, tmp_path / "fp32.onnx")
    if precision == "fp16":
        out = convert_fp16(path, tmp_path / "v.onnx").path
    elif precision == "ptq":
        out = quantize_ptq(path, tmp_path / "v.onnx", x).path
    else:
        q = prepare_qat(model)
        calibrate(q, x, 4)
        out, _ = export_qat(q, SIZE, tmp_path / "v.onnx")
    assert pearson(onnx_map_fn(out)(x), onnx_map_fn(path)(x)) >= 0.9


@pytest.mark.slow
def test_quantize_command_writes_the_report(checkpoint: Path, tmp_path: Path) -> None:
    from trainer.quantize.cli import quantize_main

    out = tmp_path / "report"
    rc = quantize_main(["--checkpoint", str(checkpoint), "--method", "stfpm", "--out", str(out), "--recipes",
                        "fp32,fp16,ptq:train,ptq:random-normal,mixed:1,qat", "--calib-images", "4",
                        "--qat-epochs", "1", "--latency-runs", "3", "--latency-rounds", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["recipe"] for r in report["rows"]] == ["fp32", "fp16", "ptq:train", "ptq:random-normal", "mixed:1",
                                                    "qat"]
    assert all(r["p50_ms"] > 0 and r["size_mb"] > 0 for r in report["rows"])
    assert all(r["openvino_p50_ms"] > 0 for r in report["rows"]), "the same files timed under OpenVINO"
    assert report["rows"][0]["drop_image_auroc"] == 0
    assert (out / "report.md").read_text().count("| stfpm |") == 7
    assert (out / "auroc_vs_size.png").stat().st_size > 0 and (out / "auroc_vs_latency.png").stat().st_size > 0
    assert quantize_main(["--checkpoint", str(checkpoint), "--method", "rd", "--out", str(out),
                          "--recipes", "fp32"]) == 2


def test_latency_measurement_reports_percentiles() -> None:
    lat = measure(lambda x: x.sum(), 16, runs=10, warmup=1)
    assert 0 < lat.p50_ms <= lat.p95_ms and lat.images_per_s > 0 and lat.runs == 10
