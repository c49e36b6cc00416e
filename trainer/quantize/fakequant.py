"""Fake-quantised networks for quantisation-aware training: the modules and the rewrite that places them.

Every network of a method model (teacher, student, or whatever the method
holds) is traced with torch.fx and rewritten:

- Conv2d (+ the BatchNorm2d right after it) -> `QuantConv`: BatchNorm folded
  into the weights (frozen statistics, the standard QAT practice, and what the
  deployed graph computes anyway), weights fake-quantised to int8, symmetric,
  per output channel.
- `FakeQuant` (per tensor) on the network input, on every convolution output
  (after its activation when one follows, so a ReLU6 range [0, 6] is what
  gets quantised and the Clip folds away), on every residual sum, and on any
  other tensor a convolution reads.

Target `cpu`: uint8 asymmetric activations (ONNX Runtime's fast path). Target
`tensorrt`: int8 symmetric activations with zero point 0, the explicitly
quantised form TensorRT consumes. The fine-tune itself is in qat.py.
"""
from __future__ import annotations

import copy
import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from trainer.quantize import TARGETS
ACTIVATIONS = {F.relu, F.relu6, torch.relu, F.hardtanh, torch.clamp, torch.clip}
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
ADDS = {operator.add, torch.add, operator.iadd}


# -- fake-quant modules ------------------------------------------------------------

class FakeQuant(nn.Module):
    """Per-tensor activation fake-quant: observes min/max while calibrating, then quantises.

    symmetric: int8 with zero point 0 (TensorRT); else uint8 asymmetric (ONNX Runtime on CPU).
    """

    def __init__(self, symmetric: bool) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.qmin, self.qmax = (-128, 127) if symmetric else (0, 255)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        self.observing = True
        self.enabled = False

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            with torch.no_grad():
                self.min_val.copy_(torch.minimum(self.min_val, x.min()))
                self.max_val.copy_(torch.maximum(self.max_val, x.max()))
        if not self.enabled:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def freeze(self) -> None:
        """Ranges -> scale and zero point (ONNX Runtime's formulas), stop observing, start quantising."""
        lo = min(float(self.min_val), 0.0)
        hi = max(float(self.max_val), 0.0)
        if not math.isfinite(lo) or not math.isfinite(hi):
            raise RuntimeError("FakeQuant.freeze before any calibration batch")
        if self.symmetric:
            scale, zp = max(abs(lo), abs(hi)) / 127.0, 0
        else:
            scale = (hi - lo) / 255.0
            zp = round(-lo / scale) if scale > 0 else 0
        self.scale.fill_(max(scale, 1e-8))
        self.zero_point.fill_(int(zp))
        self.observing, self.enabled = False, True

    def extra_repr(self) -> str:
        return f"{'int8 symmetric' if self.symmetric else 'uint8 asymmetric'}, scale={float(self.scale):.4g}"


class QuantConv(nn.Module):
    """Conv2d with an optional BatchNorm folded in and int8 per-channel symmetric weight fake-quant.

    The kernel is kept exactly as the convolution runs it (for the backbones'
    shifted "same" convolutions, with its zero first row and column, held at
    zero by masking their gradient), so the export is Q -> DQ -> Conv.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        w = conv.weight.detach().clone()
        shift = int(getattr(conv, "shift", 0))
        if shift:   # the backbone's SameConv: the kernel it actually convolves with
            w = F.pad(w, (1, 0, 1, 0))
        b = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(w.shape[0])
        if bn is not None:
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(std)
            beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(std)
            w = w * (gamma / std).view(-1, 1, 1, 1)
            b = (b - bn.running_mean) * gamma / std + beta
        self.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
        self.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.enabled = True
        self.register_buffer("weight_scale", torch.ones(w.shape[0]))
        self.frozen = False
        if shift and self.weight.requires_grad:
            mask = torch.ones_like(w)
            mask[:, :, 0, :] = 0
            mask[:, :, :, 0] = 0
            self.weight.register_hook(lambda g: g * mask)

    def current_scale(self) -> Tensor:
        if self.frozen:
            return self.weight_scale
        return (self.weight.detach().abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-12)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.enabled:
            zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            w = torch.fake_quantize_per_channel_affine(w, self.current_scale(), zp, 0, -128, 127)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the weight scales as constants (for export: the graph then holds no scale arithmetic)."""
        self.weight_scale.copy_(self.current_scale())
        self.frozen = True


# -- graph rewriting ------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """Convolutions and BatchNorm stay whole (subclasses too: the backbones' SameConv)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in ACTIVATIONS
    if n.op == "call_method":
        return n.target in ("relu", "relu_", "clamp", "clip", "clamp_")
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), ACTIVATION_MODULES)


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in ADDS) or (n.op == "call_method" and n.target in ("add", "add_"))


def _module_of(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def quantize_network(net: nn.Module, symmetric: bool) -> fx.GraphModule:
    """`net` traced and rewritten with QuantConv and FakeQuant modules (see the module docstring)."""
    trainable = any(p.requires_grad for p in net.parameters())
    gm = fx.GraphModule(net, _Tracer().trace(net))
    g = gm.graph
    count = 0

    def add_module(name: str, module: nn.Module) -> str:
        gm.add_submodule(name, module)
        return name

    # 1. Conv (+ BatchNorm) -> QuantConv
    for n in list(g.nodes):
        conv = _module_of(gm, n)
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, QuantConv):
            continue
        users = list(n.users)
        bn_node = users[0] if len(users) == 1 and isinstance(_module_of(gm, users[0]), nn.BatchNorm2d) else None
        bn = _module_of(gm, bn_node) if bn_node is not None else None
        qc = QuantConv(conv, bn)
        if not trainable:
            qc.requires_grad_(False)
        gm.add_submodule(n.target, qc)
        if bn_node is not None:
            bn_node.replace_all_uses_with(n)
            g.erase_node(bn_node)

    # 2. FakeQuant after the input, convolutions, activations and sums
    def insert_after(n: fx.Node) -> fx.Node:
        nonlocal count
        name = add_module(f"fq_{count}", FakeQuant(symmetric))
        count += 1
        with g.inserting_after(n):
            fq = g.call_module(name, (n,))
        n.replace_all_uses_with(fq, delete_user_cb=lambda u: u is not fq)
        return fq

    for n in list(g.nodes):
        conv_out = isinstance(_module_of(gm, n), QuantConv) and not (
            n.users and all(_is_activation(gm, u) for u in n.users))   # else: quantised after its activation
        if n.op == "placeholder" or _is_activation(gm, n) or _is_add(n) or conv_out:
            insert_after(n)
    # 3. anything else a convolution reads
    for n in list(g.nodes):
        if isinstance(_module_of(gm, n), QuantConv):
            src = n.args[0]
            if isinstance(src, fx.Node) and not isinstance(_module_of(gm, src), FakeQuant):
                name = add_module(f"fq_{count}", FakeQuant(symmetric))
                count += 1
                with g.inserting_before(n):
                    fq = g.call_module(name, (src,))
                n.replace_input_with(src, fq)
    g.lint()
    gm.recompile()
    return gm


def networks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of each network inside a method model: its direct children holding a Conv2d
    (ModuleList / ModuleDict entries each on their own)."""
    out: list[tuple[nn.Module, str]] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out += networks(child)
        elif any(isinstance(m, nn.Conv2d) for m in child.modules()):
            out.append((model, name))
    return out


def quantize_in_place(parent: nn.Module, name: str, symmetric: bool) -> None:
    """Replace `parent.name` by its fake-quantised trace; a module torch.fx cannot trace whole (its
    forward iterates over a list argument, say) has its children quantised one by one instead."""
    child = getattr(parent, name)
    net = nn.Sequential(child) if isinstance(child, nn.Conv2d) else child   # a bare conv: trace it as a call
    try:
        setattr(parent, name, quantize_network(net, symmetric))
    except (fx.proxy.TraceError, TypeError, NotImplementedError):
        for p, n in networks(child):
            quantize_in_place(p, n, symmetric)


def prepare_qat(model: nn.Module, target: str = "cpu") -> nn.Module:
    """A copy of the method `model` with every network fake-quantised (observers on, activations off)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    model = copy.deepcopy(model).eval()
    for parent, name in networks(model):
        quantize_in_place(parent, name, symmetric=target == "tensorrt")
    return model


def fake_quants(model: nn.Module) -> list[FakeQuant]:
    return [m for m in model.modules() if isinstance(m, FakeQuant)]


def freeze(model: nn.Module) -> None:
    """End calibration: activation ranges fixed and quantising."""
    for m in fake_quants(model):
        m.freeze()


def freeze_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantConv):
            m.freeze()


def set_quantisation(model: nn.Module, on: bool) -> None:
    """Switch every fake-quant (activations and weights) on or off."""
    for m in model.modules():
        if isinstance(m, (FakeQuant, QuantConv)):
            m.enabled = on
