"""Model package files the hub hosts for devices to download.

Uploads are streamed to a temporary file beside the store (hashed as they
arrive, size-capped), verified with `read_package`, and renamed to
``<root>/<sha256>.kdpkg`` only once the caller has registered them:
content-addressed, so a registered sha256 always names the same bytes, and a
refused or interrupted upload leaves nothing behind.

Packages must be signed by one of the trusted keys. A store with no trusted
key takes no package at all, unless `allow_unsigned` says otherwise (then it
checks integrity only: development and tests).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hub.store import is_sha
from shared.manifest import Manifest
from shared.package import SUFFIX, PackageError, read_package

CHUNK = 1 << 20
MAX_PACKAGE = 2 << 30  # bytes; larger uploads are refused while they stream in
NO_KEY = ("this hub trusts no signing key, so it takes no package: set trusted_keys in hub.toml "
          "(or --trusted-key) to the public key(s) your packages are signed with; "
          "allow_unsigned = true takes unsigned packages (development only)")


class UploadError(ValueError):
    """An uploaded file that is not a valid (or not a trusted) model package."""


@dataclass(frozen=True, slots=True)
class StoredPackage:
    sha256: str
    size_bytes: int
    path: Path
    manifest: Manifest
    signed_by: str | None


@dataclass(slots=True)
class StagedPackage:
    """A verified upload not yet in the store: `keep()` puts it there, else it is deleted."""

    package: StoredPackage
    target: Path
    kept: bool = field(default=False)

    def keep(self) -> StoredPackage:
        os.chmod(self.package.path, 0o644)
        os.replace(self.package.path, self.target)  # the same bytes under the same name if uploaded twice
        self.kept = True
        return StoredPackage(self.package.sha256, self.package.size_bytes, self.target, self.package.manifest,
                             self.package.signed_by)


class PackageStore:
    """Package files under `root`, named by their sha256."""

    def __init__(self, root: str | Path, trusted_keys: Iterable[Ed25519PublicKey] = (), *,
                 allow_unsigned: bool = False, max_bytes: int = MAX_PACKAGE) -> None:
        self.root = Path(root)
        self.trusted = list(trusted_keys)
        self.allow_unsigned = allow_unsigned
        self.max_bytes = max_bytes

    def path(self, sha: str) -> Path:
        if not is_sha(sha):
            raise UploadError(f"{sha!r} is not a sha256 (64 lower-case hex digits)")
        return self.root / f"{sha}{SUFFIX}"

    def find(self, sha: str) -> Path | None:
        """The hosted file with this sha256, or None."""
        p = self.path(sha)
        return p if p.is_file() else None

    @contextmanager
    def upload(self, stream: IO[bytes]) -> Iterator[StagedPackage]:
        """A verified upload, staged: call `keep()` on it once registered; otherwise nothing is left.

        Raises UploadError saying what is wrong with the file.
        """
        if not self.trusted and not self.allow_unsigned:
            raise UploadError(NO_KEY)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=SUFFIX, dir=self.root)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise UploadError(f"package is over the {self.max_bytes} byte limit")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if size == 0:
                raise UploadError("the upload is empty; send the .kdpkg file's bytes")
            try:
                package = read_package(tmp, trusted_keys=self.trusted or None)
            except PackageError as exc:
                raise UploadError(
                    f"refused: {str(exc).replace(tmp, 'the upload')}; check the file and upload it again"
                ) from None
            sha = digest.hexdigest()
            yield StagedPackage(StoredPackage(sha, size, Path(tmp), package.manifest, package.signed_by),
                                self.path(sha))
        finally:
            Path(tmp).unlink(missing_ok=True)
