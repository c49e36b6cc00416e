"""The hub's HTTP API as the retraining service uses it: reviewed results, images, models, rollouts.

Every call carries the admin bearer token; a refusal or an unreachable hub
is a `ServeError` that names the hub's own reason and its HTTP status.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any


class ServeError(RuntimeError):
    """A cycle cannot go on: the hub refused or cannot be reached, or an input is unusable.

    `status` is the hub's HTTP answer (0: the hub was not reached or not involved)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Hub:
    """The few hub API calls the retraining service makes, over urllib with a bearer token."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
                ) -> tuple[bytes, str]:
        """(body, content type) of the answer; ServeError naming the hub's own reason on failure."""
        url = path if path.startswith("http") else self.url + path
        req = urllib.request.Request(url, data=body, method=method,
                                     headers={"Authorization": f"Bearer {self.token}"})
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            try:
                detail = json.loads(detail).get("detail", detail)
            except (ValueError, AttributeError):
                pass
            hint = {401: "; check --token / KDFLEET_HUB_TOKEN", 403: "; the token needs the admin role"}
            raise ServeError(f"{method} {url}: {exc.code} {detail}{hint.get(exc.code, '')}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServeError(f"{method} {url}: cannot reach the hub ({exc}); check --hub") from None

    def get_json(self, path: str, **query: Any) -> Any:
        args = {k: v for k, v in query.items() if v is not None}
        sep = "&" if "?" in path else "?"
        body, _ = self.request("GET", path + (sep + urllib.parse.urlencode(args) if args else ""))
        return json.loads(body)

    def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        body, _ = self.request("POST", path, json.dumps(payload).encode(), "application/json")
        return json.loads(body)

    def reviewed(self, label: str, since: str | None) -> list[dict[str, Any]]:
        """Every result whose latest review is `label`, reviewed at or after `since`, across pages."""
        items, page = [], self.get_json("/api/training-data", label=label, since=since, limit=500)
        while True:
            items += page["items"]
            if not page.get("next"):
                return items
            page = self.get_json(page["next"])

    def upload(self, package: Path, notes: str) -> dict[str, Any]:
        """POST /api/models with the package as multipart field `package`; the registered model."""
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="notes"\r\n\r\n{notes}\r\n'.encode(),
            (f'--{boundary}\r\nContent-Disposition: form-data; name="package"; filename="{package.name}"\r\n'
             "Content-Type: application/x-tar\r\n\r\n").encode() + package.read_bytes() + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
        body, _ = self.request("POST", "/api/models", b"".join(parts), f"multipart/form-data; boundary={boundary}")
        return json.loads(body)
