"""Checks every request's parameters share, before any view or query sees them.

`refuse_nul` runs before every request: a NUL character in a query, form,
JSON or path parameter is answered 400 naming the parameter. No name, id,
time or note of the hub contains one, and PostgreSQL refuses to store or
compare text that does, so letting one through would end in a server error
on one database and silently match nothing on the other. `result_id` is for
the views that take a result id in their path: only ULIDs name results.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import abort, request

from hub.services.common import QueryError, check_ulid

FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
NUL = "\x00"


def refuse_nul() -> None:
    """before_request: 400 for a NUL character anywhere in the request's parameters."""
    for where, name, value in _parameters():
        if NUL in name or NUL in value:
            abort(
                400,
                f"The {where} {name.replace(NUL, '%00')!r} contains a NUL character (%00), which no "
                "name, id, time or text the hub knows contains. Remove it and send the request again.",
            )


def _parameters() -> Iterator[tuple[str, str, str]]:
    """(kind, name, value) of every text parameter: path, query string, form fields, JSON body."""
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str):
            yield "address part", name, value
    for name, value in request.args.items(multi=True):
        yield "query parameter", name, value
    if request.mimetype in FORM_TYPES:
        for name, value in request.form.items(multi=True):
            yield "form field", name, value
    elif request.is_json:
        yield from _json_strings(request.get_json(silent=True), "")


def _json_strings(value: Any, path: str) -> Iterator[tuple[str, str, str]]:
    if isinstance(value, str):
        yield "JSON field", path or "(body)", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield "JSON field", f"{path}.{key}" if path else key, ""
            yield from _json_strings(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _json_strings(item, f"{path}[{i}]")


def result_id(value: str) -> str:
    """`value` when it is a result id (a ULID); otherwise 400, naming what came instead."""
    try:
        return check_ulid(value, "result id")
    except QueryError as exc:
        abort(400, str(exc))
