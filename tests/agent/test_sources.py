"""Frame sources on real inputs: a video file, folders with bad and late files, an HTTP MJPEG stream."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import load
from agent.pipeline import Agent
from agent.sources import WRITE_GRACE_S, CaptureSource, Frame, SourceError, SourceEvents, open_source, redact
from tests.agent.test_pipeline import Collector
from tests.hostile_images import add_hostile_files

MISSING_CAMERA = "57"   # no /dev/video57 on any machine these tests run on


def until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def jpeg(value: int) -> bytes:
    return cv2.imencode(".jpg", np.full((48, 64, 3), value, np.uint8))[1].tobytes()


class Consumer:
    """Drains a source's frames on a thread, as the agent's capture thread does."""

    def __init__(self, frames: Iterator[Frame]) -> None:
        self.frames: list[Frame] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(frames,), daemon=True)
        self.thread.start()

    def _run(self, frames: Iterator[Frame]) -> None:
        try:
            self.frames.extend(frames)
        except BaseException as exc:  # handed to the test
            self.error = exc


# -- video file ------------------------------------------------------------------------


def write_video(path: Path, n: int) -> None:
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert out.isOpened()
    for i in range(n):
        out.write(np.full((48, 64, 3), 20 * i, np.uint8))
    out.release()


def test_video_file_yields_every_frame_then_ends(tmp_path):
    write_video(tmp_path / "line.avi", 6)
    source = open_source(str(tmp_path / "line.avi"), 0, threading.Event())
    frames = list(source.frames())
    assert [f.image.shape for f in frames] == [(48, 64, 3)] * 6
    assert [int(f.image.mean()) // 20 for f in frames] == pytest.approx(list(range(6)), abs=1)
    assert not source.live   # read as fast as the pipeline runs: waits instead of dropping


def test_looped_video_file_replays_until_stopped(tmp_path):
    write_video(tmp_path / "line.avi", 4)
    stop = threading.Event()
    frames = []
    for frame in open_source(str(tmp_path / "line.avi"), 0, stop, loop=True).frames():
        frames.append(frame)
        if len(frames) == 10:
            stop.set()
    assert len(frames) == 10
    assert [f.name for f in frames][4].endswith("#5")   # the numbering runs on across replays


def test_undecodable_video_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 4096)
    with pytest.raises(SourceError, match=r"video file .*broken\.mp4: .*re-encode"):
        list(open_source(str(bad), 0, threading.Event()).frames())


def test_unknown_path_names_what_a_source_can_be(tmp_path):
    with pytest.raises(SourceError, match=r"nothere\.mp4: no such file or folder; a source is a folder"):
        open_source(str(tmp_path / "nothere.mp4"), 0, threading.Event())


# -- folders ---------------------------------------------------------------------------


class Recorder(SourceEvents):
    """What a source reported: its rejected files and its state changes."""

    def __init__(self) -> None:
        self.files: list[tuple[str, str]] = []
        self.states: list[str] = []

    def rejected(self, name: str, reason: str) -> None:
        self.files.append((name, reason))

    def state(self, error: str) -> None:
        self.states.append(error)


def test_corrupt_and_truncated_jpegs_are_moved_aside_and_counted(tmp_path, caplog):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(50 * i))
    whole = jpeg(200)
    (tmp_path / "1a-truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "2a-garbage.jpg").write_bytes(b"not a jpeg at all" * 10)
    (tmp_path / "3a-empty.jpg").write_bytes(b"")
    source = open_source(str(tmp_path), 0, threading.Event())
    with caplog.at_level(logging.ERROR, logger="agent.sources"):
        names = [f.name for f in source.frames()]
    assert names == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert source.errors == 3
    assert f"1a-truncated.jpg: not a decodable JPEG image (corrupt or truncated?); moved to {tmp_path}/rejected/" \
        in caplog.text
    assert sorted(p.name for p in (tmp_path / "rejected").iterdir()) == ["1a-truncated.jpg", "2a-garbage.jpg",
                                                                        "3a-empty.jpg"]
    again = open_source(str(tmp_path), 0, threading.Event())   # a restart does not meet them again
    assert [f.name for f in again.frames()] == names and again.errors == 0


def test_hostile_images_never_stop_a_folder_and_are_moved_aside(tmp_path, huge_png, caplog):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:04d}.jpg").write_bytes(jpeg(60 * i))
    bad = add_hostile_files(folder, huge_png)
    (folder / "sub").mkdir()
    (folder / "sub" / "0000a-bomb.png").write_bytes((folder / "0000a-bomb.png").read_bytes())
    events = Recorder()
    source = open_source(str(folder), 0, threading.Event(), events=events)
    with caplog.at_level(logging.ERROR, logger="agent.sources"):
        names = [f.name for f in source.frames()]
    assert names == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert source.errors == 5 and [n for n, _ in events.files] == [*bad, "sub/0000a-bomb.png"]
    reasons = dict(events.files)
    assert "100000 x 100000 pixels (10000.0 MP) is over the 50 MP limit" in reasons["0000a-bomb.png"]
    assert "20000 x 20000 pixels (400.0 MP) is over the 50 MP limit" in reasons["0000b-huge.png"]
    assert "corrupt or truncated" in reasons["0000c-truncated.jpg"]
    assert "not a recognised image" in reasons["0000d-random.png"]
    rejected = folder / "rejected"
    assert sorted(str(p.relative_to(rejected)) for p in rejected.rglob("*.*")) == sorted(
        [*bad, "sub/0000a-bomb.png"])   # aside, keeping their place under the folder
    assert caplog.text.count("moved to") == 5
    # the same name rejected again later keeps both files
    (folder / "0000a-bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert [f.name for f in open_source(str(folder), 0, threading.Event()).frames()] == names
    assert (rejected / "0000a-bomb.1.png").read_bytes().endswith(b"broken")


def test_a_configured_rejected_folder_and_one_that_cannot_be_made(tmp_path, caplog):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg(30))
    (folder / "bad.jpg").write_bytes(b"garbage")
    elsewhere = tmp_path / "quarantine"
    source = open_source(str(folder), 0, threading.Event(), rejected=str(elsewhere))
    assert [f.name for f in source.frames()] == ["good.jpg"]
    assert (elsewhere / "bad.jpg").read_bytes() == b"garbage" and not (folder / "rejected").exists()

    (folder / "bad.jpg").write_bytes(b"garbage")
    (tmp_path / "a-file").write_text("not a folder")
    stop = threading.Event()
    looped = open_source(str(folder), 0, stop, loop=True, rejected=str(tmp_path / "a-file" / "rejected"))
    frames = []
    with caplog.at_level(logging.ERROR, logger="agent.sources"):
        for frame in looped.frames():
            frames.append(frame.name)
            if len(frames) == 3:
                stop.set()
    assert frames == ["good.jpg"] * 3   # the bad file stays, is counted once and skipped from then on
    assert looped.errors == 1 and "bad.jpg: not a recognised image" in caplog.text
    assert "could not be moved to" in caplog.text and "skipped until the agent restarts" in caplog.text
    with pytest.raises(SourceError, match="its rejected folder is the folder itself"):
        open_source(str(folder), 0, threading.Event(), rejected=str(folder))


def test_looping_a_folder_of_unreadable_images_moves_them_then_stops_with_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="no usable images"):
        list(open_source(str(tmp_path), 0, threading.Event(), loop=True).frames())
    assert (tmp_path / "rejected" / "a.jpg").exists()


def test_watched_folder_reads_each_new_file_once_and_only_when_written(tmp_path):
    (tmp_path / "000.jpg").write_bytes(jpeg(10))
    stop = threading.Event()
    source = open_source(str(tmp_path), 0, stop, watch=True)
    consumer = Consumer(source.frames())
    assert until(lambda: len(consumer.frames) == 1, 5)
    # a camera writing a file slowly: the half-written file must not be read (or counted as corrupt)
    data = jpeg(90)
    with open(tmp_path / "001.jpg", "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.8)   # longer than a poll
        f.write(data[len(data) // 2:])
    (tmp_path / "002.jpg").write_bytes(jpeg(170))
    assert until(lambda: len(consumer.frames) == 3, 5)
    assert source.errors == 0
    (tmp_path / "003.jpg").write_bytes(b"truly corrupt")   # an error once it stays broken past the grace
    assert until(lambda: source.errors == 1, 3 + WRITE_GRACE_S)
    time.sleep(1.2)   # more polls: nothing read twice, the bad file not counted again
    stop.set()
    consumer.thread.join(5)
    assert consumer.error is None and not consumer.thread.is_alive()
    assert [f.name for f in consumer.frames] == ["000.jpg", "001.jpg", "002.jpg"]
    assert [int(f.image.mean()) for f in consumer.frames] == pytest.approx([10, 90, 170], abs=3)
    assert source.errors == 1


# -- HTTP MJPEG stream -----------------------------------------------------------------


class MjpegServer:
    """An IP camera's MJPEG endpoint on loopback; every frame's grey level says which start served it."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.generation = 0
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> MjpegServer:
        self.generation += 1
        level = 60 * self.generation
        stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                body = jpeg(level)
                try:
                    while not stopping.is_set():
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(body) + body + b"\r\n")
                        time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.server.stopping = stopping  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stopping.set()  # type: ignore[attr-defined]
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"


@pytest.fixture
def mjpeg() -> Iterator[MjpegServer]:
    server = MjpegServer().start()
    yield server
    server.stop()


def test_dropped_stream_is_reopened_with_backoff_and_resumes(mjpeg, caplog):
    stop = threading.Event()
    events = Recorder()
    source = CaptureSource(mjpeg.url, 0, stop, reopen_first_s=0.1, reopen_max_s=0.4, events=events)
    assert source.live   # a stream cannot wait for the pipeline
    with caplog.at_level(logging.WARNING, logger="agent.sources"):
        consumer = Consumer(source.frames())
        assert until(lambda: len(consumer.frames) >= 5, 10)
        mjpeg.stop()
        assert until(lambda: source.failed_opens >= 3, 10)   # refused while down, retried with backoff
        before = len(consumer.frames)
        mjpeg.start()   # same port: the camera comes back
        assert until(lambda: len(consumer.frames) >= before + 5, 15)
        stop.set()
        consumer.thread.join(10)
    assert consumer.error is None and not consumer.thread.is_alive()
    assert source.reconnects == 1
    levels = [int(f.image.mean()) for f in consumer.frames]
    assert levels[0] == pytest.approx(60, abs=3) and levels[-1] == pytest.approx(120, abs=3)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"stream {mjpeg.url}: dropped after frame" in errors[0]   # one error per outage
    assert any("back after" in r.getMessage() for r in caplog.records)
    waits = [r.getMessage() for r in caplog.records if "still unavailable" in r.getMessage()]
    assert waits and "next attempt in 0.4 s" in waits[-1]   # doubled up to the cap
    assert len(events.states) == 2 and events.states[1] == ""   # the outage, reported once, then its end
    assert events.states[0].startswith(f"stream {mjpeg.url}: dropped after frame")


def test_stream_that_never_answers_retries_until_stopped(caplog):
    from tests.conftest import free_port

    stop = threading.Event()
    source = CaptureSource(f"http://127.0.0.1:{free_port()}/video.mjpg", 0, stop, reopen_first_s=0.05)
    with pytest.raises(SourceError, match="cannot connect: check the URL"):
        source.probe()   # what `kdfleet agent check` reports
    with caplog.at_level(logging.ERROR, logger="agent.sources"):
        consumer = Consumer(source.frames())
        assert until(lambda: source.failed_opens >= 2, 10)
        stop.set()
        consumer.thread.join(5)
    assert not consumer.thread.is_alive() and consumer.frames == [] and consumer.error is None


def test_passwords_stay_out_of_logs_and_names():
    assert redact("rtsp://cam:s3cret@10.0.0.7:554/live") == "rtsp://cam:***@10.0.0.7:554/live"
    assert redact("http://10.0.0.7/video.mjpg") == "http://10.0.0.7/video.mjpg"
    source = CaptureSource("rtsp://cam:s3cret@10.0.0.7:554/live", 0, threading.Event())
    assert "s3cret" not in source.label


# -- a camera that is not there, beside a working source ---------------------------------


def test_missing_camera_is_a_clear_error_and_the_other_sources_keep_running(tmp_path, tiny_package, plates,
                                                                            broker, unique, caplog):
    folder, truth = plates(6)
    cfg = load(None, {"package": str(tiny_package), "site": f"s{unique}", "device": "cam-test",
                      "broker": f"mqtt://{broker[0]}:{broker[1]}", "spool": {"path": str(tmp_path / "spool.db")},
                      "update": {"models_dir": str(tmp_path / "models")},
                      "sources": [{"uri": MISSING_CAMERA, "cls": "plate"}, {"uri": str(folder), "cls": "plate"}],
                      "allow_unsigned": True},
               environ={})
    with pytest.raises(SourceError, match=rf"camera {MISSING_CAMERA} \(/dev/video{MISSING_CAMERA} on Linux\): "
                                          "cannot open: is it connected"):
        open_source(MISSING_CAMERA, 0, threading.Event()).probe()
    agent = Agent(cfg)
    hub = Collector(broker, f"s{unique}", "cam-test", f"sub-{unique}")   # what reads the results
    with caplog.at_level(logging.ERROR, logger="agent.sources"):
        agent.start()
        try:
            assert until(lambda: agent.counters.spooled == len(truth), 20)
            assert until(lambda: agent.spool.depth() == 0, 20)   # delivered too
            assert hub.wait(len(truth), 10)
            assert not agent.sources_done()   # the camera keeps being retried
            assert agent.source_error().startswith(f"camera {MISSING_CAMERA} (/dev/video{MISSING_CAMERA} on Linux): "
                                                   "cannot open")   # and the hub is told why
            assert agent.metrics().source_error == agent.source_error()
        finally:
            agent.shutdown(drain_s=0)
            hub.link.stop()
    assert f"camera {MISSING_CAMERA}" in caplog.text and "retrying with backoff" in caplog.text
