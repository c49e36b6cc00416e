"""The agent's Scorer scores a map exactly as evaluation and the package's golden scores do."""
from __future__ import annotations

import numpy as np
import pytest

from agent.scoring import Scorer
from shared.manifest import Manifest
from shared.scoring import calibrate, fit_reference, image_score, package_score


def manifest_with_reference(seed: int = 0) -> tuple[Manifest, np.ndarray]:
    rng = np.random.default_rng(seed)
    normals = rng.gamma(2.0, 0.05, (20, 32, 32)).astype(np.float32)
    normals[:, :4] *= 4                                   # the top rows run high on every normal image
    ref = fit_reference(normals)
    cal = calibrate([image_score(ref.standardise(m), 1.0) for m in normals[:10]], reference=ref)
    manifest = Manifest.from_dict(dict(
        model_id="m", version="1", method="stfpm", backbone="efficientnet-lite0", classes=["part"], input_size=128,
        map_size=32, sigma=1.0, mean=[127.0] * 3, std=[128.0] * 3, precision="fp32",
        calibration={"part": cal.to_dict()}, metrics={}))
    return manifest, normals


def test_scorer_standardises_with_the_class_reference_like_the_package() -> None:
    manifest, normals = manifest_with_reference()
    scorer = Scorer(manifest)
    amap = normals[15].copy()
    amap[20:23, 10:13] += 0.6                             # a defect in a calm area
    scored = scorer.score(amap, "part")
    assert scored.score == pytest.approx(package_score(amap, manifest, "part"), rel=1e-6)
    assert scored.anomalous and not any(scorer.score(m, "part").anomalous for m in normals[10:])
    # raw, the busy rows hide the defect: some normal images score higher
    assert image_score(amap, 1.0) < max(image_score(m, 1.0) for m in normals[10:])


def test_threshold_override_keeps_the_reference() -> None:
    manifest, normals = manifest_with_reference()
    plain = Scorer(manifest).score(normals[12], "part")
    overridden = Scorer(manifest, {"part": 1e9}).score(normals[12], "part")
    assert overridden.score == pytest.approx(plain.score) and overridden.threshold == 1e9
    assert not overridden.anomalous
