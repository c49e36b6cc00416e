"""The leader lease: one process of several leads; another takes over when it dies or stops."""

from __future__ import annotations

import time

from hub.db.session import Database
from hub.leader import Leadership


def test_one_process_leads_and_another_takes_over_once_its_lease_runs_out(hub_db: Database, unique: str) -> None:
    name = f"test-{unique}"
    a = Leadership(hub_db, f"a-{unique}", name=name, ttl_s=3.0)
    b = Leadership(hub_db, f"b-{unique}", name=name, ttl_s=3.0)
    assert a.leads() and not b.leads()
    assert a.leads() and not b.leads(), "renewing does not hand the lease over"
    assert a.holder_now() == f"a-{unique}"
    time.sleep(3.2)  # a died: it renews no more
    assert b.leads() and b.holder_now() == f"b-{unique}"
    assert not a.leads(), "a process back from the dead does not lead beside the new leader"


def test_a_clean_stop_hands_the_lease_over_at_once(hub_db: Database, unique: str) -> None:
    name = f"test-{unique}"
    a = Leadership(hub_db, f"a-{unique}", name=name, ttl_s=60.0)
    b = Leadership(hub_db, f"b-{unique}", name=name, ttl_s=60.0)
    assert a.leads() and not b.leads()
    a.release()
    assert b.leads() and not a.leads()
