"""What a model package says about its model: `Manifest`, typed and validated.

A package's ``manifest.json`` is read once into a frozen `Manifest`; agent,
hub and trainer read its fields, never the JSON. `Manifest.from_dict` names
the first thing wrong with a manifest. `to_dict` gives the manifest back as
written, unknown keys included, which is how a tool that re-packages a model
(a new version of the same weights, a quantised variant) starts from it.

The members' digests (`files`) and the self-test list (`golden`) are the
package's own bookkeeping: `shared.package.write_package` fills them in and
`read_package` requires them, so a manifest being built (before its golden
images are scored) is a valid `Manifest` without them.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.imaging import RESIZE_MODES
from shared.scoring import ClassCalibration
from shared.vocabulary import METHODS, PRECISIONS

PACKAGE_SCHEMA_VERSION = 1
OUTPUT_NAME = "anomaly_map"      # the graph's output unless the manifest names another
LEGACY_RESIZE = "letterbox"      # how packages written before `resize` existed fit frames
BOOKKEEPING = ("schema_version", "created", "files", "golden")   # what shared.package.write_package fills in

# key -> type(s) every manifest must carry
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "model_id": str, "version": str, "method": str, "backbone": str, "classes": list, "input_size": int,
    "map_size": int, "sigma": (int, float), "mean": list, "std": list, "precision": str, "calibration": dict,
    "metrics": dict,
}
# key -> type(s) of the optional ones (None is allowed for each)
OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "schema_version": int, "created": str, "files": dict, "golden": list, "resize": str, "class_input": str,
    "output_name": str, "golden_tolerance": (int, float), "quantization": dict, "parent": str,
}


class ManifestError(ValueError):
    """A manifest that does not describe a model this build can run."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """A model package's description: identity, how to feed the graph, how to score its maps."""

    model_id: str
    version: str
    method: str                                   # shared.vocabulary.METHODS
    backbone: str
    classes: tuple[str, ...]                      # product classes, in the graph's class-index order
    input_size: int                               # the square the graph takes, in pixels
    map_size: int                                 # the side of the anomaly map it returns
    sigma: float                                  # smoothing of the map before its maximum is taken
    mean: tuple[float, ...]                       # input normalisation, per channel
    std: tuple[float, ...]
    precision: str                                # shared.vocabulary.PRECISIONS
    calibration: Mapping[str, ClassCalibration]   # per class: score scale, threshold, position reference
    metrics: Mapping[str, Any]                    # what evaluation measured (trainer.export)
    resize: str = LEGACY_RESIZE                   # how a frame becomes the square: shared.imaging.RESIZE_MODES
    class_input: str | None = None                # the graph's class-index input, for class-conditional methods
    output_name: str = OUTPUT_NAME
    golden_tolerance: float | None = None         # relative error a self-test allows; None: the agent's default
    quantization: Mapping[str, Any] | None = None  # the recipe behind a quantised graph
    parent: str | None = None                     # the version this one was trained from
    created: str = ""
    files: Mapping[str, str] = field(default_factory=dict)         # member -> sha256 (shared.package)
    golden: tuple[Mapping[str, Any], ...] = ()                     # self-test images (shared.package)
    schema_version: int = PACKAGE_SCHEMA_VERSION
    source: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def class_conditional(self) -> bool:
        """True when the graph takes the class index as a second input (one bank or head per class)."""
        return self.class_input is not None

    def to_dict(self) -> dict[str, Any]:
        """The manifest as written (a copy, unknown keys included)."""
        return copy.deepcopy(dict(self.source))

    def as_version(self, version: str, parent: str | None = None) -> Manifest:
        """The same model under another version (`parent`: the one it descends from), ready for
        `write_package`: the package bookkeeping is left for it to fill in again."""
        m = {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING}
        m["version"] = version
        if parent is not None:
            m["parent"] = parent
        return Manifest.from_dict(m)

    @classmethod
    def from_dict(cls, m: Any) -> Manifest:
        """Validate a manifest's JSON form; raises ManifestError naming the first problem."""
        if not isinstance(m, dict):
            raise ManifestError("manifest is not a JSON object")
        for key, typ in REQUIRED.items():
            if key not in m:
                raise ManifestError(f"manifest lacks {key!r}")
            _check_type(key, m[key], typ)
        for key, typ in OPTIONAL.items():
            if m.get(key) is not None:
                _check_type(key, m[key], typ)
        schema = m.get("schema_version", PACKAGE_SCHEMA_VERSION)
        if schema != PACKAGE_SCHEMA_VERSION:
            raise ManifestError(f"package schema {schema} is not supported "
                                f"(this build reads {PACKAGE_SCHEMA_VERSION}); update the agent")
        if m["method"] not in METHODS:
            raise ManifestError(f"unknown method {m['method']!r} (known: {', '.join(METHODS)})")
        if m["precision"] not in PRECISIONS:
            raise ManifestError(f"unknown precision {m['precision']!r} (known: {', '.join(PRECISIONS)})")
        classes = m["classes"]
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ManifestError("manifest 'classes' must be a non-empty list of names")
        if len(set(classes)) != len(classes):
            raise ManifestError(f"manifest 'classes' names a class twice: {classes}")
        if m["input_size"] <= 0 or m["map_size"] <= 0:
            raise ManifestError("manifest 'input_size' and 'map_size' must be positive")
        if len(m["mean"]) != len(m["std"]) or not all(_is_number(v) for v in (*m["mean"], *m["std"])):
            raise ManifestError("manifest 'mean' and 'std' must be lists of numbers of one length")
        resize = m.get("resize") or LEGACY_RESIZE
        if resize not in RESIZE_MODES:
            raise ManifestError(f"manifest 'resize' must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        missing = [c for c in classes if c not in m["calibration"]]
        if missing:
            raise ManifestError(f"manifest has no calibration for class(es) {missing}")
        calibration = {c: _calibration(c, cal) for c, cal in m["calibration"].items()}
        tolerance = m.get("golden_tolerance")
        return cls(
            model_id=m["model_id"], version=m["version"], method=m["method"], backbone=m["backbone"],
            classes=tuple(classes), input_size=m["input_size"], map_size=m["map_size"], sigma=float(m["sigma"]),
            mean=tuple(float(v) for v in m["mean"]), std=tuple(float(v) for v in m["std"]),
            precision=m["precision"], calibration=calibration, metrics=m["metrics"], resize=resize,
            class_input=m.get("class_input"), output_name=m.get("output_name") or OUTPUT_NAME,
            golden_tolerance=None if tolerance is None else float(tolerance), quantization=m.get("quantization"),
            parent=m.get("parent"), created=m.get("created") or "", files=m.get("files") or {},
            golden=tuple(m.get("golden") or ()), schema_version=schema, source=copy.deepcopy(m))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(key: str, value: Any, typ: type | tuple[type, ...]) -> None:
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ManifestError(f"manifest {key!r} has the wrong type ({type(value).__name__})")


def _calibration(cls: str, cal: Any) -> ClassCalibration:
    if not isinstance(cal, dict) or not all(_is_number(cal.get(k)) for k in ("center", "scale", "threshold")):
        raise ManifestError(f"calibration of {cls!r} needs numeric center, scale, threshold")
    if cal["scale"] <= 0:
        raise ManifestError(f"calibration of {cls!r} has a non-positive scale")
    try:
        return ClassCalibration.from_dict(cal)
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"calibration of {cls!r} has a malformed position reference: {exc}") from exc
