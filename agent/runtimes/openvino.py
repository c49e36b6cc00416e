"""OpenVINO on the CPU: the same ONNX graph, compiled by Intel's runtime.

It reads the package's ONNX as it is (FP32, FP16 or QDQ INT8) and is often
faster than ONNX Runtime on x86 CPUs (`python -m bench.quantization`
measures both on the same files); scores agree within float rounding.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from agent.runtimes import RuntimeUnavailable, feed
from shared.manifest import Manifest


class OpenVinoRuntime:
    """One compiled model, tuned for latency on `threads` CPU threads."""

    name = "openvino"

    def __init__(self, model: bytes, manifest: Manifest, threads: int = 0) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeUnavailable("the OpenVINO runtime needs the openvino package: pip install 'kdfleet[openvino]'"
                                     ', or use runtime = "onnxruntime"') from None
        core = ov.Core()
        network = core.read_model(model)
        # f32: on CPUs with bfloat16 units OpenVINO would otherwise compute in bf16 and miss the package's
        # golden scores by ~4 %; an INT8 (QDQ) graph still runs its integer kernels
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or (os.cpu_count() or 1),
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = core.compile_model(network, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.manifest = manifest
        self.class_input = manifest.class_input
        names = [i.get_any_name() for i in self.compiled.inputs]
        self.input = next(n for n in names if n != self.class_input)
        self.output = self.compiled.outputs[0]
        self.size = manifest.input_size

    def infer(self, batch: np.ndarray, classes: Sequence[str] | None = None) -> np.ndarray:
        """(N, S, S, 3) uint8 [, the frames' class names] -> (N, m, m) float32."""
        out = self.request.infer(feed(self.manifest, self.input, batch, classes))[self.output]
        return np.asarray(out, np.float32).reshape(out.shape[0], out.shape[-2], out.shape[-1]).copy()
