"""Reverse Distillation (Deng & Li, 2022): a frozen pretrained encoder, a trainable
one-class bottleneck and a student decoder that reconstructs the encoder's features.

The decoder sees only the bottleneck's compact embedding, never the image or
the encoder's levels directly, so it learns to rebuild normal features from a
summary of them; an anomaly, squeezed through that summary, comes back
looking normal and disagrees with the encoder's view of it.

Edge choices: the decoder upsamples with Resize (nearest or bilinear) then
convolves, never ConvTranspose2d (which quantizes badly and falls back to
FP32 on edge runtimes); BatchNorm (folded into the convolutions on export)
and ReLU only.

The encoder's levels come from `trainer.models.teacher`: locally averaged
and standardised per channel, the same targets STFPM's student learns. The
paper's recipe (raw levels at strides 4, 8, 16, cosine distance) is one
config away: strides (4, 8, 16), pool 1, target "unit".
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.backbone import BACKBONES, STRIDES, init_random
from trainer.models.rd.anomaly_map import level_maps, sum_maps
from trainer.models.teacher import Teacher

UPSAMPLE = ("nearest", "bilinear")
TARGETS = ("standardised", "unit")


@dataclass
class RDConfig:
    method: ClassVar[str] = "rd"

    backbone: str = "efficientnet_lite0"   # ReLU6, no SE: the edge encoder that quantizes well
    strides: tuple[int, ...] = (8, 16)     # mid levels (the paper's add 4); the embedding sits one step deeper (32)
    pool: int = 3                          # local aggregation of the encoder's levels: a patch, not a pixel
    target: str = "standardised"           # levels standardised per channel, squared error; "unit": the paper's cosine
    embed_channels: int = 256              # compact embedding, ~2x the deepest level as the paper's 2048 for 1024
    min_width: int = 64                    # decoder width floor: Lite0's shallow levels (24, 40 ch) are too narrow
    upsample: str = "nearest"              # copies values, exact under INT8; measured no worse than bilinear here
    weights: str | None = None             # local encoder weights file; None: the backbone's weights package

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        ok = [s for s in STRIDES if s <= 16]   # the embedding is at twice the deepest stride, inputs are /32
        if (len(self.strides) < 1 or any(s not in ok for s in self.strides)
                or list(self.strides) != sorted(set(self.strides))):
            raise ValueError(f"strides must increase through {tuple(ok)}, got {self.strides}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be a positive odd size, got {self.pool}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.embed_channels < 1 or self.min_width < 1:
            raise ValueError("embed_channels and min_width must be positive")
        if self.upsample not in UPSAMPLE:
            raise ValueError(f"upsample must be one of {UPSAMPLE}, got {self.upsample!r}")


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """ResNet basic block with stride 2: (B, cin, h, w) -> (B, cout, h/2, w/2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, stride=2)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.skip(x))


class Bottleneck(nn.Module):
    """One-class bottleneck: every level strided down to the deepest, concatenated, one residual block.

    Levels (B, C_i, H/s_i, W/s_i) -> embedding (B, E, H/2s, W/2s) with s the deepest stride.
    """

    def __init__(self, channels: list[int], strides: list[int], embed: int) -> None:
        super().__init__()
        deep = channels[-1]
        self.down = nn.ModuleList()
        for c, s in zip(channels[:-1], strides[:-1], strict=True):
            steps, layers = (strides[-1] // s).bit_length() - 1, []
            for k in range(steps):   # one stride-2 convolution per octave, to the deepest level's width
                layers.append(conv_bn_relu(c if k == 0 else deep, deep, stride=2))
            self.down.append(nn.Sequential(*layers))
        self.fuse = ResidualBlock(deep * len(channels), embed)

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = torch.cat([d(f) for d, f in zip(self.down, feats[:-1], strict=True)] + [feats[-1]], dim=1)  # (B, n*C, h, w)
        return self.fuse(x)   # (B, E, h/2, w/2)


class UpBlock(nn.Module):
    """x2 upsampling (Resize), then two 3x3 convolutions: (B, cin, h, w) -> (B, cout, 2h, 2w)."""

    def __init__(self, cin: int, cout: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "nearest":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(x)


class Decoder(nn.Module):
    """The student: the encoder mirrored, deepest level first.

    Each level is one UpBlock to a hidden width (the level's channels, at least
    `min_width`) and a linear 1x1 head to the encoder's channels: the encoder's
    levels are linear-bottleneck outputs (signed), which a ReLU output could not match.
    """

    def __init__(self, channels: list[int], embed: int, min_width: int, mode: str) -> None:
        super().__init__()
        outs = [max(c, min_width) for c in channels[::-1]]   # hidden widths, deepest first
        ins = [embed, *outs[:-1]]
        self.ups = nn.ModuleList(UpBlock(i, o, mode) for i, o in zip(ins, outs, strict=True))
        self.heads = nn.ModuleList(nn.Conv2d(o, c, 1) for o, c in zip(outs, channels[::-1], strict=True))

    def forward(self, z: Tensor) -> list[Tensor]:
        out = []
        for up, head in zip(self.ups, self.heads, strict=True):
            z = up(z)               # (B, W_i, 2h, 2w)
            out.append(head(z))     # (B, C_i, 2h, 2w)
        return out[::-1]            # shallowest first, as the encoder


class ReverseDistillation(nn.Module):
    """forward(x) -> (encoder_feats, decoder_feats); anomaly_map(x) -> (B, 1, H/4, W/4)."""

    def __init__(self, cfg: RDConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Teacher(cfg.backbone, cfg.strides, cfg.pool, pretrained=pretrained, weights=cfg.weights)
        channels, strides = self.encoder.channels, list(cfg.strides)
        self.bottleneck = Bottleneck(channels, strides, cfg.embed_channels)
        self.decoder = Decoder(channels, cfg.embed_channels, cfg.min_width, cfg.upsample)
        init_random(self.bottleneck)
        init_random(self.decoder)

    def train(self, mode: bool = True) -> ReverseDistillation:
        super().train(mode)
        self.encoder.eval()   # its BatchNorm statistics are part of what was pretrained
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]

    def loss_options(self, validation: bool = False) -> dict[str, str]:
        return {"target": self.cfg.target}

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """x: normalised (B, 3, H, W) -> per level (B, C_i, H/s_i, W/s_i) for encoder and decoder."""
        with torch.no_grad():
            t = self.encoder(x)[1] if self.cfg.target == "standardised" else self.encoder.raw(x)[1]
        return t, self.decoder(self.bottleneck(t))

    def anomaly_map(self, x: Tensor) -> Tensor:
        """x: normalised (B, 3, H, W) -> raw, unsmoothed map (B, 1, H/4, W/4)."""
        t, s = self(x)
        return sum_maps(level_maps(t, s, self.cfg.target), list(self.cfg.strides))


def prepare(model: ReverseDistillation, batches: Iterable[Tensor]) -> None:
    """Before training: the encoder's per-channel statistics over the training images."""
    model.encoder.fit(batches)
