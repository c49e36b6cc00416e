"""Inference runtimes: ONNX Runtime on a CPU, TensorRT on an NVIDIA GPU.

A runtime takes a batch of letterboxed frames, uint8 (N, S, S, 3) RGB, and
returns the raw anomaly maps, float32 (N, m, m).
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("auto", "onnxruntime", "tensorrt")


class RuntimeUnavailable(RuntimeError):
    """A runtime that cannot be opened here; the message says what is missing."""


class Runtime(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


def tensorrt_available() -> bool:
    """True when tensorrt and pycuda import and a CUDA device answers."""
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # any import or driver failure means: not here
        return False


def open_runtime(kind: str, model: bytes, manifest: dict[str, Any], threads: int = 0,
                 cache_dir: str | None = None) -> Runtime:
    """Open `kind`; "auto" picks TensorRT when a GPU and tensorrt are present, else ONNX Runtime."""
    if kind not in KINDS:
        raise RuntimeUnavailable(f"unknown runtime {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "tensorrt" if tensorrt_available() else "onnxruntime"
    if kind == "tensorrt":
        from agent.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(model, manifest, cache_dir=cache_dir)
    from agent.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(model, manifest, threads=threads)
