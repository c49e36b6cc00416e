"""TensorRT on an NVIDIA GPU (Jetson or discrete), with pycuda buffers.

Engines are built on the device from the package's ONNX, because an engine is
tied to one GPU and one TensorRT version, and cached under a key of
(onnx sha256, TensorRT version, GPU name, precision). A QDQ (INT8) graph
builds as an explicitly quantised network; FP16 is enabled for every
precision below FP32 so unquantised layers do not fall back to FP32.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.runtimes import RuntimeUnavailable, class_indices
from shared.manifest import Manifest

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30
MAX_BATCH = 8


def engine_key(onnx_sha256: str, trt_version: str, gpu: str, precision: str) -> str:
    """The cache file name of an engine: everything that makes engines incompatible."""
    gpu_tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    return f"{onnx_sha256[:16]}-trt{trt_version}-{gpu_tag}-{precision}.engine"


class TensorRTRuntime:
    name = "tensorrt"

    def __init__(self, model: bytes, manifest: Manifest, cache_dir: str | Path | None = None,
                 max_batch: int = MAX_BATCH) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as exc:
            raise RuntimeUnavailable(
                f"TensorRT runtime needs tensorrt and pycuda ({exc.name} is missing): "
                "install 'kdfleet[jetson]' on a machine with an NVIDIA GPU, or use runtime = \"onnxruntime\"") from None
        cuda.init()
        if cuda.Device.count() == 0:
            raise RuntimeUnavailable("no CUDA device found; use runtime = \"onnxruntime\"")
        self.cuda, self.trt = cuda, trt
        device = cuda.Device(0)
        self.gpu = device.name()
        # the device's primary context: the one TensorRT's CUDA runtime calls use too; pushed
        # around every call, since inference runs on another thread than the one that opened it
        self.context_cuda = device.retain_primary_context()
        self.context_cuda.push()
        try:
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.manifest = manifest
            self.class_input = manifest.class_input   # a class-conditional graph's second input
            self.size = manifest.input_size
            self.max_batch = max_batch
            precision = manifest.precision
            key = engine_key(hashlib.sha256(model).hexdigest(), trt.__version__, self.gpu,
                             f"{precision}-b{max_batch}")  # the profile's batch range shapes the engine
            cache = Path(cache_dir or "var/agent/engines")
            path = cache / key
            if path.exists():
                serialized = path.read_bytes()
                log.info("TensorRT engine from cache %s", path)
            else:
                log.info("building TensorRT engine (%s, %s) on %s; this takes a while once", precision,
                         trt.__version__, self.gpu)
                serialized = self._build(model, precision)
                cache.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(serialized)
                tmp.replace(path)
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(serialized)
            if self.engine is None:
                raise RuntimeUnavailable(f"TensorRT could not load engine {path}; delete it to rebuild")
            self.context = self.engine.create_execution_context()
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
                              and n != self.class_input)
            self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
            self.stream = cuda.Stream()
            self._allocate()
        finally:
            self.context_cuda.pop()

    def _build(self, model: bytes, precision: str) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        # explicit batch: a flag before TensorRT 10 (JetPack 5/6 ship 8.x), the only mode since.
        # Quantised (QDQ) and FP16-typed graphs build strongly typed where TensorRT offers it: the
        # graph's own types decide each layer's precision, and the precision flags are not used.
        major = int(trt.__version__.split(".")[0])
        flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        strongly_typed = precision != "fp32" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(model):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeUnavailable(f"TensorRT cannot parse the model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if not strongly_typed and precision in ("fp16", "int8", "mixed"):
            config.set_flag(trt.BuilderFlag.FP16)
        if not strongly_typed and precision in ("int8", "mixed"):
            config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
        profile = builder.create_optimization_profile()
        s = self.size
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name == self.class_input:
                profile.set_shape(name, (1,), (1,), (self.max_batch,))
            else:
                profile.set_shape(name, (1, s, s, 3), (1, s, s, 3), (self.max_batch, s, s, 3))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeUnavailable("TensorRT failed to build an engine; see the log above")
        return bytes(serialized)

    def _allocate(self) -> None:
        cuda, trt = self.cuda, self.trt
        s = self.size
        self.context.set_input_shape(self.input, (self.max_batch, s, s, 3))
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        self.out_dtype = trt.nptype(self.engine.get_tensor_dtype(self.output))
        self.h_in = cuda.pagelocked_empty((self.max_batch, s, s, 3), np.uint8)
        self.h_out = cuda.pagelocked_empty(out_shape, self.out_dtype)
        self.d_in = cuda.mem_alloc(self.h_in.nbytes)
        self.d_out = cuda.mem_alloc(self.h_out.nbytes)
        self.context.set_tensor_address(self.input, int(self.d_in))
        self.context.set_tensor_address(self.output, int(self.d_out))
        if self.class_input:
            self.context.set_input_shape(self.class_input, (self.max_batch,))
            self.h_cls = cuda.pagelocked_empty((self.max_batch,), np.int32)
            self.d_cls = cuda.mem_alloc(self.h_cls.nbytes)
            self.context.set_tensor_address(self.class_input, int(self.d_cls))

    def infer(self, batch: np.ndarray, classes: Sequence[str] | None = None) -> np.ndarray:
        """(N, S, S, 3) uint8 [, the frames' class names] -> (N, m, m) float32."""
        n = batch.shape[0]
        index = class_indices(self.manifest, classes, n)
        if n > self.max_batch:
            names = None if index is None else [self.manifest.classes[k] for k in index]
            return np.concatenate([self.infer(batch[i:i + self.max_batch], names and names[i:i + self.max_batch])
                                   for i in range(0, n, self.max_batch)])
        self.context_cuda.push()
        try:
            self.h_in[:n] = batch
            self.context.set_input_shape(self.input, (n, self.size, self.size, 3))
            self.cuda.memcpy_htod_async(self.d_in, self.h_in, self.stream)
            if index is not None:
                self.h_cls[:n] = index
                self.context.set_input_shape(self.class_input, (n,))
                self.cuda.memcpy_htod_async(self.d_cls, self.h_cls, self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execution failed")
            self.cuda.memcpy_dtoh_async(self.h_out, self.d_out, self.stream)
            self.stream.synchronize()
        finally:
            self.context_cuda.pop()
        out = np.asarray(self.h_out[:n], dtype=np.float32)
        return out.reshape(n, out.shape[-2], out.shape[-1]).copy()

    def close(self) -> None:
        self.context_cuda.detach()
