import numpy as np
import pytest
from scipy import ndimage

from shared import scoring


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 4.0])
def test_smooth_matches_scipy(sigma):
    amap = np.random.default_rng(0).random((40, 56)).astype(np.float32)
    ours = scoring.smooth(amap, sigma)
    ref = ndimage.gaussian_filter(amap, sigma, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_image_score_is_max_of_smoothed_map():
    amap = np.zeros((32, 32), np.float32)
    amap[10:14, 20:24] = 5.0
    assert scoring.image_score(amap, 1.0) == pytest.approx(scoring.smooth(amap, 1.0).max())
    assert scoring.image_score(amap, 0) == 5.0


def test_image_score_leaves_the_letterbox_border_out():
    # a 320x256 frame letterboxed to 128: rows 13..115 hold the frame, the rest is its reflection
    from shared.imaging import letterbox, unletterbox

    _, place = letterbox(np.zeros((256, 320, 3), np.uint8), 128)
    amap = np.zeros((32, 32), np.float32)
    amap[1, 16] = 9.0     # in the reflected border above the frame
    amap[16, 16] = 2.0    # inside the frame
    assert scoring.image_score(amap, 0) == 9.0                       # no placement: the whole square
    assert scoring.image_score(amap, 0, place, 128) == 2.0
    ys, xs = scoring.frame_slices(amap.shape, place, 128)
    region = amap[ys, xs]
    np.testing.assert_array_equal(region, unletterbox(amap, place, 128, region.shape))
    with pytest.raises(ValueError):
        scoring.image_score(amap, 0, place)


def test_calibration_flags_about_one_percent_of_normals():
    normal = np.random.default_rng(1).normal(10, 1, 5000)
    cal = scoring.calibrate(normal)
    assert (normal > cal.threshold).mean() < 0.01
    assert cal.normalise(cal.threshold) == pytest.approx(1.0)
    assert scoring.ClassCalibration.from_dict(cal.to_dict()) == cal


def test_components_match_scipy_labels():
    mask = np.random.default_rng(2).random((50, 50)) > 0.6
    labels, n = scoring.label_components(mask)
    ref, n_ref = ndimage.label(mask)
    assert n == n_ref
    # same partition, up to label names
    pairs = set(zip(labels[mask].tolist(), ref[mask].tolist(), strict=True))
    assert len(pairs) == n


def test_regions_and_boxes():
    amap = np.zeros((64, 64), np.float32)
    amap[5:9, 10:20] = 3.0
    amap[40:50, 40:42] = 6.0
    regions = scoring.find_regions(amap, 1.0)
    assert [(r.x, r.y, r.w, r.h) for r in regions] == [(40, 40, 2, 10), (10, 5, 10, 4)]
    x, y, w, h = scoring.scale_box(regions[1], 4.0, 4.0, 0.0, (256, 256))
    assert (x, y, w, h) == (40, 20, 40, 16)
    assert scoring.scale_box(regions[0], 4.0, 4.0, 10.0, (256, 256))[2] <= 256


def test_position_reference_discounts_where_normal_maps_run_high():
    rng = np.random.default_rng(0)
    normals = rng.normal(1.0, 0.1, (40, 64, 64))
    normals[:, :, :8] += rng.normal(2.0, 1.0, (40, 64, 8))   # a busy strip: high and spread out on every normal
    ref = scoring.fit_reference(normals)
    assert ref.mean.shape == ref.spread.shape == (16, 16)
    assert ref.mean[:, :2].mean() == pytest.approx(3.0, abs=0.2)
    assert ref.mean[:, 4:].mean() == pytest.approx(1.0, abs=0.02)
    defect = rng.normal(1.0, 0.1, (64, 64))
    defect[30:34, 40:44] = 2.5                               # a defect in the calm area, weaker than the strip
    normal = rng.normal(1.0, 0.1, (64, 64))
    normal[:, :8] += 3.5                                     # a busy strip a little above its average
    raw = [scoring.image_score(m, 1.0) for m in (normal, defect)]
    assert raw[0] > raw[1]                                   # raw: the normal image scores higher
    std = [scoring.image_score(ref.standardise(m), 1.0) for m in (normal, defect)]
    assert std[1] > 3 * std[0]                               # against the reference: the defect stands out
    z = ref.standardise(rng.normal(1.0, 0.1, (64, 64)))
    assert abs(float(z[:, 16:].mean())) < 0.1                # a typical normal position standardises near 0


def test_position_reference_grid_resizing_is_exact_on_constants_and_blocks():
    blocks = np.kron(np.arange(16.0).reshape(4, 4), np.ones((8, 8)))   # 32 x 32, constant 8 x 8 blocks
    np.testing.assert_allclose(scoring._block_means(blocks, 4), np.arange(16.0).reshape(4, 4))
    np.testing.assert_allclose(scoring._block_means(np.ones((24, 24)), 16), np.ones((16, 16)))   # uneven blocks
    up = scoring._upsample(np.array([[0.0, 1.0], [2.0, 3.0]]), (4, 4))
    np.testing.assert_allclose(up[0], [0, 0.25, 0.75, 1])    # cell centres aligned, edges held
    np.testing.assert_allclose(up[:, 0], [0, 0.5, 1.5, 2])


def test_position_reference_round_trips_and_refuses_bad_grids():
    ref = scoring.fit_reference(np.random.default_rng(1).random((5, 32, 32)))
    cal = scoring.calibrate(np.linspace(0, 1, 20), reference=ref)
    back = scoring.ClassCalibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(back.reference.mean, ref.mean, atol=1e-6)
    np.testing.assert_allclose(back.reference.spread, ref.spread, atol=1e-6)
    assert back.with_threshold(7.0).reference is back.reference and back.with_threshold(7.0).threshold == 7.0
    assert "reference" not in scoring.calibrate(np.linspace(0, 1, 20)).to_dict()
    for bad in ({"mean": [[0.0]], "spread": [[0.0]]}, {"mean": [[0.0, 1.0]], "spread": [[1.0]]},
                {"mean": [0.0, 1.0], "spread": [1.0, 1.0]}, {"mean": [[float("nan")]], "spread": [[1.0]]}):
        with pytest.raises(ValueError):
            scoring.PositionReference.from_dict(bad)
    with pytest.raises(ValueError, match="at least two"):
        scoring.fit_reference(np.zeros((1, 32, 32)))
