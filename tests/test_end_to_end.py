"""One image's whole journey: a trained package, an agent on a folder, real Mosquitto, the hub, SQLite;
and a station whose source fails and whose folder holds hostile files, as the dashboard shows it."""
from __future__ import annotations

import http.cookiejar
import os
import re
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from sqlalchemy import create_engine, text

from shared.imaging import fit_square, read_image
from shared.package import read_package
from shared.scoring import image_score
from tests.trainer.tiny_data import make_tiny_set
from tests.waiting import wait_for
from trainer.export import export_package
from trainer.config import TrainConfig
from trainer.train import train


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, package) from a tiny real training run."""
    torch.set_num_threads(2)
    data = make_tiny_set(tmp_path_factory.mktemp("data"), n_train=20, n_good=6, n_defect=3)
    run = tmp_path_factory.mktemp("run")
    ckpt = train(TrainConfig(data=str(data), out=str(run), size=64, epochs=3, batch_size=8, lr=0.4, threads=2),
                 progress=None)
    return data, export_package(ckpt, run / "model.kdpkg", data, latency_runs=2)


@pytest.fixture
def hub(tmp_path: Path, broker: tuple[str, int], unique: str):
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-m", "hub", "init-db", "--db", db], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "hub", "add-user", "inspector", "--role", "viewer", "--db", db,
                    "--password-stdin"], input="line-a-secret\n", text=True, check=True, capture_output=True)
    log = open(tmp_path / "hub.log", "wb")  # noqa: SIM115 (the child process writes it)
    proc = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--db", db, "--data-dir", str(tmp_path / "store"),
                             "--broker", f"mqtt://{broker[0]}:{broker[1]}", "--site", f"e2e-{unique}",
                             "--port", str(port), "--client-id", f"hub-{unique}"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: port_open(port), 30, "the hub's web server")
    yield db, port, tmp_path / "hub.log"
    proc.terminate()
    proc.wait(15)
    log.close()


def test_results_travel_from_model_to_database(trained, hub, broker, unique, tmp_path):
    data, package = trained
    db, port, hub_log = hub
    folder = data / "disc" / "test"
    files = sorted(p for p in folder.rglob("*.png"))
    site, device = f"e2e-{unique}", "cam-1"
    agent = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--package", str(package), "--broker", f"mqtt://{broker[0]}:{broker[1]}",
         "--site", site, "--device", device, "--station", "line-a", "--source", str(folder), "--cls", "disc",
         "--spool", str(tmp_path / "spool.db"), "--until-drained", "--allow-unsigned"],
        capture_output=True, text=True, timeout=120)
    assert agent.returncode == 0, agent.stderr[-2000:]

    engine = create_engine(db)

    def stored() -> int:
        with engine.connect() as c:
            return c.execute(text("SELECT COUNT(*) FROM results")).scalar_one()

    wait_for(lambda: stored() == len(files), 30, f"{len(files)} results in the hub ({hub_log.read_text()[-800:]})")

    with engine.connect() as c:
        rows = c.execute(text("SELECT id, source, score, verdict, threshold FROM results")).all()
        crops = c.execute(text("SELECT image_sha FROM crops")).scalars().all()
    # the scores the hub stored are the agent's: recompute them independently from the package
    pkg = read_package(package)
    session = ort.InferenceSession(pkg.model, providers=["CPUExecutionProvider"])
    size, sigma = pkg.manifest.input_size, pkg.manifest.sigma
    cal = pkg.manifest.calibration["disc"]
    by_source = {r.source: r for r in rows}
    assert sorted(by_source) == sorted(str(p.relative_to(folder)) for p in files)
    for p in files:
        boxed, placement = fit_square(read_image(p), size, pkg.manifest.resize)
        amap = session.run(None, {"image": boxed[None]})[0][0, 0]
        expected = image_score(cal.standardise(amap), sigma, placement, size)   # the frame, as the agent does
        row = by_source[str(p.relative_to(folder))]
        assert row.score == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert row.verdict == ("anomaly" if expected > row.threshold else "ok")
    # defects are flagged: the tiny model sees its obvious spots and scratches
    defect_scores = [by_source[str(p.relative_to(folder))].score for p in files if "good" not in p.parts]
    good_scores = [by_source[str(p.relative_to(folder))].score for p in files if "good" in p.parts]
    assert np.mean(defect_scores) > np.mean(good_scores)
    # crops are real JPEGs in the hub's image store
    assert any(r.verdict == "anomaly" for r in rows), "no anomaly flagged: crops cannot be checked"
    assert crops, "anomalies stored without crops"
    store = tmp_path / "store"
    for sha in crops:
        path = next(store.rglob(f"{sha}.*"))
        assert cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR) is not None

    # the dashboard shows them: sign in over HTTP as a person would, then read the results page
    jar = http.cookiejar.CookieJar()
    web = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    base = f"http://127.0.0.1:{port}"
    login = web.open(f"{base}/login").read().decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
    form = urllib.parse.urlencode({"csrf_token": token, "username": "inspector", "password": "line-a-secret",
                                   "next": "/results/"}).encode()
    web.open(f"{base}/login", data=form).read()
    response = web.open(f"{base}/results/?site={site}")
    assert urllib.parse.urlparse(response.geturl()).path == "/results/", "sign-in failed"
    page = response.read().decode()
    assert device in page
    shown = set(re.findall(r"/images/([0-9a-f]{64})", page))
    assert shown, "the results page shows no heat maps or crops"
    for sha in list(shown)[:5]:
        body = web.open(f"{base}/images/{sha}").read()
        assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is not None


def test_a_failing_source_and_hostile_files_reach_the_dashboard_and_the_station_goes_on(hub, broker, unique,
                                                                                         tmp_path, huge_png):
    from tests.hostile_images import add_hostile_files
    from tests.package_factory import build_package, plate

    db, port, hub_log = hub
    site, device = f"e2e-{unique}", "cam-9"
    folder = tmp_path / "frames"   # not there when the agent starts
    package = build_package(tmp_path / "darkness.kdpkg", metrics={})
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--package", str(package), "--broker", f"mqtt://{broker[0]}:{broker[1]}",
         "--site", site, "--device", device, "--station", "line-b", "--source", str(folder), "--cls", "plate",
         "--loop", "--fps", "5", "--spool", str(tmp_path / "spool.db"), "--allow-unsigned"],
        env={**os.environ, "KDFLEET_AGENT_METRICS_INTERVAL_S": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        jar = http.cookiejar.CookieJar()
        web = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        base = f"http://127.0.0.1:{port}"
        token = re.search(r'name="csrf_token" value="([^"]+)"', web.open(f"{base}/login").read().decode()).group(1)
        web.open(f"{base}/login", data=urllib.parse.urlencode(
            {"csrf_token": token, "username": "inspector", "password": "line-a-secret"}).encode()).read()

        def device_page() -> str:
            try:
                return web.open(f"{base}/devices/{site}/{device}").read().decode()
            except urllib.error.HTTPError:
                return ""   # 404 until the device's first message is stored

        wait_for(lambda: '<span class="state error">error</span>' in device_page(), 30,
                 f"the device page in state error ({hub_log.read_text()[-500:]})")
        page = device_page()
        assert f"<samp>{folder}: no such file or folder" in page
        assert "A source of this device is failing" in page

        folder.mkdir()
        rng = np.random.default_rng(1)
        for i in range(4):
            cv2.imwrite(str(folder / f"{i:04d}.png"), plate(rng, i == 0))
        bad = add_hostile_files(folder, huge_png)
        wait_for(lambda: '<span class="state online">online</span>' in device_page(), 30, "the device online again")
        wait_for(lambda: re.search(rf"<dt>Frames rejected</dt><dd>{len(bad)} ", device_page()), 30,
                 "the rejected files counted on the device page")
        assert sorted(p.name for p in (folder / "rejected").iterdir()) == sorted(bad)
        engine = create_engine(db)

        def sources() -> set[str]:
            with engine.connect() as c:
                return set(c.execute(text("SELECT source FROM results")).scalars())

        good = {f"{i:04d}.png" for i in range(4)}
        wait_for(lambda: sources() >= good, 30, "a result from each good frame")
        assert sources() == good   # the good frames, looped, and only they
        assert agent.poll() is None, "the agent must keep running"
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=30)
    assert "opening it again" in err
