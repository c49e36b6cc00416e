"""Reverse Distillation: model/loss/map contracts, edge-friendly ops, training, ONNX export and detection."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from shared.package import read_package
from tests.trainer.obvious_defect import assert_detects_obvious_defect
from trainer.data import synth
from trainer.export import check_onnx, export_onnx, export_package
from trainer.models import build_model, get_method, model_config
from trainer.models.rd import RDConfig, ReverseDistillation, cosine_distance, level_maps, rd_loss, sum_maps
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.train import train

torch.set_num_threads(2)

SIZE = 64
# the paper's optimizer; levels (4, 8): at 64 px the default's stride-32 embedding would be a mere 2 x 2
RUN = dict(size=SIZE, model={"strides": (4, 8)}, epochs=15, batch_size=8, optimizer="adam", lr=0.005, momentum=0.5,
           threads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=0, size=SIZE, n_train=30,
                          n_test_good=8, n_test_defect=1, classes=["washer"])


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(TrainConfig(data=str(data), method="rd", out=str(tmp_path_factory.mktemp("run")), **RUN),
                 progress=None)


# -- model, loss, map ----------------------------------------------------------

def test_model_contract() -> None:
    model = build_model(model_config("rd"))
    assert isinstance(model, ReverseDistillation) and get_method("rd").config is RDConfig
    assert not any(p.requires_grad for p in model.encoder.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in [*model.bottleneck.parameters(), *model.decoder.parameters()]}
    assert not trainable & {id(p) for p in model.encoder.parameters()}
    model.train()
    assert model.decoder.training and model.bottleneck.training and not model.encoder.training
    x = torch.randn(2, 3, SIZE, SIZE)
    t, s = model(x)
    assert [f.shape for f in t] == [f.shape for f in s] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    assert model.bottleneck(t).shape == (2, 256, 2, 2)   # the one-class embedding, one octave below the deepest
    assert not t[0].requires_grad and s[0].requires_grad
    assert model.eval().anomaly_map(x).shape == (2, 1, SIZE // 4, SIZE // 4)


def test_decoder_uses_only_edge_friendly_ops() -> None:
    model = build_model(model_config("rd", {"upsample": "bilinear"}), pretrained=False)
    kinds = {type(m) for m in [*model.bottleneck.modules(), *model.decoder.modules()]}
    assert not kinds & {nn.ConvTranspose2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.SiLU, nn.GELU}
    assert nn.BatchNorm2d in kinds and nn.ReLU in kinds


def test_loss_and_map() -> None:
    t = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    assert rd_loss(t, [3 * f for f in t], "unit").item() == pytest.approx(0, abs=1e-6)    # cosine: scale-free
    assert rd_loss(t, [-f for f in t], "unit").item() == pytest.approx(4.0)               # 2 per opposite level
    assert rd_loss(t, [f + 1 for f in t]).item() == pytest.approx(2.0)                    # standardised: 1 per level
    other = torch.randn(2, 8, 8, 8)
    d = cosine_distance(t[0], other)
    assert d.shape == (2, 1, 8, 8) and d.min() >= 0 and d.max() <= 2
    torch.testing.assert_close(d, 1 - torch.nn.functional.cosine_similarity(t[0], other, dim=1)[:, None])
    maps = level_maps(t, [torch.randn_like(f) for f in t])
    total = sum_maps(maps, [4, 8])
    assert total.shape == (2, 1, 8, 8)
    flat = sum_maps([torch.ones(1, 1, 8, 8), torch.full((1, 1, 4, 4), 0.5)], [4, 8])
    torch.testing.assert_close(flat, torch.full((1, 1, 8, 8), 1.5))   # upsampled, then added
    assert sum_maps([torch.ones(1, 1, 4, 4), torch.ones(1, 1, 2, 2)], [8, 16]).shape == (1, 1, 8, 8)   # to stride 4


def test_config_is_validated() -> None:
    for bad in ({"strides": (16, 8)}, {"strides": (4, 32)}, {"upsample": "transposed"}, {"backbone": "vgg"},
                {"embed_channels": 0}, {"pool": 4}, {"target": "l1"}):
        with pytest.raises(ValueError):
            model_config("rd", bad)
    assert model_config("rd", {"strides": [4, 8]}).strides == (4, 8)
    model = build_model(model_config("rd", {"strides": (4, 8)}), pretrained=False)
    assert model.anomaly_map(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 1, 16, 16)


# -- training, export, detection -----------------------------------------------

def test_training_learns_and_the_checkpoint_rebuilds(trained: Path) -> None:
    cfg, model, ckpt = load_checkpoint(trained)
    assert cfg.method == "rd" and isinstance(cfg.model, RDConfig) and isinstance(model, ReverseDistillation)
    assert cfg.model.strides == (4, 8) and model.decoder.heads[0].out_channels == 40
    losses = [h["train_loss"] for h in ckpt["history"]]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_default_graph_exports(tmp_path: Path, upsample: str) -> None:
    model = build_model(model_config("rd", {"upsample": upsample})).eval()
    path = export_onnx(model, SIZE, tmp_path / "rd.onnx")
    assert check_onnx(path, model, SIZE, batch=2) < 1e-3
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Resize" in ops and not ops & {"ConvTranspose", "GroupNormalization", "LayerNormalization"}


def test_onnx_runtime_agrees_with_torch(trained: Path, tmp_path: Path) -> None:
    _, model, _ = load_checkpoint(trained)
    path = export_onnx(model, SIZE, tmp_path / "rd.onnx")
    assert check_onnx(path, model, SIZE, batch=3) < 1e-3


def test_packages_through_the_shared_export(trained: Path, data: Path, tmp_path: Path) -> None:
    pkg = read_package(export_package(trained, tmp_path / "rd.kdpkg", data, latency_runs=2, golden_per_class=2))
    assert pkg.manifest.method == "rd" and pkg.manifest.map_size == SIZE // 4
    assert set(pkg.manifest.calibration) == {"washer"}


def test_detects_an_obvious_defect(trained: Path, data: Path) -> None:
    assert_detects_obvious_defect(trained, data, "washer", SIZE)
