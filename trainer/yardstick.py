"""The training-free yardstick: kNN distance of frozen teacher patches to a bank of normal patches.

Each position's descriptor joins the teacher's levels (the distillation
methods' own levels), each averaged over its 3x3 neighbourhood for a little
context and scaled to unit length, resampled to stride 8. The bank keeps a
subsample of the normal training patches (random, or a greedy k-centre
coreset that covers them more evenly); a frame's map is each patch's distance
to its nearest bank entry, brought to stride 4 like every method's map, so it
is scored by the same evaluation code.

A trained method that scores below this has a student that has not learned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.inference_graph import Normalize, to_float_nchw
from trainer.models.backbone import build_backbone

EMBED_STRIDE = 8


@dataclass
class YardstickConfig:
    method: ClassVar[str] = "knn"

    backbone: str = "efficientnet_lite0"   # the teacher the methods distil
    strides: tuple[int, ...] = (4, 8, 16)  # the same levels as STFPM
    bank_size: int = 16384                 # patches kept: ~0.1 s per 256 px frame on 2 cores
    coreset: str = "random"                # "greedy": better coverage, costs minutes on large sets
    weights: str | None = None             # local teacher weights file; None: the weights package

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        if self.coreset not in ("random", "greedy"):
            raise ValueError(f"coreset must be 'random' or 'greedy', got {self.coreset!r}")


class KNNYardstick(nn.Module):
    """anomaly_map(x) -> (B, 1, H/4, W/4): nearest-bank-patch distance, in [0, 2]."""

    def __init__(self, cfg: YardstickConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = build_backbone(cfg.backbone, cfg.strides, pretrained=pretrained, weights=cfg.weights)
        self.teacher.requires_grad_(False).eval()
        self.register_buffer("bank", torch.zeros(0, sum(self.teacher.channels)))   # (M, D)

    def train(self, mode: bool = True) -> KNNYardstick:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """x: normalised (B, 3, H, W) -> unit-length descriptors (B, D, H/8, W/8)."""
        feats = []
        for f, s in zip(self.teacher(x), self.teacher.strides, strict=True):
            f = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if s < EMBED_STRIDE:
                f = F.avg_pool2d(f, EMBED_STRIDE // s)
            elif s > EMBED_STRIDE:
                f = F.interpolate(f, scale_factor=s // EMBED_STRIDE, mode="bilinear", align_corners=False)
            feats.append(f)
        return torch.cat(feats, 1) / math.sqrt(len(feats))

    @torch.no_grad()
    def anomaly_map(self, x: Tensor) -> Tensor:
        if len(self.bank) == 0:
            raise RuntimeError("the yardstick has an empty bank; call fit() first")
        e = self.embed(x)                                           # (B, D, h, w)
        b, d, h, w = e.shape
        q = e.permute(0, 2, 3, 1).reshape(-1, d)                    # (B*h*w, D)
        dist = torch.cat([torch.cdist(c, self.bank).min(1).values for c in q.split(4096)])
        amap = dist.view(b, 1, h, w)                                # (B, 1, H/8, W/8)
        return F.interpolate(amap, scale_factor=EMBED_STRIDE // 4, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def fit(self, images: np.ndarray, seed: int = 0, batch_size: int = 16) -> KNNYardstick:
        """Build the bank from normal frames, uint8 (N, S, S, 3)."""
        norm = Normalize.for_model(self)
        gen = torch.Generator().manual_seed(seed)
        per_image = (self.cfg.bank_size if self.cfg.coreset == "random" else 4 * self.cfg.bank_size)
        per_image = max(1, math.ceil(per_image / len(images)))
        pool = []
        for i in range(0, len(images), batch_size):
            e = self.embed(norm(to_float_nchw(torch.from_numpy(images[i:i + batch_size]))))
            patches = e.permute(0, 2, 3, 1).reshape(e.shape[0], -1, e.shape[1])    # (B, h*w, D)
            for p in patches:
                keep = torch.randperm(len(p), generator=gen)[:per_image]
                pool.append(p[keep])
        pool_t = torch.cat(pool)
        if self.cfg.coreset == "greedy":
            self.bank = pool_t[greedy_coreset(pool_t, self.cfg.bank_size, gen)]
        else:
            self.bank = pool_t[torch.randperm(len(pool_t), generator=gen)[:self.cfg.bank_size]]
        return self


def greedy_coreset(x: Tensor, n: int, gen: torch.Generator, dim: int = 128) -> Tensor:
    """Indices of `n` rows of x (M, D) chosen by k-centre greedy on a random projection (PatchCore)."""
    if n >= len(x):
        return torch.arange(len(x))
    proj = x @ torch.randn(x.shape[1], min(dim, x.shape[1]), generator=gen) if x.shape[1] > dim else x
    chosen = [int(torch.randint(len(x), (1,), generator=gen))]
    mind = torch.cdist(proj, proj[chosen]).squeeze(1)                  # (M,)
    for _ in range(n - 1):
        i = int(mind.argmax())
        chosen.append(i)
        mind = torch.minimum(mind, torch.cdist(proj, proj[i:i + 1]).squeeze(1))
    return torch.tensor(chosen)


def fit_yardstick(data: str, classes: list[str], size: int, cfg: YardstickConfig | None = None,
                  val_fraction: float = 0.2, seed: int = 0, threads: int = 2) -> KNNYardstick:
    """A yardstick whose bank holds the normal training patches of `classes` (their union)."""
    from trainer.train import load_letterboxed, split_normal

    train_s, _ = split_normal(data, classes, val_fraction, seed)
    images, _ = load_letterboxed([s.path for s in train_s], size, threads)
    return KNNYardstick(cfg or YardstickConfig()).fit(images, seed)


def yardstick_report(data: str, classes: list[str], size: int, cfg: YardstickConfig | None = None,
                     val_fraction: float = 0.2, seed: int = 0, threads: int = 2, **eval_kw) -> dict:
    """Fit the yardstick on `classes` and evaluate it with the methods' evaluation code."""
    from trainer.evaluate import evaluate

    model = fit_yardstick(data, classes, size, cfg, val_fraction, seed, threads)
    return evaluate(model, data, classes, size, val_fraction=val_fraction, seed=seed, threads=threads, **eval_kw)
