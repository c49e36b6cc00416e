"""Over-the-air model updates: download, verify, self-test and install a package, or keep the old one.

Layout under ``models_dir``::

    downloads/<sha256>.part   a download in progress; resumed with an HTTP Range request
    <version>/package.kdpkg   an installed package
    current                   JSON pointer to the package to run
    last_good                 JSON pointer to the one that ran before it (what `rollback` returns to)

A package is installed only after its size, sha256, signature and golden
self-test pass. Files and pointers are written aside, fsync'd and renamed
into place (and the folder fsync'd), so after a power cut at any moment
``current`` names a complete, verified package: the old one or the new one.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import messages
from shared.manifest import Manifest
from shared.package import Package, PackageError, file_sha256, read_package
from shared.vocabulary import (MODEL_ACTIVE, MODEL_BUILDING, MODEL_DOWNLOADING, MODEL_FAILED, MODEL_ROLLED_BACK,
                               MODEL_TESTING, MODEL_VERIFYING)

log = logging.getLogger(__name__)

CHUNK = 1 << 16
GOLDEN_TOLERANCE = 0.05   # relative error allowed on golden scores unless the manifest sets golden_tolerance
MAX_PACKAGE = 4 << 30     # refuse anything larger before writing it to the device's disk
_VERSION = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,63}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")

BuildRuntime = Callable[[bytes, Manifest], Any]
OnState = Callable[[messages.ModelState], None]


class UpdateError(RuntimeError):
    """An update that did not install; the message says why, and the old model stays."""


@dataclass(frozen=True, slots=True)
class InstalledModel:
    """An installed package; `package` and `runtime` are set by `apply` (built and self-tested)."""

    model_id: str
    version: str
    sha256: str
    path: Path
    package: Package | None = None
    runtime: Any = None


class Updater:
    """Installs the packages the hub asks for into `models_dir`; one caller at a time.

    `trusted_keys`: packages must be signed by one of them. With none, every
    package is refused unless `allow_unsigned` (then integrity only: development
    and tests). `hub_url` resolves relative package URLs; `token` is sent
    as a bearer token. A broken download is retried `attempts` times, each
    resuming where the last stopped; the partial file also survives restarts.
    """

    def __init__(self, models_dir: str | Path, trusted_keys: Iterable[Ed25519PublicKey] = (), *,
                 device: str = "", hub_url: str = "", token: str | None = None, http_timeout: float = 30.0,
                 attempts: int = 3, retry_delay_s: float = 1.0, runtime: str = "auto",
                 allow_unsigned: bool = False) -> None:
        self.dir = Path(models_dir)
        self.trusted = list(trusted_keys)
        self.allow_unsigned = allow_unsigned
        self.device = device
        self.hub_url = hub_url
        self.token = token
        self.http_timeout = http_timeout
        self.attempts = max(1, attempts)
        self.retry_delay_s = retry_delay_s
        self.runtime = runtime

    # -- pointers ----------------------------------------------------------------

    def current(self) -> InstalledModel | None:
        """The package to run (falling back to `last_good` if `current` is unusable), or None."""
        return self._pointer("current") or self._pointer("last_good")

    def last_good(self) -> InstalledModel | None:
        return self._pointer("last_good")

    def rollback(self, on_state: OnState | None = None, rollout_id: str = "") -> InstalledModel:
        """Point `current` back at `last_good`; raises UpdateError when there is nothing to go back to."""
        target = self._pointer("last_good")
        if target is None:
            raise UpdateError(f"no last good model in {self.dir}; nothing to roll back to")
        was = self.current()
        self._write_pointer("current", target)
        if on_state:
            left = f" (left {was.model_id} {was.version})" if was is not None else ""
            on_state(self._state(MODEL_ROLLED_BACK, target.model_id, target.version, rollout_id,
                                 f"back on {target.model_id} {target.version}, the model that ran before{left}"))
        return target

    def read(self, path: str | Path) -> Package:
        """Read a package with this updater's trust: signed by a trusted key, or unsigned if allowed."""
        if not self.trusted and not self.allow_unsigned:
            raise UpdateError("this agent trusts no signing key, so it runs no package: set trusted_keys to the "
                              "site's public key (or allow_unsigned = true for development)")
        return read_package(path, trusted_keys=self.trusted or None)

    def is_current(self, desired: messages.ModelDesired) -> bool:
        now = self.current()
        return now is not None and (now.version, now.sha256) == (desired.version, desired.sha256.lower())

    # -- the update --------------------------------------------------------------

    def apply(self, desired: messages.ModelDesired, build_runtime: BuildRuntime | None = None,
              on_state: OnState | None = None, size: int | None = None) -> InstalledModel:
        """Download, verify, self-test and install `desired`; returns it with its runtime built.

        Reports downloading, verifying, building, testing, then active (or
        failed with the reason, raising UpdateError and keeping the old model).
        Already current: returns it at once (no runtime built), reporting active.
        `build_runtime(model_bytes, manifest)` defaults to agent.runtimes.open_runtime.
        """
        def report(state: str, reason: str = "") -> None:
            if on_state:
                on_state(self._state(state, desired.model_id, desired.version, desired.rollout_id, reason))

        if self.is_current(desired):
            report(MODEL_ACTIVE)
            return self.current()  # type: ignore[return-value]
        part: Path | None = None
        try:
            report(MODEL_DOWNLOADING)
            part = self._download(desired, size)
            report(MODEL_VERIFYING)
            package = self._verify(desired, part)
            report(MODEL_BUILDING)
            runtime = (build_runtime or self._open_runtime)(package.model, package.manifest)
            report(MODEL_TESTING)
            self_test(runtime, package)
            installed = self._install(desired, part, package, runtime)
        except Exception as exc:  # every failure is reported; the old model stays current
            reason = str(exc) if isinstance(exc, UpdateError | PackageError) else f"{type(exc).__name__}: {exc}"
            log.warning("update to %s %s failed: %s", desired.model_id, desired.version, reason)
            if part is not None:   # complete and checked, yet refused: fetching it again cannot help
                part.unlink(missing_ok=True)
            report(MODEL_FAILED, reason)
            raise UpdateError(reason) from exc
        report(MODEL_ACTIVE)
        return installed

    def _open_runtime(self, model: bytes, manifest: Manifest) -> Any:
        from agent.runtimes import open_runtime

        return open_runtime(self.runtime, model, manifest)

    def _state(self, state: str, model_id: str, version: str, rollout_id: str, reason: str = "") -> messages.ModelState:
        return messages.ModelState(device=self.device, ts=time.time(), state=state, model_id=model_id,
                                   version=version, rollout_id=rollout_id, reason=reason[: messages.MAX_TEXT])

    def _download(self, desired: messages.ModelDesired, size: int | None) -> Path:
        sha = desired.sha256.lower()
        if not _VERSION.match(desired.version):
            raise UpdateError(f"version {desired.version!r} cannot name a folder; use letters, digits, . _ + -")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise UpdateError(f"desired sha256 {desired.sha256!r} is not 64 hex digits; fix the hub's registry entry")
        url = urllib.parse.urljoin(self.hub_url, desired.url)
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise UpdateError(f"package URL {url!r} is not http(s); set the hub URL for relative package URLs")
        part = self.dir / "downloads" / f"{sha}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        last: Exception | None = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.retry_delay_s * attempt)
            try:
                total = self._fetch(url, part)
                break
            except UpdateError:
                raise
            except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
                last = exc
                log.info("download of %s interrupted at %d bytes (%s); resuming", url, _size(part), exc)
        else:
            raise UpdateError(f"download of {url} failed {self.attempts} times, last: {last}; "
                              f"{_size(part)} bytes are kept and the next attempt resumes from there")
        if size is not None and total != size:
            part.unlink()
            raise UpdateError(f"package is {total} bytes, the hub's registry says {size}; re-upload it")
        digest = file_sha256(part)
        if digest != sha:
            part.unlink()   # a corrupt partial must not be resumed
            raise UpdateError(f"downloaded package has sha256 {digest[:12]}..., expected {sha[:12]}... "
                              "(corrupted in transit or replaced on the hub); it was deleted")
        return part

    def _fetch(self, url: str, part: Path) -> int:
        """One request: append the rest of the file to `part`; returns the full size once complete."""
        have = _size(part)
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            resp = urllib.request.urlopen(req, timeout=self.http_timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                total = _total_of(exc.headers.get("Content-Range", ""))
                if total == have:
                    return have   # finished before an interruption, or by an earlier run
                part.unlink()     # larger than the file: not a prefix of it
                raise OSError(f"partial download is larger than the package ({total} bytes); restarting") from None
            retry = exc.code >= 500 or exc.code == 429
            err = f"the hub answered {exc.code} {exc.reason} for {url}"
            if retry:
                raise OSError(err) from None
            raise UpdateError(err + ("; check the agent's hub token" if exc.code in (401, 403) else "")) from None
        with resp:
            if resp.status == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:
                    raise UpdateError(f"{url}: range answer {resp.headers.get('Content-Range')!r} does not "
                                      f"start at byte {have}")
                total, mode = int(m.group(3)), "ab"
            else:   # 200: the whole file (the server ignored the range)
                total, mode, have = int(resp.headers.get("Content-Length") or -1), "wb", 0
            if total > MAX_PACKAGE:
                raise UpdateError(f"package of {total} bytes is over the {MAX_PACKAGE} byte limit")
            with open(part, mode) as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        got = _size(part)
        if total >= 0 and got != total:
            raise http.client.IncompleteRead(b"", total - got)
        return got

    def _verify(self, desired: messages.ModelDesired, part: Path) -> Package:
        try:
            package = self.read(part)
        except PackageError as exc:   # the reason names the package, not the agent's download file
            raise UpdateError(str(exc).replace(str(part), f"package {desired.model_id} {desired.version}")) from None
        m = package.manifest
        if (m.model_id, m.version) != (desired.model_id, desired.version):
            raise UpdateError(f"package is {m.model_id} {m.version}, the hub asked for "
                              f"{desired.model_id} {desired.version}; fix the registry entry")
        return package

    def _install(self, desired: messages.ModelDesired, part: Path, package: Package, runtime: Any) -> InstalledModel:
        sha = desired.sha256.lower()
        folder = self.dir / desired.version
        target = folder / "package.kdpkg"
        previous = self.current()
        for name in ("current", "last_good"):
            held = self._pointer(name)
            if held and held.version == desired.version and held.sha256 != sha:
                raise UpdateError(f"version {desired.version} is installed with other contents "
                                  f"(it is {name}); publish the new package under a new version")
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)      # same file system: atomic; the part was fsync'd when written
        _fsync_dir(folder)
        _fsync_dir(part.parent)
        installed = InstalledModel(desired.model_id, desired.version, sha, target, package, runtime)
        if previous is not None and previous.version != desired.version:
            self._write_pointer("last_good", previous)
        self._write_pointer("current", installed)
        self._prune()
        return installed

    def _prune(self) -> None:
        """Remove installed versions no pointer names."""
        keep = {p.version for p in (self._pointer("current"), self._pointer("last_good")) if p}
        for entry in self.dir.iterdir():
            if entry.is_dir() and entry.name not in keep and (entry / "package.kdpkg").exists():
                shutil.rmtree(entry, ignore_errors=True)

    def _pointer(self, name: str) -> InstalledModel | None:
        try:
            d = json.loads((self.dir / name).read_text())
            path = self.dir / d["version"] / "package.kdpkg"
            if not _VERSION.match(d["version"]) or not path.is_file():
                return None
            return InstalledModel(d["model_id"], d["version"], d["sha256"], path)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_pointer(self, name: str, model: InstalledModel) -> None:
        body = json.dumps({"model_id": model.model_id, "version": model.version, "sha256": model.sha256})
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        _fsync_dir(self.dir)


def self_test(runtime: Any, package: Package) -> float:
    """Score every golden image; raises UpdateError unless each is within tolerance. Returns the worst error."""
    from shared.imaging import decode_image
    from shared.scoring import package_score

    if not package.golden:
        raise UpdateError("package has no golden images, so it cannot be self-tested; re-export it")
    tol = package.manifest.golden_tolerance or GOLDEN_TOLERANCE
    worst = 0.0
    for g in package.golden:
        score = package_score(runtime.infer(decode_image(g.png)[None], [g.cls])[0], package.manifest, g.cls)
        error = abs(score - g.score) / max(abs(g.score), 1e-3)
        worst = max(worst, error)
        if not error <= tol:   # also catches NaN
            raise UpdateError(f"self-test failed: golden image {g.name} ({g.cls}) scores {score:.5g} here, the "
                              f"package records {g.score:.5g} (error {error:.1%} > {tol:.0%}): the package's "
                              "network does not produce the scores it was exported with (a wrong or damaged "
                              "model, or golden scores from another model); the old model keeps running. "
                              "Export the package again from its checkpoint and check it with "
                              "`kdfleet agent check --package`")
    return worst


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _total_of(content_range: str) -> int:
    m = re.match(r"^bytes \*/(\d+)$", content_range)
    return int(m.group(1)) if m else -1


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
