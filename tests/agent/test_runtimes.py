"""Runtimes: ONNX Runtime here; TensorRT only on a machine with an NVIDIA GPU."""
import numpy as np
import pytest

from agent.runtimes import RuntimeUnavailable, open_runtime, tensorrt_available
from agent.runtimes.tensorrt import engine_key
from shared.package import read_package


def test_auto_picks_onnxruntime_without_a_gpu(tiny_package):
    pkg = read_package(tiny_package)
    rt = open_runtime("auto", pkg.model, pkg.manifest, threads=1)
    if not tensorrt_available():
        assert rt.name == "onnxruntime"
    maps = rt.infer(np.full((3, 64, 64, 3), 255, np.uint8))
    assert maps.shape == (3, 16, 16) and maps.dtype == np.float32 and np.allclose(maps, 0)


def test_unknown_runtime_and_missing_tensorrt_are_explained(tiny_package):
    pkg = read_package(tiny_package)
    with pytest.raises(RuntimeUnavailable, match="unknown runtime"):
        open_runtime("tflite", pkg.model, pkg.manifest)
    if tensorrt_available():
        pytest.skip("TensorRT is present here; its own test below runs instead")
    with pytest.raises(RuntimeUnavailable, match=r"tensorrt|CUDA"):
        open_runtime("tensorrt", pkg.model, pkg.manifest)


def test_openvino_runs_the_same_package_with_the_same_maps(tiny_package):
    pkg = read_package(tiny_package)
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    ref = open_runtime("onnxruntime", pkg.model, pkg.manifest, threads=1).infer(frames)
    ov = open_runtime("openvino", pkg.model, pkg.manifest, threads=1)
    assert ov.name == "openvino"
    np.testing.assert_allclose(ov.infer(frames), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ov.infer(frames[:1]), ref[:1], rtol=1e-5, atol=1e-6)   # any batch size


def test_engine_cache_key_names_everything_that_makes_engines_incompatible():
    a = engine_key("ab" * 32, "10.3.0", "NVIDIA H100 80GB HBM3", "int8-b8")
    assert a.startswith("abababababababab-trt10.3.0-nvidia-h100-80gb-hbm3-int8-b8")
    assert a != engine_key("ab" * 32, "10.4.0", "NVIDIA H100 80GB HBM3", "int8-b8")
    assert a != engine_key("ab" * 32, "10.3.0", "Orin", "int8-b8")


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs an NVIDIA GPU with tensorrt and pycuda (kdfleet[jetson])")
def test_tensorrt_matches_onnxruntime(tiny_package, tmp_path):
    pkg = read_package(tiny_package)
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    ref = open_runtime("onnxruntime", pkg.model, pkg.manifest).infer(frames)
    trt = open_runtime("tensorrt", pkg.model, pkg.manifest, cache_dir=str(tmp_path))
    np.testing.assert_allclose(trt.infer(frames), ref, atol=1e-3)
    assert list(tmp_path.glob("*.engine")), "the engine was not cached"
