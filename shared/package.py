"""The model package (``.kdpkg``): one tar file that describes and proves itself.

Members: ``manifest.json`` (what the model is, how to feed it, how to score
it, per-class calibration, metrics, and the sha256 of every other member),
``model.onnx``, ``golden/*.png`` (self-test images with expected scores), and
optionally ``manifest.sig``, an Ed25519 signature over the manifest bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.manifest import BOOKKEEPING, PACKAGE_SCHEMA_VERSION, Manifest, ManifestError

SUFFIX = ".kdpkg"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL = "model.onnx"
MAX_MEMBER = 512 * 1024 * 1024


class PackageError(ValueError):
    """A model package that is malformed, tampered with, or not trusted."""


@dataclass(frozen=True, slots=True)
class GoldenImage:
    """A self-test image (PNG of the model's square input) and the image score it must give."""

    name: str
    png: bytes
    cls: str
    score: float


@dataclass(frozen=True, slots=True)
class Package:
    """A verified package loaded in memory."""

    manifest: Manifest
    model: bytes
    golden: tuple[GoldenImage, ...]
    signed_by: str | None   # fingerprint of the trusted key that signed it, if any

    @property
    def version(self) -> str:
        return self.manifest.version


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_package(out: str | Path, manifest: Manifest | dict[str, Any], model_path: str | Path,
                  golden: Iterable[GoldenImage] = (), key: Ed25519PrivateKey | None = None) -> Path:
    """Write a package; fills in schema_version, created, files and golden, signs when `key` is given."""
    out = Path(out)
    model = Path(model_path).read_bytes()
    members: dict[str, bytes] = {MODEL: model}
    golden_entries = []
    for g in golden:
        name = f"golden/{g.name}"
        members[name] = g.png
        golden_entries.append({"file": name, "cls": g.cls, "score": float(g.score)})
    m = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    m["schema_version"] = PACKAGE_SCHEMA_VERSION
    m.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    m["files"] = {name: sha256(data) for name, data in members.items()}
    m["golden"] = golden_entries
    try:
        Manifest.from_dict(m)
    except ManifestError as exc:
        raise PackageError(f"{out}: {exc}") from None
    manifest_bytes = json.dumps(m, indent=2, sort_keys=True).encode()
    members = {MANIFEST: manifest_bytes, **members}
    if key is not None:
        members[SIGNATURE] = key.sign(manifest_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _write_members(out, members)


def read_package(path: str | Path, trusted_keys: Iterable[Ed25519PublicKey] | None = None) -> Package:
    """Load and verify a package.

    Every member's sha256 must match the manifest and nothing unlisted may be
    present. With `trusted_keys`, the manifest must carry a valid signature by
    one of them; without, signatures are not checked (development use).
    """
    path = Path(path)
    try:
        members = _read_members(path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"{path}: not a readable package ({exc}); download it again") from None
    if MANIFEST not in members:
        raise PackageError(f"{path}: no {MANIFEST} inside; is this a {SUFFIX} file?")
    manifest_bytes = members.pop(MANIFEST)
    signature = members.pop(SIGNATURE, None)
    signed_by = None
    if trusted_keys is not None:
        signed_by = _verify_signature(path, manifest_bytes, signature, list(trusted_keys))
    try:
        manifest = Manifest.from_dict(json.loads(manifest_bytes))
    except ValueError as exc:   # not JSON, or a ManifestError
        raise PackageError(f"{path}: manifest is not valid ({exc}); re-export the package") from None
    for key in BOOKKEEPING:
        if key not in manifest.source:
            raise PackageError(f"{path}: manifest lacks {key!r}; re-export the package")
    listed = manifest.files
    extra = set(members) - set(listed)
    if extra:
        raise PackageError(f"{path}: members not listed in the manifest: {sorted(extra)}")
    if MODEL not in listed:
        raise PackageError(f"{path}: manifest does not list {MODEL}")
    for name, digest in listed.items():
        if name not in members:
            raise PackageError(f"{path}: {name} is listed but missing (truncated package?)")
        if sha256(members[name]) != digest:
            raise PackageError(f"{path}: {name} does not match its sha256 (corrupted or tampered)")
    try:
        golden = tuple(GoldenImage(Path(g["file"]).name, members[g["file"]], g["cls"], float(g["score"]))
                       for g in manifest.golden)
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{path}: a golden image entry is malformed ({exc!r}); re-export the package") from None
    return Package(manifest, members[MODEL], golden, signed_by)


def _read_members(path: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile() or info.name.startswith(("/", "..")) or ".." in Path(info.name).parts:
                raise PackageError(f"{path}: unexpected member {info.name!r}")
            if info.size > MAX_MEMBER:
                raise PackageError(f"{path}: member {info.name} is too large ({info.size} bytes)")
            if info.name in members:
                raise PackageError(f"{path}: duplicate member {info.name}")
            f = tar.extractfile(info)
            data = f.read() if f else b""
            if len(data) != info.size:
                raise PackageError(f"{path}: member {info.name} is truncated")
            members[info.name] = data
    return members


def _write_members(out: Path, members: dict[str, bytes]) -> Path:
    """The tar of `members` in their order, written aside and renamed over `out`: never half a package."""
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    return out


def _verify_signature(path: Path, manifest_bytes: bytes, signature: bytes | None,
                      keys: list[Ed25519PublicKey]) -> str:
    if signature is None:
        raise PackageError(f"{path}: package is not signed, and this device accepts only signed packages")
    for k in keys:
        try:
            k.verify(signature, manifest_bytes)
            return key_fingerprint(k)
        except InvalidSignature:
            continue
    raise PackageError(f"{path}: signature does not match any trusted key (tampered, or signed by an unknown key)")


# -- keys ---------------------------------------------------------------------

def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_keypair(key: Ed25519PrivateKey, private_path: str | Path) -> Path:
    """Write the private key (PEM, mode 600) and the public key beside it (``.pub``)."""
    private_path = Path(private_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.touch(mode=0o600)
    private_path.write_bytes(pem)
    pub = private_path.with_suffix(".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"{path}: not an Ed25519 public key")
    return key


def key_fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256(raw)[:16]


def sign_package(path: str | Path, key: Ed25519PrivateKey) -> Path:
    """Sign a package in place (replacing any earlier signature); returns its path.

    The package is verified first, so a tampered one is never blessed; the
    new file is written aside and renamed over the old one.
    """
    path = Path(path)
    read_package(path)
    members = _read_members(path)
    members.pop(SIGNATURE, None)
    members[SIGNATURE] = key.sign(members[MANIFEST])
    return _write_members(path, members)


def is_signed(path: str | Path) -> bool:
    """True when the package carries a signature (whether it verifies is read_package's job)."""
    with tarfile.open(path, "r:") as tar:
        return any(info.name == SIGNATURE for info in tar)
