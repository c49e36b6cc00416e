"""What the `check` commands print (`kdfleet agent check`, `kdfleet hub check`): one line per thing
checked, "ok" or "FAIL" with what is wrong, and exit status 1 when anything failed."""
from __future__ import annotations

import sys
from typing import TextIO


class Checklist:
    """Report each check as it is made; `exit_code` is 0 only when every one passed."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out
        self.failed: list[str] = []

    def report(self, what: str, error: str | None = None) -> bool:
        """Print `what` as passed (error None) or failed with `error`; returns whether it passed."""
        if error is not None:
            self.failed.append(what)
        print(f"{'ok  ' if error is None else 'FAIL'} {what}{'' if error is None else ': ' + error}",
              file=self.out or sys.stdout, flush=True)
        return error is None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0
