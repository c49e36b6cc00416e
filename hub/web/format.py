"""Jinja filters for times and numbers as a quality engineer reads them."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from flask import Flask

from shared.vocabulary import REVIEW_DEFECT, REVIEW_FALSE_ALARM

DASH = "\u2014"  # shown for a value a device has not reported


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """'never', 'just now', '42 s ago', '5 min ago', '3 h ago', '2 d ago'."""
    if value is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    if seconds < 2:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def utc(value: datetime | None) -> str:
    """'2025-01-31 08:00:05 UTC' (milliseconds dropped)."""
    if value is None:
        return DASH
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _missing(value: object) -> bool:
    """No number to show: none, not a number (an absent key in a template), or NaN."""
    return not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)


def num(value: float | None, digits: int = 2) -> str:
    """A number with `digits` decimals, or a dash when there is none."""
    if _missing(value):
        return DASH
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def percent(value: float | None) -> str:
    return DASH if _missing(value) else f"{100 * value:.1f} %"  # type: ignore[operator]


def size(value: int | None) -> str:
    """Bytes as people read them: '812 B', '14.2 KB', '3.1 MB', '1.2 GB'."""
    if value is None:
        return DASH
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return f"{amount:.1f} TB"  # pragma: no cover - the loop returns at GB


def label(value: str | None) -> str:
    """A review label as the page shows it."""
    return {REVIEW_DEFECT: "defect confirmed", REVIEW_FALSE_ALARM: "false alarm"}.get(value or "", "unreviewed")


def register_filters(app: Flask) -> None:
    app.jinja_env.filters.update(
        ago=ago, utc=utc, num=num, percent=percent, size=size, label=label
    )
    app.jinja_env.globals["now_utc"] = lambda: datetime.now(UTC)
