"""Frame sources: a folder (replayed, looped or watched), a video file, a camera, a stream URL.

Each source yields `Frame`s and never raises for one bad frame: a corrupt or
truncated image is logged and counted, a dropped stream is reopened with
backoff, and the source ends only when its input really has (a finished
folder or file without `loop`/`watch`) or the stop event is set.
"""
from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shared.imaging import ImageError, read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm"}
REOPEN_MAX_S = 30.0   # longest wait between attempts to reopen a dropped stream
WATCH_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class Frame:
    image: np.ndarray   # RGB uint8 (H, W, 3)
    ts: float           # capture time, unix seconds
    name: str           # file name or stream position


class SourceError(RuntimeError):
    """A source that cannot be opened at all."""


class Source(ABC):
    """Common pacing and counters."""

    def __init__(self, uri: str, fps: float, stop: threading.Event) -> None:
        self.uri = uri
        self.period = 1.0 / fps if fps > 0 else 0.0
        # a live source cannot wait: under overload its frames are dropped; a folder or file
        # read as fast as possible waits for the pipeline instead, so no file goes unread
        self.live = fps > 0
        self.stop = stop
        self.errors = 0
        self._next = time.monotonic()

    def pace(self) -> None:
        if self.period:
            self._next += self.period
            delay = self._next - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                self._next = time.monotonic()  # fell behind: don't burst to catch up

    @abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Frames until the input ends or the stop event is set."""


class FolderSource(Source):
    """Images in a folder in name order; `loop` replays them, `watch` waits for new files."""

    def __init__(self, uri: str, fps: float, stop: threading.Event, loop: bool = False,
                 watch: bool = False) -> None:
        super().__init__(uri, fps, stop)
        self.root = Path(uri)
        if not self.root.is_dir():
            raise SourceError(f"{uri}: not a folder")
        self.loop, self.watch = loop, watch

    def _files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def frames(self) -> Iterator[Frame]:
        seen: set[Path] = set()
        while not self.stop.is_set():
            files = [p for p in self._files() if p not in seen] if self.watch else self._files()
            if not files and not self.watch:
                raise SourceError(f"{self.uri}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for path in files:
                if self.stop.is_set():
                    return
                seen.add(path)
                try:
                    image = read_image(path)
                except (ImageError, OSError) as exc:
                    self.errors += 1
                    log.error("skipping %s: %s", path, exc)
                    continue
                self.pace()
                yield Frame(image, time.time(), str(path.relative_to(self.root)))
            if self.watch:
                self.stop.wait(WATCH_POLL_S)
            elif not self.loop:
                return


class CaptureSource(Source):
    """OpenCV capture: video file, camera index or stream URL; reopens a dropped stream."""

    def __init__(self, uri: str, fps: float, stop: threading.Event, loop: bool = False) -> None:
        super().__init__(uri, fps, stop)
        self.loop = loop
        self.is_file = Path(uri).suffix.lower() in VIDEO_SUFFIXES and Path(uri).exists()
        self.live = self.live or not self.is_file
        self.target: str | int = int(uri) if uri.isdigit() else uri
        if not self.is_file and not uri.isdigit() and "://" not in uri:
            raise SourceError(f"{uri}: not a folder, a video file, a camera index or a stream URL")

    def _open(self) -> cv2.VideoCapture | None:
        cap = cv2.VideoCapture(self.target)
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def frames(self) -> Iterator[Frame]:
        backoff = 0.5
        index = 0
        while not self.stop.is_set():
            cap = self._open()
            if cap is None:
                if self.is_file:
                    raise SourceError(f"{self.uri}: OpenCV cannot open this video")
                log.warning("%s: cannot open, retrying in %.1f s", self.uri, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, REOPEN_MAX_S)
                continue
            backoff = 0.5
            try:
                while not self.stop.is_set():
                    ok, bgr = cap.read()
                    if not ok or bgr is None:
                        break
                    index += 1
                    self.pace()
                    yield Frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time.time(), f"{self.uri}#{index}")
            finally:
                cap.release()
            if self.is_file and not self.loop:
                return
            if not self.is_file:
                log.warning("%s: stream dropped after frame %d; reopening", self.uri, index)


def open_source(uri: str, fps: float, stop: threading.Event, loop: bool = False, watch: bool = False) -> Source:
    """The source kind `uri` names: folder, video file, camera index or URL."""
    if Path(uri).is_dir():
        return FolderSource(uri, fps, stop, loop=loop, watch=watch)
    return CaptureSource(uri, fps, stop, loop=loop)
