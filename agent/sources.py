"""Frame sources: a folder (replayed, looped or watched), a video file, a camera, a stream URL.

Each source yields `Frame`s and never raises for one bad frame: an image that
is corrupt, truncated, not an image, or over the size limits (checked from
its header before decoding, see shared/imaging.py) is logged, counted and
reported to `SourceEvents.rejected`; a folder's bad file is moved aside (to
`<folder>/rejected/`, or the folder configured), so a restart does not meet
it again. A camera or stream that cannot be opened, or drops, is reopened with
exponential backoff (with jitter, capped) for as long as the agent runs: the
first failure of an outage is logged as an error saying what to check and
reported to `SourceEvents.state`, the return as a warning with the outage's
length. A source ends only when its input really has (a finished folder or
file without `loop`/`watch`) or the stop event is set; it raises
`SourceError` for what it cannot go on with (a missing folder, an unreadable
video file, a looped folder with no usable image), which the pipeline
reports and retries with backoff.
"""
from __future__ import annotations

import logging
import random
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from shared.imaging import DEFAULT_LIMITS, ImageError, ImageLimits, read_image, to_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm"}
REOPEN_FIRST_S = 0.5  # first wait before reopening a dropped camera or stream
REOPEN_MAX_S = 30.0   # longest wait between attempts
STREAM_TIMEOUT_MS = 5000  # a stream that neither connects nor sends for this long counts as dropped
WATCH_POLL_S = 0.5
SETTLE_S = 0.2        # a watched file modified more recently than this may still be being written
WRITE_GRACE_S = 2.0   # a watched file that does not decode is retried until it is this old


@dataclass(frozen=True, slots=True)
class Frame:
    image: np.ndarray   # RGB uint8 (H, W, 3)
    ts: float           # capture time, unix seconds
    name: str           # file name or stream position


class SourceError(RuntimeError):
    """A source that cannot work at all; the message says what to fix."""


class SourceEvents:
    """What a source tells whoever runs it, from the source's thread; these defaults ignore it."""

    def rejected(self, name: str, reason: str) -> None:
        """One frame or file could not be used (`reason` says why); the source goes on."""

    def state(self, error: str) -> None:
        """The source cannot deliver frames now (`error` says why and what to check), or "" once it can again."""


class Source(ABC):
    """Common pacing and counters."""

    def __init__(self, uri: str, fps: float, stop: threading.Event, events: SourceEvents | None = None) -> None:
        self.uri = uri
        self.period = 1.0 / fps if fps > 0 else 0.0
        # a live source cannot wait: under overload its frames are dropped; a folder or file
        # read as fast as possible waits for the pipeline instead, so no file goes unread
        self.live = fps > 0
        self.stop = stop
        self.events = events or SourceEvents()
        self.errors = 0   # frames or files rejected
        self._next = time.monotonic()

    def reject(self, name: str, reason: str) -> None:
        self.errors += 1
        self.events.rejected(name, reason)

    def pace(self) -> None:
        if self.period:
            self._next += self.period
            delay = self._next - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                self._next = time.monotonic()  # fell behind: don't burst to catch up

    @abstractmethod
    def probe(self) -> None:
        """Raise `SourceError` if the source could not deliver a frame now (`kdfleet agent check`)."""

    @abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Frames until the input ends or the stop event is set."""


class FolderSource(Source):
    """Images in a folder in name order; `loop` replays them, `watch` waits for new files.

    A file that cannot be used is moved to `rejected` (default `<folder>/rejected`, which is not
    read), keeping its place under the folder; one that cannot be moved is skipped until the
    agent restarts.
    """

    def __init__(self, uri: str, fps: float, stop: threading.Event, loop: bool = False, watch: bool = False,
                 limits: ImageLimits = DEFAULT_LIMITS, rejected: str = "",
                 events: SourceEvents | None = None) -> None:
        super().__init__(uri, fps, stop, events)
        self.root = Path(uri)
        if not self.root.is_dir():
            raise SourceError(f"{uri}: not a folder")
        self.loop, self.watch, self.limits = loop, watch, limits
        self.rejected_dir = Path(rejected) if rejected else self.root / "rejected"
        try:
            inside = self.rejected_dir.resolve().relative_to(self.root.resolve()).parts
        except ValueError:
            inside = None   # elsewhere: nothing under the folder to leave out
        if inside == ():
            raise SourceError(f"{uri}: its rejected folder is the folder itself; set sources.rejected "
                              "to a sub-folder or another folder")
        self._aside = inside
        self._stuck: set[Path] = set()   # rejected files that could not be moved

    def _files(self) -> list[Path]:
        n = len(self._aside or ())
        return sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                      and not (n and p.relative_to(self.root).parts[:n] == self._aside) and p not in self._stuck)

    def probe(self) -> None:
        if not self.watch and not self._files():
            stuck = f", but {len(self._stuck)} rejected that could not be moved aside" if self._stuck else ""
            raise SourceError(f"{self.uri}: no usable images ({', '.join(sorted(IMAGE_SUFFIXES))}){stuck}; "
                              "add some, or set watch = true to wait for them")

    def frames(self) -> Iterator[Frame]:
        seen: set[Path] = set()
        while not self.stop.is_set():
            if self.watch:
                pending = [p for p in self._files() if p not in seen]
                files = [p for p in pending if _settled(p)]
            else:
                self.probe()
                files = self._files()
            for path in files:
                if self.stop.is_set():
                    return
                try:
                    image = read_image(path, self.limits)
                except FileNotFoundError:
                    continue   # taken away since it was listed
                except Exception as exc:   # one file, whatever its fault, never ends the source
                    if self.watch and isinstance(exc, ImageError) and _age(path) < WRITE_GRACE_S:
                        continue   # its writer may only have paused: read it again on the next poll
                    seen.add(path)
                    self._reject_file(path, exc)
                    continue
                seen.add(path)
                self.pace()
                yield Frame(image, time.time(), str(path.relative_to(self.root)))
            if self.watch:   # a file still being written is looked at again soon
                self.stop.wait(SETTLE_S if len(pending) > len(files) else WATCH_POLL_S)
            elif not self.loop:
                return
            # looped: the next pass's probe stops a folder left with no usable image

    def _reject_file(self, path: Path, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, ImageError) else f"{path}: {type(exc).__name__}: {exc}"
        target = self.rejected_dir / path.relative_to(self.root)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            n = 0
            while target.exists():   # an earlier file of that name was rejected too: keep both
                n += 1
                target = target.with_name(f"{path.stem}.{n}{path.suffix}")
            shutil.move(path, target)
            log.error("%s; moved to %s", reason, target)
        except OSError as move_error:
            self._stuck.add(path)
            log.error("%s; it could not be moved to %s (%s), so it stays and is skipped until the agent "
                      "restarts", reason, self.rejected_dir, move_error.strerror or move_error)
        self.reject(str(path.relative_to(self.root)), reason)


def _age(path: Path) -> float:
    """Seconds since `path` was last modified (infinite when it has vanished)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _settled(path: Path) -> bool:
    """Modified long enough ago that its writer is probably done (vanished files are not)."""
    return SETTLE_S <= _age(path) < float("inf")


class CaptureSource(Source):
    """OpenCV capture: video file, camera index or stream URL; reopens a camera or stream with backoff."""

    def __init__(self, uri: str, fps: float, stop: threading.Event, loop: bool = False,
                 reopen_first_s: float = REOPEN_FIRST_S, reopen_max_s: float = REOPEN_MAX_S,
                 events: SourceEvents | None = None) -> None:
        super().__init__(uri, fps, stop, events)
        self.loop = loop
        self.reopen_first_s, self.reopen_max_s = reopen_first_s, reopen_max_s
        self.reconnects = 0       # outages of a camera or stream that ended with frames again
        self.failed_opens = 0
        if uri.isdigit():
            self.kind, self.label = "camera", f"camera {uri} (/dev/video{uri} on Linux)"
        elif "://" in uri:
            self.kind, self.label = "stream", f"stream {redact(uri)}"
        elif Path(uri).suffix.lower() in VIDEO_SUFFIXES and Path(uri).is_file():
            self.kind, self.label = "video", f"video file {uri}"
        else:
            what = "no such file or folder" if not Path(uri).exists() else "not a folder or a video file " \
                f"({', '.join(sorted(VIDEO_SUFFIXES))})"
            raise SourceError(f"{uri}: {what}; a source is a folder, a video file, a camera index (0) or a "
                              "stream URL (rtsp://, http://)")
        self.live = self.live or self.kind != "video"

    def _open(self) -> cv2.VideoCapture | None:
        if self.kind == "camera":
            cap = cv2.VideoCapture(int(self.uri))
        elif self.kind == "stream":
            # bounded waits: a hung camera must not hold the capture thread (or shutdown) forever
            cap = cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                                                              cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS])
        else:
            cap = cv2.VideoCapture(self.uri)
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def _why(self) -> str:
        if self.kind == "camera":
            return "cannot open: is it connected, and not held by another process? (ls /dev/video*)"
        if self.kind == "stream":
            return "cannot connect: check the URL, the network and the camera's credentials"
        return "OpenCV cannot open this video file; check that it plays (ffprobe) and re-encode it to H.264"

    def probe(self) -> None:
        cap = self._open()
        if cap is None:
            raise SourceError(f"{self.label}: {self._why()}")
        try:
            ok, _ = cap.read()
        finally:
            cap.release()
        if not ok:
            raise SourceError(f"{self.label}: opened but delivered no frame")

    def frames(self) -> Iterator[Frame]:
        backoff = self.reopen_first_s
        down_since: float | None = None   # monotonic start of the current outage
        index = 0
        while not self.stop.is_set():
            cap = self._open()
            got = 0
            if cap is None and self.kind == "video":
                raise SourceError(f"{self.label}: {self._why()}")
            if cap is not None:
                try:
                    while not self.stop.is_set():
                        ok, bgr = cap.read()
                        if not ok or bgr is None:
                            break
                        if down_since is not None:
                            self.reconnects += 1
                            log.warning("%s: back after %.1f s", self.label, time.monotonic() - down_since)
                            self.events.state("")
                            down_since = None
                        got += 1
                        index += 1
                        backoff = self.reopen_first_s
                        name = f"{self.label}#{index}"
                        try:
                            rgb = to_rgb(bgr, bgr=True)
                        except (cv2.error, ValueError) as exc:   # a frame of a shape or depth OpenCV cannot convert
                            self.reject(name, f"{name}: cannot convert a {bgr.dtype} frame of shape {bgr.shape}: {exc}")
                            log.error("%s: frame %d of shape %s skipped (%s)", self.label, index, bgr.shape, exc)
                            continue
                        self.pace()
                        yield Frame(rgb, time.time(), name)
                finally:
                    cap.release()
            if self.kind == "video":
                if not got:
                    raise SourceError(f"{self.label}: no frame could be decoded; re-encode it to H.264")
                if not self.loop:
                    return
                continue
            if self.stop.is_set():
                return
            if cap is None:
                self.failed_opens += 1
            if down_since is None:
                down_since = time.monotonic()
                why = self._why() if cap is None else f"dropped after frame {index}"
                log.error("%s: %s; retrying with backoff up to %.0f s while the other sources run",
                          self.label, why, self.reopen_max_s)
                self.events.state(f"{self.label}: {why}")
            else:
                log.warning("%s: still unavailable after %.0f s; next attempt in %.1f s",
                            self.label, time.monotonic() - down_since, backoff)
            self.stop.wait(backoff * random.uniform(0.8, 1.2))   # jitter: cameras on one switch don't stampede
            backoff = min(backoff * 2, self.reopen_max_s)


def redact(uri: str) -> str:
    """`uri` without its password, for logs and result names."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_source(uri: str, fps: float, stop: threading.Event, loop: bool = False, watch: bool = False, *,
                limits: ImageLimits = DEFAULT_LIMITS, rejected: str = "", events: SourceEvents | None = None
                ) -> Source:
    """The source kind `uri` names: folder, video file, camera index or URL."""
    if Path(uri).is_dir():
        return FolderSource(uri, fps, stop, loop=loop, watch=watch, limits=limits, rejected=rejected, events=events)
    return CaptureSource(uri, fps, stop, loop=loop, events=events)
