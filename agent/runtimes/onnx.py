"""ONNX Runtime on the CPU."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from agent.runtimes import feed
from shared.manifest import Manifest


class OnnxRuntime:
    """One ONNX Runtime session; thread count set for this machine."""

    name = "onnxruntime"

    def __init__(self, model: bytes, manifest: Manifest, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        self.manifest = manifest
        self.input = self.session.get_inputs()[0].name
        self.output = manifest.output_name
        self.size = manifest.input_size

    def infer(self, batch: np.ndarray, classes: Sequence[str] | None = None) -> np.ndarray:
        """(N, S, S, 3) uint8 [, the frames' class names] -> (N, m, m) float32."""
        out = self.session.run([self.output], feed(self.manifest, self.input, batch, classes))[0]
        return out.reshape(out.shape[0], out.shape[-2], out.shape[-1]).astype(np.float32, copy=False)
