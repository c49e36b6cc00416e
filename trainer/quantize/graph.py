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
uint8 -> float conversion; `fold_input_normalisation` removes it altogether.
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


@dataclass(frozen=True, slots=True)
class InputNormalisation:
    """The pre part of an exported graph: image -> Transpose -> Cast -> Mul(scale) -> Add(shift)."""

    transpose: onnx.NodeProto
    cast: onnx.NodeProto
    mul: onnx.NodeProto
    add: onnx.NodeProto
    scale: np.ndarray    # (3,) per channel
    shift: np.ndarray    # (3,)


def find_input_normalisation(model: onnx.ModelProto) -> InputNormalisation | None:
    """The uint8 NHWC -> normalised NCHW chain of `trainer.inference_graph`, if the graph starts with it."""
    cons = consumers(model)
    image = model.graph.input[0].name

    def only(name: str, op: str) -> onnx.NodeProto | None:
        users = cons.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    tr = only(image, "Transpose")
    if tr is None or list(attributes(tr).get("perm", [])) != [0, 3, 1, 2]:
        return None
    cast = only(tr.output[0], "Cast")
    mul = only(cast.output[0], "Mul") if cast else None
    add = only(mul.output[0], "Add") if mul else None
    if add is None:
        return None
    a = constant_value(model, mul.input[1])
    b = constant_value(model, add.input[1])
    if a is None or b is None or a.size != 3 or b.size != 3:
        return None
    return InputNormalisation(tr, cast, mul, add, a.reshape(3).astype(np.float64), b.reshape(3).astype(np.float64))


def fold_input_normalisation(model: onnx.ModelProto) -> bool:
    """Move the ImageNet normalisation into the first convolutions' weights; returns whether it did.

    conv(a * x + b) equals conv'(x) with W' = W * a (per input channel) and
    bias' = bias + sum(W * b), as long as the padding is done on x with the
    pixel value that normalises to zero (255 * mean). The padding becomes
    explicit (blocks of that pixel concatenated on the padded sides):

    - float graphs: image -> Transpose -> Cast -> pad -> Conv', exact. Saves
      the two full-frame float passes of the normalisation.
    - QDQ graphs: image -> pad (uint8, the pixel value rounded: at most 0.01
      in normalised units, on the padded border only) -> Transpose ->
      DequantizeLinear(scale 1, zero point 0) -> Conv', W' re-quantised per output channel. The
      input is then quantised losslessly (the pixels are the integers), and
      ONNX Runtime runs the first convolution directly on the frame's bytes.
      The trained or calibrated grid of the first layers' weights moves by one
      rounding (a <= 2 % per-input-channel rescale).

    Both kinds may coexist (one stem quantised, one kept float); first
    convolutions with different paddings each get their own padded frame.
    """
    norm = find_input_normalisation(model)
    if norm is None:
        return False
    cons = consumers(model)
    prod = producers(model)
    inits = initializers(model)
    x = norm.add.output[0]
    float_convs: list[onnx.NodeProto] = []    # read the normalised frame directly
    int_convs: list[onnx.NodeProto] = []      # read it through QuantizeLinear -> DequantizeLinear
    for c in cons[x]:
        if c.op_type == "Conv":
            float_convs.append(c)
        elif c.op_type == "QuantizeLinear":
            for d in cons[c.output[0]]:
                users = cons[d.output[0]]
                if d.op_type != "DequantizeLinear" or not users or any(u.op_type != "Conv" for u in users):
                    return False
                int_convs += users
        else:
            return False
    convs = float_convs + int_convs
    if (not convs or any(attributes(c).get("group", 1) != 1 for c in convs)
            or any(weight_source(model, c, prod) is None for c in convs)):
        return False

    image = model.graph.input[0].name
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    zero_pixel = -norm.shift / norm.scale
    new_nodes: list[onnx.NodeProto] = []
    made: dict[tuple, str] = {}

    def pad(src: str, pads: tuple[int, ...], nhwc: bool, pixel: np.ndarray, dst: str) -> str:
        """`src` with blocks of `pixel` concatenated on each side: a copy of the frame or two, where a
        per-channel Where over a broadcast mask would take a sizeable share of the whole graph."""
        pt, pl, pb, pr = pads
        h_axis, w_axis = (1, 2) if nhwc else (2, 3)
        if not any(n.output[0] == "kd_batch" for n in new_nodes):
            node("Shape", [image], "kd_batch", start=0, end=1)

        def block(h: int, w: int, tag: str) -> str:
            shape = [h, w, 3] if nhwc else [3, h, w]
            const = np.broadcast_to(pixel, [1, *shape]).copy()
            model.graph.initializer.extend([numpy_helper.from_array(const, tag + "_value"),
                                            numpy_helper.from_array(np.array(shape, np.int64), tag + "_dims")])
            size = node("Concat", ["kd_batch", tag + "_dims"], tag + "_shape", axis=0)
            return node("Expand", [tag + "_value", size], tag)

        h, w = dims[1], dims[2]
        if pl or pr:
            left = [block(h, pl, dst + "_left")] if pl else []
            right = [block(h, pr, dst + "_right")] if pr else []
            src = node("Concat", [*left, src, *right], dst + "_cols", axis=w_axis)
            w += pl + pr
        if pt or pb:
            top = [block(pt, w, dst + "_top")] if pt else []
            bottom = [block(pb, w, dst + "_bottom")] if pb else []
            src = node("Concat", [*top, src, *bottom], dst + "_rows", axis=h_axis)
        return src

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        new_nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def frame(integer: bool, pads: tuple[int, ...]) -> str:
        """The input for convolutions of one kind and padding (built once, shared)."""
        key = (integer, pads)
        if key in made:
            return made[key]
        tag = f"kd_{'int' if integer else 'float'}_" + "_".join(map(str, pads))
        if integer:   # uint8 NHWC padded with the rounded pixel, then integers as they are
            src = image
            if any(pads):
                pixel = np.clip(np.rint(zero_pixel), 0, 255).astype(np.uint8).reshape(1, 1, 1, 3)
                src = pad(image, pads, True, pixel, tag + "_padded")
            nchw = node("Transpose", [src], tag + "_nchw", perm=[0, 3, 1, 2])
            if "kd_pixel_scale" not in {t.name for t in model.graph.initializer}:
                model.graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), "kd_pixel_scale"),
                                                numpy_helper.from_array(np.array(0, np.uint8), "kd_pixel_zero")])
            out = node("DequantizeLinear", [nchw, "kd_pixel_scale", "kd_pixel_zero"], tag + "_pixels")
        else:         # float NCHW padded with the exact pixel
            pixels = made.get((False, None)) or node("Cast", [node("Transpose", [image], "kd_image_nchw",
                                                                   perm=[0, 3, 1, 2])],
                                                     "kd_pixels_float", to=TensorProto.FLOAT)
            made[(False, None)] = pixels
            out = pixels
            if any(pads):
                out = pad(pixels, pads, False, zero_pixel.astype(np.float32).reshape(1, 3, 1, 1), tag)
        made[key] = out
        return out

    a = norm.scale.reshape(1, 3, 1, 1)
    b = norm.shift.reshape(1, 3, 1, 1)
    for c in convs:
        pads = tuple(attributes(c).get("pads", [0, 0, 0, 0]))
        _fold_into_conv(model, c, a, b, inits, prod)
        c.input[0] = frame(c in int_convs, pads)
        set_attribute(c, "pads", [0, 0, 0, 0])
    first = list(model.graph.node).index(norm.transpose)
    for n in reversed(new_nodes):
        model.graph.node.insert(first, n)
    remove_unused(model)
    return True


def _fold_into_conv(model: onnx.ModelProto, conv: onnx.NodeProto, a: np.ndarray, b: np.ndarray,
                    inits: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto]) -> None:
    """W' = W * a, bias' = bias + sum(W * b); for a QDQ weight, re-quantise W' per output channel."""
    w_name = conv.input[1]
    dq = prod.get(w_name) if w_name not in inits else None
    if dq is None:
        w = numpy_helper.to_array(inits[w_name]).astype(np.float64)
    else:
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        s = constant_value(model, dq.input[1]).astype(np.float64)
        z = constant_value(model, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        zz = 0.0 if z is None else (z.astype(np.float64).reshape(-1, 1, 1, 1) if z.ndim else float(z))
        w = (q - zz) * (s.reshape(-1, 1, 1, 1) if s.ndim else s)
    bias = _conv_bias(model, conv, inits, prod, w.shape[0])
    bias = bias + (w * b).sum(axis=(1, 2, 3))
    w = w * a
    if dq is None:
        inits[w_name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), w_name))
        _set_bias(model, conv, bias)
        return
    scale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127.0).clip(min=1e-12).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    base = conv.name + "_kd_folded"
    model.graph.initializer.extend([numpy_helper.from_array(q, base + "_w"),
                                    numpy_helper.from_array(scale, base + "_w_scale"),
                                    numpy_helper.from_array(np.zeros(len(scale), np.int8), base + "_w_zp")])
    new_dq = helper.make_node("DequantizeLinear", [base + "_w", base + "_w_scale", base + "_w_zp"], [base + "_wq"],
                              name=base + "_w_dq", axis=0)
    model.graph.node.insert(list(model.graph.node).index(conv), new_dq)
    conv.input[1] = base + "_wq"
    _set_bias(model, conv, bias)


def _conv_bias(model: onnx.ModelProto, conv: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
               prod: dict[str, onnx.NodeProto], n_out: int) -> np.ndarray:
    if len(conv.input) < 3 or not conv.input[2]:
        return np.zeros(n_out)
    name = conv.input[2]
    value = constant_value(model, name)   # an initializer, or one shared through an Identity
    if value is not None:
        return value.astype(np.float64)
    dq = prod[name]
    if dq.op_type != "DequantizeLinear":
        raise ValueError(f"{conv.name}: bias {name!r} is neither constant nor dequantised")
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    return q * constant_value(model, dq.input[1]).astype(np.float64)


def _set_bias(model: onnx.ModelProto, conv: onnx.NodeProto, bias: np.ndarray) -> None:
    """A float bias: ONNX Runtime quantises it itself when it fuses a QLinearConv, TensorRT wants it float."""
    name = conv.name + "_kd_folded_b"
    model.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), name))
    if len(conv.input) < 3:
        conv.input.append(name)
    else:
        conv.input[2] = name


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
