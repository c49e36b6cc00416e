"""Message schemas on the wire: frozen dataclasses, msgpack-encoded, validated on decode.

Every payload is a msgpack map with ``"v"`` (the schema version) and ``"t"``
(the message type). `decode` checks types, sizes and ranges and raises
`MessageError` naming the offending field; it never lets a malformed payload
through and never crashes on one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from shared.ids import is_ulid
from shared.vocabulary import MODEL_STATES, VERDICTS

SCHEMA_VERSION = 1
MAX_PAYLOAD = 2 * 1024 * 1024   # a result with crops and a frame stays well below this
MAX_IMAGE = 512 * 1024          # one encoded image (heat map, thumbnail, crop, frame)
MAX_CROPS = 16
MAX_TEXT = 256
MAX_RECEIPT_IDS = 1000          # result ids in one receipt; a bigger batch is confirmed in several



class MessageError(ValueError):
    """A payload that is not a valid kdfleet message."""


@dataclass(frozen=True, slots=True)
class Crop:
    """An anomalous region: box in frame pixels, its peak normalised score, and a JPEG of it."""

    x: int
    y: int
    w: int
    h: int
    score: float
    jpeg: bytes


@dataclass(frozen=True, slots=True)
class Result:
    """One inspected frame."""

    TYPE: ClassVar[str] = "result"
    id: str                 # ULID, sortable; the hub deduplicates by it
    ts: float               # capture time, unix seconds
    site: str
    device: str
    station: str
    cls: str                # the product class this station inspects
    model_version: str
    score: float            # raw image score (max of the smoothed map)
    norm_score: float       # score normalised with the class calibration
    threshold: float        # raw threshold applied
    verdict: str            # VERDICTS
    latency_ms: float       # capture to result
    heatmap: bytes          # small PNG/JPEG heat-map overlay
    thumbnail: bytes = b""  # small JPEG of the frame
    crops: tuple[Crop, ...] = ()
    frame: bytes = b""      # full frame JPEG, only for sampled results kept for retraining
    source: str = ""        # file name or stream position, for tracing


@dataclass(frozen=True, slots=True)
class Status:
    """Birth message (retained) and last will of a device."""

    TYPE: ClassVar[str] = "status"
    device: str
    online: bool
    ts: float
    site: str = ""
    station: str = ""
    version: str = ""       # agent software version
    model_id: str = ""
    model_version: str = ""
    runtime: str = ""       # onnxruntime | tensorrt
    hardware: str = ""


@dataclass(frozen=True, slots=True)
class Metrics:
    """Periodic health of a device."""

    TYPE: ClassVar[str] = "metrics"
    device: str
    ts: float
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    frames_dropped: int
    spool_depth: int
    results_dropped: int = 0
    cpu_percent: float = -1.0
    temperature_c: float = -1.0
    # per stage, over the same window: inference (per frame of a batch) and scoring with crops and
    # heat map; capture-to-scored latency above is the whole pipeline, queues included. -1: unknown
    infer_p50_ms: float = -1.0
    infer_p95_ms: float = -1.0
    score_p50_ms: float = -1.0
    score_p95_ms: float = -1.0
    gpu_percent: float = -1.0   # where readable (Jetson sysfs, NVML); -1 otherwise
    frames_rejected: int = 0    # frames or files the sources could not use since the agent started
    source_error: str = ""      # why a source is failing (it is retried meanwhile); "" while all work
    # results sent and not yet confirmed by a receipt from the hub (part of spool_depth); -1: unknown
    pending_receipts: int = -1


@dataclass(frozen=True, slots=True)
class ModelDesired:
    """The model a device should run (retained, from the hub)."""

    TYPE: ClassVar[str] = "model_desired"
    model_id: str
    version: str
    url: str
    sha256: str
    rollout_id: str = ""


@dataclass(frozen=True, slots=True)
class ModelState:
    """Progress of a model update on a device."""

    TYPE: ClassVar[str] = "model_state"
    device: str
    ts: float
    state: str              # MODEL_STATES
    model_id: str = ""
    version: str = ""
    rollout_id: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Receipt:
    """The hub's word on results of one device, sent after its commit: `ids` are stored (now or
    before, so a receipt for a duplicate is the same); `refused` never will be, for `reason`."""

    TYPE: ClassVar[str] = "receipt"
    device: str
    ts: float
    ids: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    reason: str = ""


MESSAGE_TYPES: dict[str, type] = {c.TYPE: c for c in (Result, Status, Metrics, ModelDesired, ModelState, Receipt)}

# field-level bounds beyond the type: name -> (min, max) for numbers, max length for str/bytes
_BOUNDS: dict[str, tuple[float, float]] = {
    "score": (-1e12, 1e12), "norm_score": (-1e12, 1e12), "threshold": (-1e12, 1e12),
    "latency_ms": (0, 1e9), "fps": (0, 1e6), "ts": (0, 1e11),
    "x": (0, 1 << 20), "y": (0, 1 << 20), "w": (1, 1 << 20), "h": (1, 1 << 20),
}
_MAX_ITEMS: dict[tuple[str, str], int] = {("receipt", "ids"): MAX_RECEIPT_IDS, ("receipt", "refused"): MAX_RECEIPT_IDS}
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("result", "verdict"): VERDICTS,
    ("model_state", "state"): MODEL_STATES,
}
# the hub's deduplication key: anything else could collide once stored; receipts name only such ids
_ULIDS = {("result", "id"), ("receipt", "ids"), ("receipt", "refused")}


def encode(msg: Any) -> bytes:
    """msgpack bytes of a message dataclass, stamped with the schema version and type."""
    body = _to_plain(msg)
    body["v"] = SCHEMA_VERSION
    body["t"] = type(msg).TYPE
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_PAYLOAD:
        raise MessageError(f"{type(msg).TYPE} payload is {len(data)} bytes, over the {MAX_PAYLOAD} limit")
    return data


def decode(data: bytes, expect: type | None = None) -> Any:
    """Validate and decode a payload; `expect` restricts the accepted message type."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("payload is not bytes")
    if len(data) > MAX_PAYLOAD:
        raise MessageError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
    try:
        body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, max_bin_len=MAX_PAYLOAD,
                               max_str_len=MAX_PAYLOAD, max_array_len=1024, max_map_len=256)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MessageError(f"payload is not valid msgpack: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise MessageError("payload is not a msgpack map")
    version = body.pop("v", None)
    if version != SCHEMA_VERSION:
        raise MessageError(f"unsupported schema version {version!r} (this build speaks {SCHEMA_VERSION})")
    kind = body.pop("t", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {kind!r}")
    if expect is not None and cls is not expect:
        raise MessageError(f"expected a {expect.TYPE} message, got {kind!r}")
    return _build(cls, body, kind)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(x) for x in obj]
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # resolving string annotations costs ~90 us; a hub decodes thousands of messages a second
    return typing.get_type_hints(cls)


def _build(cls: type, body: dict, kind: str) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(body) - names
    if unknown:
        raise MessageError(f"{kind}: unknown field(s) {sorted(unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{kind}: missing field {f.name!r}")
            continue
        values[f.name] = _check(kind, f.name, hints[f.name], body[f.name])
    return cls(**values)


def _check(kind: str, name: str, hint: Any, value: Any) -> Any:
    where = f"{kind}.{name}"
    if hint is bool:
        if not isinstance(value, bool):
            raise MessageError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{where}: expected int, got {type(value).__name__}")
        return _bounded(where, name, value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MessageError(f"{where}: expected number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise MessageError(f"{where}: not a finite number")
        return _bounded(where, name, float(value))
    if hint is str:
        if not isinstance(value, str):
            raise MessageError(f"{where}: expected str, got {type(value).__name__}")
        limit = 2048 if name == "url" else MAX_TEXT
        if len(value) > limit:
            raise MessageError(f"{where}: {len(value)} characters, over the {limit} limit")
        if "\x00" in value:   # no name or text has one, and PostgreSQL refuses to store it
            raise MessageError(f"{where}: contains a NUL character")
        if (kind, name) in _ULIDS and not is_ulid(value):
            raise MessageError(f"{where}: {value[:40]!r} is not a ULID (26 upper-case Crockford base32 digits)")
        choices = _CHOICES.get((kind, name))
        if choices and value not in choices:
            raise MessageError(f"{where}: {value!r} is not one of {choices}")
        return value
    if hint is bytes:
        if not isinstance(value, bytes):
            raise MessageError(f"{where}: expected bytes, got {type(value).__name__}")
        if len(value) > MAX_IMAGE:
            raise MessageError(f"{where}: {len(value)} bytes, over the {MAX_IMAGE} limit")
        return value
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise MessageError(f"{where}: expected a list, got {type(value).__name__}")
        limit = _MAX_ITEMS.get((kind, name), MAX_CROPS)
        if len(value) > limit:
            raise MessageError(f"{where}: {len(value)} items, over the {limit} limit")
        return tuple(_check(kind, name, item, v) for v in value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected a map, got {type(value).__name__}")
        return _build(hint, value, f"{kind}.{name}")
    if isinstance(hint, types.UnionType):  # pragma: no cover - no optional fields today
        raise MessageError(f"{where}: unsupported field type")
    raise MessageError(f"{where}: unsupported field type {hint!r}")


def _bounded(where: str, name: str, value: float | int) -> float | int:
    lo, hi = _BOUNDS.get(name, (-(2**63), 2**63 - 1))
    if not lo <= value <= hi:
        raise MessageError(f"{where}: {value} outside [{lo}, {hi}]")
    return value
