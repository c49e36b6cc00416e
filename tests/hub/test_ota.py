"""Over the air, end to end: the hub rolls a signed package out to running agents over a real broker and HTTP."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from flask import Flask
from sqlalchemy import func, select

from agent.config import load
from agent.pipeline import Agent
from hub.db.models import Device, Result, Site
from hub.db.session import Database
from hub.ingest import Ingest
from hub.rollouts import RolloutController
from hub.services import rollouts, users
from hub.store import ImageStore
from shared import package as pkg
from shared.config import BrokerConfig
from tests.package_factory import build_package, plate
from tests.waiting import wait_for as wait


@pytest.fixture
def signing(tmp_path: Path) -> tuple[pkg.Ed25519PrivateKey, Path]:
    """The site's signing key and its public key file."""
    key = pkg.new_key()
    return key, pkg.save_keypair(key, tmp_path / "keys" / "fleet.key")


@pytest.fixture
def app(make_app, signing) -> Flask:
    """The hub as deployed: it takes the packages the site's key signed."""
    return make_app(HUB_TRUSTED_KEYS=[str(signing[1])])


@pytest.fixture
def fleet(app: Flask, live_hub, hub_db: Database, broker, data_dir: Path, tmp_path: Path,
          unique: str, signing, caplog) -> Iterator[dict]:
    """Three agents on model 1.0.0 of a signed package, the hub's ingest and rollout controller, and
    versions 2.0.0 (good) and 3.0.0 (fails its golden self-test) uploaded to the registry."""
    caplog.set_level(logging.INFO)   # the agents' start-up lines
    key, pub = signing
    name = f"darkness-{unique}"
    made = {v: build_package(tmp_path / f"{v}.kdpkg", model_id=name, version=v, key=key,
                             golden_offset=5.0 if v == "3.0.0" else 0.0) for v in ("1.0.0", "2.0.0", "3.0.0")}
    with hub_db.transaction() as s:
        admin = users.create_token(s, f"admin-{unique}", "admin")[1]
        device_token = users.create_token(s, f"device-{unique}", "viewer")[1]
    client = app.test_client()
    ids = {}
    for v, path in made.items():
        r = client.post("/api/models", data={"package": (io.BytesIO(path.read_bytes()), path.name)},
                        headers={"Authorization": f"Bearer {admin}"}, content_type="multipart/form-data")
        assert r.status_code == 201, r.get_json()
        ids[v] = r.get_json()["id"]
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(frames / f"{i:03d}.png"), plate(rng, spot=i % 4 == 0))
    site = f"ota-{unique}"
    hub_url, _ = live_hub
    ingest = Ingest(hub_db, ImageStore(data_dir / "images"), BrokerConfig(*broker), client_id=f"ingest-{unique}",
                    site=site, shared_group=None, persistent=False).start()
    controller = RolloutController(hub_db, BrokerConfig(*broker), interval_s=0.2,
                                   client_id=f"rollouts-{unique}").start()
    assert ingest.wait_ready(10) and controller.wait_ready(10)
    agents = []
    for i in range(3):
        cfg = load(None, {
            "device": f"cam-{i}", "site": site, "package": str(made["1.0.0"]), "trusted_keys": [str(pub)],
            "broker": f"mqtt://{broker[0]}:{broker[1]}", "runtime": "onnxruntime", "threads": 1,
            "sources": [{"uri": str(frames), "cls": "plate", "fps": 20.0, "loop": True}],
            "spool": {"path": str(tmp_path / f"spool-{i}.db")}, "metrics_interval_s": 0.5,
            "update": {"models_dir": str(tmp_path / f"models-{i}"), "hub_url": hub_url, "hub_token": device_token}})
        agent = Agent(cfg)
        threading.Thread(target=agent.run, daemon=True).start()
        agents.append(agent)

    def registered() -> bool:   # this site's: other tests' devices share a PostgreSQL database
        with hub_db.transaction() as s:
            return s.scalar(select(func.count()).select_from(Device).join(Device.site)
                            .where(Device.model_version == "1.0.0", Site.name == site)) >= 3
    wait(registered, 20, "three agents on 1.0.0 in the hub")
    yield {"agents": agents, "site": site, "ids": ids}
    for agent in agents:
        agent.stop.set()
    controller.stop()
    ingest.stop()


def running(agent: Agent) -> str:
    return agent.active.package.version


def test_a_rollout_updates_every_agent_and_a_bad_package_stops_at_the_canary(fleet, hub_db, caplog) -> None:
    agents, site, ids = fleet["agents"], fleet["site"], fleet["ids"]
    started = [r.getMessage() for r in caplog.get_records("setup")]
    assert sum("packages must be signed by one of 1 trusted key(s)" in m for m in started) == 3
    with hub_db.transaction() as s:
        first = rollouts.start_rollout(s, ids["2.0.0"], rollouts.Policy(canary=1, soak_s=1.0), site=site)

    def detail(rid: str) -> rollouts.RolloutDetail:
        with hub_db.transaction() as s:
            return rollouts.rollout_detail(s, rid)
    wait(lambda: detail(first).state == "completed", 60, "the rollout of 2.0.0 to complete")
    assert [running(a) for a in agents] == ["2.0.0"] * 3
    assert all(a.updates.applied == 1 for a in agents)

    def scored_by_2() -> bool:   # results keep flowing, now from the new model
        with hub_db.transaction() as s:
            return s.scalar(select(func.count()).select_from(Result)
                            .where(Result.model_version == "2.0.0")) >= 6
    wait(scored_by_2, 20, "results from 2.0.0")

    with hub_db.transaction() as s:
        second = rollouts.start_rollout(s, ids["3.0.0"], rollouts.Policy(canary=1, soak_s=1.0), site=site)
    wait(lambda: detail(second).state == "failed", 60, "the bad package to stop the rollout")
    wait(lambda: detail(second).targets[0].state == "rolled_back", 20, "the canary back on 2.0.0")
    d = detail(second)
    assert "1 device update(s) failed (cam-0)" in d.note
    assert "self-test failed" in d.targets[0].reason and d.targets[0].reason.endswith(f"back on {d.model} 2.0.0")
    assert [t.state for t in d.targets[1:]] == ["pending", "pending"]
    assert [running(a) for a in agents] == ["2.0.0"] * 3   # the canary kept its model; nobody else was told
