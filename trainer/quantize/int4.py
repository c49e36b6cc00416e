"""INT4 weights as an experiment.

`requantize_weights` (recipe `int4`, `ptq.PTQConfig.weight_bits = 4`): ONNX Runtime's 4-bit
kernels (MatMulNBits) cover MatMul only, and its integer convolutions take
8-bit weights. Conv weights are therefore put on a 4-bit grid (per output
channel, symmetric, levels -7..7) but stored and run as int8: this measures
what 4-bit weights cost in accuracy, and nothing else. The graph runs exactly
as fast as INT8 and its file is as large; `int4_weight_mb` reports what a
packed 4-bit store would weigh. Depthwise kernels (9 or 25 weights per
channel, a few percent of the parameters) stay at 8 bits by default: 4 bits
there costs the most accuracy and saves the least.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from trainer.quantize import graph as G


def requantize_weights(model: onnx.ModelProto, bits: int = 4, depthwise_bits: int = 8) -> dict[str, Any]:
    """Put every int8 per-channel Conv weight of a QDQ graph on a `bits` grid (stored as int8).

    Depthwise kernels (group == output channels) go to `depthwise_bits`.
    Returns counts and the size a packed store would have.
    """
    prod = G.producers(model)
    inits = G.initializers(model)
    changed, packed_bytes, int8_bytes = 0, 0.0, 0
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        dq = prod.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        if q.dtype != np.int8:
            continue
        depthwise = G.attributes(n).get("group", 1) == q.shape[0] and q.shape[1] == 1
        b = depthwise_bits if depthwise else bits
        int8_bytes += q.size
        packed_bytes += q.size * b / 8
        if b >= 8:
            continue
        scale = G.constant_value(model, dq.input[1]).astype(np.float64).reshape(-1)
        w = q.astype(np.float64) * scale.reshape(-1, 1, 1, 1)
        levels = 2 ** (b - 1) - 1
        new_scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / levels).clip(min=1e-12)
        q_new = np.clip(np.rint(w / new_scale.reshape(-1, 1, 1, 1)), -levels, levels).astype(np.int8)
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q_new, dq.input[0]))
        scale_name = dq.input[0] + "_scale_4bit"
        model.graph.initializer.append(numpy_helper.from_array(new_scale.astype(np.float32), scale_name))
        dq.input[1] = scale_name
        changed += 1
    G.remove_unused(model)
    return {"layers_4bit": changed, "int8_weight_mb": int8_bytes / 2**20, "int4_weight_mb": packed_bytes / 2**20}
