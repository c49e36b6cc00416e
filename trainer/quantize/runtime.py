"""ONNX Runtime sessions tuned for batch-1 latency on a small CPU, and honest timing.

Timing on a shared machine is only as good as the machine's quiet: `CpuWatch`
records how much CPU other processes used while a measurement ran, so every
latency in a report carries the load it was taken under.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from trainer.inference_graph import CLASS_INPUT_NAME, INPUT_NAME

DEFAULT_THREADS = 2   # the edge boxes this targets have 2-4 cores; the report's machine has 2


def session_options(threads: int = DEFAULT_THREADS):
    """Settings for lowest batch-1 latency: all graph optimisations (QDQ -> integer kernels, NCHWc
    layouts, Conv+activation fusion), `threads` intra-op threads spinning between ops (a frame's
    ~70 small ops would otherwise each pay a wake-up), sequential execution.

    Measured on 2 cores: running teacher and student as parallel branches (ORT_PARALLEL, one or two
    threads each) was 1.5-2.5x slower than this; without spinning INT8 graphs were ~30 % slower on a
    quiet machine, though faster when other processes compete for the cores.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return opts


def make_session(model: str | Path | bytes, threads: int = DEFAULT_THREADS):
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    return ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])


def graph_feed(images: np.ndarray, class_index: int, conditional: bool) -> dict[str, np.ndarray]:
    """The inference graph's inputs: uint8 frames (N, S, S, 3), and the class index of each where the
    graph scores against a class (`conditional`)."""
    inputs = {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)}
    if conditional:
        inputs[CLASS_INPUT_NAME] = np.full(len(images), class_index, np.int32)
    return inputs


def onnx_map_fn(model: str | Path | bytes, threads: int = DEFAULT_THREADS) -> Callable[..., np.ndarray]:
    """A function uint8 frames (N, S, S, 3)[, class index] -> maps (N, 1, S/4, S/4) through a tuned session."""
    sess = make_session(model, threads)
    conditional = CLASS_INPUT_NAME in {i.name for i in sess.get_inputs()}

    def run(images: np.ndarray, class_index: int = 0) -> np.ndarray:
        return sess.run(None, graph_feed(images, class_index, conditional))[0]

    return run


def openvino_map_fn(model: str | Path | bytes, threads: int = DEFAULT_THREADS) -> Callable[..., np.ndarray] | None:
    """The same as `onnx_map_fn` through OpenVINO (the runtime a user might pick instead), or None when the
    openvino package is not installed. Latency hint, f32 inference precision: the settings the agent's
    OpenVINO runtime uses, so its scores match ONNX Runtime's."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    compiled = core.compile_model(core.read_model(data), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    conditional = CLASS_INPUT_NAME in {i.get_any_name() for i in compiled.inputs}
    output = compiled.outputs[0]

    def run(images: np.ndarray, class_index: int = 0) -> np.ndarray:
        return np.asarray(request.infer(graph_feed(images, class_index, conditional))[output], np.float32).copy()

    return run


@dataclass(frozen=True, slots=True)
class Latency:
    """Batch-1 latency of one variant: median and 95th percentile in ms, and images per second."""

    p50_ms: float
    p95_ms: float
    images_per_s: float
    runs: int
    other_cpu: float   # cores' worth of CPU other processes used meanwhile (0 = quiet machine)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class CpuWatch:
    """Measures, over a `with` block, the CPU that processes other than this one used (in cores)."""

    def __init__(self) -> None:
        self.other_cores = float("nan")

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                parts = [float(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
        return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuWatch:
        self._t, self._busy, self._own = time.monotonic(), self._busy_s(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc: object) -> None:
        busy = self._busy_s()
        wall = time.monotonic() - self._t
        if busy is None or self._busy is None or wall <= 0:
            return
        own = sum(os.times()[:2]) - self._own
        self.other_cores = max(0.0, (busy - self._busy - own) / wall)


def measure(run: Callable[[np.ndarray], Any], size: int, runs: int = 50, warmup: int = 5,
            seed: int = 0) -> Latency:
    """Batch-1 latency of `run` on random uint8 frames (the content does not change the work)."""
    frames = np.random.default_rng(seed).integers(0, 256, (4, 1, size, size, 3), dtype=np.uint8)
    for i in range(warmup):
        run(frames[i % 4])
    times = np.empty(runs)
    with CpuWatch() as watch:
        for i in range(runs):
            t = time.perf_counter()
            run(frames[i % 4])
            times[i] = time.perf_counter() - t
    p50 = float(np.median(times) * 1000)
    return Latency(p50, float(np.percentile(times, 95) * 1000), 1000.0 / p50, runs, watch.other_cores)


def torch_map_fn(graph, threads: int = DEFAULT_THREADS) -> Callable[..., np.ndarray]:
    """PyTorch eager FP32 inference of an InferenceGraph, the baseline every ratio refers to."""
    import torch

    torch.set_num_threads(threads)
    graph = graph.eval()

    @torch.no_grad()
    def run(images: np.ndarray, class_index: int = 0) -> np.ndarray:
        frames = torch.from_numpy(np.ascontiguousarray(images))
        if graph.class_conditional:
            return graph(frames, torch.full((len(images),), class_index, dtype=torch.int32)).numpy()
        return graph(frames).numpy()

    return run


def machine_load() -> dict[str, float]:
    """Load averages and core count, for the report's header."""
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen, "cpus": float(os.cpu_count() or 0)}
