"""Folding the input normalisation into the first convolutions: the uint8 frame feeds them directly.

The exported graph starts image -> Transpose -> Cast -> Mul(scale) -> Add(shift)
(`trainer.inference_graph`); `fold_input_normalisation` moves scale and shift
into the weights and biases of the convolutions that read the result, float or
behind Q/DQ, and pads the frame with the pixel value that normalises to zero.
`graph.fold_input_normalisation` runs it; its docstring below says where it is
exact and where it rounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trainer.quantize.graph import (
    attributes,
    constant_value,
    consumers,
    initializers,
    producers,
    remove_unused,
    set_attribute,
    weight_source,
)


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
