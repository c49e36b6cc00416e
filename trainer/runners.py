"""Runners: a model of any form as one callable, uint8 (N, S, S, 3) [, class index] -> float32 (N, 1, S/4, S/4).

A torch module or checkpoint runs in torch, an ONNX file or package in ONNX
Runtime; either way evaluation, calibration, golden scores and the retraining
gate see the same interface, with what the source says about itself (its
checkpoint config or package manifest) beside it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from shared.manifest import LEGACY_RESIZE, Manifest
from trainer.inference_graph import CLASS_INPUT_NAME, INPUT_NAME, MAP_STRIDE, InferenceGraph


@dataclass
class Runner:
    """A callable that maps square uint8 frames to raw anomaly maps, with what is known about it.

    A class-conditional model needs each frame's class index (its position
    in the model's class list); other models ignore it.
    """

    run: Callable[[np.ndarray, np.ndarray], np.ndarray]
    size: int
    runtime: str          # "torch" or "onnxruntime"
    size_bytes: int       # weights (torch) or the ONNX file
    meta: dict[str, Any]  # what the source says about itself (checkpoint config, manifest)
    class_conditional: bool = False

    @property
    def manifest(self) -> Manifest | None:
        """The package's manifest, for a runner of a package."""
        return self.meta.get("manifest")

    @property
    def resize(self) -> str:
        """How frames become its square input: the checkpoint's or package's setting, else the one given."""
        if self.manifest is not None:
            return self.manifest.resize
        return self.meta.get("config", {}).get("resize") or self.meta.get("resize", LEGACY_RESIZE)

    def __call__(self, images: np.ndarray, class_index: int | np.ndarray = 0) -> np.ndarray:
        index = np.array(np.broadcast_to(np.asarray(class_index, np.int32), (len(images),)))   # a writable copy
        return self.run(images, index)


def torch_runner(graph: torch.nn.Module, size: int, meta: dict[str, Any] | None = None) -> Runner:
    graph = (graph if isinstance(graph, InferenceGraph) else InferenceGraph(graph)).eval()

    @torch.no_grad()
    def run(images: np.ndarray, class_index: np.ndarray) -> np.ndarray:
        frames = torch.from_numpy(np.ascontiguousarray(images))
        if graph.class_conditional:
            return graph(frames, torch.from_numpy(class_index)).numpy()
        return graph(frames).numpy()

    n_bytes = sum(t.numel() * t.element_size() for t in list(graph.parameters()) + list(graph.buffers()))
    return Runner(run, size, "torch", n_bytes, meta or {}, graph.class_conditional)


def onnx_runner(model: bytes | str | Path, meta: dict[str, Any] | None = None, threads: int = 0) -> Runner:
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape   # [N, S, S, 3]
    size = int(shape[1])
    conditional = CLASS_INPUT_NAME in {i.name for i in sess.get_inputs()}

    def run(images: np.ndarray, class_index: np.ndarray) -> np.ndarray:
        feed = {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)}
        if conditional:
            feed[CLASS_INPUT_NAME] = class_index
        return sess.run(None, feed)[0]

    return Runner(run, size, "onnxruntime", len(data), meta or {}, conditional)


def make_runner(source: Any, size: int | None = None, threads: int = 0) -> Runner:
    """A Runner from an InferenceGraph, a method model, a checkpoint (.pt), an ONNX file or a package."""
    if isinstance(source, Runner):
        return source
    if isinstance(source, torch.nn.Module):
        if size is None:
            raise ValueError("evaluating a torch module needs the input size")
        return torch_runner(source, size)
    path = Path(source)
    if path.suffix == ".onnx":
        return onnx_runner(path, {}, threads)
    if path.suffix == ".kdpkg":
        from shared.package import read_package

        pkg = read_package(path)
        return onnx_runner(pkg.model, {"manifest": pkg.manifest}, threads)
    from trainer.checkpoint import load_checkpoint

    cfg, model, _ = load_checkpoint(path)
    return torch_runner(InferenceGraph(model), size or cfg.size, {"config": cfg.to_dict()})


def run_batched(runner: Runner, images: np.ndarray, batch_size: int = 8, class_index: int = 0) -> np.ndarray:
    """Maps (N, h, w) for uint8 frames (N, S, S, 3), all of the class at `class_index`."""
    if len(images) == 0:
        return np.zeros((0, runner.size // MAP_STRIDE, runner.size // MAP_STRIDE), np.float32)
    return np.concatenate([runner(images[i:i + batch_size], class_index)[:, 0]
                           for i in range(0, len(images), batch_size)])


def measure_latency(runner: Runner, runs: int = 20) -> float:
    """Median milliseconds for one frame (batch 1), after two warm-up runs."""
    frame = np.random.default_rng(0).integers(0, 256, (1, runner.size, runner.size, 3), dtype=np.uint8)
    for _ in range(2):
        runner(frame)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runner(frame)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)
