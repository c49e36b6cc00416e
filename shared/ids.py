"""Sortable unique ids (ULID: 48-bit millisecond time + 80 random bits, Crockford base32)."""
from __future__ import annotations

import os
import re
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# 26 upper-case Crockford digits; the first at most 7, since a ULID is 128 bits and 26 digits hold 130
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_lock = threading.Lock()
_last = (0, 0)


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, r = divmod(value, 32)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def new_ulid(now_ms: int | None = None) -> str:
    """A 26-character ULID; ids made in the same millisecond by this process stay in order.

    `now_ms` fixes the time part (for replaying recorded timestamps); such ids
    are not ordered against the process's own.
    """
    global _last
    if now_ms is not None:
        return _encode(now_ms, 10) + _encode(int.from_bytes(os.urandom(10), "big"), 16)
    ms = int(time.time() * 1000)
    with _lock:
        last_ms, last_rand = _last
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1  # monotonic within a millisecond
        else:
            rand = int.from_bytes(os.urandom(10), "big")
        _last = (ms, rand)
    return _encode(ms, 10) + _encode(rand & ((1 << 80) - 1), 16)


def ulid_floor(ms: int) -> str:
    """The smallest ULID of millisecond `ms`: every id made at or after it sorts at or above it."""
    return _encode(ms, 10) + "0" * 16


def ulid_time_ms(ulid: str) -> int:
    """The millisecond timestamp inside a ULID."""
    value = 0
    for ch in ulid[:10].upper():
        value = value * 32 + _ALPHABET.index(ch)
    return value


def is_ulid(value: object) -> bool:
    """True for a ULID as `new_ulid` writes it: 26 upper-case Crockford base32 digits, at most 128 bits."""
    return isinstance(value, str) and _ULID.fullmatch(value) is not None
