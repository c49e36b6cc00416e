"""Checkpoints: a training run's config, weights and history in one file, and the model rebuilt from it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.models import build_model

BEST, LAST = "best.pt", "last.pt"   # the lowest validation loss so far; the latest epoch (to resume from)


def save_checkpoint(path: Path, cfg: TrainConfig, model: torch.nn.Module, epoch: int, best_val: float,
                    optimizer: torch.optim.Optimizer | None, history: list[dict[str, float]]) -> None:
    """Write atomically; a fitted method (no optimizer) stores epoch 0 and no optimizer state."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": cfg.to_dict(), "state_dict": model.state_dict(), "epoch": epoch,
                "best_val": best_val, "optimizer": optimizer.state_dict() if optimizer else {},
                "history": history}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[TrainConfig, torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, with its weights, in eval mode: (config, model, raw dict)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg.model, pretrained=False)   # the checkpoint carries the teacher too
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return cfg, model.eval(), ckpt
