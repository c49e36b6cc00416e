"""ONNX graph passes shared by the FP16, PTQ, QAT and mixed-precision variants.

The exported inference graph has three parts (`partition`):

- pre: the input path before any weight op (uint8 NHWC -> Transpose -> Cast ->
  ImageNet normalisation);
- body: the networks (teacher, student, decoder...): every node that has a
  weight op (Conv, ConvTranspose, Gemm, MatMul) upstream *and* downstream,
  plus the element-wise ops that close a network (its last residual Add or
  activation);
- head: the map arithmetic after the last weight ops (feature normalisation,
  reductions, distances, resizing, the product of levels).

Only the body is quantised or cast to FP16. The pre part holds the exact
uint8 -> float conversion; `fold_input_normalisation` (input_fold.py) removes it
altogether.
The head holds unit-length normalisation, sums of squares over up to 672
channels and products of small numbers: in INT8 or FP16 these lose the very
differences the map is made of (the head takes ~0.5 ms of a ~3 ms INT8 STFPM frame).

Passes here are exact rewrites (up to float rounding) unless their docstring
says otherwise.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# element-wise ops that may close a network (a last residual Add, a final ReLU) and quantise cleanly
EPILOGUE_OPS = frozenset({"Add", "Sum", "Relu", "Clip", "MaxPool", "Concat"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True, slots=True)
class Partition:
    """Node names of the three parts of an inference graph, each in graph order."""

    pre: tuple[str, ...]
    body: tuple[str, ...]
    head: tuple[str, ...]

    @property
    def float_only(self) -> tuple[str, ...]:
        """The nodes no recipe quantises: input conversion and map arithmetic."""
        return self.pre + self.head


def load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant node output (through Identity nodes), else None."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.output and n.output[0] == name:
            if n.op_type == "Identity":
                return constant_value(model, n.input[0])
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        return numpy_helper.to_array(a.t)
            return None
    return None


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        counts[n.op_type] += 1
    return dict(counts)


def weight_source(model: onnx.ModelProto, node: onnx.NodeProto, prod: dict[str, onnx.NodeProto] | None = None,
                  ) -> str | None:
    """The initializer behind a weight op's weight input (directly or through a DequantizeLinear)."""
    prod = prod if prod is not None else producers(model)
    inits = initializers(model)
    name = node.input[1] if len(node.input) > 1 else ""
    if name in inits:
        return name
    p = prod.get(name)
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
        return p.input[0]
    return None


def class_input(model: onnx.ModelProto) -> str | None:
    """The class-index input of a class-conditional graph (a bank per class), or None."""
    from trainer.inference_graph import CLASS_INPUT_NAME

    return CLASS_INPUT_NAME if any(i.name == CLASS_INPUT_NAME for i in model.graph.input) else None


def partition(model: onnx.ModelProto) -> Partition:
    """Split the graph into input conversion, networks and map arithmetic (see the module docstring)."""
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    prod = producers(model)
    cons = consumers(model)

    def is_weight_op(n: onnx.NodeProto) -> bool:
        # a MatMul of two activations (attention) is arithmetic, not a layer
        return n.op_type in WEIGHT_OPS and weight_source(model, n, prod) is not None

    up: dict[str, bool] = {}     # a weight op at or above the node
    for n in nodes:              # graph order is topological
        up[n.name] = is_weight_op(n) or any(up.get(prod[i].name, False) for i in n.input if i in prod)
    down: dict[str, bool] = {}   # a weight op at or below the node
    for n in reversed(nodes):
        down[n.name] = is_weight_op(n) or any(down.get(c.name, False) for o in n.output for c in cons.get(o, []))
    body = {n.name for n in nodes if up[n.name] and down[n.name]}
    changed = True
    while changed:                # close each network with its trailing Add / activation
        changed = False
        for n in nodes:
            if n.name in body or n.op_type not in EPILOGUE_OPS or not up[n.name]:
                continue
            srcs = [prod[i] for i in n.input if i in prod and prod[i].op_type != "Constant"]
            if srcs and all(s.name in body for s in srcs):
                body.add(n.name)
                changed = True
    pre = tuple(n.name for n in nodes if not up[n.name] and n.op_type not in QDQ_OPS)
    head = tuple(n.name for n in nodes if up[n.name] and n.name not in body and n.op_type not in QDQ_OPS)
    return Partition(pre, tuple(n.name for n in nodes if n.name in body), head)


def prepare(fp32: str | Path | onnx.ModelProto, out: str | Path) -> Path:
    """Shape inference and ONNX Runtime's basic fusions (`quant_pre_process`: BatchNorm into Conv,
    constants folded), then smaller strided kernels (`strip_shifted_kernels`)."""
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.onnx"
        save(load(fp32), src)
        # symbolic inference is for transformer shapes; plain ONNX inference covers these static convolutions
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    model = load(out)
    strip_shifted_kernels(model)
    return save(model, out)


def optimise_float(fp32: str | Path | onnx.ModelProto, out: str | Path, fold_input: bool = True) -> Path:
    """The FP32 graph with this module's exact rewrites (`prepare`, `fold_input_normalisation`)."""
    prepare(fp32, out)
    model = load(out)
    if fold_input:
        fold_input_normalisation(model)
    onnx.checker.check_model(model)
    return save(model, out)


def strip_shifted_kernels(model: onnx.ModelProto) -> int:
    """Drop the all-zero first row and column of "same"-padded strided kernels; returns how many.

    The backbones express TensorFlow's asymmetric "same" padding as a kernel
    grown by a zero row and column in front plus symmetric padding (one Conv
    node). ONNX Conv takes asymmetric pads, so the kernel can shrink back: a
    3x3 stride-2 convolution stops costing 16 taps, a 5x5 one 36. Works on
    float weights and on int8 weights behind a DequantizeLinear.
    """
    inits = initializers(model)
    prod = producers(model)
    shared: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if n.op_type == "Conv":
            shared[weight_source(model, n, prod) or ""] += 1
    done = 0
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        src = weight_source(model, n, prod)
        if src is None or shared[src] != 1:
            continue
        w = numpy_helper.to_array(inits[src])
        a = attributes(n)
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if (w.ndim != 4 or w.shape[2] < 2 or w.shape[3] < 2 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or pads[0] < 1 or pads[1] < 1 or np.any(w[:, :, 0, :]) or np.any(w[:, :, :, 0])
                or any(d != 1 for d in a.get("dilations", [1, 1]))):
            continue
        inits[src].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, :, 1:, 1:]), src))
        set_attribute(n, "kernel_shape", [w.shape[2] - 1, w.shape[3] - 1])
        set_attribute(n, "pads", [pads[0] - 1, pads[1] - 1, pads[2], pads[3]])
        done += 1
    return done


def fold_weight_quantize(model: onnx.ModelProto) -> int:
    """QuantizeLinear of constant float weights -> the int8 initializer it produces; returns how many.

    A QAT export quantises its weights inside the graph; ONNX Runtime fuses a
    Conv only when its weight is a constant integer tensor behind a
    DequantizeLinear, and the file shrinks to a quarter.
    """
    done = 0
    inits = initializers(model)
    for n in list(model.graph.node):
        if n.op_type != "QuantizeLinear":
            continue
        w = constant_value(model, n.input[0])
        scale = constant_value(model, n.input[1])
        zp = constant_value(model, n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if w is None or scale is None or n.input[0] not in inits:
            continue
        axis = attributes(n).get("axis", 1)
        q = quantize_array(w, scale, zp, axis)
        name = n.output[0]
        model.graph.initializer.append(numpy_helper.from_array(q, name))
        model.graph.node.remove(n)
        done += 1
    remove_unused(model)
    return done


def quantize_array(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (round half to even, saturate), per tensor or along `axis`."""
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    info = np.iinfo(dtype)
    shape = [1] * w.ndim
    if np.ndim(scale) == 1:
        shape[axis] = -1
    s = np.reshape(scale, shape if np.ndim(scale) == 1 else ())
    z = np.reshape(zp, shape if np.ndim(scale) == 1 else ()).astype(np.int64) if zp is not None else 0
    return np.clip(np.rint(w / s) + z, info.min, info.max).astype(dtype)


def toposort(model: onnx.ModelProto) -> None:
    """Reorder nodes so every input is produced before it is read (converters append nodes at the end)."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a dangling input near node {pending[0].name!r}")
        ids = {id(n) for n in ready}
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if id(n) not in ids]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads and initializers nobody uses."""
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | graph_outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)


def fold_input_normalisation(model: onnx.ModelProto) -> bool:
    """Move the ImageNet normalisation into the first convolutions' weights; returns whether it did.

    Exact for float convolutions, one rounding of the weights for quantised ones (`input_fold.py`).
    """
    from trainer.quantize.input_fold import fold_input_normalisation as fold

    return fold(model)


def compact_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Smaller QDQ files, same computation: int32 biases behind a DequantizeLinear become the float
    values they stand for (ONNX Runtime re-derives the same int32 when it fuses; TensorRT wants float
    biases), and all-zero zero points of constant weights are dropped (zero is the default)."""
    prod = producers(model)
    inits = initializers(model)
    biases = zero_points = 0
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in prod:
            dq = prod[n.input[2]]
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                q = numpy_helper.to_array(inits[dq.input[0]])
                scale = constant_value(model, dq.input[1])
                if q.dtype == np.int32 and scale is not None:
                    name = dq.input[0] + "_float"
                    model.graph.initializer.append(numpy_helper.from_array(
                        (q.astype(np.float64) * scale.astype(np.float64)).astype(np.float32), name))
                    n.input[2] = name
                    biases += 1
    for n in model.graph.node:
        if (n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[0] in inits
                and numpy_helper.to_array(inits[n.input[0]]).dtype == np.int8):
            zp = constant_value(model, n.input[2])
            if zp is not None and not np.any(zp):
                del n.input[2]
                zero_points += 1
    remove_unused(model)
    return {"float_biases": biases, "dropped_zero_points": zero_points}


def guard_float_layers(model: onnx.ModelProto) -> int:
    """Keep float weight layers float under ONNX Runtime; returns how many needed it.

    ONNX Runtime's `WeightBiasQuantization` optimisation (basic level, on by default) quantises the
    float weights of any Conv / Gemm / MatMul whose input comes straight from a DequantizeLinear, per
    tensor, to form an integer node unit. A layer deliberately left in FP32 between INT8 layers would
    silently become a coarse INT8 one (measured: 3x the map error of quantising it properly). A
    multiplication by 2 between the DequantizeLinear and the layer, with the layer's weights halved
    (both exact in floating point), breaks that pattern at the cost of one element-wise pass.
    """
    prod = producers(model)
    inits = initializers(model)
    done = 0
    for n in list(model.graph.node):
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        src = prod.get(n.input[0])
        w = numpy_helper.to_array(inits[n.input[1]])
        if src is None or src.op_type != "DequantizeLinear" or w.dtype != np.float32:
            continue
        two, halved, guarded = n.name + "_kd_two", n.name + "_kd_half_w", n.name + "_kd_guarded"
        model.graph.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), two),
                                        numpy_helper.from_array(w * np.float32(0.5), halved)])
        model.graph.node.insert(list(model.graph.node).index(n),
                                helper.make_node("Mul", [n.input[0], two], [guarded], name=guarded))
        n.input[0], n.input[1] = guarded, halved
        done += 1
    remove_unused(model)
    return done


def qdq_summary(model: onnx.ModelProto) -> dict[str, object]:
    """What a QDQ graph quantises: counts of Q/DQ nodes and of int8 / int4 / uint8 weight tensors."""
    counts = op_counts(model)
    dtypes: dict[str, int] = defaultdict(int)
    for t in model.graph.initializer:
        if len(t.dims) >= 2:
            dtypes[TensorProto.DataType.Name(t.data_type).lower()] += 1
    return {"quantize_linear": counts.get("QuantizeLinear", 0),
            "dequantize_linear": counts.get("DequantizeLinear", 0), "weight_dtypes": dict(dtypes)}


def file_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 2**20
