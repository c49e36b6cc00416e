"""`kdfleet demo` for real, stopped with Ctrl-C in every phase as a terminal does it (SIGINT to the
foreground process group): it exits 0, quietly, and leaves no process behind. Running, it says what
each station streams, and the registry holds its model and a second version a rollout ships."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


class Demo:
    """`kdfleet demo` in a process group of its own, its output gathered line by line."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kdfleet.cli", "demo", "--workdir", str(workdir), "--port", str(free_port()),
             "--mqtt-port", str(free_port()), "--fps", "4", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            # as from a terminal, whatever started the tests: SIGINT is Ctrl-C, not ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output)
            if found:
                return found
            assert self.proc.poll() is None, f"the demo exited with {self.proc.returncode}:\n{self.output}"
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout:.0f} s:\n{self.output}")

    def ctrl_c(self, timeout: float = 40) -> float:
        """SIGINT to the demo's process group, as Ctrl-C in its terminal; the seconds it took to exit."""
        t0 = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the demo did not stop within {timeout:.0f} s of Ctrl-C:\n{self.output}") from None
        self.reader.join(5)
        return time.monotonic() - t0

    def kill(self) -> None:
        for pid in left_behind(self.workdir):
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()


def left_behind(workdir: Path) -> list[int]:
    """Processes whose command line names the demo's work folder (broker, hub, stations, trainer)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if str(workdir).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def assert_stopped_quietly(demo: Demo, seconds: float) -> None:
    assert demo.proc.returncode == 0, demo.output
    out = demo.output
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "exited with code" not in out, out
    assert out.rstrip().endswith("demo stopped"), out
    for log in (demo.workdir / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, f"{log.name}:\n{text}"
    assert left_behind(demo.workdir) == [], "processes left running after the demo stopped"
    assert seconds < 30, f"the demo took {seconds:.1f} s to stop"


@pytest.fixture
def plate_set(tmp_path: Path) -> Path:
    """An MVTec-layout set of the class the tiny package scores: plates, a dark spot on the defective ones."""
    from tests.package_factory import plate

    rng = np.random.default_rng(5)
    root = tmp_path / "plates"
    for kind, n in (("good", 6), ("spot", 3)):
        folder = root / "plate" / "test" / kind
        folder.mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(folder / f"{i:03d}.png"), plate(rng, kind == "spot"))
    return root


def test_the_demo_runs_says_what_it_streams_registers_two_versions_and_stops_on_ctrl_c(
        tmp_path: Path, tiny_package: Path, plate_set: Path) -> None:
    workdir = tmp_path / "demo"
    demo = Demo(workdir, "--stations", "2", "--data", str(plate_set), "--package", str(tiny_package))
    try:
        demo.wait_for_line(r"fleet up in", 90)
        assert "station-1 (line-1) streams plate: 9 images in a loop, 3 defective (spot 3) and 6 good" in demo.output
        command = demo.wait_for_line(r"to try a rollout of 1\.1\.0: (kdfleet hub rollout start (\d+) .*)", 5)
        db = sqlite3.connect(workdir / "hub.db")
        models = db.execute("SELECT name, version, parent_version, notes FROM models ORDER BY id").fetchall()
        assert [m[:3] for m in models] == [("darkness", "1.0.0", ""), ("darkness", "1.1.0", "1.0.0")]
        assert "to try a rollout" in models[1][3]
        deadline = time.monotonic() + 30
        while not db.execute("SELECT count(*) FROM results").fetchone()[0]:
            assert time.monotonic() < deadline, f"no result stored within 30 s:\n{demo.output}"
            time.sleep(0.2)

        # the command it prints ships the second version, reading the demo hub's config
        argv = command.group(1).replace("--soak 30", "--soak 1").split()
        started = subprocess.run([sys.executable, "-m", "kdfleet.cli", *argv[1:]], cwd=ROOT, capture_output=True,
                                 text=True, timeout=30)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 90
        while db.execute("SELECT count(*) FROM devices WHERE model_version = '1.1.0'").fetchone()[0] < 2:
            assert time.monotonic() < deadline, "the stations did not update to 1.1.0 within 90 s"
            time.sleep(0.5)
        db.close()
        assert_stopped_quietly(demo, demo.ctrl_c())
    finally:
        demo.kill()


@pytest.mark.parametrize("phase", ["starting the broker and hub", "generating data", "training"])
def test_ctrl_c_stops_the_demo_quietly_in_every_phase(tmp_path: Path, tiny_package: Path, plate_set: Path,
                                                      phase: str) -> None:
    from tests.trainer.tiny_data import make_tiny_set

    workdir = tmp_path / "demo"
    if phase == "starting the broker and hub":
        demo = Demo(workdir, "--data", str(plate_set), "--package", str(tiny_package))
        demo.wait_for_line(r"\.demo ", 30)
    elif phase == "generating data":
        demo = Demo(workdir)
        demo.wait_for_line(r"generating the synthetic data set", 60)
        time.sleep(1)
    else:
        demo = Demo(workdir, "--data", str(make_tiny_set(tmp_path / "tiny")))
        demo.wait_for_line(r"preparing the demo model", 60)
        time.sleep(2)
    try:
        assert_stopped_quietly(demo, demo.ctrl_c())
        assert "stopping" in demo.output
    finally:
        demo.kill()
