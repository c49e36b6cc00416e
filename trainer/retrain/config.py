"""What `kdfleet trainer serve` was told, as one frozen `ServeConfig` (built by trainer.serve.parse_config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.gate import HOLDOUT, Limits


@dataclass(frozen=True)
class ServeConfig:
    """What `kdfleet trainer serve` was told; validated once in `parse_config`."""

    hub: str
    token: str
    workdir: Path
    data: Path
    base: Path
    key: Path | None = None
    min_new: int = 20                 # fewer new images rarely move a model; retraining costs minutes
    limits: Limits = field(default_factory=Limits)   # how much worse than the fleet's model a candidate may be
    holdout: float = HOLDOUT
    precision: str = "fp32"
    epochs: int = 5                   # fine-tune epochs on top of the checkpoint's
    qat_epochs: int = 3
    model_id: str | None = None       # the registry name; default the fleet's model's, else METHOD-BACKBONE-SCOPE-SIZE
    base_version: str | None = None   # the version --base was released as; default what the fleet runs at first
    site: str | None = None
    devices: tuple[str, ...] = ()
    canary: str = "1"
    wave_size: int = 0
    soak_s: float = 600.0
    max_failures: int = 1
    max_anomaly_rate: float | None = None
    # a threshold gone wrong flags nearly everything: 20 points above the device's rate before stops the rollout
    max_anomaly_rise: float | None = 0.2
    max_latency_ms: float | None = None
    wave_timeout_s: float = 1800.0
    interval_s: float = 3600.0
    threads: int = 0
    latency_runs: int = 5
