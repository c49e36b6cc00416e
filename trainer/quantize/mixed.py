"""Mixed precision chosen by measured sensitivity.

Sensitivity (`layer_sensitivity`): each weight layer is quantised alone (all
else FP32) and the resulting maps are compared with the FP32 maps on held-out
normal frames: relative L2 error ||m_q - m_fp32|| / ||m_fp32||. That needs no
labels, so choosing what to keep in float never looks at the test set.
`quantize_mixed` then quantises everything except the `keep` most sensitive
layers, which stay FP32 (on a CPU, FP16 would only add casts). ONNX Runtime
would re-quantise such a float layer on its own, per tensor, whenever a
DequantizeLinear feeds it (`graph.guard_float_layers` explains and prevents
that; the per-layer measurement needs the same guard for the layers next to
the one quantised).
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from trainer.quantize import graph as G
from trainer.quantize.ptq import DEFAULT_PTQ, PTQConfig, PTQResult, quantize_ptq
from trainer.quantize.runtime import onnx_map_fn


@dataclass(frozen=True, slots=True)
class LayerSensitivity:
    node: str
    op: str
    params: int
    map_error: float     # relative L2 map error with only this layer quantised


@dataclass
class MixedResult:
    ptq: PTQResult
    kept: list[str]
    sensitivity: list[LayerSensitivity] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.ptq.path

    def recipe(self) -> dict[str, Any]:
        """The manifest's `quantization` entry."""
        return {**self.ptq.recipe(), "scheme": "mixed", "kept_fp32": self.kept,
                "selection": "largest relative L2 map error when quantised alone, held-out normal frames"}


def map_error(maps: np.ndarray, reference: np.ndarray) -> float:
    """Relative L2 error of maps against reference maps."""
    return float(np.linalg.norm(maps - reference) / max(np.linalg.norm(reference), 1e-12))


def weight_layers(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """(name, op, parameter count) of each weight layer the quantiser would quantise."""
    part = set(G.partition(model).body)
    inits = G.initializers(model)
    prod = G.producers(model)
    out = []
    for n in model.graph.node:
        if n.name in part and n.op_type in G.WEIGHT_OPS:
            src = G.weight_source(model, n, prod)
            if src is not None:
                out.append((n.name, n.op_type, int(np.prod(inits[src].dims))))
    return out


def layer_sensitivity(fp32: str | Path, calib: np.ndarray, frames: np.ndarray, cfg: PTQConfig = DEFAULT_PTQ,
                      progress: Callable[[str], None] | None = None) -> list[LayerSensitivity]:
    """Map error of quantising each weight layer alone, most sensitive first."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pre = G.prepare(fp32, tmp / "pre.onnx")
        reference = onnx_map_fn(pre)(frames)
        cache = tmp / "ranges"
        out = []
        model = G.load(pre)
        cons = G.consumers(model)
        layers = weight_layers(model)
        node = {n.name: n for n in model.graph.node}
        for i, (name, op, params) in enumerate(layers):
            # with its activation, so the quantiser folds the Clip into the output range as in the full graph
            acts = tuple(c.name for c in cons[node[name].output[0]] if c.op_type in ("Relu", "Clip"))
            one = replace(cfg, only=(name, *acts), exclude=())
            res = quantize_ptq(pre, tmp / "one.onnx", calib, one, calibration_cache=cache, prepared=True)
            out.append(LayerSensitivity(name, op, params, map_error(onnx_map_fn(res.path)(frames), reference)))
            if progress:
                progress(f"sensitivity {i + 1}/{len(layers)} {name}: {out[-1].map_error:.4f}")
    return sorted(out, key=lambda s: s.map_error, reverse=True)


def quantize_mixed(fp32: str | Path, out: str | Path, calib: np.ndarray, keep: int,
                   sensitivity: list[LayerSensitivity], cfg: PTQConfig = DEFAULT_PTQ) -> MixedResult:
    """PTQ with the `keep` most sensitive layers left in FP32."""
    kept = [s.node for s in sensitivity[:keep]]
    res = quantize_ptq(fp32, out, calib, replace(cfg, exclude=tuple(kept)))
    return MixedResult(res, kept, list(sensitivity))


def sensitivity_table(sensitivity: list[LayerSensitivity], top: int = 10) -> list[dict[str, Any]]:
    return [asdict(s) for s in sensitivity[:top]]
