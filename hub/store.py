"""Content-addressed image store on disk.

An image is named by the sha256 of its bytes and lives at
``<root>/ab/cd/<sha>.jpg`` (or ``.png``), so the same heat map sent twice is
stored once and a name can never point at different bytes. Writes go to a
temporary file in the same directory and are renamed into place, so a reader
never sees half an image and a crash leaves no partial file under a real name.
Only JPEG and PNG are accepted: the dashboard serves these bytes to browsers.

A file's modification time is the last time the hub stored a result naming
it (`put` touches an image it already has, at most once per TOUCH_EVERY_S),
which is what retention goes by (`remove_if_unused_since`). The ingest writer
puts a batch's images without syncing each file and calls `sync` once before
committing the rows that name them: one flush per batch that wrote new files,
instead of one per image.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_SHA = re.compile(r"^[0-9a-f]{64}$")
MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png"}
TOUCH_EVERY_S = 3600.0  # how stale an image's "last used" time may get; retention works in days
KEEP_RECENT_S = 2 * TOUCH_EVERY_S  # retention's size limit spares images used this recently
_RECENT_MAX = 200_000  # images remembered as recently touched


class StoreError(ValueError):
    """Bytes the store refuses (not JPEG or PNG) or a name that is not a sha256."""


@dataclass(frozen=True, slots=True)
class StoredImage:
    sha: str
    data: bytes
    media_type: str


def image_kind(data: bytes) -> str | None:
    """'jpg' or 'png' from the file signature, None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def is_sha(value: str) -> bool:
    return bool(_SHA.match(value))


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file of the store as retention sees it."""

    sha: str
    path: Path
    size: int
    mtime: float  # last time a stored result named it


def _syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), which flushes one file system; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs()


class ImageStore:
    """Images under `root`, addressed by sha256 (lower-case hex)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._root = str(self.root)
        self._touched: dict[str, float] = {}  # sha -> when this process last marked it used
        self._unsynced = False  # files written with sync=False since the last sync()

    def path(self, sha: str, kind: str) -> Path:
        if not is_sha(sha):
            raise StoreError(f"{sha!r} is not a sha256 (64 lower-case hex digits)")
        if kind not in MEDIA_TYPES:
            raise StoreError(f"image kind {kind!r} is not one of {sorted(MEDIA_TYPES)}")
        return self.root / sha[:2] / sha[2:4] / f"{sha}.{kind}"

    def put(self, data: bytes, *, sync: bool = True) -> str:
        """Store `data` (JPEG or PNG) unless it is already there; returns its sha256.

        With ``sync=False`` the file is not flushed to disk here: call `sync()`
        before relying on it surviving a power cut (the ingest writer does, once
        per batch).
        """
        kind = image_kind(data)
        if kind is None:
            raise StoreError(f"not a JPEG or PNG image ({len(data)} bytes starting {data[:8]!r})")
        sha = hashlib.sha256(data).hexdigest()
        now = time.monotonic()
        if now - self._touched.get(sha, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
            return sha  # stored, and marked used within the hour
        target = os.path.join(self._root, sha[:2], sha[2:4], f"{sha}.{kind}")
        try:
            os.utime(target)  # already stored: mark it as in use now (see the module docstring)
        except FileNotFoundError:
            self._write(target, data, sync)
        if len(self._touched) >= _RECENT_MAX:
            self._touched.clear()
        self._touched[sha] = now
        return sha

    def _write(self, target: str, data: bytes, sync: bool) -> None:
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if sync or _SYNCFS is None:
                    f.flush()
                    os.fsync(f.fileno())
                else:
                    self._unsynced = True
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)  # atomic; two writers of the same sha write the same bytes
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def sync(self) -> None:
        """Flush every image written with ``sync=False`` to disk (one syncfs for the store)."""
        if not self._unsynced or _SYNCFS is None:
            return  # nothing new, or put() synced each file itself
        self._unsynced = False
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs of the image store {self.root}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def files(self) -> Iterator[StoredFile]:
        """Every image in the store, in no particular order."""
        if not self.root.exists():
            return
        for first in os.scandir(self.root):
            if not first.is_dir(follow_symlinks=False) or len(first.name) != 2:
                continue
            for second in os.scandir(first.path):
                if not second.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(second.path):
                    sha, _, kind = entry.name.partition(".")
                    if kind in MEDIA_TYPES and is_sha(sha):
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # removed meanwhile
                        yield StoredFile(sha, Path(entry.path), st.st_size, st.st_mtime)

    def remove_if_unused_since(self, file: StoredFile, cutoff: float) -> bool:
        """Delete `file` unless a result stored since `cutoff` (unix time) named it.

        Safe against a concurrent `put` of the same image: the file is moved
        aside first and its time checked again; a `put` that touched it before
        the move makes it stay, one that comes after finds no file and writes it anew.
        """
        aside = file.path.with_name(f".prune-{file.path.name}")
        try:
            os.replace(file.path, aside)
        except FileNotFoundError:
            return False
        try:
            if os.stat(aside).st_mtime >= cutoff:
                try:
                    os.link(aside, file.path)  # back in place, unless a put wrote it anew meanwhile
                except FileExistsError:
                    pass
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def find(self, sha: str) -> Path | None:
        """The file holding `sha`, or None when the store does not have it."""
        for kind in MEDIA_TYPES:
            p = self.path(sha, kind)
            if p.exists():
                return p
        return None

    def get(self, sha: str) -> StoredImage | None:
        """The image named `sha` with its media type, or None."""
        p = self.find(sha)
        if p is None:
            return None
        return StoredImage(sha, p.read_bytes(), MEDIA_TYPES[p.suffix[1:]])

    def __contains__(self, sha: str) -> bool:
        return is_sha(sha) and self.find(sha) is not None
