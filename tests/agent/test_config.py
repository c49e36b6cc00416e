"""Agent config errors: each names the file and line (or variable), the key, and what to write."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from agent.config import load
from shared.config import ConfigError

GOOD = """\
device = "press-1"
site = "plant-a"
package = "models/stfpm.kdpkg"
threads = 2
trusted_keys = ["/etc/kdfleet/keys/fleet.pub"]

[spool]
path = "var/spool.db"

[[sources]]
uri = "frames/"
cls = "screw"

[[sources]]
uri = "rtsp://10.0.0.7/live"
cls = "washer"
fps = 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def error(path: Path | None, environ: dict[str, str] | None = None, **overrides) -> str:
    with pytest.raises(ConfigError) as exc:
        load(path, overrides or None, environ=environ or {})
    return str(exc.value)


def test_the_good_file_loads(tmp_path):
    cfg = load(write(tmp_path, GOOD), environ={})
    assert (cfg.device, cfg.threads, cfg.spool.path) == ("press-1", 2, "var/spool.db")
    assert [(s.uri, s.fps) for s in cfg.sources] == [("frames/", 0.0), ("rtsp://10.0.0.7/live", 10.0)]


@pytest.mark.parametrize("good, typo, expected", [
    ("threads = 2", "treads = 2", r"agent\.toml:4: treads: unknown key; did you mean threads\?"),
    ('path = "var/spool.db"', 'pth = "var/spool.db"',
     r"agent\.toml:8: spool\.pth: unknown key; did you mean spool\.path\?"),
    ("fps = 10", "fsp = 10", r"agent\.toml:17: sources\[1\]\.fsp: unknown key; did you mean sources\[1\]\.fps\?"),
])
def test_a_typo_names_file_line_key_and_the_key_meant(tmp_path, good, typo, expected):
    msg = error(write(tmp_path, GOOD.replace(good, typo)))
    assert re.search(expected, msg), msg


def test_an_unknown_key_with_no_near_match_lists_the_allowed_ones(tmp_path):
    msg = error(write(tmp_path, GOOD.replace('cls = "screw"', 'cls = "screw"\ncolour = "red"')))
    assert "sources[0].colour: unknown key; allowed here: cls, fps, loop, rejected, station, uri, watch" in msg


@pytest.mark.parametrize("good, bad, expected", [
    ("threads = 2", 'threads = "2"', "agent.toml:4: threads: expected an integer, got '2'"),
    ("fps = 10", 'fps = "fast"', "agent.toml:17: sources[1].fps: expected a number, got 'fast'"),
    ('path = "var/spool.db"', 'path = "var/spool.db"\nmax_results = 0',
     "agent.toml:9: spool.max_results = 0: must be >= 1"),
    ("threads = 2", "threads = -3", "agent.toml:4: threads = -3: must be >= 0 (0: one per core)"),
    ('site = "plant-a"', 'site = "plant/a"', "agent.toml:2: site: invalid site 'plant/a': use 1-64 letters"),
    ("threads = 2", 'threads = 2\nruntime = "cuda"',
     "runtime: 'cuda' is not one of 'auto', 'onnxruntime', 'openvino', 'tensorrt'"),
    ("threads = 2", 'threads = 2\nca_file = "ca.crt"', "ca_file set, but the broker URL mqtt://127.0.0.1:1883"),
    ("threads = 2", 'threads = 2\nbroker = "mqtts://b"\ncert_file = "c.crt"', "needs both cert_file and key_file"),
    ('path = "var/spool.db"', 'path = "var/spool.db"\n[delivery]\nreceipt_window = 10',
     "delivery.receipt_window = 10: must be window (64) to 100000"),
])
def test_a_wrong_type_or_range_names_the_key_and_what_is_allowed(tmp_path, good, bad, expected):
    assert expected in error(write(tmp_path, GOOD.replace(good, bad)))


def test_image_limits_default_to_a_jetson_s_budget_and_are_checked(tmp_path):
    cfg = load(write(tmp_path, GOOD), environ={})
    assert (cfg.image.max_pixels, cfg.image.max_bytes) == (50_000_000, 50 * 1024 * 1024)
    cfg = load(write(tmp_path, GOOD + "\n[image]\nmax_pixels = 20_000_000\nmax_bytes = 10_000_000\n"), environ={})
    assert (cfg.image.limits().max_pixels, cfg.image.limits().max_bytes) == (20_000_000, 10_000_000)
    text = GOOD + "\n[image]\nmax_pixels = 0\n"
    line = text.splitlines().index("max_pixels = 0") + 1
    assert f"agent.toml:{line}: image.max_pixels = 0: must be >= 1" in error(write(tmp_path, text))
    assert "image.max_pixel: unknown key; did you mean image.max_pixels?" in error(
        write(tmp_path, GOOD + "\n[image]\nmax_pixel = 10\n"))


def test_a_missing_required_key_is_named(tmp_path):
    assert "missing required key sources[0].cls" in error(write(tmp_path, GOOD.replace('cls = "screw"\n', "")))


def test_toml_syntax_error_names_the_line(tmp_path):
    msg = error(write(tmp_path, GOOD.replace("threads = 2", "threads = ")))
    assert "agent.toml" in msg and "line 4" in msg


def test_unreadable_files_say_why(tmp_path):
    assert "config file not found" in error(tmp_path / "nope.toml")
    assert "cannot read (Is a directory)" in error(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('station = "Pr\xfcfplatz"\n'.encode("latin-1"))
    assert "not UTF-8 text (bad byte at offset 13); save it as UTF-8" in error(latin1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission_says_so(tmp_path):
    path = write(tmp_path, GOOD)
    path.chmod(0)
    assert "cannot read (Permission denied)" in error(path)


# -- the environment ---------------------------------------------------------------------


def test_environment_overrides_the_file_and_explicit_flags_override_both(tmp_path):
    path = write(tmp_path, GOOD)
    env = {"KDFLEET_AGENT_DEVICE": "press-2", "KDFLEET_AGENT_THREADS": "1", "KDFLEET_AGENT_PASSWORD": "s3cret",
           "KDFLEET_AGENT_METRICS_INTERVAL_S": "2.5", "KDFLEET_AGENT_RUNTIME": "onnxruntime", "OTHER": "x"}
    cfg = load(path, environ=env)
    assert (cfg.device, cfg.threads, cfg.password, cfg.metrics_interval_s, cfg.runtime) == \
        ("press-2", 1, "s3cret", 2.5, "onnxruntime")
    assert cfg.broker_config().password == "s3cret"
    assert load(path, {"device": "press-3"}, environ=env).device == "press-3"


@pytest.mark.parametrize("var, value, expected", [
    ("KDFLEET_AGENT_THREADS", "two", "KDFLEET_AGENT_THREADS='two': expected an integer, e.g. 4"),
    ("KDFLEET_AGENT_METRICS_INTERVAL_S", "10s", "KDFLEET_AGENT_METRICS_INTERVAL_S='10s': expected a number"),
    ("KDFLEET_AGENT_RUNTIME", "cuda",
     "KDFLEET_AGENT_RUNTIME='cuda': must be one of auto, onnxruntime, openvino, tensorrt"),
    ("KDFLEET_AGENT_THREADS", "-1", "threads = -1: must be >= 0 (0: one per core) (set by KDFLEET_AGENT_THREADS)"),
    ("KDFLEET_AGENT_BATCHSIZE", "2",
     "KDFLEET_AGENT_BATCHSIZE: not an agent setting; did you mean KDFLEET_AGENT_BATCH_SIZE? (or unset it)"),
    ("KDFLEET_AGENT_SOURCES", "frames/",
     "KDFLEET_AGENT_SOURCES: sources is a table or list; set it in the TOML file, not the environment"),
])
def test_a_bad_environment_variable_is_named_with_the_fix(tmp_path, var, value, expected):
    assert expected in error(write(tmp_path, GOOD), {var: value})


def test_environment_is_read_when_loading_not_at_import(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("KDFLEET_AGENT_STATION", "line-7")
    assert load(path).station == "line-7"   # environ=None: the process environment, as the CLI runs


# -- the command line --------------------------------------------------------------------


def test_check_command_prints_the_error_and_fails(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("threads = 2", "treads = 2"))
    assert agent_main(["check", "--config", str(path)]) == 1
    assert f"FAIL config: {path}:4: treads: unknown key; did you mean threads?" in capsys.readouterr().out


def test_run_command_exits_2_with_the_error(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("fps = 10", "fps = -1"))
    assert agent_main(["run", "--config", str(path)]) == 2
    assert "fps = -1.0: must be >= 0" in capsys.readouterr().err


def test_each_agent_installs_updates_beside_its_own_spool_unless_told() -> None:
    base = {"device": "cam-1", "site": "plant1", "package": "m.kdpkg", "sources": [{"uri": "/images", "cls": "screw"}],
            "trusted_keys": ["/keys/fleet.pub"]}
    one = load(None, {**base, "spool": {"path": "/var/lib/kdfleet/cam-1.db"}})
    two = load(None, {**base, "spool": {"path": "/var/lib/kdfleet/cam-2.db"}})
    assert one.models_dir() == Path("/var/lib/kdfleet/cam-1-models") != two.models_dir()
    told = load(None, {**base, "update": {"models_dir": "/models"}})
    assert told.models_dir() == Path("/models")


def test_keepalive_reaches_the_broker_connection() -> None:
    base = {"device": "cam-1", "site": "plant1", "package": "m.kdpkg", "sources": [{"uri": "/images", "cls": "screw"}],
            "trusted_keys": ["/keys/fleet.pub"]}
    assert load(None, {**base, "keepalive_s": 10}).broker_config().keepalive == 10
    with pytest.raises(ConfigError, match="keepalive_s = 2: must be 5 to 65535 seconds"):
        load(None, {**base, "keepalive_s": 2})


def test_an_agent_that_trusts_no_key_is_refused_unless_unsigned_packages_are_allowed(tmp_path, capsys) -> None:
    """Secure by default: no trusted key and no allow_unsigned is a configuration error, named at start."""
    no_keys = GOOD.replace('trusted_keys = ["/etc/kdfleet/keys/fleet.pub"]\n', "")
    msg = error(write(tmp_path, no_keys))
    assert "trusted_keys: none given" in msg and "allow_unsigned = true" in msg and "--trusted-key" in msg
    assert load(write(tmp_path, no_keys), environ={"KDFLEET_AGENT_ALLOW_UNSIGNED": "true"}).allow_unsigned
    assert "expected true or false" in error(write(tmp_path, no_keys), {"KDFLEET_AGENT_ALLOW_UNSIGNED": "maybe"})
    both = error(write(tmp_path, GOOD.replace("threads = 2", "threads = 2\nallow_unsigned = true")))
    assert "allow_unsigned = true cannot go with trusted_keys" in both
    assert agent_main(["run", "--config", str(write(tmp_path, no_keys))]) == 2
    assert "trusted_keys: none given" in capsys.readouterr().err
