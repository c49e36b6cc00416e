"""The candidate: fine-tuned from the fleet's checkpoint, quantised for --precision int8, scored, packaged.

The fine-tune is the method's own training loop on the base data set plus
the collected normals not held out (QAT after it for --precision int8);
scored gives the gate (trainer/gate.py) each model's numbers on the test
set and on the collected images, at the thresholds each model ships with.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.scoring import ClassCalibration

from trainer.gate import SPLITS
from trainer.retrain.config import ServeConfig

log = logging.getLogger("kdfleet.trainer.serve")


def fine_tune(cfg: ServeConfig, checkpoint: Path, data: Path, out: Path) -> Path:
    """Go on training `checkpoint` for cfg.epochs more epochs on `data` with the method's loop; the best.pt.

    The checkpoint is seeded as the run's last.pt and resumed: its weights and optimizer state carry
    over and the learning rate follows the tail of the run's cosine schedule. The best validation
    loss starts afresh, because the validation images are now others.
    """
    import torch

    from trainer.checkpoint import LAST
    from trainer.config import TrainConfig
    from trainer.train import print_progress, train

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    old = TrainConfig.from_dict(ckpt["config"])
    tcfg = dataclasses.replace(old, data=str(data), out=str(out), epochs=int(ckpt["epoch"]) + cfg.epochs,
                               threads=cfg.threads or old.threads)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.update(config=tcfg.to_dict(), best_val=math.inf)
    torch.save(ckpt, out / LAST)
    return train(tcfg, progress=print_progress, resume=True)


def quantize(cfg: ServeConfig, checkpoint: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    """QAT of the fine-tuned checkpoint (trainer.quantize.qat): the INT8 ONNX and its manifest recipe."""
    from trainer.quantize.qat import QATConfig, run_qat

    res = run_qat(checkpoint, out, QATConfig(epochs=cfg.qat_epochs, threads=cfg.threads),
                  progress=lambda s: log.info("  %s", s))
    return res.path, res.recipe()


def scored(runner: Any, data: Path, classes: list[str], val_fraction: float, seed: int,
           collected: dict[str, dict[str, Any]], sigma: float, latency_runs: int,
           shipped: Mapping[str, ClassCalibration] | None = None) -> dict[str, Any]:
    """evaluate() with per-image details, plus the raw scores of the collected images by role and split
    (`hub[role][split]`). With `shipped` (a package's calibration per class), the test set is scored with
    the reference and judged at the threshold the package ships, not at a recalibration."""
    from trainer.evaluate import evaluate, score_images

    result = evaluate(runner, data, classes, runner.size, sigma=sigma, val_fraction=val_fraction, seed=seed,
                      latency_runs=latency_runs, details=True, progress=lambda s: log.info("  evaluating %s", s))
    for cls in classes:
        m = result["classes"][cls]
        if shipped is not None:
            cal = shipped[cls]
            m["scores"] = score_images(runner, m["paths"], sigma, reference=cal.reference)[0].tolist()
            m["calibration"] = cal.to_dict()
        cal = ClassCalibration.from_dict(m["calibration"])
        m["hub"] = {}
        for role in ("normal", "defect"):
            m["hub"][role] = {}
            for split in SPLITS:
                paths = [c["file"] for c in collected.values()
                         if c["cls"] == cls and c["role"] == role and c.get("split", "train") == split]
                m["hub"][role][split] = score_images(runner, paths, sigma, reference=cal.reference)[0].tolist()
    return result


def build_package(cfg: ServeConfig, checkpoint: Path, onnx_path: Path, result: dict[str, Any], data: Path,
                  version: str, parent: str | None, recipe: dict[str, Any] | None, out: Path) -> Path:
    """The package of the candidate from its own ONNX evaluation; signed with --key."""
    import torch

    from shared.package import load_private_key, write_package
    from trainer.runners import onnx_runner
    from trainer.export import build_manifest, golden_images
    from trainer.jsonsafe import json_safe
    from trainer.config import TrainConfig

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    tcfg = TrainConfig.from_dict(ckpt["config"])
    manifest = build_manifest(tcfg, result, result["sigma"], version, cfg.model_id, parent, ckpt,
                              precision="fp32" if recipe is None else "int8",
                              quantization=None if recipe is None else json_safe(recipe))
    golden = golden_images(onnx_runner(onnx_path), data, manifest)
    key = load_private_key(cfg.key) if cfg.key else None
    return write_package(out, manifest, onnx_path, golden, key=key)
