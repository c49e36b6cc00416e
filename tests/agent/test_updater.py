"""The updater against a real HTTP server: refusals keep the old model, downloads resume, kill -9 is safe."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.updater import Updater, UpdateError
from shared import messages
from shared import package as pkg
from tests.package_factory import build_package, members, rewrite_member, truncate

ROOT = Path(__file__).resolve().parents[2]


class FileServer(ThreadingHTTPServer):
    """Serves `files` (path -> bytes) with Range support; `cut[path] = n` makes the next answer
    for `path` stop after n body bytes and close the connection."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []   # (path, Range header)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, path: Path) -> str:
        name = f"/files/{path.name}"
        self.files[name] = path.read_bytes()
        return name


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        self.server.requests.append((self.path, rng))
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = self.server.cut.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True   # the client sees the connection close mid-body


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def keys() -> tuple[pkg.Ed25519PrivateKey, pkg.Ed25519PrivateKey]:
    return pkg.new_key(), pkg.new_key()   # (trusted, unknown)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory, keys) -> dict[str, Path]:
    """v1 and v2 signed with the trusted key, and every way a v2 can be wrong."""
    root = tmp_path_factory.mktemp("packages")
    trusted, unknown = keys
    made = {
        "v1": build_package(root / "v1.kdpkg", version="1.0.0", key=trusted),
        "v2": build_package(root / "v2.kdpkg", version="2.0.0", key=trusted),
        "unsigned": build_package(root / "unsigned.kdpkg", version="2.0.0"),
        "wrong signer": build_package(root / "other.kdpkg", version="2.0.0", key=unknown),
        "bad golden": build_package(root / "golden.kdpkg", version="2.0.0", key=trusted, golden_offset=0.05),
        "wrong version": build_package(root / "v3.kdpkg", version="3.0.0", key=trusted),
    }
    v2 = made["v2"]
    made["tampered"] = rewrite_member(v2, root / "tampered.kdpkg", "model.onnx",
                                      members(v2)["model.onnx"].replace(b"darkness", b"darkneSS"))
    made["truncated"] = truncate(v2, root / "truncated.kdpkg", 0.5)
    return made


def desired_for(path: Path, url: str, version: str = "2.0.0", sha: str | None = None) -> messages.ModelDesired:
    return messages.ModelDesired(model_id="darkness", version=version, url=url,
                                 sha256=sha or pkg.file_sha256(path), rollout_id="01HZROLLOUT")


def make_updater(tmp_path: Path, server: FileServer, keys, **kw: object) -> Updater:
    return Updater(tmp_path / "models", [keys[0].public_key()], device="cam-1", hub_url=server.url,
                   retry_delay_s=0, runtime="onnxruntime", **kw)


def install(updater: Updater, server: FileServer, path: Path, version: str) -> None:
    updater.apply(desired_for(path, server.add(path), version))


def test_apply_installs_reports_each_state_and_rolls_back(tmp_path, server, packages, keys) -> None:
    updater = make_updater(tmp_path, server, keys)
    assert updater.current() is None
    states: list[messages.ModelState] = []
    first = updater.apply(desired_for(packages["v1"], server.add(packages["v1"]), "1.0.0"), on_state=states.append)
    assert [s.state for s in states] == ["downloading", "verifying", "building", "testing", "active"]
    assert all(s.device == "cam-1" and s.version == "1.0.0" and s.rollout_id == "01HZROLLOUT" for s in states)
    messages.decode(messages.encode(states[0]), expect=messages.ModelState)   # valid on the wire
    assert first.runtime is not None and first.package is not None and first.package.signed_by
    assert updater.current().path == tmp_path / "models" / "1.0.0" / "package.kdpkg"

    second = updater.apply(desired_for(packages["v2"], server.add(packages["v2"])))
    assert second.version == updater.current().version == "2.0.0"
    assert updater.last_good().version == "1.0.0"
    assert pkg.read_package(updater.current().path, [keys[0].public_key()]).version == "2.0.0"
    assert not list((tmp_path / "models" / "downloads").iterdir())   # the partial became the package

    asked = len(server.requests)
    states.clear()
    again = updater.apply(desired_for(packages["v2"], "/files/v2.kdpkg"), on_state=states.append)
    assert again.version == "2.0.0" and len(server.requests) == asked   # already current: nothing fetched
    assert [s.state for s in states] == ["active"]

    back = updater.rollback(on_state=states.append)
    assert back.version == updater.current().version == "1.0.0" and states[-1].state == "rolled_back"


@pytest.mark.parametrize("case, reason", [
    ("unsigned", "not signed"),
    ("wrong signer", "does not match any trusted key"),
    ("tampered", "model.onnx does not match its sha256"),
    ("truncated", "not a readable package"),
    ("bad golden", "self-test failed"),
    ("wrong version", "the hub asked for darkness 2.0.0"),
    ("sha mismatch", "expected"),
])
def test_bad_packages_are_refused_every_time_and_current_is_unchanged(
        tmp_path, server, packages, keys, case, reason) -> None:
    updater = make_updater(tmp_path, server, keys)
    install(updater, server, packages["v1"], "1.0.0")
    before = updater.current()
    before_bytes = before.path.read_bytes()
    if case == "sha mismatch":   # the hub registered v2, but what arrives is something else
        desired = desired_for(packages["v2"], server.add(packages["tampered"]), sha=pkg.file_sha256(packages["v2"]))
    else:
        desired = desired_for(packages[case], server.add(packages[case]))
    for _ in range(2):
        states: list[messages.ModelState] = []
        with pytest.raises(UpdateError, match=re.escape(reason)):
            updater.apply(desired, on_state=states.append)
        assert states[-1].state == "failed" and reason in states[-1].reason
        assert ".part" not in states[-1].reason and str(tmp_path) not in states[-1].reason   # no internal paths
        now = updater.current()
        assert (now.version, now.sha256, now.path) == (before.version, before.sha256, before.path)
        assert now.path.read_bytes() == before_bytes
        assert not (tmp_path / "models" / "2.0.0").exists()
        assert not list((tmp_path / "models" / "downloads").iterdir())   # a bad download is not resumed


def test_an_interrupted_download_resumes_from_the_partial_file(tmp_path, server, packages, keys) -> None:
    path = packages["v2"]
    url = server.add(path)
    size = path.stat().st_size
    server.cut[url] = size // 3
    updater = make_updater(tmp_path, server, keys, attempts=1)
    with pytest.raises(UpdateError, match="bytes are kept and the next attempt resumes"):
        updater.apply(desired_for(path, url))
    part = tmp_path / "models" / "downloads" / f"{pkg.file_sha256(path)}.part"
    assert part.read_bytes() == path.read_bytes()[: size // 3]
    assert updater.current() is None

    # a new updater (the agent restarted) picks the partial file up; this answer breaks off too
    server.cut[url] = size // 3
    resumed = make_updater(tmp_path, server, keys, attempts=3)
    assert resumed.apply(desired_for(path, url)).version == "2.0.0"
    third = size // 3
    assert server.requests == [(url, None), (url, f"bytes={third}-"), (url, f"bytes={2 * third}-")]
    assert resumed.current().path.read_bytes() == path.read_bytes()


def test_a_download_finished_before_a_restart_is_not_fetched_again(tmp_path, server, packages, keys) -> None:
    path = packages["v2"]
    url = server.add(path)
    part = tmp_path / "models" / "downloads" / f"{pkg.file_sha256(path)}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(path.read_bytes())
    assert make_updater(tmp_path, server, keys).apply(desired_for(path, url)).version == "2.0.0"
    assert server.requests == [(url, f"bytes={path.stat().st_size}-")]   # answered 416: nothing left


def test_missing_package_and_size_mismatch_name_the_problem(tmp_path, server, packages, keys) -> None:
    updater = make_updater(tmp_path, server, keys)
    with pytest.raises(UpdateError, match="404"):
        updater.apply(desired_for(packages["v2"], "/files/nowhere.kdpkg"))
    with pytest.raises(UpdateError, match="the hub's registry says 5"):
        updater.apply(desired_for(packages["v2"], server.add(packages["v2"])), size=5)
    assert updater.current() is None


CHILD = """
import json, sys
from agent.updater import Updater
from shared import messages
from shared.package import load_public_key
cfg = json.loads(sys.argv[1])
u = Updater(cfg["dir"], [load_public_key(cfg["pub"])], hub_url=cfg["hub"], retry_delay_s=0,
            runtime="onnxruntime")
while True:
    for d in cfg["desired"]:
        u.apply(messages.ModelDesired(**d), on_state=lambda s: print(s.state, s.version, flush=True))
"""


def test_kill_9_mid_install_leaves_a_current_package_that_verifies(tmp_path, server, packages, keys) -> None:
    """A child installs v1..v4 in a loop; it is killed at varying moments right after a self-test."""
    trusted = keys[0]
    pub = tmp_path / "trusted.pub"
    pkg.save_keypair(trusted, tmp_path / "trusted.key")
    versions = [build_package(tmp_path / f"loop{i}.kdpkg", version=f"{i}.0.0", key=trusted) for i in range(1, 5)]
    desired = [{"model_id": "darkness", "version": f"{i}.0.0", "url": server.add(p), "sha256": pkg.file_sha256(p)}
               for i, p in enumerate(versions, 1)]
    cfg = {"dir": str(tmp_path / "models"), "pub": str(pub), "hub": server.url, "desired": desired}
    seen: set[str] = set()
    for round_ in range(8):
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        try:
            tests = 0
            assert child.stdout is not None
            for line in child.stdout:
                if line.startswith("testing"):
                    tests += 1
                    if tests == 2:   # the second install of this round is under way: kill it inside
                        time.sleep(round_ * 0.009)   # self-test to installed takes ~60 ms here
                        break
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(10)
        current = Updater(tmp_path / "models", [trusted.public_key()]).current()
        assert current is not None, f"round {round_}: no current model after kill -9"
        assert pkg.file_sha256(current.path) == current.sha256
        assert pkg.read_package(current.path, [trusted.public_key()]).version == current.version
        seen.add(current.version)
    assert len(seen) >= 2   # the kills landed at different points of the loop


def test_a_wrong_network_is_named_as_such_and_says_what_to_do(tmp_path, server, packages, keys) -> None:
    updater = make_updater(tmp_path, server, keys)
    with pytest.raises(UpdateError) as refused:
        install(updater, server, packages["bad golden"], "2.0.0")
    reason = str(refused.value)
    assert "this runtime does not reproduce the model" not in reason
    assert "network does not produce the scores it was exported with" in reason
    assert "the old model keeps running" in reason and "Export the package again" in reason


def test_an_updater_that_trusts_no_key_refuses_every_package(tmp_path, server, packages, keys) -> None:
    strict = Updater(tmp_path / "models", [], hub_url=server.url, retry_delay_s=0, runtime="onnxruntime")
    with pytest.raises(UpdateError, match="trusts no signing key"):
        install(strict, server, packages["v1"], "1.0.0")
    loose = Updater(tmp_path / "loose", [], hub_url=server.url, retry_delay_s=0, runtime="onnxruntime",
                    allow_unsigned=True)
    install(loose, server, packages["unsigned"], "2.0.0")
    assert loose.current().version == "2.0.0"


def test_going_back_to_the_previous_model_is_reported_as_a_roll_back(tmp_path, server, packages, keys) -> None:
    from agent.runtimes import open_runtime
    from agent.updates import UpdateWorker

    updater = make_updater(tmp_path, server, keys)
    install(updater, server, packages["v1"], "1.0.0")
    install(updater, server, packages["v2"], "2.0.0")
    running = [updater.read(updater.current().path)]
    states: list[messages.ModelState] = []
    stop = threading.Event()
    worker = UpdateWorker(updater, lambda model, m: open_runtime("onnxruntime", model, m),
                          lambda package, runtime: running.append(package), states.append, stop,
                          current=lambda: running[-1])
    worker.start()
    asked = len(server.requests)
    worker.desired(desired_for(packages["v1"], "/files/v1.kdpkg", "1.0.0"))
    deadline = time.monotonic() + 10
    while not states and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    assert [s.state for s in states] == ["rolled_back"]
    assert states[0].version == "1.0.0" and states[0].rollout_id == "01HZROLLOUT"
    assert states[0].reason == "back on darkness 1.0.0, the model it ran before darkness 2.0.0, as the hub asked"
    assert running[-1].version == updater.current().version == "1.0.0" and len(server.requests) == asked
