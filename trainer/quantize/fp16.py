"""FP16 variant of the full inference graph, teacher included, with the sensitive ops kept in FP32.

Built with ONNX Runtime's `convert_float_to_float16` on the prepared FP32
graph (graph.optimise_float: BatchNorm folded, strided kernels shrunk, input
normalisation folded), with `keep_io_types` so the graph still takes uint8
frames and returns a float32 map.

Kept in FP32 (`node_block_list` and `op_block_list`), with reasons:

- the map arithmetic after the networks (graph.partition's head): unit-length
  normalisation divides by norms summed over up to 672 squared channels,
  which overflow FP16's 65504 for feature magnitudes above ~10; the distance
  is a small difference of nearly equal unit vectors, where FP16's 11-bit
  mantissa leaves ~3 significant digits; and the product of three levels
  multiplies those errors.
- every reduction, division, power, square root, subtraction and resize
  anywhere (`SENSITIVE_OPS`): the same arguments, for any method's head that
  the partition would not recognise.
- the input conversion (uint8 -> float), which is exact in FP32.

The convolutions, activations and residual sums run in FP16; their values stay
within a few hundred, where FP16's relative error (5e-4) is harmless.

On a CPU without FP16 arithmetic ONNX Runtime computes FP16 nodes by casting
to FP32 and back: the file halves, the speed does not improve. The variant is
for GPUs (TensorRT on Jetson).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from trainer.quantize import graph as G

SENSITIVE_OPS = ("ReduceL2", "ReduceSum", "ReduceSumSquare", "ReduceMean", "ReduceMax", "Div", "Pow", "Sqrt",
                 "Sub", "Resize", "Softmax", "Exp", "Log", "LayerNormalization", "InstanceNormalization",
                 "Where", "Pad")


@dataclass
class FP16Result:
    path: Path
    fp32_nodes: list[str]     # nodes left in FP32

    def recipe(self) -> dict[str, object]:
        """The manifest's `quantization` entry."""
        return {"scheme": "fp16", "op_block_list": list(SENSITIVE_OPS), "fp32_nodes": len(self.fp32_nodes)}


def convert_fp16(fp32: str | Path, out: str | Path, fold_input: bool = True) -> FP16Result:
    """Write the FP16 variant of the FP32 inference graph `fp32` to `out`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with tempfile.TemporaryDirectory() as tmp:
        prepared = G.optimise_float(fp32, Path(tmp) / "fp32.onnx", fold_input=fold_input)
        model = G.load(prepared)
    part = G.partition(model)
    keep = list(part.float_only)
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(SENSITIVE_OPS),
                                    node_block_list=keep)
    G.toposort(half)
    onnx.checker.check_model(half)
    G.save(half, out)
    blocked = [n.name for n in model.graph.node if n.name in set(keep) or n.op_type in SENSITIVE_OPS]
    return FP16Result(Path(out), blocked)
