"""What the retraining service did, cycle by cycle, and why: recorded from its reports, listed for people."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.db.models import RETRAIN_OUTCOMES, TEXT_LEN, Model, RetrainCycle
from hub.services.common import QueryError


@dataclass(frozen=True, slots=True)
class CycleView:
    id: int
    model_name: str
    cycle: int
    outcome: str
    reason: str
    new_images: int
    version: str
    model_id: int | None
    rollout_id: str | None
    gate: dict[str, Any]
    created_at: datetime


def _view(c: RetrainCycle) -> CycleView:
    return CycleView(c.id, c.model_name, c.cycle, c.outcome, c.reason, c.new_images, c.version, c.model_id,
                     c.rollout_id, json.loads(c.gate or "{}"), c.created_at)


def record_cycle(session: Session, data: Mapping[str, Any]) -> CycleView:
    """Store one cycle's report (the caller commits); QueryError names what is wrong with it."""
    outcome = data.get("outcome")
    if outcome not in RETRAIN_OUTCOMES:
        raise QueryError(f"outcome must be one of {', '.join(RETRAIN_OUTCOMES)}, not {outcome!r}")
    cycle, new_images = data.get("cycle"), data.get("new_images", 0)
    for key, value in (("cycle", cycle), ("new_images", new_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise QueryError(f"{key} must be a whole number >= 0, not {value!r}")
    texts = {}
    for key, limit in (("model_name", TEXT_LEN), ("reason", 4000), ("version", 64), ("rollout_id", 26)):
        value = data.get(key) or ""
        if not isinstance(value, str) or len(value) > limit:
            raise QueryError(f"{key} must be text of at most {limit} characters")
        texts[key] = value
    model_id = data.get("model_id")
    if model_id is not None and (isinstance(model_id, bool) or not isinstance(model_id, int)
                                 or session.get(Model, model_id) is None):
        raise QueryError(f"model_id {model_id!r} is not a registry id")
    gate = data.get("gate", {})
    if not isinstance(gate, dict) or len(json.dumps(gate)) > 50_000:
        raise QueryError("gate must be an object of at most 50000 characters as JSON")
    row = RetrainCycle(model_name=texts["model_name"], cycle=cycle, outcome=outcome, reason=texts["reason"],
                       new_images=new_images, version=texts["version"], model_id=model_id,
                       rollout_id=texts["rollout_id"] or None, gate=json.dumps(gate))
    session.add(row)
    session.flush()
    return _view(row)


def recent_cycles(session: Session, limit: int = 20) -> list[CycleView]:
    """The newest cycles first."""
    rows = session.scalars(select(RetrainCycle).order_by(RetrainCycle.id.desc()).limit(limit))
    return [_view(c) for c in rows]
