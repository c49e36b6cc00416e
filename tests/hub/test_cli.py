"""The hub's command line: init-db, user creation, and errors that say what to do."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import select

from hub.cli import main
from hub.db.models import User
from hub.db.session import Database, current_revision, head_revision


def test_init_db_then_create_the_first_admin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'var' / 'hub.db'}"
    assert main(["create-admin", "alice", "--db", url, "--password-stdin"]) == 1
    assert "init-db" in capsys.readouterr().err

    assert main(["init-db", "--db", url]) == 0
    assert main(["init-db", "--db", url]) == 0  # repeatable
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert main(["create-admin", "alice", "--db", url, "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("another password\n"))
    assert main(["create-admin", "bob", "--db", url, "--password-stdin"]) == 1
    assert "an admin exists already" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("viewer password\n"))
    assert main(["add-user", "carol", "--db", url, "--password-stdin"]) == 0

    db = Database(url)
    try:
        assert current_revision(db) == head_revision()
        with db.session() as session:
            users = {u.username: u for u in session.scalars(select(User))}
    finally:
        db.dispose()
    assert {n: u.role for n, u in users.items()} == {"alice": "admin", "carol": "viewer"}
    assert "correct horse" not in users["alice"].password_hash


def test_configuration_errors_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hub.toml"
    config.write_text("[web]\nport = 8080\nprot = 1\n")
    assert main(["init-db", "--config", str(config)]) == 2
    assert "web.prot" in capsys.readouterr().err
    assert main(["serve", "--broker", "ftp://x", "--db", f"sqlite:///{tmp_path}/h.db"]) == 2
    assert "mqtt://" in capsys.readouterr().err
    config.write_text('[broker_tls]\nca_file = "ca.crt"\n[web]\ncert_file = "hub.crt"\nkey_file = "hub.key"\n')
    assert main(["serve", "--config", str(config), "--db", f"sqlite:///{tmp_path}/h.db"]) == 2
    assert "ca_file set, but the broker URL mqtt://127.0.0.1:1883 is plain MQTT" in capsys.readouterr().err
    config.write_text('[web]\ncert_file = "hub.crt"\n')
    assert main(["serve", "--config", str(config), "--db", f"sqlite:///{tmp_path}/h.db"]) == 2
    assert "web.cert_file and web.key_file go together" in capsys.readouterr().err


def test_add_token_prints_it_once_and_stores_its_hash(
    db_url: str, hub_db, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from hub.db.models import ApiToken

    assert main(["add-token", f"trainer-{unique}", "--role", "operator", "--db", db_url]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("kdf_") and len(token) > 40
    with hub_db.session() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == f"trainer-{unique}"))
    assert row.role == "operator" and token not in row.token_hash and row.prefix == token[:12]
    assert main(["add-token", f"trainer-{unique}", "--db", db_url]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["revoke-token", f"trainer-{unique}", "--db", db_url]) == 0
    assert main(["revoke-token", f"nobody-{unique}", "--db", db_url]) == 1
    assert "no API token" in capsys.readouterr().err


def test_export_training_writes_false_alarms_as_good_images(
    db_url: str, hub_db, tmp_path: Path, unique: str, make_result, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    from datetime import UTC, datetime

    from hub.services.writes import BatchWriter, Envelope
    from hub.services import reviews
    from hub.store import ImageStore

    site, cls = f"exp-{unique}", f"cap-{unique}"
    made = [make_result(site, "cam-e", seed=i, cls=cls) for i in range(3)]
    BatchWriter(hub_db, ImageStore(tmp_path / "images")).write(
        [Envelope(site, "cam-e", r, datetime.now(UTC)) for r in made]
    )
    with hub_db.transaction() as session:
        reviews.add_review(session, made[0].id, "false_alarm", "glare", user_id=None)
        reviews.add_review(session, made[1].id, "defect", "", user_id=None)
    out = tmp_path / "export"
    args = ["export-training", str(out), "--cls", cls, "--db", db_url, "--data-dir", str(tmp_path)]
    assert main(args) == 0
    assert "wrote 1 images" in capsys.readouterr().out
    image = out / cls / "train" / "good" / f"{made[0].id}.jpg"
    assert image.read_bytes() == made[0].thumbnail
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["result_id"] == made[0].id and record["note"] == "glare" and not record["full_frame"]
    assert main(args) == 0 and "wrote 0 images" in capsys.readouterr().out  # already there
    assert main([*args, "--label", "defect"]) == 0
    assert (out / cls / "test" / "reviewed_defect" / f"{made[1].id}.jpg").exists()


def test_make_certs_writes_a_ca_and_the_broker_s_certificate_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ssl

    from cryptography import x509

    out = tmp_path / "tls"
    assert main(["make-certs", str(out), "--host", "mosquitto", "--host", "10.0.0.5"]) == 0
    assert capsys.readouterr().out.count("wrote ") == 4
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {"ca.key": 0o600, "ca.crt": 0o644, "broker.key": 0o640, "broker.crt": 0o644}
    cert = x509.load_pem_x509_certificate((out / "broker.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mosquitto"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()))
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(out / "broker.crt", out / "broker.key")
    before = (out / "ca.key").read_bytes()
    assert main(["make-certs", str(out), "--host", "mosquitto"]) == 0
    assert "nothing changed" in capsys.readouterr().out and (out / "ca.key").read_bytes() == before


def test_bridge_config_is_what_the_operations_guide_shows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import re

    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    shown = re.search(r"```\n(connection central\n.*?)```", guide, re.S).group(1)
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["bridge-config", "central", "central.example:8885", "--site", "plant1",
                 "--username", "bridge-plant1", "--password-stdin",
                 "--cafile", "/etc/mosquitto/tls/central-ca.crt"]) == 0
    printed = capsys.readouterr().out
    assert printed.replace("remote_password s3cret", "remote_password ...") == shown
    assert main(["bridge-config", "central", "x:1", "--site", "plant1", "--acl"]) == 1
    assert "--acl needs --username" in capsys.readouterr().err


def test_help_names_the_command_as_the_readme_does(capsys) -> None:
    from kdfleet.cli import main as kdfleet

    with pytest.raises(SystemExit):
        kdfleet(["hub", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: kdfleet hub ") and "`kdfleet hub init-db`" in text
    with pytest.raises(SystemExit):
        kdfleet(["hub", "rollout", "--help"])
    assert capsys.readouterr().out.startswith("usage: kdfleet hub rollout ")


def test_check_reports_each_part_and_names_what_to_do(
    tmp_path: Path, broker: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import free_port

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    common = ["--db", url, "--data-dir", str(tmp_path / "data"), "--broker", f"mqtt://{broker[0]}:{broker[1]}"]
    assert main(["check", *common]) == 1
    out = capsys.readouterr().out
    assert "ok   config" in out
    assert f"FAIL database {tmp_path / 'hub.db'}: no such file: create it with `kdfleet hub init-db`" in out
    assert f"ok   image store {tmp_path / 'data' / 'images'}" in out
    assert "ok   packages: no trusted key is set" in out
    assert f"ok   broker mqtt://{broker[0]}:{broker[1]}" in out

    assert main(["init-db", "--db", url]) == 0
    capsys.readouterr()
    assert main(["check", *common]) == 0
    assert f"ok   database sqlite:///{tmp_path / 'hub.db'} at revision {head_revision()}" in capsys.readouterr().out

    missing_key = tmp_path / "fleet.pub"
    nobody = f"mqtt://127.0.0.1:{free_port()}"
    assert main(["check", *common[:4], "--broker", nobody, "--trusted-key", str(missing_key)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL trusted keys: trusted_keys: cannot load {missing_key}" in out
    assert f"FAIL broker {nobody}: " in out
    assert main(["check", "--db", url, "--broker", "ftp://x"]) == 1
    assert "FAIL config: " in capsys.readouterr().out
