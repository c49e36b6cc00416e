"""Quantisation-aware training: fake-quantised networks fine-tuned with the method's own loss.

Every network of the method model is rewritten with fake-quant modules
(fakequant.py: BatchNorm folded into int8 per-channel weights, per-tensor
fake-quant on activations and sums). Ranges are calibrated on training images
(min-max) before fine-tuning and then frozen. The teacher gets the same
treatment but is never trained: its fake-quant is PTQ-calibrated, and only the
trainable networks see gradients (straight-through estimator). The map
arithmetic stays in float (ptq.py says why).

`torch.onnx.export` turns each fake-quant into QuantizeLinear ->
DequantizeLinear; the ONNX passes then store the weights as int8 (a quarter
the size), shrink the strided kernels and, for the CPU target, fold the input
normalisation (graph.py). Biases stay float: ONNX Runtime quantises them when
it fuses a QLinearConv, and TensorRT wants them float. Target `cpu`: uint8
asymmetric activations (ONNX Runtime's fast path). Target `tensorrt`: int8
symmetric activations with zero point 0, the explicitly quantised form
TensorRT consumes; ONNX Runtime runs it as well.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.quantize import graph as G
from trainer.quantize import TARGETS
from trainer.quantize.fakequant import freeze, freeze_weights, prepare_qat, set_quantisation


@dataclass(frozen=True)
class QATConfig:
    epochs: int = 3                 # a fine-tune from the FP32 checkpoint, not a training run
    lr_ratio: float | None = None   # of the checkpoint's peak rate; None: its final one (lr_min_ratio), i.e. training
                                    # resumes where its schedule ended: settle on the grid, do not retrain
    calib_images: int = 32          # frames that set the activation ranges before fine-tuning
    target: str = "cpu"
    batch_size: int | None = None   # None: the checkpoint's
    seed: int = 0
    threads: int = 0                # torch threads; 0: torch's default

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.epochs < 0 or (self.lr_ratio is not None and self.lr_ratio <= 0) or self.calib_images < 1:
            raise ValueError("epochs >= 0, lr_ratio > 0 and calib_images >= 1 required")


# -- the fine-tune ------------------------------------------------------------------------

@dataclass
class QATResult:
    path: Path
    config: QATConfig
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def recipe(self) -> dict[str, Any]:
        """The manifest's `quantization` entry."""
        return {"scheme": "qat", "format": "QDQ", **asdict(self.config), "epochs_run": len(self.history),
                **self.summary}


def calibrate(model: nn.Module, images: np.ndarray, batch_size: int) -> None:
    """Run `images` (uint8 NHWC) through the prepared model with observers on, then freeze the ranges."""
    from trainer.inference_graph import Normalize, to_float_nchw

    normalize = Normalize.for_model(model)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            model(normalize(to_float_nchw(torch.from_numpy(images[i:i + batch_size]))))
    freeze(model)


def run_qat(checkpoint: str | Path, out: str | Path, cfg: QATConfig = QATConfig(),
            progress: Callable[[str], None] | None = None, float_out: str | Path | None = None) -> QATResult:
    """Fine-tune the checkpoint's model fake-quantised, export QDQ ONNX to `out`.

    float_out: also export the fine-tuned weights with every fake-quant off, which tells how much of
    an accuracy change comes from the fine-tune itself rather than from quantisation.
    """
    t0 = time.monotonic()
    qmodel, size, history = fine_tune(checkpoint, cfg, progress)
    if float_out is not None:
        from trainer.export import export_onnx

        set_quantisation(qmodel, False)
        export_onnx(qmodel, size, float_out)
        set_quantisation(qmodel, True)
    path, summary = export_qat(qmodel, size, out, cfg.target)
    return QATResult(path, cfg, history, summary, time.monotonic() - t0)


def fine_tune(checkpoint: str | Path, cfg: QATConfig = QATConfig(), progress: Callable[[str], None] | None = None
              ) -> tuple[nn.Module, int, list[dict[str, float]]]:
    """The checkpoint's model fake-quantised, calibrated and fine-tuned: (model, input size, history)."""
    from trainer.inference_graph import Normalize, to_float_nchw
    from trainer.models import get_method
    from trainer.data.frames import load_square
    from trainer.checkpoint import load_checkpoint
    from trainer.data.mvtec import split_normal
    from trainer.train import augment, make_optimizer, run_hook, validation_loss

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tcfg, model, _ = load_checkpoint(checkpoint)
    method = get_method(tcfg.method)
    if not method.trained:
        raise ValueError(f"QAT fine-tunes a trained network; {tcfg.method} is fitted, not trained, so it has "
                         f"nothing to fine-tune: use PTQ (e.g. ptq:holdout-normal) for its INT8 variant")
    train_s, val_s = split_normal(tcfg.data, list(tcfg.classes), tcfg.val_fraction, tcfg.seed)
    train_x, _ = load_square([s.path for s in train_s], tcfg.size, resize=tcfg.resize)
    val_x, _ = load_square([s.path for s in val_s], tcfg.size, resize=tcfg.resize)
    bs = min(cfg.batch_size or tcfg.batch_size, len(train_x))

    torch.manual_seed(cfg.seed)
    qmodel = prepare_qat(model, cfg.target)
    rng = np.random.default_rng(cfg.seed)
    calib = train_x[rng.permutation(len(train_x))[:cfg.calib_images]]
    calibrate(qmodel, calib, bs)

    normalize = Normalize.for_model(qmodel)
    params = [p for p in qmodel.trainable_parameters() if p.requires_grad]
    lr = tcfg.lr * (tcfg.lr_min_ratio if cfg.lr_ratio is None else cfg.lr_ratio)
    optimizer = make_optimizer(dataclasses.replace(tcfg, lr=lr), params)   # the checkpoint's optimizer kind
    steps = max(1, len(train_x) // bs)
    total = steps * cfg.epochs
    val_images = val_x if len(val_x) else train_x
    best_val = validation_loss(qmodel, method, normalize, val_images, bs)
    history = [{"epoch": 0, "train_loss": float("nan"), "val_loss": best_val}]
    best_state = copy.deepcopy(qmodel.state_dict())
    for epoch in range(cfg.epochs):
        qmodel.train()
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_x))
        running = 0.0
        for i in range(steps):
            step = epoch * steps + i
            for g in optimizer.param_groups:   # cosine from lr to 0 over the fine-tune
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / max(1, total)))
            x = augment(to_float_nchw(torch.from_numpy(train_x[order[i * bs:(i + 1) * bs]])), tcfg, gen)
            loss = method.training_loss(qmodel, normalize(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
        val = validation_loss(qmodel, method, normalize, val_images, bs)
        history.append({"epoch": epoch + 1, "train_loss": running / steps, "val_loss": val})
        if progress:
            progress(f"qat epoch {epoch + 1}/{cfg.epochs} loss {running / steps:.4f} val {val:.4f}")
        if val < best_val:
            best_val, best_state = val, copy.deepcopy(qmodel.state_dict())
    qmodel.load_state_dict(best_state)
    if method.finalize is not None:   # statistics of the map (US) follow the quantised networks
        run_hook(method.finalize, qmodel, normalize, train_x, bs)
    return qmodel.eval(), tcfg.size, history


def export_qat(qmodel: nn.Module, size: int, out: str | Path, target: str = "cpu") -> tuple[Path, dict[str, Any]]:
    """Export a fake-quantised model as QDQ ONNX and apply the deployment passes; (path, what they did)."""
    from trainer.export import export_onnx

    out = Path(out)
    freeze_weights(qmodel)
    export_onnx(qmodel, size, out)
    model = G.load(out)
    summary: dict[str, Any] = {"int8_weights": G.fold_weight_quantize(model),
                               "stripped_kernels": G.strip_shifted_kernels(model)}
    if target == "cpu":
        summary["input_folded"] = G.fold_input_normalisation(model)
    summary.update(G.compact_qdq(model))
    summary.update(G.qdq_summary(model))
    G.save(model, out)
    return out, summary
