"""A small, real model package for agent tests: no training, a hand-built ONNX graph.

The graph honours the model contract (uint8 (N, S, S, 3) in, (N, 1, S/4, S/4)
out): the map is the local darkness of the frame, so a dark spot on a bright
plate is an anomaly, which makes expected verdicts easy to state.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from shared.package import GoldenImage, write_package
from shared.scoring import image_score

SIZE = 64


def darkness_model(size: int = SIZE) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMean", ["nchw", "axes"], ["grey"], keepdims=1),
        helper.make_node("AveragePool", ["grey"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Sub", ["white", "pooled"], ["dark"]),
        helper.make_node("Div", ["dark", "scale"], ["anomaly_map"]),
    ]
    graph = helper.make_graph(
        nodes, "darkness",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, size // 4, size // 4])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
         helper.make_tensor("white", TensorProto.FLOAT, [], [255.0]),
         helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def plate(rng: np.random.Generator, spot: bool) -> np.ndarray:
    """A bright plate (BGR for cv2.imwrite), optionally with a dark spot."""
    img = np.clip(rng.normal(220, 3, (48, 64, 3)), 0, 255).astype(np.uint8)   # not square: letterboxed
    if spot:
        cv2.circle(img, (int(rng.integers(15, 50)), int(rng.integers(12, 36))), 6, (20, 20, 20), -1)
    return img


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    model = root / "model.onnx"
    onnx.save(darkness_model(), model)
    manifest = dict(model_id="darkness", version="1.0.0", method="stfpm", backbone="none", classes=["plate"],
                    input_size=SIZE, map_size=SIZE // 4, sigma=1.0, mean=[0.0] * 3, std=[1.0] * 3,
                    precision="fp32", quantization=None,
                    calibration={"plate": {"center": 0.14, "scale": 0.1, "threshold": 0.3}},
                    metrics={}, parent=None)
    import onnxruntime as ort

    from shared.imaging import encode_png, letterbox

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    golden = []
    for i, spot in enumerate((False, True)):
        boxed, _ = letterbox(plate(np.random.default_rng(i), spot)[..., ::-1].copy(), SIZE)
        score = image_score(sess.run(None, {"image": boxed[None]})[0][0, 0], 1.0)
        golden.append(GoldenImage(f"{i}.png", encode_png(boxed), "plate", score))
    return write_package(root / "darkness.kdpkg", manifest, model, golden)


@pytest.fixture
def plates(tmp_path: Path):
    """A folder of n plates, every third with a spot; returns (folder, {name: has_spot})."""

    def make(n: int, corrupt: int = 0) -> tuple[Path, dict[str, bool]]:
        folder = tmp_path / "frames"
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(7)
        truth = {}
        for i in range(n):
            name = f"{i:04d}.png"
            truth[name] = i % 3 == 0
            cv2.imwrite(str(folder / name), plate(rng, truth[name]))
        for j in range(corrupt):
            data = (folder / "0001.png").read_bytes()
            (folder / f"{n + j:04d}.png").write_bytes(data[: len(data) // 3])   # truncated file
        return folder, truth

    return make
