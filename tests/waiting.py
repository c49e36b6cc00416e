"""Polling for a condition in tests that watch real processes, brokers and databases."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition", *,
             every: float = 0.02, check: Callable[[], object] | None = None) -> T:
    """Poll until `predicate()` is true and return what it returned; fail naming `what` after `timeout`
    seconds. `check`, when given, runs before each poll (e.g. to fail at once when a process died)."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
