"""The agent's configuration: a TOML file, strictly typed, plus environment overrides.

Environment variables ``KDFLEET_AGENT_<KEY>`` override top-level scalar keys
(``KDFLEET_AGENT_BROKER``, ``KDFLEET_AGENT_DEVICE``, ``KDFLEET_AGENT_PASSWORD`` ...);
they are read when the config is loaded, never at import.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared import topics
from shared.config import BrokerConfig, ConfigError, build, load_toml

ENV_PREFIX = "KDFLEET_AGENT_"


@dataclass(frozen=True)
class SourceConfig:
    """One frame source and what it inspects."""

    uri: str                   # folder, video file, camera index ("0") or rtsp:// / http:// URL
    cls: str                   # the product class this source shows (selects calibration)
    station: str = ""          # defaults to the device's station
    fps: float = 0.0           # pace for folders and files; 0: as fast as the pipeline runs
    loop: bool = False         # replay a folder or file forever (simulated stations)
    watch: bool = False        # keep watching a folder for new files

    def validate(self) -> None:
        if self.fps < 0:
            raise ConfigError(f"source {self.uri}: fps must be >= 0")


@dataclass(frozen=True)
class SpoolConfig:
    """The on-disk result spool and its bounds."""

    path: str = "var/agent/spool.db"
    max_results: int = 100_000          # a day of results at ~1/s with room to spare
    max_bytes: int = 2 * 1024**3        # keeps a small SD card from filling
    max_age_s: float = 7 * 24 * 3600.0  # older results are stale for the plant

    def validate(self) -> None:
        if self.max_results < 1 or self.max_bytes < 1024 or self.max_age_s <= 0:
            raise ConfigError("spool: max_results >= 1, max_bytes >= 1024 and max_age_s > 0 are required")


@dataclass(frozen=True)
class PublishConfig:
    """Which results leave the station."""

    policy: Literal["all", "anomalies", "sampled"] = "all"
    sample_every: int = 50     # "sampled": anomalies plus 1 in N normal results, with the full frame
    frame_quality: int = 85    # JPEG quality of sampled frames

    def validate(self) -> None:
        if self.sample_every < 1:
            raise ConfigError("publish.sample_every must be >= 1")


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent process needs."""

    device: str
    site: str
    package: str
    sources: list[SourceConfig]
    station: str = "station"
    broker: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    runtime: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    threads: int = 0                    # inference threads; 0: one per core
    batch_size: int = 1                 # frames per inference call
    queue_size: int = 8                 # frames waiting for inference before capture drops
    thresholds: dict[str, float] = field(default_factory=dict)   # per-class raw threshold overrides
    trusted_keys: list[str] = field(default_factory=list)        # public keys; empty: unsigned allowed
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    metrics_interval_s: float = 10.0
    heatmap_size: int = 128             # side of the heat-map thumbnail

    def validate(self) -> None:
        topics.check_name(self.site, "site")
        topics.check_name(self.device, "device")
        if not self.sources:
            raise ConfigError("at least one [[sources]] entry is required")
        if self.batch_size < 1 or self.queue_size < 1 or self.threads < 0:
            raise ConfigError("batch_size and queue_size must be >= 1, threads >= 0")
        if self.metrics_interval_s <= 0:
            raise ConfigError("metrics_interval_s must be > 0")
        self.broker_config()  # the URL must parse

    def broker_config(self) -> BrokerConfig:
        b = BrokerConfig.from_url(self.broker)
        return dataclasses.replace(
            b, username=self.username or b.username, password=self.password or b.password,
            ca_file=self.ca_file, tls=b.tls or self.ca_file is not None)


def load(path: str | Path | None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> AgentConfig:
    """Config from a TOML file (optional), then the environment, then explicit overrides."""
    data: dict[str, Any] = load_toml(path) if path else {}
    env = os.environ if environ is None else environ
    scalars = {f.name: f for f in dataclasses.fields(AgentConfig)
               if f.name not in ("sources", "spool", "publish", "thresholds", "trusted_keys")}
    for name, f in scalars.items():
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None:
            data[name] = _from_env(name, value, f.type)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    where = str(path) if path else "agent config"
    try:
        return build(AgentConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _from_env(name: str, value: str, typ: Any) -> Any:
    text = str(typ)
    if text.startswith("int"):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}={value!r}: expected an integer") from None
    if text.startswith("float"):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}={value!r}: expected a number") from None
    return value
