"""Training: one model on the normal images of a list of classes.

Unified = one model on the shuffled union of every class's normal training
images; one-class = the same function once per class (`one_class_configs`).
The normal training images are split into train and validation parts
(`split_train_val`, stratified by the data module); the validation loss picks
the best checkpoint, and the same validation images later calibrate the
per-class thresholds (evaluate.py), so they are never trained on.

Determinism: the student's initialisation, each epoch's shuffle and each
epoch's augmentations derive from the seed alone (not from the RNG state of
earlier epochs), so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from trainer.data.frames import load_square
from trainer.inference_graph import Normalize, to_float_nchw
from trainer.checkpoint import BEST, LAST, save_checkpoint
from trainer.config import TrainConfig
from trainer.data.mvtec import split_normal
from trainer.models import build_model, get_method

# keys that may differ when resuming: where things are, and how long to go on
RESUMABLE_CHANGES = {"data", "out", "epochs", "threads"}


@dataclass(frozen=True, slots=True)
class Progress:
    epoch: int        # 1-based, the epoch in progress
    epochs: int
    step: int         # steps done in this epoch
    steps: int
    loss: float       # running mean of this epoch's training loss
    val_loss: float | None   # set once the epoch's validation is done
    lr: float
    eta_s: float      # seconds left for the whole run
    note: str = ""    # what a fitted method (no epochs) is doing


def print_progress(p: Progress) -> None:
    """Progress line on stderr: rewritten in place on a terminal, one line per epoch otherwise."""
    eta = f"{int(p.eta_s // 60)}:{int(p.eta_s % 60):02d}"
    if p.note:
        print(f"fitting {p.note}, eta {eta}", file=sys.stderr, flush=True)
        return
    line = (f"epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps} loss {p.loss:.4f} "
            f"lr {p.lr:.3g} eta {eta}")
    if p.val_loss is not None:
        print(f"\r{line} val {p.val_loss:.4f}", file=sys.stderr, flush=True)
    elif sys.stderr.isatty():
        print(f"\r{line}", end="", file=sys.stderr, flush=True)


# -- data ----------------------------------------------------------------------

def resolve_classes(cfg: TrainConfig) -> list[str]:
    from trainer.data.mvtec import discover_classes

    found = discover_classes(cfg.data)
    if not cfg.classes:
        return list(found)
    missing = [c for c in cfg.classes if c not in found]
    if missing:
        raise ValueError(f"{cfg.data}: class(es) {missing} not found; have {', '.join(found)}")
    return list(cfg.classes)


def one_class_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """One config per class, each writing under `out/<class>`: the one-class mode."""
    return [dataclasses.replace(cfg, classes=(c,), out=str(Path(cfg.out) / c)) for c in resolve_classes(cfg)]


def augment(x: Tensor, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Augmentations that keep a normal image normal: optional flips, a brightness gain. x: (B, 3, S, S) 0..255."""
    b = x.shape[0]
    if cfg.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    if cfg.vflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(2), x)
    if cfg.brightness > 0:
        gain = 1 + (torch.rand(b, generator=gen) * 2 - 1) * cfg.brightness
        x = (x * gain.view(b, 1, 1, 1)).clamp(0, 255)
    return x


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up for `warmup_epochs`, then cosine decay to lr_min_ratio * lr."""
    warm = max(1, round(cfg.warmup_epochs * total / cfg.epochs)) if cfg.warmup_epochs > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    lo = cfg.lr * cfg.lr_min_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(1.0, t)))


# -- the loop ------------------------------------------------------------------

def train(cfg: TrainConfig, progress: Callable[[Progress], None] | None = print_progress,
          resume: bool = False) -> Path:
    """Train one model on the normal images of `cfg.classes`; returns the best checkpoint's path.

    resume: continue from `out/last.pt` when it exists (same config, `epochs` may grow).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    classes = resolve_classes(cfg)
    cfg = dataclasses.replace(cfg, classes=tuple(classes))
    method = get_method(cfg.method)

    train_s, val_s = split_normal(cfg.data, classes, cfg.val_fraction, cfg.seed)
    threads = cfg.threads or torch.get_num_threads()
    train_x, _ = load_square([s.path for s in train_s], cfg.size, threads, cfg.resize)   # (N, S, S, 3) uint8
    val_x, _ = load_square([s.path for s in val_s], cfg.size, threads, cfg.resize)
    if len(train_x) < 2:
        raise ValueError(f"need at least 2 normal training images, found {len(train_x)}")

    torch.manual_seed(cfg.seed)   # the student's initialisation
    model = build_model(cfg.model)
    normalize = Normalize.for_model(model)
    if not method.trained:
        if resume and (out / BEST).exists():   # a fitted model is done in one pass: reuse it when it matches
            check_resumable(TrainConfig.from_dict(torch.load(out / BEST, map_location="cpu",
                                                             weights_only=True)["config"]), cfg)
            return out / BEST
        t0 = time.monotonic()
        fit_once(cfg, model, train_s, train_x, progress)
        save_checkpoint(out / BEST, cfg, model, 0, math.nan, None, [{"fit_s": time.monotonic() - t0}])
        return out / BEST
    params = model.trainable_parameters()
    optimizer = make_optimizer(cfg, params)

    start, best_val, history = 0, math.inf, []
    if resume and (out / LAST).exists():
        ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
        check_resumable(TrainConfig.from_dict(ckpt["config"]), cfg)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        start, best_val, history = ckpt["epoch"], ckpt["best_val"], list(ckpt.get("history", []))

    bs = min(cfg.batch_size, len(train_x))
    if start == 0 and method.prepare is not None:   # e.g. US: the teacher's descriptor statistics
        run_hook(method.prepare, model, normalize, train_x, bs)
    steps = len(train_x) // bs          # the last partial batch is dropped: BatchNorm dislikes tiny ones
    total = steps * cfg.epochs
    t0, done_steps = time.monotonic(), 0
    for epoch in range(start, cfg.epochs):
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = rng.permutation(len(train_x))
        running = 0.0
        for i in range(steps):
            step = epoch * steps + i
            lr = lr_at(cfg, step, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            idx = order[i * bs:(i + 1) * bs]
            x = augment(to_float_nchw(torch.from_numpy(train_x[idx])), cfg, gen)   # (B, 3, S, S)
            loss = method.training_loss(model, normalize(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            done_steps += 1
            if progress:
                eta = (time.monotonic() - t0) / done_steps * (total - step - 1)
                progress(Progress(epoch + 1, cfg.epochs, i + 1, steps, running / (i + 1), None, lr, eta))
        val = validation_loss(model, method, normalize, val_x if len(val_x) else train_x, bs)
        history.append({"epoch": epoch + 1, "train_loss": running / steps, "val_loss": val})
        if val < best_val:
            best_val = val
            save_checkpoint(out / BEST, cfg, model, epoch + 1, best_val, optimizer, history)
        save_checkpoint(out / LAST, cfg, model, epoch + 1, best_val, optimizer, history)
        if progress:
            eta = (time.monotonic() - t0) / max(1, done_steps) * (total - (epoch + 1) * steps)
            progress(Progress(epoch + 1, cfg.epochs, steps, steps, running / steps, val, lr, eta))
    if method.finalize is not None and (out / BEST).exists():   # e.g. US: the chosen model's score statistics
        finalize_best(out / BEST, model, method, normalize, train_x, bs)
    return out / BEST


def fit_once(cfg: TrainConfig, model: torch.nn.Module, samples: list, images: np.ndarray,
             progress: Callable[[Progress], None] | None = None) -> torch.nn.Module:
    """Fit a method that has no loss and no epochs: one pass per class over its normal training images
    (`samples` and their square `images`, uint8 NHWC). Returns the model, fitted, in eval mode."""
    method = get_method(cfg.method)
    normalize = Normalize.for_model(model)
    bs = max(1, cfg.batch_size)
    t0 = time.monotonic()
    rows = {c: [i for i, s in enumerate(samples) if s.cls == c] for c in cfg.classes}
    missing = [c for c, idx in rows.items() if not idx]
    if missing:
        raise ValueError(f"{cfg.data}: no normal training images left for {missing} after the validation split")

    def batches(idx: list[int]) -> Callable[[], list[Tensor]]:
        return lambda: [normalize(to_float_nchw(torch.from_numpy(images[idx[i:i + bs]])))
                        for i in range(0, len(idx), bs)]

    def note(done: int, total: int, msg: str) -> None:
        if progress:
            eta = (time.monotonic() - t0) / done * (total - done) if done else 0.0
            progress(Progress(1, 1, done, total, math.nan, None, 0.0, eta, note=msg))

    model.eval()
    method.fit(model, {c: batches(idx) for c, idx in rows.items()}, seed=cfg.seed, progress=note)
    return model


@torch.no_grad()
def validation_loss(model: torch.nn.Module, method, normalize: Normalize, images: np.ndarray, bs: int) -> float:
    """Mean distillation loss over `images` (uint8 NHWC), model in eval mode."""
    model.eval()
    total = 0.0
    for i in range(0, len(images), bs):
        x = normalize(to_float_nchw(torch.from_numpy(images[i:i + bs])))
        total += method.training_loss(model, x, validation=True).item() * len(x)
    return total / len(images)


@torch.no_grad()
def run_hook(hook: Callable, model: torch.nn.Module, normalize: Normalize, images: np.ndarray, bs: int) -> None:
    """A method's `prepare` / `finalize` on `images` (uint8 NHWC), as one pass of normalised batches, eval mode."""
    model.eval()
    hook(model, (normalize(to_float_nchw(torch.from_numpy(images[i:i + bs]))) for i in range(0, len(images), bs)))


def finalize_best(path: Path, model: torch.nn.Module, method, normalize: Normalize, images: np.ndarray,
                  bs: int) -> None:
    """Load the best checkpoint into `model`, run the method's `finalize` and save it back in place."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    run_hook(method.finalize, model, normalize, images, bs)
    ckpt["state_dict"] = model.state_dict()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def check_resumable(saved: TrainConfig, now: TrainConfig) -> None:
    a, b = saved.to_dict(), now.to_dict()
    changed = sorted(k for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"cannot resume: the checkpoint was trained with different {changed}; "
                         f"use a new --out or the same settings")
