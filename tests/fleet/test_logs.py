"""shared/logs.py: JSON lines with the `extra=` fields, the environment switch, and the hub's
long-running commands logging JSON for real."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.logs import setup_logging

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back afterwards (pytest's own included)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def test_json_lines_carry_device_and_result_ids(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging(True, "INFO", stream=stream, force=True)
    log = logging.getLogger("hub.ingest")
    log.info("stored %d results", 3, extra={"device": "cam-1", "site": "plant1", "result_id": "01JABC"})
    log.debug("not at INFO")
    try:
        raise ValueError("bad payload")
    except ValueError:
        log.exception("refused", extra={"device": "cam-2"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "stored 3 results" and first["level"] == "INFO" and first["logger"] == "hub.ingest"
    assert (first["device"], first["site"], first["result_id"]) == ("cam-1", "plant1", "01JABC")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["device"] == "cam-2" and "ValueError: bad payload" in second["exc"]
    assert "args" not in first and "levelno" not in first, "only the extra= fields are added"


def test_environment_switch_and_text_default(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging(None, "WARNING", stream=stream, environ={"KDFLEET_LOG_JSON": "1"}, force=True)
    logging.getLogger("agent").warning("spool %s full", "a", extra={"device": "cam-9"})
    assert json.loads(stream.getvalue())["device"] == "cam-9"

    text = io.StringIO()
    setup_logging(None, "INFO", stream=text, environ={}, force=True)  # a second call replaces the first
    logging.getLogger("agent").info("plain")
    assert text.getvalue().rstrip().endswith("INFO agent: plain")
    assert stream.getvalue().count("\n") == 1, "the first handler was replaced, not kept"
    with pytest.raises(ValueError, match="log level"):
        setup_logging(False, "LOUD", stream=text)


def test_hub_ingest_logs_json_lines(broker: tuple[str, int], tmp_path: Path, unique: str) -> None:
    """`hub ingest --log-json` (a long-running command) logs only JSON lines on stderr."""
    host, port = broker
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    subprocess.run([sys.executable, "-m", "hub", "init-db", "--db", db], cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "hub", "ingest", "--db", db, "--broker", f"mqtt://{host}:{port}",
                             "--data-dir", str(tmp_path / "hub"), "--client-id", f"logs-{unique}",
                             # a site nobody publishes to, no shared group: it takes no other test's results
                             "--site", f"logs-{unique}", "--shared-group", "", "--log-json"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[1]
    lines = [first, *rest.splitlines()]
    records = [json.loads(line) for line in lines if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert any(r["msg"].startswith("ingest stopped") for r in records), [r["msg"] for r in records]
