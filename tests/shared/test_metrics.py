import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from shared import metrics


def random_case(seed: int, n: int = 300, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores mildly separated by label; `levels` quantises them to force ties."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.35
    y[:2] = [True, False]
    s = rng.normal(size=n) + 0.8 * y
    if levels:
        s = np.round(s * levels / 4) / (levels / 4)
    return s, y.astype(int)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 8, 2])
def test_auroc_matches_sklearn(seed, levels):
    s, y = random_case(seed, levels=levels)
    assert metrics.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_extremes_and_all_tied():
    assert metrics.auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert metrics.auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert metrics.auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5


@pytest.mark.parametrize("levels", [None, 5])
def test_roc_curve_matches_sklearn(levels):
    s, y = random_case(3, levels=levels)
    fpr, tpr, thr = metrics.roc_curve(s, y)
    rf, rt, rthr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, rf)
    np.testing.assert_allclose(tpr, rt)
    np.testing.assert_array_equal(thr[1:], rthr[1:])
    assert thr[0] == np.inf
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(s, y))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [None, 6])
def test_f1_max_matches_sklearn_and_its_threshold_reaches_it(seed, levels):
    s, y = random_case(seed, n=120, levels=levels)
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nanmax(2 * p * r / (p + r))
    f1, t = metrics.f1_max(s, y)
    assert f1 == pytest.approx(ref, abs=1e-12)
    # both comparison rules flag the same samples at the returned threshold
    assert f1_score(y, s > t) == pytest.approx(f1, abs=1e-12)
    assert f1_score(y, s >= t) == pytest.approx(f1, abs=1e-12)


def test_f1_max_when_flagging_everything_is_best():
    f1, t = metrics.f1_max([0.3, 0.2, 0.1], [1, 1, 1])
    assert f1 == 1.0 and t < 0.1


@pytest.mark.parametrize("fn", [metrics.auroc, metrics.roc_curve])
def test_one_class_labels_are_refused_with_a_clear_message(fn):
    with pytest.raises(ValueError, match="both normal"):
        fn([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="both normal"):
        fn([0.1, 0.2, 0.3], [1, 1, 1])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least one anomalous"):
        metrics.f1_max([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="one entry per score"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0.1, np.nan, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="anomalous regions"):
        metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(np.zeros((1, 4, 4)), np.eye(4, dtype=bool)[None], fpr_limit=0)


def random_maps(seed: int, n: int = 5, h: int = 24, w: int = 28, levels: int | None = None):
    """Maps with blobby masks (several regions, some images clean) and scores raised inside them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), bool)
    for i in range(n - 1):   # the last image has no defect
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            masks[i, y:y + rng.integers(1, 6), x:x + rng.integers(1, 7)] = True
    maps = rng.normal(size=(n, h, w)) + masks * rng.uniform(0.3, 2.0, (n, 1, 1))
    if levels:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("levels", [None, 3])
def test_pixel_auroc_matches_sklearn(levels):
    maps, masks = random_maps(0, levels=levels)
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(ref, abs=1e-12)
    # a list of per-image maps of different shapes gives the pooled value
    other_maps, other_masks = random_maps(1, n=3, h=17, w=9, levels=levels)
    both = metrics.pixel_auroc([*maps, *other_maps], [*masks, *other_masks])
    pooled = roc_auc_score(np.r_[masks.ravel(), other_masks.ravel()], np.r_[maps.ravel(), other_maps.ravel()])
    assert both == pytest.approx(pooled, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_regions_matches_skimage(seed, connectivity):
    mask = np.random.default_rng(seed).random((37, 41)) < 0.45
    ours, n = metrics.label_regions(mask, connectivity)
    ref, n_ref = sk_label(mask, connectivity=1 if connectivity == 4 else 2, return_num=True)
    assert n == n_ref
    # same partition: a one-to-one map between label ids over the foreground
    pairs = np.unique(np.stack([ours[mask], ref[mask]]), axis=1)
    assert pairs.shape[1] == n
    assert (ours[~mask] == 0).all()


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Straightforward PRO curve: every distinct score is a threshold, regions from skimage."""
    regions = []
    for i, g in enumerate(masks):
        lab = sk_label(g, connectivity=2)
        regions += [(i, lab == k) for k in range(1, lab.max() + 1)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float((normal >= t).mean()))
        pros.append(float(np.mean([(maps[i][r] >= t).mean() for i, r in regions])))
    fprs.append(1.0)
    pros.append(1.0)
    fprs, pros = np.array(fprs), np.array(pros)
    # integrate up to the limit, interpolating linearly at the limit
    x = np.linspace(0, fpr_limit, 20001)
    return float(np.trapezoid(np.interp(x, fprs, pros), x) / fpr_limit)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed, levels, fpr_limit):
    maps, masks = random_maps(seed, levels=levels)
    ours = metrics.aupro(maps, masks, fpr_limit)
    assert ours == pytest.approx(reference_aupro(maps.astype(np.float64), masks, fpr_limit), abs=2e-4)


def test_aupro_perfect_and_binned():
    maps, masks = random_maps(7)
    assert metrics.aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    exact = metrics.aupro(maps, masks)
    assert metrics.aupro(maps, masks, num_thresholds=4000) == pytest.approx(exact, abs=5e-3)
    # a region found only partly counts partly: half of one of two regions
    m = np.zeros((1, 10, 10), bool)
    m[0, 1:3, 1:3] = True
    m[0, 6:8, 6:9] = True
    amap = np.zeros((1, 10, 10), np.float32)
    amap[0, 1:3, 1:3] = 1.0
    amap[0, 6:8, 6] = 1.0
    # threshold 1: FPR 0, PRO (1 + 1/3) / 2; threshold 0: everything flagged, the
    # segment between them is interpolated at FPR 0.3
    pro_at_1 = (1.0 + 1 / 3) / 2
    assert metrics.aupro(amap, m) == pytest.approx(pro_at_1 + 0.3 * (1 - pro_at_1) / 2)


def test_metrics_import_no_heavy_modules():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, shared.metrics; "
            "print(sorted(m for m in ('torch', 'sklearn', 'scipy', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
