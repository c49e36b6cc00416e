"""Static INT8 post-training quantisation of the inference graph: QDQ, per-channel weights.

Steps (`quantize_ptq`):

1. `graph.prepare`: `quant_pre_process` (symbolic and ONNX shape inference,
   ONNX Runtime's basic optimisations: BatchNorm folded into Conv, constants
   folded), then `graph.strip_shifted_kernels` (smaller strided kernels).
2. `graph.partition` splits off what stays float (see below).
3. `quantize_static` in QDQ format: weights int8, symmetric, per output
   channel; activations per tensor, ranges from the calibration frames with
   the chosen observer (min-max, percentile, entropy).
4. For the CPU target, `graph.fold_input_normalisation` then feeds the uint8
   frame straight into the first integer convolutions.

Kept in float, with reasons:

- the input path (uint8 -> float, ImageNet normalisation): it is exact and
  cheap in float, while a QLinearAdd / QLinearMul over a full 3-channel frame
  broadcasting per-channel constants is ONNX Runtime's slowest integer path
  (measured ~1.5 ms, 60 % of all the integer convolutions together). The CPU
  target removes it entirely.
- the map arithmetic (unit-length feature normalisation, squared distances
  summed over channels, upsampling, the product of levels): the map is the
  *difference* between two nearly equal normalised vectors; at 8 bits that
  difference drowns in rounding (and a product of three quantised levels
  compounds it), and the whole head takes ~0.5 ms of a ~3 ms INT8 frame.

Targets: `cpu` quantises activations asymmetric uint8 (ONNX Runtime's
U8S8 kernels; a ReLU6 range [0, 6] maps onto 0..255 so the Clip folds
away); `tensorrt` quantises them symmetric int8 with zero point 0, the only
form TensorRT accepts for explicitly quantised networks (ONNX Runtime runs it
too, slower, as its Clips then stay in float).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from trainer.quantize import DEFAULT_OBSERVER, OBSERVERS, TARGETS
from trainer.quantize import graph as G
from trainer.quantize.calibration import FrameReader
from trainer.quantize.int4 import requantize_weights



@dataclass(frozen=True)
class PTQConfig:
    observer: str = DEFAULT_OBSERVER    # trainer.quantize.OBSERVERS (the map arithmetic stays float: graph.py)
    per_channel: bool = True            # depthwise kernels differ by 100x between channels
    target: str = "cpu"
    fold_input: bool = True             # CPU target only: uint8 frame straight into the first convolutions
    percentile: float = 99.999          # for observer "percentile"
    calib_chunk: int = 4                # frames per calibration pass: bounds memory for histogram observers
    exclude: tuple[str, ...] = ()       # further nodes kept in float (mixed precision)
    only: tuple[str, ...] = ()          # quantise just these nodes (per-layer sensitivity); empty: all
    weight_bits: int = 8                # 4: the INT4-weight experiment (int8 storage, 4-bit grid; see int4.py)

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.weight_bits not in (4, 8):
            raise ValueError("weight_bits must be 4 or 8")


DEFAULT_PTQ = PTQConfig()


@dataclass
class PTQResult:
    path: Path
    config: PTQConfig
    float_nodes: dict[str, str]         # node -> why it stays float
    summary: dict[str, Any] = field(default_factory=dict)

    def recipe(self) -> dict[str, Any]:
        """The manifest's `quantization` entry."""
        cfg = asdict(self.config)
        cfg["exclude"], cfg["only"] = list(self.config.exclude), list(self.config.only)
        return {"scheme": "ptq", "format": "QDQ", **cfg, "float_nodes": len(self.float_nodes), **self.summary}


def float_nodes(model: onnx.ModelProto, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Nodes quantisation leaves in float, each with its reason.

    A layer kept float keeps its activation (Clip / Relu) too: quantised on its own, that activation's
    input would get the pre-activation range, far coarser than the [0, 6] the next layer reads.
    """
    part = G.partition(model)
    cons = G.consumers(model)
    reasons = {n: "input conversion: exact in float; folded away on the CPU target" for n in part.pre}
    reasons.update({n: "map arithmetic: differences of nearly equal vectors need float" for n in part.head})
    for node in model.graph.node:
        if node.name in extra:
            reasons[node.name] = "kept in float for accuracy (mixed precision)"
            for c in cons.get(node.output[0], []):
                if c.op_type in ("Clip", "Relu"):
                    reasons[c.name] = "activation of a layer kept in float"
    return reasons


def quantize_ptq(fp32: str | Path, out: str | Path, frames: np.ndarray, cfg: PTQConfig = DEFAULT_PTQ,
                 calibration_cache: str | Path | None = None, prepared: bool = False) -> PTQResult:
    """Quantise the FP32 inference graph `fp32` with calibration `frames` (uint8 NHWC) to `out`.

    prepared: `fp32` already went through `graph.prepare` (node names in `cfg` refer to that graph).
    calibration_cache: a file to store the activation ranges in, and reuse them from when it exists
    (same graph, frames and observer).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(fp32) if prepared else G.prepare(fp32, Path(tmp) / "pre.onnx")
        model = G.load(pre)
        keep = float_nodes(model, cfg.exclude)
        chunk = max(1, min(cfg.calib_chunk, len(frames)))
        frames = frames[: len(frames) - len(frames) % chunk]   # strided calibration needs whole chunks
        symmetric = cfg.target == "tensorrt"
        options: dict[str, Any] = {
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            "CalibStridedMinMax": chunk,
            "CalibPercentile": cfg.percentile,
            "CalibTensorRangeSymmetric": symmetric,
        }
        with contextlib.redirect_stdout(io.StringIO()):   # the histogram calibrators print their progress
            quantize_static(
                str(pre), str(out), FrameReader(frames, 1, class_input=G.class_input(model)),
                quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=list(cfg.only) or None,
                nodes_to_exclude=sorted(keep),
                calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                  "entropy": CalibrationMethod.Entropy}[cfg.observer],
                extra_options=options,
                calibration_cache_path=str(calibration_cache) if calibration_cache else None,
            )
    model = G.load(out)
    summary: dict[str, Any] = {}
    if cfg.weight_bits == 4:
        summary["int4_weights"] = requantize_weights(model, bits=4)
    if cfg.target == "cpu" and cfg.fold_input:
        summary["input_folded"] = G.fold_input_normalisation(model)
    summary["guarded_float_layers"] = G.guard_float_layers(model)
    summary.update(G.compact_qdq(model))
    summary.update(G.qdq_summary(model))
    G.save(model, out)
    return PTQResult(out, cfg, keep, summary)
