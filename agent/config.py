"""The agent's configuration: a TOML file, strictly typed, plus environment overrides.

Environment variables ``KDFLEET_AGENT_<KEY>`` override top-level scalar keys
(``KDFLEET_AGENT_BROKER``, ``KDFLEET_AGENT_DEVICE``, ``KDFLEET_AGENT_PASSWORD`` ...);
they are read when the config is loaded, never at import.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared import topics
from shared.config import BrokerConfig, ConfigError, build, load_toml
from shared.imaging import DEFAULT_LIMITS, ImageLimits

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
    rejected: str = ""         # a folder's images that cannot be used go here; "": <folder>/rejected

    def validate(self) -> None:
        if self.fps < 0:
            raise ConfigError(f"source {self.uri}: fps = {self.fps}: must be >= 0 (0: as fast as possible)")


@dataclass(frozen=True)
class ImageConfig:
    """What a frame file may be before it is decoded (shared/imaging.py reads its header first)."""

    max_pixels: int = DEFAULT_LIMITS.max_pixels   # 50 MP: 150 MB decoded, safe on a 4 GB Jetson
    max_bytes: int = DEFAULT_LIMITS.max_bytes     # 50 MiB: the file is read whole before decoding

    def validate(self) -> None:
        for key in ("max_pixels", "max_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"image.{key} = {getattr(self, key)}: must be >= 1")

    def limits(self) -> ImageLimits:
        return ImageLimits(self.max_pixels, self.max_bytes)


@dataclass(frozen=True)
class SpoolConfig:
    """The on-disk result spool and its bounds."""

    path: str = "var/agent/spool.db"
    max_results: int = 100_000          # a day of results at ~1/s with room to spare
    max_bytes: int = 2 * 1024**3        # keeps a small SD card from filling
    max_age_s: float = 7 * 24 * 3600.0  # older results are stale for the plant

    def validate(self) -> None:
        for key, ok, need in (("max_results", self.max_results >= 1, ">= 1"),
                              ("max_bytes", self.max_bytes >= 1024, ">= 1024"),
                              ("max_age_s", self.max_age_s > 0, "> 0")):
            if not ok:
                raise ConfigError(f"spool.{key} = {getattr(self, key)}: must be {need}")


@dataclass(frozen=True)
class PublishConfig:
    """Which results leave the station."""

    policy: Literal["all", "anomalies", "sampled"] = "all"
    sample_every: int = 50     # "sampled": anomalies plus 1 in N normal results, with the full frame
    frame_quality: int = 85    # JPEG quality of sampled frames

    def validate(self) -> None:
        if self.sample_every < 1:
            raise ConfigError(f"publish.sample_every = {self.sample_every}: must be >= 1")
        if not 1 <= self.frame_quality <= 100:
            raise ConfigError(f"publish.frame_quality = {self.frame_quality}: must be 1 to 100")


@dataclass(frozen=True)
class DeliveryConfig:
    """How results travel to the hub: each stays in the spool until the hub's receipt names it."""

    window: int = 64                       # results awaiting the broker's PUBACK at once
    receipt_window: int = 500              # results awaiting the hub's receipt at once; the rest wait in the spool
    resend_after_s: float = 30.0           # no PUBACK by then: sent again
    receipt_timeout_s: float = 30.0        # PUBACK but no receipt by then: sent again, the wait doubling each time
    receipt_timeout_max_s: float = 600.0   # ... up to this

    def validate(self) -> None:
        for key, ok, need in (("window", 1 <= self.window <= 1000, "1 to 1000"),
                              ("receipt_window", self.window <= self.receipt_window <= 100_000,
                               f"window ({self.window}) to 100000"),
                              ("resend_after_s", self.resend_after_s > 0, "> 0"),
                              ("receipt_timeout_s", self.receipt_timeout_s > 0, "> 0"),
                              ("receipt_timeout_max_s", self.receipt_timeout_max_s >= self.receipt_timeout_s,
                               f">= receipt_timeout_s ({self.receipt_timeout_s})")):
            if not ok:
                raise ConfigError(f"delivery.{key} = {getattr(self, key)}: must be {need}")


@dataclass(frozen=True)
class UpdateConfig:
    """Over-the-air model updates from the hub (agent/updater.py)."""

    models_dir: str = ""                   # installed packages and pointers; "": beside the spool, <spool>-models
    hub_url: str = ""                      # base for relative package URLs in the hub's desired-model message
    hub_token: str | None = None           # hub API token, sent as a bearer token with downloads
    attempts: int = 3                      # a broken download resumes this many times before giving up

    def validate(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"update.attempts = {self.attempts}: must be >= 1")
        if self.hub_url and not self.hub_url.startswith(("http://", "https://")):
            raise ConfigError(f"update.hub_url = {self.hub_url!r}: must start with http:// or https://")


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
    ca_file: str | None = None          # CA bundle that signed the broker's certificate (mqtts://); None: system store
    cert_file: str | None = None        # client certificate (PEM), for a broker that asks for one
    key_file: str | None = None         # its private key (PEM)
    keepalive_s: int = 30               # the broker declares the agent offline after 1.5x this without a word
    runtime: Literal["auto", "onnxruntime", "openvino", "tensorrt"] = "auto"
    threads: int = 0                    # inference threads; 0: one per core
    batch_size: int = 1                 # frames per inference call
    queue_size: int = 8                 # frames waiting for inference before capture drops
    thresholds: dict[str, float] = field(default_factory=dict)   # per-class raw threshold overrides
    trusted_keys: list[str] = field(default_factory=list)        # public key files; packages must be signed by one
    allow_unsigned: bool = False        # no trusted_keys: take unsigned packages (development only)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    metrics_interval_s: float = 10.0
    heatmap_size: int = 128             # side of the heat-map thumbnail

    def validate(self) -> None:
        for key in ("site", "device"):
            try:
                topics.check_name(getattr(self, key), key)
            except topics.TopicError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        if not self.sources:
            raise ConfigError("sources: at least one [[sources]] entry (uri and cls) is required")
        for key, ok, need in (("batch_size", self.batch_size >= 1, ">= 1"),
                              ("queue_size", self.queue_size >= 1, ">= 1"),
                              ("threads", self.threads >= 0, ">= 0 (0: one per core)"),
                              ("metrics_interval_s", self.metrics_interval_s > 0, "> 0"),
                              ("heatmap_size", self.heatmap_size >= 16, ">= 16"),
                              ("keepalive_s", 5 <= self.keepalive_s <= 65535, "5 to 65535 seconds")):
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)}: must be {need}")
        self.broker_config()  # the URL must parse
        if not self.trusted_keys and not self.allow_unsigned:
            raise ConfigError("trusted_keys: none given, and the agent runs only packages signed by a trusted key; "
                              "list the site's public key file(s) (`kdfleet keys new` writes them, "
                              "--trusted-key on the command line), or set allow_unsigned = true for development")
        if self.trusted_keys and self.allow_unsigned:
            raise ConfigError("allow_unsigned = true cannot go with trusted_keys: with keys every package must be "
                              "signed by one of them; remove one of the two settings")

    def package_policy(self) -> str:
        """One line for the start-up log: which packages the agent runs."""
        if self.trusted_keys:
            return f"packages must be signed by one of {len(self.trusted_keys)} trusted key(s) " \
                   f"({', '.join(self.trusted_keys)})"
        return "allow_unsigned = true: UNSIGNED packages are accepted (development only)"

    def models_dir(self) -> Path:
        """Where over-the-air packages are installed: update.models_dir, else beside the spool (one per agent)."""
        if self.update.models_dir:
            return Path(self.update.models_dir)
        spool = Path(self.spool.path)
        return spool.with_name(f"{spool.stem}-models")

    def broker_config(self) -> BrokerConfig:
        b = BrokerConfig.from_url(self.broker)
        return dataclasses.replace(
            b, username=self.username or b.username, password=self.password or b.password,
            ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
            keepalive=self.keepalive_s).checked()


def load(path: str | Path | None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> AgentConfig:
    """Config from a TOML file (optional), then the environment, then explicit overrides.

    Errors name the file and line (or the environment variable), the key, and what to write instead.
    """
    data, text = _read(Path(path)) if path else ({}, "")
    env = from_environ(os.environ if environ is None else environ)
    data.update(env)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    where = str(path) if path else "agent config"
    problems = unknown_keys(AgentConfig, data)
    if problems:
        raise ConfigError("\n".join(_at(where, text, key, f"{msg}") for key, msg in problems))
    try:
        return build(AgentConfig, data)
    except ConfigError as exc:
        msg = str(exc)
        m = _KEY.match(msg)
        key = m.group(1) if m else ""
        origin = f" (set by {ENV_PREFIX}{key.upper()})" if key in env else ""
        raise ConfigError(_at(where, text if not origin else "", key, msg + origin)) from None


def _read(path: Path) -> tuple[dict[str, Any], str]:
    try:
        data = load_toml(path)   # names the file and the line of a syntax error
        return data, path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8") from None


def from_environ(environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    """The `KDFLEET_AGENT_<KEY>` variables as typed values; an unknown or malformed one is refused."""
    hints = typing.get_type_hints(AgentConfig)
    out: dict[str, Any] = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name in TABLE_KEYS:
            raise ConfigError(f"{var}: {name} is a table or list; set it in the TOML file, not the environment")
        if name not in hints:
            near = difflib.get_close_matches(name, [n for n in hints if n not in TABLE_KEYS], 1)
            hint = f"did you mean {ENV_PREFIX}{near[0].upper()}?" if near else \
                f"the environment can set {', '.join(ENV_PREFIX + n.upper() for n in hints if n not in TABLE_KEYS)}"
            raise ConfigError(f"{var}: not an agent setting; {hint} (or unset it)")
        out[name] = _from_env(var, value, hints[name])
    return out


def _from_env(var: str, value: str, hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{var}={value!r}: must be one of {', '.join(args)}")
        return value
    base = args[0] if args and typing.get_origin(hint) is not None else hint
    if base is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{var}={value!r}: expected true or false")
        return value.lower() in ("true", "1")
    kinds = {int: "an integer, e.g. 4", float: "a number, e.g. 2.5"}
    if base in kinds:
        try:
            return base(value)
        except ValueError:
            raise ConfigError(f"{var}={value!r}: expected {kinds[base]}") from None
    return value


TABLE_KEYS = ("sources", "spool", "image", "publish", "delivery", "update", "thresholds", "trusted_keys")
_KEY = re.compile(r"^(?:missing required key |)([A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*)(?::| =|$)")


def unknown_keys(cls: type, mapping: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(key, message) for every key `cls` (a config dataclass, recursively) does not know, with the nearest."""
    if not isinstance(mapping, dict):
        return []   # build() reports the wrong type
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), 1, 0.6)
            hint = f"did you mean {prefix}{near[0]}?" if near else f"allowed here: {', '.join(sorted(hints))}"
            out.append((path, f"{path}: unknown key; {hint}"))
            continue
        hint = hints[key]
        item = (typing.get_args(hint) or [None])[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            out += unknown_keys(hint, value, f"{path}.")
        elif dataclasses.is_dataclass(item) and isinstance(value, list):
            for i, v in enumerate(value):
                out += unknown_keys(item, v, f"{path}[{i}].")
    return out


def _at(where: str, text: str, key: str, msg: str) -> str:
    """`where[:line]: msg`, the line where `key` is set in the TOML `text` when it can be found."""
    line = _line_of(text, key) if text and key else None
    return f"{where}{f':{line}' if line else ''}: {msg}"


def _line_of(text: str, key: str) -> int | None:
    """The line setting dotted `key` ("batch_size", "spool.path", "sources[1].fps") in TOML `text`."""
    parts = re.findall(r"([A-Za-z_]\w*)(?:\[(\d+)\])?", key)
    if not parts:
        return None
    *tables, (name, _) = parts
    header = ".".join(t for t, _ in tables)
    index = int(tables[-1][1] or 0) if tables else 0
    current, count = "", -1
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        table = re.match(r"^\[\[?\s*([\w.]+)\s*\]\]?", line)
        if table:
            current = table.group(1)
            count += current == header
        elif current == header and (not header or count == index) and re.match(rf"^{name}\s*=", line):
            return n
    return None
