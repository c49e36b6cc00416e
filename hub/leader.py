"""Leadership among several hub processes: work that must run once, not once per host.

Rollouts (hub.rollouts.RolloutController) and retention run in every `serve`
process, but only the one holding the lease named LEASE in the `leases` table
does them. A process holds the lease by renewing it every `ttl_s / 3`; one
that dies (or loses the database) stops renewing, and another takes the lease
over once it has expired, at most `ttl_s` later. A process that stops cleanly
gives it up at once.

The expiry is written in the renewing host's clock and read in the others':
hosts must keep their clocks within a few seconds of each other (NTP), far less
than `ttl_s`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from hub.db.models import Lease
from hub.db.session import Database
from hub.services.common import insert_ignoring_duplicates, now_utc

log = logging.getLogger(__name__)

LEASE = "hub"  # the one lease: rollouts and retention go together
TTL_S = 30.0


def default_holder(name: str = "") -> str:
    """This process, as the lease names it: host, pid and (optionally) its MQTT client id."""
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{name}" if name else "")


class Leadership:
    """Whether this process leads; `leads()` renews the lease when due. Thread-safe."""

    def __init__(self, db: Database, holder: str | None = None, *, name: str = LEASE, ttl_s: float = TTL_S) -> None:
        self.db, self.name, self.ttl_s = db, name, ttl_s
        self.holder = holder or default_holder()
        self._lock = threading.Lock()
        self._until = 0.0  # monotonic time until which this process surely holds the lease
        self._renewed = -ttl_s  # monotonic time of the last successful renewal
        self._leading = False

    def leads(self) -> bool:
        """True while this process holds the lease (taking or renewing it as needed)."""
        with self._lock:
            now = time.monotonic()
            if self._leading and now - self._renewed < self.ttl_s / 3:
                return True
            try:
                held = self._claim()
            except SQLAlchemyError as exc:
                held = False
                log.warning("lease %r: database unavailable (%s)", self.name, str(exc).splitlines()[0])
                if now < self._until:  # cannot renew, but nobody else may take it before then
                    return self._leading
            if held:
                self._renewed, self._until = now, now + self.ttl_s * 2 / 3  # margin for clock skew
            if held != self._leading:
                log.info("%s the %r lease (rollouts and retention run here%s)", "took" if held else "lost",
                         self.name, "" if held else " no more")
                self._leading = held
            return held

    def _claim(self) -> bool:
        now = now_utc()
        until = now + timedelta(seconds=self.ttl_s)
        with self.db.transaction() as session:
            taken = session.execute(
                update(Lease).where(Lease.name == self.name, (Lease.holder == self.holder) | (Lease.expires_at < now))
                .values(holder=self.holder, expires_at=until)
            ).rowcount
            if taken:
                return True
            inserted = session.execute(
                insert_ignoring_duplicates(session, Lease).values(name=self.name, holder=self.holder, expires_at=until)
                .returning(Lease.name)
            ).first()
            return inserted is not None

    def release(self) -> None:
        """Give the lease up (a clean stop), so another process takes over at once."""
        with self._lock:
            if not self._leading:
                return
            self._leading, self._until = False, 0.0
            try:
                with self.db.transaction() as session:
                    session.execute(update(Lease).where(Lease.name == self.name, Lease.holder == self.holder)
                                    .values(expires_at=now_utc() - timedelta(seconds=1)))
                log.info("gave up the %r lease", self.name)
            except SQLAlchemyError as exc:
                log.warning("lease %r: not given up (%s); it expires within %.0f s", self.name,
                            str(exc).splitlines()[0], self.ttl_s)

    def holder_now(self) -> str | None:
        """Who holds the lease now (None: nobody), for status pages and tests."""
        with self.db.session() as session:
            lease = session.get(Lease, self.name)
            return lease.holder if lease is not None and lease.expires_at > now_utc() else None
