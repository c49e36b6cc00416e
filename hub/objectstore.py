"""The image store in an S3-compatible bucket: the same content-addressed keys as the folder.

An image is the object ``<prefix>ab/cd/<sha>.jpg`` (or ``.png``), the path it
would have under the folder store, so a folder copied into a bucket as it is
(``aws s3 sync images/ s3://bucket/``) is a store the hub can use.

An object's write time is the last time the hub stored a result naming it:
`put` writes the bytes again when this process has not done so within
TOUCH_EVERY_S (an object cannot be touched; content addressing makes the
rewrite harmless). Retention lists the bucket and deletes what was not
written since its cutoff, asking for the object's time once more just before
the delete. An object store has no rename, so a result stored in the instant
between that look and the delete names an image that is gone (the dashboard
shows "image pruned"); only an image unused for `images_days` and sent again
at that very moment can meet this.

`put(..., sync=False)` hands the upload to a pool of threads (each with its
own connection) and returns at once; `sync()` waits for them and raises the
first failure, so a batch's images are all in the bucket before the
transaction naming them commits, as with the folder store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from hub.s3 import ObjectStoreError, S3Client
from hub.store import MEDIA_TYPES, RecentlyUsed, StoredFile, StoredImage, checked, is_sha, parse_key, relative_key

log = logging.getLogger(__name__)

PRESENT_TTL_S = 300.0  # how long "the bucket has this image" is believed without asking again
_PRESENT_MAX = 100_000


class ObjectImageStore:
    """Images in `client`'s bucket under `prefix` (e.g. ``"images/"``, or ``""``)."""

    def __init__(self, client: S3Client, prefix: str = "", *, uploads: int = 16) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.client = client
        self.prefix = prefix
        self._recent = RecentlyUsed()
        self._pool = ThreadPoolExecutor(max_workers=uploads, thread_name_prefix="hub-image-upload")
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        self._present: dict[str, tuple[str, float]] = {}  # sha -> (kind, monotonic time it was seen)

    def describe(self) -> str:
        return f"the bucket {self.client.bucket!r} at {self.client.endpoint}" + (
            f" (keys under {self.prefix})" if self.prefix else "")

    def key(self, sha: str, kind: str) -> str:
        return self.prefix + relative_key(sha, kind)

    # -- writing -------------------------------------------------------------------

    def put(self, data: bytes, *, sync: bool = True) -> str:
        sha, kind = checked(data)
        if self._recent.fresh(sha):
            return sha
        if sync:
            self._upload(sha, kind, data)
            return sha
        future = self._pool.submit(self._upload, sha, kind, data)
        with self._lock:
            self._pending.append(future)
        return sha

    def _upload(self, sha: str, kind: str, data: bytes) -> None:
        self.client.put(self.key(sha, kind), data, MEDIA_TYPES[kind], sha256_hex=sha)
        self._recent.mark(sha)
        self._seen(sha, kind)

    def sync(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        failure = None
        for future in pending:  # wait for every one, so none is left running into the next batch
            exc = future.exception()
            if exc is not None and failure is None:
                failure = exc
        if failure is not None:
            if isinstance(failure, OSError):
                raise failure
            raise ObjectStoreError(f"image upload failed: {failure}") from failure

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- reading -------------------------------------------------------------------

    def _seen(self, sha: str, kind: str) -> None:
        if len(self._present) >= _PRESENT_MAX:
            self._present.clear()
        self._present[sha] = (kind, time.monotonic())

    def _kinds(self, sha: str) -> list[str]:
        known = self._present.get(sha)
        first = [known[0]] if known else []
        return first + [k for k in MEDIA_TYPES if k not in first]

    def get(self, sha: str) -> StoredImage | None:
        if not is_sha(sha):
            return None
        for kind in self._kinds(sha):
            found = self.client.get(self.key(sha, kind))
            if found is not None:
                self._seen(sha, kind)
                return StoredImage(sha, found[0], MEDIA_TYPES[kind])
        self._present.pop(sha, None)
        return None

    def size(self, sha: str) -> int | None:
        if not is_sha(sha):
            return None
        for kind in self._kinds(sha):
            info = self.client.head(self.key(sha, kind))
            if info is not None:
                return info.size
        return None

    def __contains__(self, sha: object) -> bool:
        """Whether the bucket has the image; a yes is remembered for PRESENT_TTL_S (pages ask per image)."""
        if not isinstance(sha, str) or not is_sha(sha):
            return False
        known = self._present.get(sha)
        if known is not None and time.monotonic() - known[1] < PRESENT_TTL_S:
            return True
        for kind in self._kinds(sha):
            if self.client.head(self.key(sha, kind)) is not None:
                self._seen(sha, kind)
                return True
        self._present.pop(sha, None)
        return False

    # -- retention -----------------------------------------------------------------

    def files(self) -> Iterator[StoredFile]:
        for info in self.client.list(self.prefix):
            sha = parse_key(info.key[len(self.prefix):])
            if sha is not None and info.key == self.key(sha, info.key.rpartition(".")[2]):
                yield StoredFile(sha, info.key, info.size, info.modified)

    def remove_if_unused_since(self, file: StoredFile, cutoff: float) -> bool:
        info = self.client.head(file.key)
        if info is None or info.modified >= cutoff:
            return False
        self.client.delete(file.key)
        self._present.pop(file.sha, None)
        self._recent.forget(file.sha)
        return True
