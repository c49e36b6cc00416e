"""PatchCore: the coreset, one bank per class, the graph's nearest-neighbour search, fitting, export, packages."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from agent.runtimes import open_runtime
from shared.package import read_package
from shared.scoring import package_score
from tests.trainer.obvious_defect import assert_detects_obvious_defect
from trainer.data import synth
from trainer.export import check_onnx, export_onnx, export_package
from trainer.inference_graph import CLASS_INPUT_NAME, InferenceGraph
from trainer.models import build_model, get_method, model_config
from trainer.models.patchcore import PatchCore, PatchCoreConfig, greedy_coreset
from trainer.data.frames import load_square
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.train import train

torch.set_num_threads(1)

SIZE = 64
CLASSES = ["brick", "washer"]   # sorted, as discovered
RUN = dict(size=SIZE, method="patchcore", model={"bank_size": 256}, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=0, size=SIZE, n_train=20,
                          n_test_good=6, n_test_defect=1, classes=CLASSES)


@pytest.fixture(scope="module")
def fitted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(TrainConfig(data=str(data), out=str(tmp_path_factory.mktemp("run")), **RUN), progress=None)


def test_greedy_coreset_keeps_the_rare_patch_a_random_sample_drops() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, 8) * 0.1, torch.full((1, 8), 5.0)])   # a dense cloud and one outlier
    chosen = greedy_coreset(x, 20, gen)
    assert len(set(chosen.tolist())) == 20 and 2000 in chosen.tolist()
    radius = torch.cdist(x, x[chosen]).min(1).values.max()
    random_radius = torch.cdist(x, x[torch.randperm(len(x), generator=gen)[:20]]).min(1).values.max()
    assert radius < random_radius
    assert torch.equal(greedy_coreset(x, 5000, gen), torch.arange(len(x)))   # fewer rows than asked: all


def test_the_map_is_each_patch_s_distance_to_its_class_bank() -> None:
    model = build_model(model_config("patchcore", {"strides": (4, 8), "bank_size": 4096})).eval()
    assert get_method("patchcore").class_conditional and not get_method("patchcore").trained
    assert model.trainable_parameters() == [] and not any(p.requires_grad for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, SIZE, SIZE, generator=gen), torch.randn(4, 3, SIZE, SIZE, generator=gen) * 3 + 1
    model.fit({"a": lambda: [a], "b": lambda: [b[:2]]})
    # (K, D, M): every patch kept (fewer than bank_size); b's 512 patches repeat to a's 1024
    assert model.bank.shape == (2, 64, 1024) and model.bank_sq.shape == (2, 1, 1024)
    x = torch.cat([a[:1], b[:1]])
    with torch.no_grad():
        amap = model.anomaly_map(x, torch.tensor([0, 1]))
        e = model.embed(x).flatten(2).transpose(1, 2)                                  # (2, P, D)
        brute = torch.stack([torch.cdist(e[i], model.bank[i].T).min(1).values for i in range(2)])
        swapped = model.anomaly_map(x, torch.tensor([1, 0]))
    assert amap.shape == (2, 1, SIZE // 4, SIZE // 4)
    # at stride 4 no resampling; |q|^2 - 2 q.b + |b|^2 in float32 loses ~sqrt(eps) |q| near zero distance
    torch.testing.assert_close(amap.flatten(1), brute, atol=0.1, rtol=1e-3)
    assert amap.max() < 0.1                     # images in the bank are at distance zero from it
    assert swapped.mean() > 1.0                 # against the other class's bank they are far


def test_config_is_validated() -> None:
    for bad in ({"strides": (2, 8)}, {"strides": (16, 8)}, {"pool": 2}, {"bank_size": 0}, {"backbone": "vgg"}):
        with pytest.raises(ValueError):
            model_config("patchcore", bad)
    assert isinstance(model_config("patchcore", {"strides": [8, 16]}), PatchCoreConfig)


def test_fitting_writes_a_checkpoint_that_rebuilds_its_banks(fitted: Path) -> None:
    cfg, model, ckpt = load_checkpoint(fitted)
    assert isinstance(model, PatchCore) and cfg.classes == tuple(CLASSES) and ckpt["epoch"] == 0
    assert model.n_classes == 2 and model.bank.shape[2] == 256
    assert "fit_s" in ckpt["history"][0]


def test_the_graph_searches_the_bank_in_onnx(fitted: Path, tmp_path: Path) -> None:
    _, model, _ = load_checkpoint(fitted)
    path = export_onnx(model, SIZE, tmp_path / "patchcore.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["image", CLASS_INPUT_NAME]
    assert proto.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT32
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMul", "ReduceMin", "Gather"} <= ops
    assert check_onnx(path, model, SIZE, batch=3) < 1e-3
    with pytest.raises(ValueError, match="class_index"):
        InferenceGraph(model)(torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8))


def test_the_package_runs_on_the_agent_s_runtime_per_class(fitted: Path, data: Path, tmp_path: Path) -> None:
    pkg = read_package(export_package(fitted, tmp_path / "pc.kdpkg", data, latency_runs=1, golden_per_class=2))
    m = pkg.manifest
    assert m.method == "patchcore" and m.class_input == CLASS_INPUT_NAME and list(m.classes) == CLASSES
    rt = open_runtime("onnxruntime", pkg.model, m, threads=1)
    from shared.imaging import decode_image

    for g in pkg.golden:   # the golden self-test an agent runs before it swaps a package in
        assert package_score(rt.infer(decode_image(g.png)[None], [g.cls])[0], m, g.cls) == pytest.approx(
            g.score, rel=1e-4, abs=1e-4)
    frames, _ = load_square(sorted((data / "washer" / "test" / "good").glob("*.png"))[:2], SIZE, resize=m.resize)
    mixed = rt.infer(frames, ["washer", "brick"])
    np.testing.assert_allclose(mixed[0], rt.infer(frames[:1], ["washer"])[0], rtol=1e-5)
    assert mixed[1].mean() > mixed[0].mean()     # a washer scored against the brick bank
    ov = open_runtime("openvino", pkg.model, m, threads=1)      # the same package, per class, on OpenVINO
    np.testing.assert_allclose(ov.infer(frames, ["washer", "brick"]), mixed, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="not in this model"):
        rt.infer(frames[:1], ["bottle"])
    with pytest.raises(ValueError, match="its own class"):
        rt.infer(frames[:1])


def test_detects_an_obvious_defect(data: Path, tmp_path: Path) -> None:
    one = train(TrainConfig(data=str(data), classes=("washer",), out=str(tmp_path / "one"), **RUN), progress=None)
    assert_detects_obvious_defect(one, data, "washer", SIZE)
