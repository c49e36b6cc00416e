"""Content-addressed image stores: the interface (`Images`) and its folder on disk (`ImageStore`).

The hub keeps heat maps, thumbnails, frames and crops in one of two stores
behind the same interface: this folder (the default) or an S3-compatible
object store (hub.objectstore), chosen by the ``[images]`` settings.

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
from typing import Protocol

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


def checked(data: bytes) -> tuple[str, str]:
    """(sha256, kind) of image bytes a store may keep; StoreError for anything but JPEG or PNG."""
    kind = image_kind(data)
    if kind is None:
        raise StoreError(f"not a JPEG or PNG image ({len(data)} bytes starting {data[:8]!r})")
    return hashlib.sha256(data).hexdigest(), kind


def relative_key(sha: str, kind: str) -> str:
    """Where an image lives inside a store: ``ab/cd/<sha>.<kind>`` (a folder path or an object key)."""
    if not is_sha(sha):
        raise StoreError(f"{sha!r} is not a sha256 (64 lower-case hex digits)")
    if kind not in MEDIA_TYPES:
        raise StoreError(f"image kind {kind!r} is not one of {sorted(MEDIA_TYPES)}")
    return f"{sha[:2]}/{sha[2:4]}/{sha}.{kind}"


def parse_key(key: str) -> str | None:
    """The sha of a store's ``ab/cd/<sha>.<kind>`` key, or None for anything else."""
    sha, _, kind = key.rpartition("/")[2].partition(".")
    return sha if kind in MEDIA_TYPES and is_sha(sha) else None


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One image of a store as retention sees it."""

    sha: str
    key: str  # the file's path (folder) or the object's key (object store)
    size: int
    mtime: float  # last time a stored result named it (unix time)


class RecentlyUsed:
    """The images this process marked as used within TOUCH_EVERY_S: `put` skips them."""

    def __init__(self) -> None:
        self._touched: dict[str, float] = {}  # sha -> monotonic time this process last marked it used

    def fresh(self, sha: str) -> bool:
        return time.monotonic() - self._touched.get(sha, -TOUCH_EVERY_S) < TOUCH_EVERY_S

    def mark(self, sha: str) -> None:
        if len(self._touched) >= _RECENT_MAX:
            self._touched.clear()
        self._touched[sha] = time.monotonic()

    def forget(self, sha: str) -> None:
        self._touched.pop(sha, None)


class Images(Protocol):
    """What the hub needs of an image store (the folder here, or hub.objectstore.ObjectImageStore)."""

    def put(self, data: bytes, *, sync: bool = True) -> str:
        """Store JPEG or PNG bytes (or mark them used now); their sha256. With sync=False the write
        may finish only at `sync()`."""
        ...

    def sync(self) -> None:
        """Every image put with sync=False is durable; OSError when one could not be stored."""
        ...

    def get(self, sha: str) -> StoredImage | None: ...

    def size(self, sha: str) -> int | None:
        """Bytes of the image named `sha`, None when the store does not have it."""
        ...

    def files(self) -> Iterator[StoredFile]:
        """Every image in the store, in no particular order."""
        ...

    def remove_if_unused_since(self, file: StoredFile, cutoff: float) -> bool:
        """Delete `file` unless a result stored since `cutoff` named it; True when deleted."""
        ...

    def describe(self) -> str:
        """Where the images are, for logs."""
        ...

    def __contains__(self, sha: object) -> bool: ...


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
        self._recent = RecentlyUsed()
        self._unsynced = False  # files written with sync=False since the last sync()

    def describe(self) -> str:
        return f"the folder {self.root}"

    def path(self, sha: str, kind: str) -> Path:
        return self.root / relative_key(sha, kind)

    def put(self, data: bytes, *, sync: bool = True) -> str:
        """Store `data` (JPEG or PNG) unless it is already there; returns its sha256.

        With ``sync=False`` the file is not flushed to disk here: call `sync()`
        before relying on it surviving a power cut (the ingest writer does, once
        per batch).
        """
        sha, kind = checked(data)
        if self._recent.fresh(sha):
            return sha  # stored, and marked used within the hour
        target = os.path.join(self._root, sha[:2], sha[2:4], f"{sha}.{kind}")
        try:
            os.utime(target)  # already stored: mark it as in use now (see the module docstring)
        except FileNotFoundError:
            self._write(target, data, sync)
        self._recent.mark(sha)
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
                        yield StoredFile(sha, entry.path, st.st_size, st.st_mtime)

    def remove_if_unused_since(self, file: StoredFile, cutoff: float) -> bool:
        """Delete `file` unless a result stored since `cutoff` (unix time) named it.

        Safe against a concurrent `put` of the same image: the file is moved
        aside first and its time checked again; a `put` that touched it before
        the move makes it stay, one that comes after finds no file and writes it anew.
        """
        path = Path(file.key)
        aside = path.with_name(f".prune-{path.name}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return False
        try:
            if os.stat(aside).st_mtime >= cutoff:
                try:
                    os.link(aside, path)  # back in place, unless a put wrote it anew meanwhile
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

    def size(self, sha: str) -> int | None:
        p = self.find(sha)
        try:
            return p.stat().st_size if p is not None else None
        except FileNotFoundError:
            return None

    def get(self, sha: str) -> StoredImage | None:
        """The image named `sha` with its media type, or None."""
        p = self.find(sha)
        if p is None:
            return None
        return StoredImage(sha, p.read_bytes(), MEDIA_TYPES[p.suffix[1:]])

    def __contains__(self, sha: object) -> bool:
        return isinstance(sha, str) and is_sha(sha) and self.find(sha) is not None
