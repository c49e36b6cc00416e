"""Certificates for a site that has no PKI of its own: a CA, and what it signs.

`kdfleet hub make-certs DIR --host NAME ...` writes ``ca.crt`` and ``ca.key``
(kept to issue more) and ``broker.crt``/``broker.key`` for the broker's TLS
listeners, valid for every host name and address the stations and the hub use
to reach it. Agents, the hub and bridges trust ``ca.crt`` (their ``ca_file``).
`issue` also makes client certificates, for a broker with
``require_certificate true``. Existing files are kept, so running it again
changes nothing. ECDSA P-256 keys, SHA-256 signatures.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hub.mosquitto import write_atomically

CA_DAYS = 3650
CERT_DAYS = 825  # what browsers and most clients accept for a leaf certificate


@dataclass(frozen=True, slots=True)
class Pem:
    """A private key and its certificate, PEM-encoded."""

    key: bytes
    cert: bytes


def _key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem(key, cert) -> Pem:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return Pem(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM),
    )


def make_ca(name: str = "kdfleet site CA", days: int = CA_DAYS) -> Pem:
    """A self-signed CA that may sign leaf certificates only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem(key, cert)


def issue(ca: Pem, name: str, hosts: Sequence[str] = (), *, client: bool = False, days: int = CERT_DAYS) -> Pem:
    """A certificate signed by `ca`: for a server reachable as `hosts` (names or IP addresses),
    or, with `client`, for a client named `name`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not client and not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                              else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return _pem(key, builder.sign(ca_key, hashes.SHA256()))


def _san(host: str):  # type: ignore[no-untyped-def]
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_site_certs(folder: str | Path, hosts: Sequence[str], group: str = "") -> list[Path]:
    """The CA and the broker's certificate in `folder`, made where missing; returns the files written.

    Private keys are 0600, except the broker's: 0640 with `group` (the broker reads it as that
    group after dropping root).
    """
    folder = Path(folder)
    written: list[Path] = []
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    if ca_key.exists() and ca_crt.exists():
        ca = Pem(ca_key.read_bytes(), ca_crt.read_bytes())
    else:
        ca = make_ca()
        written += [write_atomically(ca_key, ca.key.decode(), mode=0o600),
                    write_atomically(ca_crt, ca.cert.decode(), mode=0o644)]
    key, crt = folder / "broker.key", folder / "broker.crt"
    if not (key.exists() and crt.exists()) or written:
        broker = issue(ca, hosts[0] if hosts else "broker", hosts)
        written += [write_atomically(key, broker.key.decode(), mode=0o640, group=group),
                    write_atomically(crt, broker.cert.decode(), mode=0o644)]
    return written
