"""`kdfleet keys` and `kdfleet package`: signing keys, and signing, verifying, inspecting packages.

Exit codes: 0 done (or the package verifies), 1 the package or key is refused
(the reason is printed on stderr), 2 a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shared.package import (
    PackageError,
    is_signed,
    key_fingerprint,
    load_private_key,
    load_public_key,
    new_key,
    read_package,
    save_keypair,
    sign_package,
)


def _fail(what: str, reason: str) -> int:
    print(f"kdfleet {what}: {reason}", file=sys.stderr)
    return 1


def keys_main(argv: list[str]) -> int:
    """`kdfleet keys new OUT`: an Ed25519 key pair, OUT (mode 600) and OUT with the suffix .pub."""
    ap = argparse.ArgumentParser(prog="kdfleet keys", description="Signing keys for model packages.")
    sub = ap.add_subparsers(dest="command", required=True)
    new = sub.add_parser(
        "new", help="make a key pair: OUT (private, mode 600) and the public key beside it, OUT's suffix "
                    "replaced by .pub (keys/fleet.key -> keys/fleet.pub)",
        description="Make an Ed25519 key pair: the private key OUT (mode 600; it signs packages) and the public "
                    "key beside it with the suffix .pub in place of OUT's (keys/fleet.key -> keys/fleet.pub; "
                    "keys/fleet -> keys/fleet.pub): give it to the hub and the agents as a trusted key.")
    new.add_argument("out", type=Path, help="private key file to write, e.g. keys/fleet.key")
    args = ap.parse_args(argv)
    out: Path = args.out
    pub = out.with_suffix(".pub")
    existing = [str(p) for p in (out, pub) if p.exists()]
    if existing:
        return _fail("keys new", f"{', '.join(existing)} exists already; not overwriting a key "
                                 "(packages signed with it would stop verifying): choose another path")
    key = new_key()
    save_keypair(key, out)
    print(f"private key {out} (keep it secret; sign with `kdfleet package sign PKG --key {out}`)")
    print(f"public key  {pub} (give it to devices as a trusted key)")
    print(f"fingerprint {key_fingerprint(key.public_key())}")
    return 0


def package_main(argv: list[str]) -> int:
    """`kdfleet package sign|verify|inspect`."""
    ap = argparse.ArgumentParser(prog="kdfleet package", description="Sign, verify and inspect model packages.")
    sub = ap.add_subparsers(dest="command", required=True)
    sign = sub.add_parser("sign", help="sign PKG in place with a private key")
    sign.add_argument("package", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="private key file (`kdfleet keys new`)")
    verify = sub.add_parser("verify", help="check every member's sha256 and the signature; exit 0 or 1")
    verify.add_argument("package", type=Path)
    verify.add_argument("--trusted", type=Path, action="append", default=[],
                        help="a trusted public key (repeatable); without one, only integrity is checked")
    inspect = sub.add_parser("inspect", help="summarise the manifest")
    inspect.add_argument("package", type=Path)
    inspect.add_argument("--trusted", type=Path, action="append", default=[],
                         help="public keys to name the signer by")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    sign.set_defaults(handler=_sign)
    verify.set_defaults(handler=_verify)
    inspect.set_defaults(handler=_inspect)
    args = ap.parse_args(argv)
    return args.handler(args)


def _sign(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(args.key)
    except (OSError, ValueError) as exc:
        return _fail("package sign", f"cannot load the private key {args.key}: {exc}")
    try:
        sign_package(args.package, key)
    except (PackageError, OSError) as exc:
        return _fail("package sign", f"{exc}; refusing to sign it")
    print(f"signed {args.package} with key {key_fingerprint(key.public_key())}")
    return 0


def _load_trusted(paths: list[Path], what: str) -> list | int:
    keys = []
    for p in paths:
        try:
            keys.append(load_public_key(p))
        except (OSError, ValueError) as exc:
            return _fail(what, f"cannot load the trusted key {p}: {exc}")
    return keys


def _verify(args: argparse.Namespace) -> int:
    keys = _load_trusted(args.trusted, "package verify")
    if isinstance(keys, int):
        return keys
    try:
        package = read_package(args.package, trusted_keys=keys or None)
    except PackageError as exc:
        return _fail("package verify", f"REFUSED: {exc}")
    m = package.manifest
    how = f"signed by {package.signed_by}" if package.signed_by else "integrity only (no --trusted key given)"
    print(f"ok {args.package}: {m.model_id} {m.version}, {len(m.files)} members match, {how}")
    return 0


def summary(path: Path, trusted: list | None = None) -> dict[str, Any]:
    """What `package inspect` shows: the manifest's headline fields and who signed it."""
    package = read_package(path)
    m = package.manifest
    signer = "unsigned"
    if is_signed(path):
        signer = "signed (pass --trusted to name the signer)"
        if trusted:
            try:
                signer = f"signed by {read_package(path, trusted_keys=trusted).signed_by}"
            except PackageError:
                signer = "signed by none of the given trusted keys"
    return {
        "model_id": m.model_id, "version": m.version, "method": m.method, "backbone": m.backbone,
        "precision": m.precision, "classes": list(m.classes), "input_size": m.input_size,
        "metrics": m.metrics, "golden": len(m.golden), "created": m.created,
        "parent": m.parent, "size_bytes": path.stat().st_size, "signer": signer,
    }


def _inspect(args: argparse.Namespace) -> int:
    keys = _load_trusted(args.trusted, "package inspect")
    if isinstance(keys, int):
        return keys
    try:
        info = summary(args.package, keys)
    except PackageError as exc:
        return _fail("package inspect", str(exc))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    for key, value in info.items():
        if key == "metrics":
            continue
        if key == "classes":
            value = ", ".join(value)
        print(f"{key.replace('_', ' '):<11} {value}")
    print("\n".join(metrics_table(info["metrics"])))
    return 0


# the columns of the metrics table, in this order, with their headings; other figures follow as they are named
COLUMNS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "f1_max": "F1 max",
           "tpr_at_threshold": "defects caught", "fpr_at_threshold": "false alarms"}
RATES = ("tpr_at_threshold", "fpr_at_threshold")


def _figure(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    if value != value:   # NaN: the data could not tell
        return "-"
    if key in RATES:
        return f"{100 * value:.1f} %"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """The manifest's metrics as people read them: a row per class and the mean, a column per figure,
    then the single figures (latency, size, ...) and any group of them (drop vs FP32) on a line each."""
    rows = {c: m for c, m in (metrics.get("classes") or {}).items() if isinstance(m, dict)}
    if isinstance(metrics.get("mean"), dict):
        rows["mean"] = metrics["mean"]
    keys = list(dict.fromkeys(k for m in rows.values() for k, v in m.items() if not isinstance(v, dict)))
    keys = [k for k in COLUMNS if k in keys] + [k for k in keys if k not in COLUMNS]
    lines = ["metrics" if rows or metrics else "metrics     none"]
    if rows:
        table = [["class", *(COLUMNS.get(k, k.replace("_", " ")) for k in keys)]]
        table += [[name, *(_figure(k, m.get(k)) for k in keys)] for name, m in rows.items()]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  " + "  ".join(cells).rstrip())
    for key, value in metrics.items():
        if key in ("classes", "mean"):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{_name(k)} {_figure(k, v)}" for k, v in value.items())
        else:
            value = _figure(key, value) + {"_ms": " ms", "_mb": " MB"}.get(key[-3:], "")
        lines.append(f"  {_name(key)}: {value}")
    return lines


def _name(key: str) -> str:
    """latency_ms -> latency, image_auroc -> image AUROC, val_loss -> val loss."""
    return COLUMNS.get(key) or key.removesuffix("_ms").removesuffix("_mb").replace("_", " ")
