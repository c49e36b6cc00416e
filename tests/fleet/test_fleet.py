"""`kdfleet fleet up --agents 3` for real: a private Mosquitto with provisioned credentials, the
hub, three agents running the tiny hand-made model; status reads the hub, down leaves nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from kdfleet.fleet_state import ProcessRecord, alive, parse_metrics, start_ticks
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def kdfleet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdfleet.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_fleet_up_status_down(tmp_path: Path, tiny_package: Path, plate_folder: Path) -> None:
    if not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto): the fleet would run unauthenticated")
    workdir = tmp_path / "fleet"
    up = subprocess.Popen(
        [sys.executable, "-m", "kdfleet.cli", "fleet", "up", "--agents", "3", "--package", str(tiny_package),
         "--data", str(plate_folder), "--cls", "plate", "--fps", "5", "--workdir", str(workdir),
         "--port", str(free_port()), "--mqtt-port", str(free_port()), "--online-timeout", "60"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state: dict = {}
    try:
        deadline = time.monotonic() + 90
        while "timing" not in state:
            assert up.poll() is None, f"fleet up exited with {up.returncode}:\n{up.stdout.read()}"
            assert time.monotonic() < deadline, "fleet up did not report the fleet online within 90 s"
            time.sleep(0.5)
            if (workdir / "fleet.json").exists():
                state = json.loads((workdir / "fleet.json").read_text())
        assert state["timing"]["all_online_s"] is not None, "not every device came online"
        assert (workdir / "fleet.json").stat().st_mode & 0o077 == 0, "the state file holds a token: mode 0600"
        names = [p["name"] for p in state["processes"]]
        assert names == ["broker", "hub", "station-1", "station-2", "station-3"]

        # each device signed in with its own account: the broker's password file names them
        passwd = (workdir / "mosquitto" / "passwd").read_text()
        for device in state["devices"]:
            assert f"{device}@fleet:$7$" in passwd
        assert "allow_anonymous false" in (workdir / "mosquitto.conf").read_text()

        out = kdfleet("fleet", "status", "--workdir", str(workdir), "--json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["hub"] == "up"
        assert all(p["alive"] for p in status["processes"]), status["processes"]
        assert {d["device"]: d["state"] for d in status["devices"]} == dict.fromkeys(state["devices"], "online")
        assert status["ingest_rate"] > 0

        # the results are in the hub's database, from every device
        engine = create_engine(state["db"])
        with engine.connect() as c:
            counts = dict(c.execute(text(
                "SELECT devices.name, count(*) FROM results JOIN devices ON devices.id = results.device_id "
                "GROUP BY devices.name")).all())
            online = dict(c.execute(text("SELECT name, online FROM devices")).all())
        engine.dispose()
        assert set(counts) == set(state["devices"]) and min(counts.values()) > 0, counts
        assert all(online[d] for d in state["devices"]), online

        # /metrics agrees, through the same token status used
        import urllib.request

        request = urllib.request.Request(state["dashboard"] + "metrics",
                                         headers={"Authorization": f"Bearer {state['token']}"})
        samples = parse_metrics(urllib.request.urlopen(request, timeout=5).read().decode())
        online_gauges = {s[1]["device"]: s[2] for s in samples if s[0] == "kdfleet_device_online"}
        assert online_gauges == dict.fromkeys(state["devices"], 1.0)

        text_status = kdfleet("fleet", "status", "--workdir", str(workdir))
        assert "station-3" in text_status.stdout and "online" in text_status.stdout

        roll_out_a_new_version(workdir, state, tmp_path)
    finally:
        down = kdfleet("fleet", "down", "--workdir", str(workdir), timeout=90)
        try:
            code = up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert down.returncode == 0, down.stderr
    assert code == 0, up.stdout.read()
    records = [ProcessRecord(**r) for r in [state["supervisor"], *state["processes"]]]
    left = [r.name for r in records if alive(r)]
    assert not left, f"processes left running after fleet down: {left}"
    assert not (workdir / "fleet.json").exists()
    assert "no fleet runs" in kdfleet("fleet", "down", "--workdir", str(workdir)).stdout


def roll_out_a_new_version(workdir: Path, state: dict, tmp_path: Path) -> None:
    """As on a plant: the site's key signs 2.0.0, an admin uploads it, `hub rollout start` reads the hub's own
    config (no --db), and every agent the fleet started follows the hub's desired model."""
    import urllib.request

    from shared import package as pkg
    from kdfleet.demo import register_package
    from tests.package_factory import build_package

    config = str(workdir / "hub.toml")
    assert "trusted_keys" in (workdir / "hub.toml").read_text()
    models = json.loads(urllib.request.urlopen(urllib.request.Request(
        state["dashboard"] + "api/models", headers={"Authorization": f"Bearer {state['token']}"}), timeout=5).read())
    assert [(m["name"], m["version"]) for m in models["models"]] == [("darkness", "1.0.0")]   # what they run

    key = pkg.load_private_key(workdir / "keys" / "site.key")
    v2 = build_package(tmp_path / "v2" / "darkness.kdpkg", version="2.0.0", key=key)
    admin = subprocess.run([sys.executable, "-m", "hub", "add-token", "release", "--role", "admin", "--config",
                            config], cwd=ROOT, capture_output=True, text=True)
    assert admin.returncode == 0, admin.stderr
    model = register_package(state["dashboard"], admin.stdout.strip().splitlines()[-1], v2)
    assert model is not None and model["version"] == "2.0.0"

    out = subprocess.run([sys.executable, "-m", "hub", "rollout", "start", str(model["id"]), "--site", "fleet",
                          "--canary", "1", "--soak", "1", "--config", config], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    rollout = out.stdout.split()[1].rstrip(":")
    deadline = time.monotonic() + 90
    while True:
        status = subprocess.run([sys.executable, "-m", "hub", "rollout", "status", rollout, "--config", config],
                                cwd=ROOT, capture_output=True, text=True)
        if "completed" in status.stdout.splitlines()[0] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "darkness 2.0.0, completed (3 active)" in status.stdout, status.stdout + status.stderr
    engine = create_engine(state["db"])
    with engine.connect() as c:
        running = dict(c.execute(text("SELECT name, model_version FROM devices")).all())
    engine.dispose()
    assert running == dict.fromkeys(state["devices"], "2.0.0")


def test_alive_tells_a_reused_pid_apart() -> None:
    me = ProcessRecord("me", os.getpid(), start_ticks(os.getpid()) or -1, "")
    assert alive(me)
    assert not alive(ProcessRecord("me", os.getpid(), me.start_ticks + 1, ""))
    done = subprocess.Popen(["sleep", "30"])   # alive until killed: its start time is readable
    ticks = start_ticks(done.pid)
    assert ticks is not None and alive(ProcessRecord("sleep", done.pid, ticks, ""))
    done.kill()
    done.wait()
    assert not alive(ProcessRecord("sleep", done.pid, ticks, ""))


def test_status_and_down_without_a_fleet(tmp_path: Path) -> None:
    out = kdfleet("fleet", "status", "--workdir", str(tmp_path))
    assert out.returncode == 1 and "no fleet runs" in out.stdout
    out = kdfleet("fleet", "down", "--workdir", str(tmp_path))
    assert out.returncode == 0 and "no fleet runs" in out.stdout
