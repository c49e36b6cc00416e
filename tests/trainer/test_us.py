"""Uninformed Students: descriptor teacher, ensemble contracts, the prepare/finalize hooks, training,
ONNX export, packaging, detection and speed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.package import read_package
from tests.trainer.obvious_defect import assert_detects_obvious_defect
from trainer.data import synth
from trainer.export import check_onnx, export_onnx, export_package
from trainer.inference_graph import Normalize, to_float_nchw
from trainer.models import build_model, get_method, model_config
from trainer.models.backbone import build_backbone, input_normalization
from trainer.models.us import (DescriptorTeacher, UninformedStudents, USConfig, error_and_variance,
                               standardised_sum, us_loss)
from trainer.data.frames import load_square
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.data.mvtec import split_normal
from trainer.train import train

torch.set_num_threads(2)

SIZE = 64
RUN = dict(size=SIZE, epochs=15, batch_size=8, optimizer="adam", lr=0.002, threads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=0, size=SIZE, n_train=30,
                          n_test_good=8, n_test_defect=1, classes=["washer"])


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(TrainConfig(data=str(data), method="us", out=str(tmp_path_factory.mktemp("run")), **RUN),
                 progress=None)


def normalised(images: np.ndarray) -> torch.Tensor:
    return Normalize(*input_normalization("efficientnet_lite0"))(to_float_nchw(torch.from_numpy(images)))


# -- model, loss, map ----------------------------------------------------------

def test_model_contract() -> None:
    model = build_model(model_config("us"))
    assert isinstance(model, UninformedStudents) and get_method("us").config is USConfig
    assert get_method("us").prepare is not None and get_method("us").finalize is not None
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.students.parameters()}
    first = [s.stem[0][0].weight for s in model.students]
    assert len(first) == 3 and not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    model.train()
    assert all(s.training for s in model.students) and not model.teacher.training
    x = torch.randn(2, 3, SIZE, SIZE)
    t, s = model(x)
    assert t.shape == (2, 32, 16, 16) and [f.shape for f in s] == [t.shape] * 3
    assert not t.requires_grad and s[0].requires_grad
    assert model.eval().anomaly_map(x).shape == (2, 1, SIZE // 4, SIZE // 4)
    names = set(model.state_dict())
    assert {"score_stats", "teacher.mean", "teacher.basis", "teacher.std"} <= names   # travel in checkpoints


def test_teacher_fit_whitens_the_descriptors() -> None:
    teacher = DescriptorTeacher(build_backbone("efficientnet_lite0", (4, 8)), dim=16, pool=3).eval()
    batches = [torch.randn(2, 3, SIZE, SIZE) * 0.5 + k for k in (-0.2, 0.0, 0.3)]
    teacher.fit(iter(batches))
    with torch.no_grad():
        y = torch.cat([teacher(x) for x in batches])              # (6, 16, 16, 16)
    flat = y.permute(1, 0, 2, 3).reshape(16, -1).double()
    torch.testing.assert_close(flat.mean(1), torch.zeros(16, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(flat.cov(correction=0), torch.eye(16, dtype=torch.float64), atol=1e-3, rtol=0)
    assert torch.all(teacher.std[:-1] >= teacher.std[1:])         # largest variance first
    torch.testing.assert_close(teacher.basis @ teacher.basis.T, torch.eye(16), atol=1e-5, rtol=0)


def test_loss_and_map() -> None:
    t = torch.randn(2, 8, 4, 4)
    assert us_loss(t, [t.clone() for _ in range(3)]).item() == pytest.approx(0, abs=1e-7)
    assert us_loss(t, [t + 1, t - 1, t + 2]).item() == pytest.approx(2.0)        # (1 + 1 + 4) / 3
    error, variance = error_and_variance(t, [t + 1, t - 1, t])                   # mean hits the teacher
    torch.testing.assert_close(error, torch.zeros(2, 1, 4, 4))
    torch.testing.assert_close(variance, torch.full((2, 1, 4, 4), 2 / 3))
    error, variance = error_and_variance(t, [t + 1] * 3)                         # agree, and all miss
    torch.testing.assert_close(error, torch.ones(2, 1, 4, 4))
    torch.testing.assert_close(variance, torch.zeros(2, 1, 4, 4))
    stats = torch.tensor([1.0, 2.0, 0.5, 0.25])
    out = standardised_sum(torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 1.0), stats)
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), 1.0 + 2.0))


def test_config_is_validated() -> None:
    for bad in ({"students": 2}, {"pool": 2}, {"strides": (8,)}, {"backbone": "vgg"}, {"descriptor_dim": 0}):
        with pytest.raises(ValueError):
            model_config("us", bad)
    with pytest.raises(ValueError, match="exceeds"):
        build_model(model_config("us", {"descriptor_dim": 65}), pretrained=False)   # Lite0: 24 + 40 channels
    model = build_model(model_config("us", {"students": 4, "descriptor_dim": 64, "width": 16}), pretrained=False)
    t, s = model(torch.randn(1, 3, SIZE, SIZE))
    assert t.shape == (1, 64, 16, 16) and len(s) == 4


# -- training with the hooks, export, detection, speed ----------------------------

def test_training_runs_prepare_and_finalize(trained: Path, data: Path) -> None:
    cfg, model, ckpt = load_checkpoint(trained)
    assert cfg.method == "us" and isinstance(model, UninformedStudents)
    losses = [h["train_loss"] for h in ckpt["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert not torch.equal(model.teacher.std, torch.ones_like(model.teacher.std))   # prepare ran
    assert not torch.equal(model.score_stats, torch.tensor([0.0, 1.0, 0.0, 1.0]))   # finalize ran on best.pt
    train_s, _ = split_normal(data, list(cfg.classes), cfg.val_fraction, cfg.seed)
    images, _ = load_square([s.path for s in train_s], SIZE, resize="stretch")
    with torch.no_grad():
        error, variance = error_and_variance(*model(normalised(images)))
        amap = model.anomaly_map(normalised(images))
    torch.testing.assert_close(torch.stack([error.mean(), error.std(correction=0), variance.mean(),
                                            variance.std(correction=0)]), model.score_stats, rtol=1e-3, atol=1e-5)
    assert abs(amap.mean().item()) < 1e-3   # both terms standardised on these very images


def test_onnx_runtime_agrees_with_torch(trained: Path, tmp_path: Path) -> None:
    _, model, _ = load_checkpoint(trained)
    path = export_onnx(model, SIZE, tmp_path / "us.onnx")
    assert check_onnx(path, model, SIZE, batch=3) < 1e-3   # the normalisation buffers are in the graph


def test_packages_through_the_shared_export(trained: Path, data: Path, tmp_path: Path) -> None:
    pkg = read_package(export_package(trained, tmp_path / "us.kdpkg", data, latency_runs=2, golden_per_class=2))
    assert pkg.manifest.method == "us" and pkg.manifest.map_size == SIZE // 4
    assert set(pkg.manifest.calibration) == {"washer"}


def test_detects_an_obvious_defect(trained: Path, data: Path) -> None:
    assert_detects_obvious_defect(trained, data, "washer", SIZE)
