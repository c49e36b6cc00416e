"""Mosquitto's password files, ACL and listener settings for a provisioned fleet.

The database is the source of truth (devices.mqtt_username and
mqtt_password_hash); these files are rendered from it in full on every
change, so they never drift. Passwords are hashed the way Mosquitto 2 reads
them (``$7$``: PBKDF2-HMAC-SHA512, the format `mosquitto_passwd` writes); a
device may publish only its own topics and read only its own model and
receipt topics, the hub's account reads every kdfleet topic and publishes
desired models and receipts. Mosquitto rereads the files on SIGHUP.

Client ids are bound to accounts, so that no client can knock another off
the broker or wipe its session by connecting under its id. Devices sign in
on listeners with ``use_username_as_clientid true``: the broker replaces
whatever id a device sends with its user name (``device@site``), which no
other account has. The hub's processes, several under one account, each
with its own id (and persistent session), sign in on a listener of their
own whose password file holds the hub's account only; their ids may not
contain '@', so none is ever a device's. `render_listener` writes both kinds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hub.services.devices import MqttAccount
from shared import topics

ITERATIONS = 1000
SALT_BYTES = 12  # what mosquitto_passwd uses
HEADER = "# Written by `kdfleet hub add-device` from the hub database; edits here are overwritten.\n"

DEVICE_WRITES = topics.UPSTREAM
DEVICE_READS = topics.DOWNSTREAM


def new_password() -> str:
    """A random password for a device (32 characters, URL-safe)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """``$7$<iterations>$<salt>$<hash>``, the PBKDF2-SHA512 form Mosquitto 2 checks."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """True when `password` matches a ``$7$`` hash (for tests and `check` commands)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def check_username(username: str) -> str:
    """Refuse user names the password file cannot hold (':' separates the hash) or ACLs mangle."""
    if not username or ":" in username or any(c.isspace() or c in "#+/" for c in username):
        raise ValueError(
            f"MQTT user name {username!r}: use no ':', '/', '#', '+' or white space"
        )
    return username


def render_passwords(accounts: Sequence[MqttAccount]) -> str:
    """The devices' password file (their listeners): no other account signs in there."""
    return HEADER + "".join(f"{check_username(a.username)}:{a.password_hash}\n" for a in accounts)


def render_hub_password(hub_user: str, hub_password: str) -> str:
    """The hub listener's password file: the hub's account alone."""
    if "@" in hub_user:
        raise ValueError(f"the hub's MQTT user name {hub_user!r} must not contain '@' (devices' names do)")
    return HEADER + f"{check_username(hub_user)}:{hash_password(hub_password)}\n"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A TLS listener's files, as the broker sees them."""

    cafile: str
    certfile: str
    keyfile: str
    require_certificate: bool = False  # clients must show a certificate the CA signed


def render_listener(
    port: int,
    *,
    role: Literal["devices", "hub"],
    password_file: str | Path,
    acl_file: str | Path,
    host: str = "",
    tls: TlsFiles | None = None,
) -> str:
    """One Mosquitto listener (with ``per_listener_settings true`` at the top of the file).

    ``devices``: the client id is the user name. ``hub``: `password_file` must be the one
    `render_hub_password` wrote, so that no device account signs in there.
    """
    lines = [f"listener {port}{f' {host}' if host else ''}"]
    if tls is not None:
        lines += [f"cafile {tls.cafile}", f"certfile {tls.certfile}", f"keyfile {tls.keyfile}",
                  f"require_certificate {str(tls.require_certificate).lower()}"]
    if role == "devices":
        lines.append("use_username_as_clientid true")
    lines += ["allow_anonymous false", f"password_file {password_file}", f"acl_file {acl_file}"]
    return "\n".join(lines) + "\n"


def render_acl(hub_user: str, accounts: Sequence[MqttAccount]) -> str:
    """Mosquitto ACL: the hub reads everything kdfleet and writes desired models and receipts;
    each device writes its own topics and reads its own desired model and receipts, nothing else."""
    out = [
        HEADER,
        f"user {check_username(hub_user)}",
        f"topic read {topics.ROOT}/#",
        *(f"topic write {topics.subscription(k)}" for k in topics.DOWNSTREAM),
        "",
    ]
    for a in accounts:
        out.append(f"user {check_username(a.username)}")
        out += [f"topic write {topics.topic(a.site, a.device, k)}" for k in DEVICE_WRITES]
        out += [f"topic read {topics.topic(a.site, a.device, k)}" for k in DEVICE_READS]
        out.append("")
    return "\n".join(out)


def render_bridge(
    name: str,
    address: str,
    *,
    site: str = "+",
    username: str | None = None,
    password: str | None = None,
    cafile: str | None = None,
) -> str:
    """A Mosquitto bridge from a site's broker to a central one, where the hub ingests.

    What devices send goes out, what the hub sends them (desired models, receipts) comes in,
    all at QoS 1 with a persistent bridge session, so each broker keeps what the other has
    not taken while the link is down. Receipts must come back through the bridge: without
    them every result stays in its station's spool.
    """
    lines = [
        f"connection {check_username(name)}",
        f"address {address}",
        "cleansession false",
        "restart_timeout 1 30",
    ]
    if username:
        lines += [f"remote_username {check_username(username)}", f"remote_clientid {username}"]
        if password:
            lines.append(f"remote_password {password}")
    if cafile:
        lines.append(f"bridge_cafile {cafile}")
    lines += [f"topic {topics.subscription(k, site=site)} out 1" for k in topics.UPSTREAM]
    lines += [f"topic {topics.subscription(k, site=site)} in 1" for k in topics.DOWNSTREAM]
    return "\n".join(lines) + "\n"


def render_bridge_acl(username: str, site: str) -> str:
    """The central broker's ACL for a site's bridge: the site's device topics in, the hub's out.

    For a listener of its own on the central broker (with its own password file), beside the
    listeners whose files the hub writes."""
    check_username(username)
    lines = [f"user {username}"]
    lines += [f"topic write {topics.subscription(k, site=site)}" for k in DEVICE_WRITES]
    lines += [f"topic read {topics.subscription(k, site=site)}" for k in DEVICE_READS]
    return "\n".join(lines) + "\n"


def write_atomically(path: str | Path, text: str, mode: int = 0o640, group: str = "") -> Path:
    """Replace `path` with `text` in one step (a reader sees the old file or the new one).

    `group`, when it exists on this machine, becomes the file's group: Mosquitto reads its
    files as its own user, to which the group gives read access.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        gid = _group_id(group)
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _group_id(group: str) -> int | None:
    if not group:
        return None
    try:
        import grp

        return grp.getgrnam(group).gr_gid
    except (ImportError, KeyError):
        return None  # no such group here (a broker on another machine): the mode still holds


def write_files(
    password_file: str | Path,
    hub_password_file: str | Path,
    acl_file: str | Path,
    hub_user: str,
    hub_password: str,
    accounts: Sequence[MqttAccount],
    group: str = "",
) -> None:
    """Write the devices' password file, the hub's, and the ACL for all of them."""
    write_atomically(password_file, render_passwords(accounts), group=group)
    write_atomically(hub_password_file, render_hub_password(hub_user, hub_password), group=group)
    write_atomically(acl_file, render_acl(hub_user, accounts), group=group)
