"""Anomaly-detection metrics in plain numpy: image AUROC, ROC curve, pixel AUROC, AUPRO, F1-max.

Conventions follow scikit-learn (`roc_auc_score`, `roc_curve`) and the MVTec AD
evaluation code (AUPRO), and the tests check them against those. Labels are
1 = anomalous (positive), 0 = normal; a higher score means more anomalous.

Pixel metrics take the maps and masks of a whole test set either as
(N, H, W) arrays or as sequences of (H, W) arrays whose shapes may differ
from image to image (each map paired with a mask of its own shape).

Memory: `pixel_auroc` holds one copy of the normal pixels' scores (sorted in
the maps' own float precision) plus the anomalous ones: about 4 bytes per
pixel for float32 maps, so 50M pixels fit in ~200 MB. `aupro` (exact) sorts
only the pixels above the score where the normal-pixel FPR reaches the
integration limit: about 8 bytes per pixel to find that cut, then ~40 bytes
per pixel above it (a `fpr_limit` share of the normal pixels and the
anomalous ones).
With `num_thresholds` it instead bins the scores, one image at a time, which
keeps memory flat for any set size at the cost of a slightly coarser curve.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MapsLike = np.ndarray | Sequence[np.ndarray]


# ----------------------------------------------------------------------------- inputs

def _binary_labels(labels: np.ndarray | Sequence, n: int, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be 1-D with one entry per score: got shape {y.shape} for {n} scores")
    if y.dtype != bool:
        values = np.unique(y)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must be 0 (normal) or 1 (anomalous); got values {values[:10].tolist()}")
    return y.astype(bool)


def _scores(scores: np.ndarray | Sequence, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers; got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contain NaN or infinite values ({int((~np.isfinite(s)).sum())} of {s.size})")
    return s


def _need_both(y: np.ndarray, what: str) -> None:
    if y.all() or not y.any():
        only = "anomalous (1)" if y.all() else "normal (0)"
        raise ValueError(f"{what} needs both normal (0) and anomalous (1) labels; all {len(y)} are {only}")


def _pairs(maps: MapsLike, masks: MapsLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pair each (H, W) map with its bool mask, checking shapes and values."""
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        maps, masks = maps[None], np.asarray(masks)[None]
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    if len(maps) == 0:
        raise ValueError("no maps given")
    out = []
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m, g = np.asarray(m), np.asarray(g)
        if m.ndim != 2 or m.shape != g.shape:
            raise ValueError(f"map {i} has shape {m.shape} but its mask {g.shape}; both must be the same (H, W)")
        if not np.issubdtype(m.dtype, np.floating):
            m = m.astype(np.float32)
        if not np.isfinite(m).all():
            raise ValueError(f"map {i} contains NaN or infinite values")
        out.append((m, g.astype(bool, copy=False)))
    return out


def _float_dtype(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.dtype:
    # float64 maps stay float64 so ties are judged at the precision they came in.
    return np.result_type(np.float32, *(m.dtype for m, _ in pairs))


# ----------------------------------------------------------------------------- image level

def _auc_mann_whitney(pos: np.ndarray, neg_sorted: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(equal), exactly, from sorted negatives.

    Equal to the trapezoidal area under the ROC curve (sklearn's roc_auc_score),
    ties included, computed in integers: no index array over all samples.
    """
    total = 0
    for i in range(0, len(pos), 1 << 20):   # chunks bound the int64 index arrays
        chunk = pos[i:i + (1 << 20)]
        below = np.searchsorted(neg_sorted, chunk, side="left")
        not_above = np.searchsorted(neg_sorted, chunk, side="right")
        total += int(below.sum(dtype=np.int64)) + int(not_above.sum(dtype=np.int64))
    return total / (2.0 * len(pos) * len(neg_sorted))


def auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """Area under the ROC curve; ties count one half, as in sklearn's roc_auc_score."""
    s = _scores(scores)
    y = _binary_labels(labels, len(s))
    _need_both(y, "auroc")
    return _auc_mann_whitney(s[y], np.sort(s[~y]))


def roc_curve(scores: np.ndarray | Sequence[float],
              labels: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, flagging `score >= threshold`.

    Starts at (0, 0) with threshold +inf, like sklearn's roc_curve with
    drop_intermediate=False.
    """
    s = _scores(scores)
    y = _binary_labels(labels, len(s))
    _need_both(y, "roc_curve")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]   # last index of each tie group
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, s[last]]


def f1_max(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> tuple[float, float]:
    """The best F1 over all thresholds, and a threshold that reaches it.

    The threshold lies strictly between the lowest flagged score and the highest
    unflagged one, so `scores > t` and `scores >= t` flag the same samples.
    """
    s = _scores(scores)
    y = _binary_labels(labels, len(s))
    if not y.any():
        raise ValueError(f"f1_max needs at least one anomalous (1) label; all {len(y)} are normal (0)")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last].astype(np.float64)
    flagged = (last + 1).astype(np.float64)
    f1 = 2.0 * tp / (flagged + y.sum())         # 2TP / (2TP + FP + FN)
    best = int(np.argmax(f1))                    # first maximum = the highest such threshold
    low = s[last[best]]
    if last[best] + 1 < len(s):
        high = s[last[best] + 1]
        threshold = low / 2.0 + high / 2.0     # halves first: no overflow near the float limits
        if not high < threshold < low:         # adjacent floats: keep the project's `scores > t` right
            threshold = high
    else:                                      # everything flagged
        threshold = float(np.nextafter(low, -np.inf))
    return float(f1[best]), float(threshold)


# ----------------------------------------------------------------------------- pixel level

def pixel_auroc(maps: MapsLike, masks: MapsLike) -> float:
    """AUROC over every pixel of every image: maps (N, H, W) float, masks (N, H, W) bool."""
    pairs = _pairs(maps, masks)
    dtype = _float_dtype(pairs)
    n_neg = sum(int((~g).sum()) for _, g in pairs)
    n_pos = sum(int(g.sum()) for _, g in pairs)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("pixel_auroc needs both normal and anomalous pixels; "
                         f"got {n_pos} anomalous and {n_neg} normal")
    neg = np.empty(n_neg, dtype)
    pos = np.empty(n_pos, dtype)
    i = j = 0
    for m, g in pairs:   # fill preallocated buffers: no second full-size concatenation
        n_g, p_g = int((~g).sum()), int(g.sum())
        neg[i:i + n_g] = m[~g]
        pos[j:j + p_g] = m[g]
        i, j = i + n_g, j + p_g
    neg.sort()
    return _auc_mann_whitney(pos, neg)


def label_regions(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected regions of a bool (H, W) mask: (labels int32, count), 0 = background.

    Works on horizontal runs (a union-find over runs that touch between rows),
    so the cost follows the number of runs, not pixels. connectivity 8 (the
    MVTec AD evaluation's choice) or 4. Regions are numbered in row-major
    order of their first pixel.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    if not mask.any():
        return labels, 0
    edge = np.diff(mask.astype(np.int8), axis=1, prepend=0, append=0)   # (H, W + 1)
    rs, cs = np.nonzero(edge == 1)      # run starts, row-major
    _, ce = np.nonzero(edge == -1)      # run ends (exclusive), same order
    n_runs = len(rs)
    # Runs a (row y) and b (row y + 1) touch when their column spans overlap,
    # widened by one for diagonal contact. A global key row * stride + col
    # lets one searchsorted find, for every b, the contiguous range of a's.
    k = 1 if connectivity == 8 else 0
    stride = w + 2
    key_s = rs.astype(np.int64) * stride + cs
    key_e = rs.astype(np.int64) * stride + ce
    has_above = rs > 0
    b = np.nonzero(has_above)[0]
    above_row = (rs[b] - 1).astype(np.int64) * stride
    lo = np.searchsorted(key_e, above_row + cs[b] - k, side="right")
    hi = np.searchsorted(key_s, above_row + ce[b] + k, side="left")
    count = np.maximum(hi - lo, 0)
    pb = np.repeat(b, count)
    pa = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())
    parent = np.arange(n_runs)
    if len(pa):
        while True:
            ra, rb = parent[pa], parent[pb]
            if np.array_equal(ra, rb):
                break
            low = np.minimum(ra, rb)
            np.minimum.at(parent, ra, low)   # hook each root under the smaller one
            np.minimum.at(parent, rb, low)
            while True:                      # path halving until every run points at a root
                nxt = parent[parent]
                if np.array_equal(nxt, parent):
                    break
                parent = nxt
    roots, comp = np.unique(parent, return_inverse=True)
    run_of_pixel = np.cumsum((edge[:, :w] == 1)[mask]) - 1   # pixels of mask in row-major order
    labels[mask] = comp[run_of_pixel] + 1
    return labels, len(roots)


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x, y), x ascending, from x[0] to x_max (interpolated there)."""
    cut = int(np.searchsorted(x, x_max, side="right"))   # points with x <= x_max
    area = float(np.sum(0.5 * (y[1:cut] + y[:cut - 1]) * np.diff(x[:cut])))
    if cut < len(x) and x[cut - 1] < x_max:
        x0, x1, y0, y1 = x[cut - 1], x[cut], y[cut - 1], y[cut]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def aupro(maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit`.

    For a threshold t the PRO is the mean, over every connected ground-truth
    region of every image (8-connected), of the share of that region's pixels
    scoring >= t; the x axis is the FPR over all normal pixels. With
    num_thresholds None every distinct score is a threshold (the MVTec AD
    evaluation's exact curve); an int bins the scores into that many evenly
    spaced thresholds between the lowest and highest score.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None and num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2 (or None for exact), got {num_thresholds}")
    pairs = _pairs(maps, masks)
    regions = [label_regions(g) for _, g in pairs]
    n_regions = sum(n for _, n in regions)
    n_ok = sum(int((~g).sum()) for _, g in pairs)
    if n_regions == 0 or n_ok == 0:
        raise ValueError(f"aupro needs anomalous regions and normal pixels; got {n_regions} regions "
                         f"and {n_ok} normal pixels")
    if num_thresholds is None:
        fpr, pro = _pro_curve_exact(pairs, regions, n_ok, n_regions, fpr_limit)
    else:
        fpr, pro = _pro_curve_binned(pairs, regions, n_ok, n_regions, num_thresholds)
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


def _region_weights(labels: np.ndarray, n: int) -> np.ndarray:
    """Per-pixel 1 / (size of its region), 0 outside regions."""
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    inv = np.zeros_like(sizes)
    inv[1:] = 1.0 / np.maximum(sizes[1:], 1)
    return inv[labels]


def _pro_curve_exact(pairs, regions, n_ok: int, n_regions: int,
                     fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    dtype = _float_dtype(pairs)
    # The curve up to the limit only involves pixels scoring at or above the
    # score where the FPR first reaches the limit; everything below is skipped.
    normal = np.empty(n_ok, dtype)
    i = 0
    for m, g in pairs:
        k = int((~g).sum())
        normal[i:i + k] = m[~g]
        i += k
    need = min(n_ok, int(np.ceil(fpr_limit * n_ok - 1e-9)))
    cut = np.partition(normal, n_ok - need)[n_ok - need]
    del normal
    scores, is_ok, pro_w = [], [], []
    for (m, g), (lab, n) in zip(pairs, regions, strict=True):
        keep = m >= cut
        scores.append(m[keep].astype(dtype, copy=False))
        is_ok.append(~g[keep])
        pro_w.append(_region_weights(lab, n)[keep])
    s = np.concatenate(scores)
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fps = np.cumsum(np.concatenate(is_ok)[order], dtype=np.int64)
    pro = np.cumsum(np.concatenate(pro_w)[order])
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    fpr = np.clip(fps[last] / n_ok, 0.0, 1.0)
    pro = np.clip(pro[last] / n_regions, 0.0, 1.0)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def _pro_curve_binned(pairs, regions, n_ok: int, n_regions: int,
                      num_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    lo = min(float(m.min()) for m, _ in pairs)
    hi = max(float(m.max()) for m, _ in pairs)
    if hi <= lo:
        hi = lo + 1.0   # constant maps: one threshold flags everything
    edges = np.linspace(lo, hi, num_thresholds)
    ok_hist = np.zeros(num_thresholds, np.int64)
    pro_hist = np.zeros(num_thresholds, np.float64)
    for (m, g), (lab, n) in zip(pairs, regions, strict=True):
        # bin i holds the scores in [edges[i], edges[i + 1]); the top bin is open above
        ok_hist += np.bincount(np.searchsorted(edges, m[~g], side="right") - 1, minlength=num_thresholds)
        if n:
            idx = np.searchsorted(edges, m[g], side="right") - 1
            pro_hist += np.bincount(idx, weights=_region_weights(lab, n)[g], minlength=num_thresholds)
    # flagged at threshold edges[i] = everything in bins i.. end; highest threshold first
    fpr = np.cumsum(ok_hist[::-1]) / n_ok
    pro = np.cumsum(pro_hist[::-1]) / n_regions
    return np.r_[0.0, np.clip(fpr, 0, 1), 1.0], np.r_[0.0, np.clip(pro, 0, 1), 1.0]
