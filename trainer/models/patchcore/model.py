"""PatchCore (Roth et al., 2022) on the edge teacher, one memory bank per class.

Each position of a frame gets a descriptor from the frozen pretrained
backbone's mid-level features (strides 8 and 16), each averaged over its
3 x 3 neighbourhood (local aggregation: a patch, not a pixel) and joined at
stride 8. Fitting keeps, per class, a greedy coreset of the descriptors of
its normal training images (the bank). A position's anomaly score is its
Euclidean distance to the nearest patch in its class's bank.

Everything runs inside the exported graph:

    image (N, S, S, 3) uint8, class_index (N,) int32
      -> backbone levels -> 3 x 3 mean -> stride 8, concatenated   q    (N, P, D)
      -> bank of each frame's class (Gather)                       B    (N, D, M)
      -> |q|^2 - 2 q.B + |B|^2, minimum over M (MatMul, ReduceMin)      (N, P)
      -> sqrt, (N, 1, S/8, S/8), bilinear x2 to the maps' stride 4

The class is known per station, so a unified package holds every class's
bank and each frame is compared with its own class only.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.backbone import BACKBONES, STRIDES, build_backbone
from trainer.models.patchcore.coreset import greedy_coreset

MAP_STRIDE = 4   # the graph contract's output stride (trainer.inference_graph)


@dataclass
class PatchCoreConfig:
    method: ClassVar[str] = "patchcore"

    backbone: str = "efficientnet_lite0"   # the students' teacher: one feature space for every method
    strides: tuple[int, ...] = (8, 16)     # mid-level features: stride 4 is fine texture, 32 too coarse for defects
    pool: int = 3                          # local aggregation: each descriptor summarises a 3 x 3 neighbourhood
    bank_size: int = 2048                  # coreset patches per class; the frame's cost grows with it
    coreset_pool: int = 65536              # patches per class the greedy search picks from (a random sample):
                                           # each of its bank_size steps reads them all
    coreset_dim: int = 32                  # random projection the greedy search measures distances on
    weights: str | None = None             # local backbone weights file; None: the backbone's weights package

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if (not self.strides or any(s not in STRIDES for s in self.strides)
                or list(self.strides) != sorted(set(self.strides)) or self.strides[0] < MAP_STRIDE):
            raise ValueError(f"strides must increase through {STRIDES}, got {self.strides}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be a positive odd size, got {self.pool}")
        if min(self.bank_size, self.coreset_pool, self.coreset_dim) < 1:
            raise ValueError("bank_size, coreset_pool and coreset_dim must be positive")


class PatchCore(nn.Module):
    """anomaly_map(x, class_index) -> (B, 1, H/4, W/4): distance to the nearest normal patch of the class."""

    class_conditional: ClassVar[bool] = True   # the graph takes each frame's class index

    def __init__(self, cfg: PatchCoreConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.strides, pretrained=pretrained, weights=cfg.weights)
        self.backbone.requires_grad_(False).eval()
        dim = sum(self.backbone.channels)
        # banks are sized when fitted (or loaded): (K classes, D, M patches), transposed for the MatMul
        self.register_buffer("bank", torch.zeros(0, dim, 0))
        self.register_buffer("bank_sq", torch.zeros(0, 1, 0))          # |bank entry|^2: (K, 1, M)

    def train(self, mode: bool = True) -> PatchCore:
        super().train(mode)
        self.backbone.eval()   # nothing here is trained; BatchNorm keeps its pretrained statistics
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("bank", "bank_sq"):   # banks take the size of the checkpoint's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed(self, x: Tensor) -> Tensor:
        """x: normalised (B, 3, H, W) -> descriptors (B, D, H/s0, W/s0), s0 the first stride."""
        feats = self.backbone(x)
        s0 = self.cfg.strides[0]
        parts = []
        for f, s in zip(feats, self.cfg.strides, strict=True):
            if self.cfg.pool > 1:
                f = F.avg_pool2d(f, self.cfg.pool, 1, self.cfg.pool // 2, count_include_pad=False)
            if s > s0:
                f = F.interpolate(f, scale_factor=s // s0, mode="bilinear", align_corners=False)
            parts.append(f)
        return torch.cat(parts, 1)

    def anomaly_map(self, x: Tensor, class_index: Tensor) -> Tensor:
        """x: normalised (B, 3, H, W); class_index (B,) integer into the fitted classes -> (B, 1, H/4, W/4)."""
        e = self.embed(x)                                          # (B, D, h, w)
        b, _, h, w = e.shape
        q = e.flatten(2).transpose(1, 2)                           # (B, P, D)
        bank, bank_sq = self.bank[class_index], self.bank_sq[class_index]   # (B, D, M), (B, 1, M)
        nearest = (bank_sq - 2 * torch.matmul(q, bank)).amin(dim=2)         # (B, P)
        dist = (nearest + q.pow(2).sum(2)).clamp_min(0).sqrt()             # (B, P)
        amap = dist.view(b, 1, h, w)
        s0 = self.cfg.strides[0]
        if s0 == MAP_STRIDE:
            return amap
        return F.interpolate(amap, scale_factor=s0 // MAP_STRIDE, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def fit(self, batches_by_class: Mapping[str, Callable[[], list[Tensor]]], seed: int = 0,
            progress: Callable[[int, int, str], None] | None = None) -> PatchCore:
        """One bank per class, in the mapping's order, from its normalised normal images.

        batches_by_class: class -> a callable giving its normalised (B, 3, H, W) batches;
        progress(classes done, classes, what is happening).
        """
        gen = torch.Generator().manual_seed(seed)
        banks = []
        for k, (cls, batches) in enumerate(batches_by_class.items()):
            pool = torch.cat([self.embed(x).flatten(2).transpose(1, 2).reshape(-1, self.bank.shape[1])
                              for x in batches()])                     # (N * P, D)
            if len(pool) > self.cfg.coreset_pool:
                pool = pool[torch.randperm(len(pool), generator=gen)[:self.cfg.coreset_pool]]
            if progress:
                progress(k, len(batches_by_class), f"{cls}: a coreset of {min(self.cfg.bank_size, len(pool))} "
                         f"patches from a sample of {len(pool)}")
            banks.append(pool[greedy_coreset(pool, self.cfg.bank_size, gen, self.cfg.coreset_dim)])
        if progress:
            progress(len(banks), len(batches_by_class), "banks done")
        if not banks:
            raise ValueError("PatchCore needs the normal images of at least one class")
        m = max(len(b) for b in banks)
        # a class with fewer patches repeats its own: a duplicate never changes a nearest distance
        padded = torch.stack([b[torch.arange(m) % len(b)] for b in banks])   # (K, M, D)
        self.bank = padded.transpose(1, 2).contiguous()                      # (K, D, M)
        self.bank_sq = padded.pow(2).sum(2).unsqueeze(1)                     # (K, 1, M)
        return self

    @property
    def n_classes(self) -> int:
        return int(self.bank.shape[0])


def fit(model: PatchCore, batches_by_class: Mapping[str, Callable[[], list[Tensor]]], seed: int = 0,
        progress: Callable[[int, int, str], None] | None = None) -> None:
    """The method's fitting pass (no gradient training): one coreset bank per class."""
    model.fit(batches_by_class, seed, progress)

