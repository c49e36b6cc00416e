"""Logging for the long-running commands: readable lines, or JSON lines for a log collector.

`setup_logging(json=True)` writes one JSON object per line on stderr::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "hub.ingest",
     "msg": "stored 500 results", "device": "cam-1", "result_id": "01J..."}

Fields given with ``extra=`` (``log.info("...", extra={"device": d, "result_id": r})``) become
keys of the object; an exception becomes ``exc``. `json=None` reads KDFLEET_LOG_JSON (1, true,
yes or on), at call time, never at import.
"""
from __future__ import annotations

import argparse
import json as jsonlib
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

ENV = "KDFLEET_LOG_JSON"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# the attributes every LogRecord has; anything else on a record came from `extra=`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ms), level, logger, msg, the `extra=` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return jsonlib.dumps(out, default=str, ensure_ascii=False)


def json_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """True when KDFLEET_LOG_JSON asks for JSON lines."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def setup_logging(json: bool | None = None, level: str | int = "INFO", *, stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None, force: bool = False) -> None:
    """Configure the root logger for a process: JSON lines or text, at `level`.

    `json=None` follows KDFLEET_LOG_JSON. A second call replaces the first one's handler.
    Like `logging.basicConfig`, it leaves alone a root logger someone else configured (an
    embedding program, pytest) unless `force`.
    """
    if json is None:
        json = json_wanted(environ)
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
        level = name
    root = logging.getLogger()
    if root.handlers and not force and not any(getattr(h, "kdfleet", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    handler.kdfleet = True  # type: ignore[attr-defined]  # marks the handler a later call replaces
    for old in root.handlers[:]:
        ours = getattr(old, "kdfleet", False)
        if force or ours:
            root.removeHandler(old)
            if ours:
                old.close()
    root.addHandler(handler)
    root.setLevel(level)


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    """`--log-json` (default: KDFLEET_LOG_JSON) for a command's parser."""
    parser.add_argument("--log-json", action="store_true", default=None,
                        help=f"log JSON lines, one object per line (default: ${ENV}=1 does the same)")
