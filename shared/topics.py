"""Every MQTT topic kdfleet uses, built and parsed in this one place.

Layout: ``kdfleet/v1/{site}/{device}/{kind}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "kdfleet/v1"

STATUS = "status"            # retained birth / last will
RESULT = "result"            # one inspection result, QoS 1
METRICS = "metrics"          # periodic health figures
MODEL_DESIRED = "model/desired"  # retained, written by the hub
MODEL_STATE = "model/state"  # update progress, from the agent
RECEIPT = "receipt"          # from the hub: the result ids it has stored, QoS 1

KINDS = (STATUS, RESULT, METRICS, MODEL_DESIRED, MODEL_STATE, RECEIPT)
UPSTREAM = (STATUS, RESULT, METRICS, MODEL_STATE)   # device -> hub
DOWNSTREAM = (MODEL_DESIRED, RECEIPT)               # hub -> device

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class TopicError(ValueError):
    """A topic or topic component that kdfleet does not accept."""


def check_name(value: str, what: str = "name") -> str:
    """Site and device names: 1-64 of letters, digits, '_', '.', '-' (no MQTT wildcards or '/')."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise TopicError(f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return value


def topic(site: str, device: str, kind: str) -> str:
    """The topic of `kind` for one device."""
    if kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r}; expected one of {KINDS}")
    return f"{ROOT}/{check_name(site, 'site')}/{check_name(device, 'device')}/{kind}"


def subscription(kind: str, site: str = "+", device: str = "+", shared_group: str | None = None) -> str:
    """A subscription filter for `kind` (wildcards by default); MQTT 5 shared group optional."""
    if kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r}; expected one of {KINDS}")
    if site != "+":
        check_name(site, "site")
    if device != "+":
        check_name(device, "device")
    base = f"{ROOT}/{site}/{device}/{kind}"
    return f"$share/{check_name(shared_group, 'group')}/{base}" if shared_group else base


@dataclass(frozen=True, slots=True)
class Address:
    site: str
    device: str
    kind: str


def parse(t: str) -> Address:
    """Split a concrete topic into (site, device, kind); raises TopicError for anything else."""
    prefix = ROOT + "/"
    if not t.startswith(prefix):
        raise TopicError(f"topic {t!r} is not under {ROOT}/")
    parts = t[len(prefix):].split("/", 2)
    if len(parts) != 3 or parts[2] not in KINDS:
        raise TopicError(f"topic {t!r} is not {ROOT}/<site>/<device>/<kind>")
    return Address(check_name(parts[0], "site"), check_name(parts[1], "device"), parts[2])
