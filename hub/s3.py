"""A small client for S3-compatible object stores (AWS S3, MinIO, SeaweedFS, Ceph RGW).

Only what the image store needs: put, get, head, delete and list objects in
one bucket, path-style (``https://endpoint/bucket/key``), every request signed
with AWS Signature Version 4. Each thread keeps its own keep-alive connection,
so uploads can run in parallel without a connection pool.

Every failure is an `ObjectStoreError`, an OSError: the store unreachable, a
5xx answer, refused credentials, a missing bucket. Callers treat it as an
outage an operator can end (ingest waits and retries), never as bad input.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
TIMEOUT_S = 10.0  # connect and each read
LIST_PAGE = 1000  # keys per ListObjectsV2 answer (the S3 maximum)
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class ObjectStoreError(OSError):
    """The object store could not do what was asked (unreachable, refused, failing)."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # never in a log
        return f"Credentials(access_key={self.access_key!r}, secret_key=***)"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # unix time the object was last written


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class S3Client:
    """One bucket of an S3-compatible store at `endpoint` (``http://host:port`` or ``https://...``)."""

    def __init__(self, endpoint: str, bucket: str, credentials: Credentials, *, region: str = "us-east-1",
                 ca_file: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"object store endpoint {endpoint!r} is not http://host[:port] or https://host[:port]")
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.region = region
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        default_port = parts.port is None or parts.port == (443 if self._https else 80)
        self._host_header = self._host if default_port else f"{self._host}:{self._port}"
        self._base_path = parts.path.rstrip("/")
        self._credentials = credentials
        self._ssl = ssl.create_default_context(cafile=ca_file) if self._https else None
        self._timeout = timeout_s
        self._local = threading.local()
        self._keys: dict[str, bytes] = {}  # date -> signing key

    # -- objects -------------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str, sha256_hex: str | None = None) -> None:
        """Write `data` under `key` (replacing what is there). `sha256_hex`: the data's sha256, when known."""
        payload_sha = sha256_hex or hashlib.sha256(data).hexdigest()
        self._expect(self._request("PUT", key, body=data, payload_sha=payload_sha,
                                   headers={"content-type": content_type}), 200, f"store {key}")

    def get(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of `key`, or None when there is no such object."""
        r = self._request("GET", key)
        if r.status == 404:
            return None
        self._expect(r, 200, f"read {key}")
        return r.body, r.headers.get("content-type", "application/octet-stream")

    def head(self, key: str) -> ObjectInfo | None:
        """Size and write time of `key`, or None when there is no such object."""
        r = self._request("HEAD", key)
        if r.status == 404:
            return None
        self._expect(r, 200, f"look up {key}")
        modified = parsedate_to_datetime(r.headers["last-modified"]).timestamp()
        return ObjectInfo(key, int(r.headers.get("content-length", 0)), modified)

    def delete(self, key: str) -> None:
        self._expect(self._request("DELETE", key), (200, 204), f"delete {key}")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order."""
        token = None
        while True:
            query = {"list-type": "2", "max-keys": str(LIST_PAGE), "prefix": prefix}
            if token:
                query["continuation-token"] = token
            r = self._request("GET", None, query=query)
            self._expect(r, 200, f"list {prefix or 'the bucket'}")
            root = ET.fromstring(r.body)
            for item in root.iter(f"{_NS}Contents"):
                modified = datetime.fromisoformat(item.findtext(f"{_NS}LastModified", "").replace("Z", "+00:00"))
                yield ObjectInfo(item.findtext(f"{_NS}Key", ""), int(item.findtext(f"{_NS}Size", "0")),
                                 modified.timestamp())
            token = root.findtext(f"{_NS}NextContinuationToken")
            if root.findtext(f"{_NS}IsTruncated") != "true" or not token:
                return

    # -- the bucket ----------------------------------------------------------------

    def bucket_exists(self) -> bool:
        r = self._request("HEAD", None)
        if r.status == 404:
            return False
        self._expect(r, 200, "look up the bucket")
        return True

    def create_bucket(self) -> None:
        body = b""
        if self.region != "us-east-1":
            body = (f'<CreateBucketConfiguration xmlns="{_NS[1:-1]}"><LocationConstraint>{self.region}'
                    "</LocationConstraint></CreateBucketConfiguration>").encode()
        r = self._request("PUT", None, body=body)
        if r.status == 409 and _code(r.body) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return
        self._expect(r, 200, "create the bucket")

    # -- HTTP and signing ----------------------------------------------------------

    def _expect(self, r: _Response, ok: int | tuple[int, ...], what: str) -> None:
        if r.status in ((ok,) if isinstance(ok, int) else ok):
            return
        code = _code(r.body)
        hint = {
            403: "check the access key and secret (images.credentials_file or AWS_ACCESS_KEY_ID / "
                 "AWS_SECRET_ACCESS_KEY) and the account's rights on the bucket",
            404: f"create the bucket {self.bucket!r} (or set images.create_bucket = true)",
        }.get(r.status, "the store is failing; see its log")
        raise ObjectStoreError(f"object store {self.endpoint}/{self.bucket}: cannot {what}: HTTP {r.status}"
                               f"{' ' + code if code else ''}; {hint}", r.status, code)

    def _path(self, key: str | None) -> str:
        path = f"{self._base_path}/{quote(self.bucket, safe='')}"
        return path + "/" + quote(key, safe="/~") if key is not None else path

    def _request(self, method: str, key: str | None, *, body: bytes = b"", payload_sha: str | None = None,
                 query: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> _Response:
        path = self._path(key)
        canonical_query = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}"
                                   for k, v in sorted((query or {}).items()))
        signed = self._sign(method, path, canonical_query, payload_sha or
                            (EMPTY_SHA256 if not body else hashlib.sha256(body).hexdigest()), headers or {})
        target = path + (f"?{canonical_query}" if canonical_query else "")
        if body or method == "PUT":
            signed["content-length"] = str(len(body))
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more on a new one
            try:
                conn = self._connection(fresh=attempt > 0)
                conn.request(method, target, body=body or None, headers=signed)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self._drop()
                return _Response(resp.status, resp.headers, data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._drop()
                if attempt:
                    raise ObjectStoreError(f"object store {self.endpoint}: connection lost ({exc})") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise ObjectStoreError(f"object store {self.endpoint} unreachable: {exc}") from None
        raise AssertionError("unreachable")

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _sign(self, method: str, path: str, query: str, payload_sha: str,
              extra: dict[str, str]) -> dict[str, str]:
        """The request's headers with an AWS Signature Version 4 Authorization header."""
        now = time.gmtime()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", now)
        day = amz_date[:8]
        headers = {"host": self._host_header, "x-amz-content-sha256": payload_sha, "x-amz-date": amz_date}
        headers |= {k.lower(): v.strip() for k, v in extra.items()}
        names = sorted(headers)
        canonical = "\n".join([method, path, query, "".join(f"{n}:{headers[n]}\n" for n in names),
                               ";".join(names), payload_sha])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self._credentials.access_key}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={signature}")
        return headers

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = ("AWS4" + self._credentials.secret_key).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {day: key}
        return key


def _code(body: bytes) -> str:
    """The <Code> of an S3 error document, or ''."""
    try:
        return ET.fromstring(body).findtext("Code") or ""
    except ET.ParseError:
        return ""
