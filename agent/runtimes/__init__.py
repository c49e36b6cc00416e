"""Inference runtimes: ONNX Runtime or OpenVINO on a CPU, TensorRT on an NVIDIA GPU.

A runtime takes a batch of square frames, uint8 (N, S, S, 3) RGB, and
returns the raw anomaly maps, float32 (N, m, m). A package whose graph is
class-conditional (a memory bank per class: the manifest names its
`class_input`) also needs each frame's class, given as names and fed as
int32 indices into the manifest's class list.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from shared.manifest import Manifest

log = logging.getLogger(__name__)

KINDS = ("auto", "onnxruntime", "openvino", "tensorrt")


class RuntimeUnavailable(RuntimeError):
    """A runtime that cannot be opened here; the message says what is missing."""


class Runtime(Protocol):
    name: str

    def infer(self, batch: np.ndarray, classes: Sequence[str] | None = None) -> np.ndarray: ...


def class_indices(manifest: Manifest, classes: Sequence[str] | None, n: int) -> np.ndarray | None:
    """The class-index input for `n` frames of `classes` (one name per frame, or one for all), or None
    for a graph that takes no class."""
    if not manifest.class_conditional:
        return None
    if not classes:
        raise ValueError("this model scores each frame against its own class: pass the frames' classes")
    names = list(classes) * n if len(classes) == 1 else list(classes)
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for {n} frames")
    known = manifest.classes
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"class(es) {unknown} are not in this model ({', '.join(known)})")
    return np.asarray([known.index(c) for c in names], np.int32)


def feed(manifest: Manifest, input_name: str, batch: np.ndarray,
         classes: Sequence[str] | None) -> dict[str, np.ndarray]:
    """A graph's inputs for `batch` (N, S, S, 3) uint8: the frames, and their class indices where the graph
    takes them (`class_indices`)."""
    inputs = {input_name: np.ascontiguousarray(batch, dtype=np.uint8)}
    index = class_indices(manifest, classes, len(batch))
    if index is not None:
        inputs[manifest.class_input] = index
    return inputs


def tensorrt_available() -> bool:
    """True when tensorrt and pycuda import and a CUDA device answers."""
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # any import or driver failure means: not here
        return False


def open_runtime(kind: str, model: bytes, manifest: Manifest, threads: int = 0,
                 cache_dir: str | None = None) -> Runtime:
    """Open `kind`; "auto" picks TensorRT when a GPU and tensorrt are present, else ONNX Runtime.

    OpenVINO is chosen by name only: it is faster than ONNX Runtime on many x86 CPUs but not on all
    (measure with `python -m bench.quantization`), and it is an optional install.
    """
    if kind not in KINDS:
        raise RuntimeUnavailable(f"unknown runtime {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "tensorrt" if tensorrt_available() else "onnxruntime"
    if kind == "tensorrt":
        from agent.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(model, manifest, cache_dir=cache_dir)
    if kind == "openvino":
        from agent.runtimes.openvino import OpenVinoRuntime

        return OpenVinoRuntime(model, manifest, threads=threads)
    from agent.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(model, manifest, threads=threads)
