"""Real, small model packages for tests: a hand-built ONNX graph, no training.

The graph honours the model contract (uint8 (N, S, S, 3) in, (N, 1, S/4, S/4)
out): the map is the local darkness of the frame, so a dark spot on a bright
plate is an anomaly. Golden scores are computed with ONNX Runtime, as the
trainer does. `rewrite_member` and `truncate` make the broken packages that
verification must refuse.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from shared.package import GoldenImage, write_package
from shared.scoring import image_score

SIZE = 64


def darkness_model(size: int = SIZE) -> onnx.ModelProto:
    """uint8 (N, S, S, 3) -> float (N, 1, S/4, S/4): 1 - mean brightness of each 4x4 cell."""
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
    """A bright plate (BGR), optionally with a dark spot."""
    img = np.clip(rng.normal(220, 3, (48, 64, 3)), 0, 255).astype(np.uint8)   # not square: letterboxed
    if spot:
        cv2.circle(img, (int(rng.integers(15, 50)), int(rng.integers(12, 36))), 6, (20, 20, 20), -1)
    return img


def build_package(out: Path, *, version: str = "1.0.0", model_id: str = "darkness",
                  key: Ed25519PrivateKey | None = None, golden_offset: float = 0.0,
                  metrics: dict | None = None, parent: str | None = None) -> Path:
    """Write a tiny package to `out`; `golden_offset` shifts the expected golden scores (a bad self-test)."""
    import onnxruntime as ort

    from shared.imaging import encode_png, letterbox

    out.parent.mkdir(parents=True, exist_ok=True)
    model = out.with_suffix(".onnx")
    onnx.save(darkness_model(), model)
    manifest = dict(model_id=model_id, version=version, method="stfpm", backbone="none", classes=["plate"],
                    input_size=SIZE, map_size=SIZE // 4, sigma=1.0, mean=[0.0] * 3, std=[1.0] * 3,
                    precision="fp32", quantization=None,
                    calibration={"plate": {"center": 0.14, "scale": 0.1, "threshold": 0.3}},
                    metrics=metrics if metrics is not None else {"image_auroc": 0.99}, parent=parent)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    golden = []
    for i, spot in enumerate((False, True)):
        boxed, _ = letterbox(plate(np.random.default_rng(i), spot)[..., ::-1].copy(), SIZE)
        score = image_score(sess.run(None, {"image": boxed[None]})[0][0, 0], 1.0) + golden_offset
        golden.append(GoldenImage(f"{i}.png", encode_png(boxed), "plate", score))
    path = write_package(out, manifest, model, golden, key=key)
    model.unlink()
    return path


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {i.name: tar.extractfile(i).read() for i in tar}  # type: ignore[union-attr]


def rewrite_member(src: Path, out: Path, name: str, data: bytes) -> Path:
    """A copy of `src` at `out` with member `name` replaced by `data` (a tampered package)."""
    found = members(src)
    found[name] = data
    with tarfile.open(out, "w") as tar:
        for n, d in found.items():
            info = tarfile.TarInfo(n)
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    return out


def truncate(src: Path, out: Path, keep: float = 0.6) -> Path:
    """A copy of `src` at `out` cut after `keep` of its bytes (an interrupted copy)."""
    data = src.read_bytes()
    out.write_bytes(data[: int(len(data) * keep)])
    return out
