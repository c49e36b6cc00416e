"""Uninformed Students (Bergmann et al., 2020), made practical for the edge.

The paper distils a pretrained classifier into a patch network first and
then runs it once per patch. Here the teacher is derived from the frozen
pretrained backbone directly, with no gradient training: a fully
convolutional backbone already computes, at every position of a feature
level, a descriptor of the patch it sees, all in one dense forward pass.

    levels at strides 4, 8 (B, C_i, H/s_i, W/s_i)
      -> each resized to stride 4 (bilinear) and concatenated      (B, C, H/4, W/4)
      -> a k x k local average: each descriptor summarises a patch (B, C, H/4, W/4)
      -> projected on the C features' top D principal directions
         over the training images, each divided by its standard
         deviation there                                          (B, D, H/4, W/4)

The stride-4 level gives detail, the stride-8 level context (its receptive
field is 67 px; 75 px with the 3 x 3 average: the patch). The projection
keeps the D directions where the normal data varies most, decorrelated, so
the students' targets are compact and their per-channel errors comparable.
Centring, projection and scaling are the paper's per-channel normalisation,
measured once on the training images (`prepare`, before the first epoch)
and kept as buffers.

M students, small fully convolutional networks from different random
initialisations, regress those normalised descriptors. The anomaly map is
their mean's regression error plus their predictive variance, each
standardised with its statistics over the training images (`finalize`,
after the best epoch is chosen), also buffers: checkpoint and ONNX graph
carry them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.backbone import BACKBONES, STRIDES, Backbone, build_backbone, init_random
from trainer.models.us.anomaly_map import error_and_variance, standardised_sum


@dataclass
class USConfig:
    method: ClassVar[str] = "us"

    backbone: str = "efficientnet_lite0"   # ReLU6, no SE: the edge teacher that quantizes well
    strides: tuple[int, ...] = (4, 8)      # patch-sized views; stride 16 would make the patch too large to regress
    descriptor_dim: int = 32               # top principal directions, ~95 % of the variance of Lite0's 64 channels;
                                           # the whitened rest is mostly unpredictable (measured better than 16, 64)
    pool: int = 3                          # local average at stride 4: a descriptor describes a patch, not a point
    students: int = 3                      # M: enough for a predictive variance, each one costs a forward pass
    width: int = 64                        # student channels at stride 4 (2x at stride 8): ~0.8 GMAC at 256 px
    weights: str | None = None             # local teacher weights file; None: the backbone's weights package

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if (len(self.strides) < 1 or self.strides[0] != 4 or any(s not in STRIDES for s in self.strides)
                or list(self.strides) != sorted(set(self.strides))):
            raise ValueError(f"strides must start at 4 and increase through {STRIDES}, got {self.strides}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be a positive odd size, got {self.pool}")
        if self.students < 3:
            raise ValueError(f"the ensemble needs at least 3 students, got {self.students}")
        if self.descriptor_dim < 1 or self.width < 1:
            raise ValueError("descriptor_dim and width must be positive")


class DescriptorTeacher(nn.Module):
    """Frozen backbone -> normalised patch descriptors: (B, 3, H, W) -> (B, D, H/4, W/4).

    Until `fit` has seen the training data the projection is the identity on the first D channels.
    """

    def __init__(self, backbone: Backbone, dim: int, pool: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        c = sum(backbone.channels)
        if dim > c:
            raise ValueError(f"descriptor_dim {dim} exceeds the {c} channels of {backbone.name} at "
                             f"strides {backbone.strides}")
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("basis", torch.eye(c)[:dim].clone())   # (D, C) principal directions
        self.register_buffer("std", torch.ones(dim))

    def features(self, x: Tensor) -> Tensor:
        """x: normalised (B, 3, H, W) -> pooled raw features (B, C, H/4, W/4)."""
        feats = self.backbone(x)
        s0 = self.backbone.strides[0]
        ups = [F.interpolate(f, scale_factor=s // s0, mode="bilinear", align_corners=False)
               for f, s in zip(feats[1:], self.backbone.strides[1:], strict=True)]
        f = torch.cat([feats[0], *ups], dim=1)                  # (B, C, H/4, W/4)
        return F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x) - self.mean.view(1, -1, 1, 1)
        y = F.conv2d(f, self.basis[:, :, None, None])          # (B, D, H/4, W/4)
        return y / self.std.view(1, -1, 1, 1)

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor]) -> None:
        """Mean, principal directions and their standard deviations over every position of `batches`."""
        n, total, outer = 0, None, None
        for x in batches:
            f = self.features(x)
            f = f.permute(1, 0, 2, 3).reshape(f.shape[1], -1).double()   # (C, B*h*w)
            n += f.shape[1]
            total = f.sum(1) if total is None else total + f.sum(1)
            outer = f @ f.T if outer is None else outer + f @ f.T
        if n < 2:
            raise ValueError("the descriptor statistics need at least two positions")
        mean = total / n
        cov = outer / n - torch.outer(mean, mean)
        eigval, eigvec = torch.linalg.eigh(cov)                 # ascending
        d = self.basis.shape[0]
        self.mean.copy_(mean.float())
        self.basis.copy_(eigvec[:, -d:].flip(1).T.float())     # (D, C), largest variance first
        self.std.copy_(eigval[-d:].flip(0).clamp_min(1e-12).sqrt().float())


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Student(nn.Module):
    """A light fully convolutional regressor: (B, 3, H, W) -> (B, D, H/4, W/4).

    A stride-8 branch, added back at stride 4, widens its view to about the
    teacher's patch (63 px vs 75) at a quarter of the cost of convolving at stride 4.
    """

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv_bn_relu(3, w // 2, 2), conv_bn_relu(w // 2, w, 2), conv_bn_relu(w, w))
        self.down = nn.Sequential(conv_bn_relu(w, 2 * w, 2), conv_bn_relu(2 * w, 2 * w), conv_bn_relu(2 * w, 2 * w))
        self.lateral = nn.Conv2d(2 * w, w, 1)
        self.head = nn.Sequential(conv_bn_relu(w, w), nn.Conv2d(w, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        a = self.stem(x)                                        # (B, w, H/4, W/4)
        b = self.lateral(self.down(a))                          # (B, w, H/8, W/8)
        a = a + F.interpolate(b, scale_factor=2, mode="nearest")
        return self.head(a)                                     # (B, D, H/4, W/4)


class UninformedStudents(nn.Module):
    """forward(x) -> (teacher_desc, student_descs); anomaly_map(x) -> (B, 1, H/4, W/4)."""

    def __init__(self, cfg: USConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = build_backbone(cfg.backbone, cfg.strides, pretrained=pretrained, weights=cfg.weights)
        self.teacher = DescriptorTeacher(backbone, cfg.descriptor_dim, cfg.pool)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        # each student draws its own initialisation, in turn, from the seeded random stream
        self.students = nn.ModuleList(Student(cfg.width, cfg.descriptor_dim) for _ in range(cfg.students))
        init_random(self.students)
        # (mean, std) of the regression error, then of the variance, over the training positions
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))

    def train(self, mode: bool = True) -> UninformedStudents:
        super().train(mode)
        self.teacher.eval()   # its BatchNorm statistics are part of what was pretrained
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.students.parameters())

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x: normalised (B, 3, H, W) -> teacher (B, D, H/4, W/4) and M student descriptors of that shape."""
        with torch.no_grad():
            t = self.teacher(x)
        return t, [s(x) for s in self.students]

    def anomaly_map(self, x: Tensor) -> Tensor:
        """x: normalised (B, 3, H, W) -> raw, unsmoothed map (B, 1, H/4, W/4); 0 is a typical training position."""
        error, variance = error_and_variance(*self(x))
        return standardised_sum(error, variance, self.score_stats)

    @torch.no_grad()
    def fit_score_stats(self, batches: Iterable[Tensor]) -> None:
        """Mean and standard deviation of the error and the variance over every position of `batches`."""
        sums = torch.zeros(2, 3, dtype=torch.float64)   # per term: count, sum, sum of squares
        for x in batches:
            for k, m in enumerate(error_and_variance(*self(x))):
                m = m.double()
                sums[k] += torch.stack([torch.tensor(m.numel(), dtype=torch.float64), m.sum(), m.pow(2).sum()])
        if sums[0, 0] < 2:
            raise ValueError("the score statistics need at least two positions")
        mean = sums[:, 1] / sums[:, 0]
        std = (sums[:, 2] / sums[:, 0] - mean ** 2).clamp_min(1e-12).sqrt()
        self.score_stats.copy_(torch.stack([mean[0], std[0], mean[1], std[1]]).float())


def prepare(model: UninformedStudents, batches: Iterable[Tensor]) -> None:
    """Before training: the teacher's descriptor normalisation from the training images."""
    model.teacher.fit(batches)


def finalize(model: UninformedStudents, batches: Iterable[Tensor]) -> None:
    """After training: the score terms' statistics from the training images."""
    model.fit_score_stats(batches)
