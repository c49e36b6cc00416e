"""The baseline the memory-bank method must match: a plain PatchCore-style kNN.

Exactly this, and nothing more: the frozen
EfficientNet-Lite0 teacher's stride-8 and stride-16 features, each averaged
over its 3 x 3 neighbourhood and joined at stride 8, images squashed to
S x S, one bank per class of 16384 training patches drawn at random, each
position's Euclidean distance to its nearest bank patch, the map upsampled
to S x S and smoothed with sigma 4, the image score its maximum. No position
reference, no coreset, no letterbox. Metrics come from `shared.metrics`, on
masks squashed the same way (defect images without a mask count for the
image AUROC only).
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

BANK = 16384
SIGMA = 4.0


def squash(img: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def plain_knn(data: str, classes: list[str], size: int = 256, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Per class and mean image and pixel AUROC of the plain kNN (fitted on all normal training images)."""
    import torch
    import torch.nn.functional as F

    from shared.imaging import read_image, read_mask
    from shared.metrics import auroc, pixel_auroc
    from trainer.data.mvtec import load_samples
    from trainer.inference_graph import Normalize, to_float_nchw
    from trainer.models.backbone import build_backbone, input_normalization

    torch.set_num_threads(threads)
    net = build_backbone("efficientnet_lite0", (8, 16)).eval()
    norm = Normalize(*input_normalization("efficientnet_lite0"))

    @torch.no_grad()
    def embed(paths: list) -> torch.Tensor:   # (N, h*w, D)
        out = []
        for i in range(0, len(paths), 16):
            x = np.stack([squash(read_image(p), size) for p in paths[i:i + 16]])
            f8, f16 = (F.avg_pool2d(f, 3, 1, 1, count_include_pad=False)
                       for f in net(norm(to_float_nchw(torch.from_numpy(x)))))
            f = torch.cat([f8, F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)], 1)
            out.append(f.flatten(2).transpose(1, 2))
        return torch.cat(out)

    per_class = {}
    for cls in classes:
        train = [s.path for s in load_samples(data, [cls], "train") if s.label == 0]
        test = load_samples(data, [cls], "test")
        pool = embed(train).reshape(-1, net.channels[0] + net.channels[1])
        bank = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:BANK]]
        q = embed([s.path for s in test])                                     # (N, P, D)
        side = size // 8
        dist = torch.stack([torch.cdist(e, bank).min(1).values for e in q]).view(len(test), 1, side, side)
        maps = F.interpolate(dist, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
        maps = np.stack([cv2.GaussianBlur(m, (0, 0), SIGMA) for m in maps])
        scores = maps.reshape(len(maps), -1).max(1)
        labels = np.array([s.label for s in test])
        pix = [(m, squash(read_mask(s.mask_path).astype(np.uint8), size) > 0 if s.label else np.zeros_like(m, bool))
               for m, s in zip(maps, test, strict=True) if s.label == 0 or s.mask_path]
        has_pixels = any(k.any() for _, k in pix)
        per_class[cls] = {"image_auroc": float(auroc(scores, labels)),
                          "pixel_auroc": float(pixel_auroc([m for m, _ in pix], [k for _, k in pix]))
                          if has_pixels else float("nan")}
    mean = {k: float(np.nanmean([m[k] for m in per_class.values()])) for k in ("image_auroc", "pixel_auroc")}
    return {"classes": per_class, "mean": mean}
