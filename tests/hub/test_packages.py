"""Package hosting: verified uploads, downloads with Range, and a device updating from a live hub."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from agent.updater import Updater, UpdateError
from hub.db.session import Database
from hub.services import users
from shared import messages
from shared import package as pkg
from tests.package_factory import build_package, members, rewrite_member, truncate


@pytest.fixture(scope="module")
def signing_key() -> pkg.Ed25519PrivateKey:
    return pkg.new_key()


@pytest.fixture
def trusted_pub(tmp_path: Path, signing_key) -> Path:
    """The signing key's public half, as `kdfleet keys new` writes it."""
    pkg.save_keypair(signing_key, tmp_path / "keys" / "release.key")
    return tmp_path / "keys" / "release.pub"


@pytest.fixture
def app(make_app: Callable[..., Flask], trusted_pub: Path) -> Flask:
    """The hub as shipped: it takes packages signed by the release key."""
    return make_app(HUB_TRUSTED_KEYS=[str(trusted_pub)])


@pytest.fixture
def made(tmp_path: Path, unique: str, signing_key) -> dict[str, Path]:
    """A signed package with a model id unique to this test, and broken copies of it."""
    good = build_package(tmp_path / "good.kdpkg", model_id=f"darkness-{unique}", version="1.0.0", key=signing_key)
    return {
        "good": good,
        "unsigned": build_package(tmp_path / "unsigned.kdpkg", model_id=f"darkness-{unique}", version="1.1.0"),
        "unknown signer": build_package(tmp_path / "other.kdpkg", model_id=f"darkness-{unique}", version="1.2.0",
                                        key=pkg.new_key()),
        "same version": build_package(tmp_path / "same.kdpkg", model_id=f"darkness-{unique}", version="1.0.0",
                                      key=signing_key, golden_offset=0.001),
        "tampered": rewrite_member(good, tmp_path / "tampered.kdpkg", "golden/0.png", members(good)["golden/1.png"]),
        "truncated": truncate(good, tmp_path / "truncated.kdpkg", 0.5),
    }


@pytest.fixture
def tokens(hub_db: Database, unique: str) -> dict[str, str]:
    with hub_db.transaction() as session:
        return {role: users.create_token(session, f"{role}-{unique}", role)[1] for role in ("viewer", "admin")}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(client: FlaskClient, path: Path, token: str, url: str = "/api/models", **form: str):
    data = {"package": (io.BytesIO(path.read_bytes()), path.name), **form}
    return client.post(url, data=data, headers=bearer(token), content_type="multipart/form-data")


def test_upload_registers_from_the_manifest_and_serves_ranges(app: Flask, made, tokens, data_dir) -> None:
    client = app.test_client()
    good = made["good"]
    assert upload(client, good, tokens["viewer"]).status_code == 403
    created = upload(client, good, tokens["admin"], notes="first light")
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    sha, size = pkg.file_sha256(good), good.stat().st_size
    assert (body["version"], body["method"], body["precision"]) == ("1.0.0", "stfpm", "fp32")
    assert body["name"].startswith("darkness-") and body["classes"] == ["plate"] and body["notes"] == "first light"
    assert (body["sha256"], body["size_bytes"]) == (sha, size)
    assert body["url"] == f"/api/models/{body['id']}/package"
    assert (data_dir / "packages" / f"{sha}.kdpkg").read_bytes() == good.read_bytes()

    assert client.get(body["url"]).status_code == 401
    whole = client.get(body["url"], headers=bearer(tokens["viewer"]))
    assert whole.status_code == 200 and whole.data == good.read_bytes()
    assert whole.headers["X-Package-Sha256"] == sha and whole.headers["Accept-Ranges"] == "bytes"
    part = client.get(body["url"], headers=bearer(tokens["viewer"]) | {"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.data == good.read_bytes()[1000:]
    assert part.headers["Content-Range"] == f"bytes 1000-{size - 1}/{size}"
    past = client.get(body["url"], headers=bearer(tokens["viewer"]) | {"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["Content-Range"] == f"bytes */{size}"

    again = upload(client, good, tokens["admin"])
    assert again.status_code == 400 and "registered already" in again.get_json()["detail"]


@pytest.mark.parametrize("case, reason", [
    ("tampered", "golden/0.png does not match its sha256"),
    ("truncated", "not a readable package"),
])
def test_tampered_and_truncated_uploads_are_refused(app: Flask, made, tokens, data_dir, case, reason) -> None:
    client = app.test_client()
    refused = upload(client, made[case], tokens["admin"])
    assert refused.status_code == 400 and reason in refused.get_json()["detail"], refused.get_json()
    assert "the upload" in refused.get_json()["detail"]   # not the hub's temporary file name
    assert not (data_dir / "packages" / f"{pkg.file_sha256(made[case])}.kdpkg").exists()
    assert not list((data_dir / "packages").glob(".upload-*"))
    listed = client.get("/api/models", headers=bearer(tokens["viewer"])).get_json()["models"]
    assert pkg.file_sha256(made[case]) not in {m["sha256"] for m in listed}


def test_a_package_is_attached_to_its_json_registration_only_if_it_is_that_file(
        app: Flask, made, tokens, unique, tmp_path, signing_key) -> None:
    client = app.test_client()
    good = made["good"]
    entry = {"name": f"darkness-{unique}", "version": "1.0.0", "sha256": "ab" * 32,
             "size_bytes": good.stat().st_size, "url": "https://models.example/darkness.kdpkg"}
    wrong = client.post("/api/models", json=entry, headers=bearer(tokens["admin"])).get_json()
    assert client.get(f"/api/models/{wrong['id']}/package", headers=bearer(tokens["viewer"])).status_code == 404
    refused = client.post(f"/api/models/{wrong['id']}/package", data=good.read_bytes(),
                          headers=bearer(tokens["admin"]), content_type="application/octet-stream")
    assert refused.status_code == 400 and "is not the file registered" in refused.get_json()["detail"]
    empty = client.post(f"/api/models/{wrong['id']}/package", data=b"", headers=bearer(tokens["admin"]),
                        content_type="application/octet-stream")
    assert empty.status_code == 400 and "empty" in empty.get_json()["detail"]

    entry |= {"version": "1.0.0-b", "sha256": pkg.file_sha256(good)}
    other = client.post("/api/models", json=entry, headers=bearer(tokens["admin"])).get_json()
    mismatch = upload(client, good, tokens["admin"], url=f"/api/models/{other['id']}/package")
    assert mismatch.status_code == 400 and "upload it to its own entry" in mismatch.get_json()["detail"]

    assert client.post("/api/models/999999/package", data=good.read_bytes(), headers=bearer(tokens["admin"]),
                       content_type="application/octet-stream").status_code == 404

    hosted = build_package(tmp_path / "hosted.kdpkg", model_id=f"hosted-{unique}", version="2.0.0", key=signing_key)
    entry = {"name": f"hosted-{unique}", "version": "2.0.0", "sha256": pkg.file_sha256(hosted),
             "size_bytes": hosted.stat().st_size, "url": "https://models.example/hosted.kdpkg"}
    right = client.post("/api/models", json=entry, headers=bearer(tokens["admin"])).get_json()
    attached = upload(client, hosted, tokens["admin"], url=f"/api/models/{right['id']}/package")
    assert attached.status_code == 200, attached.get_json()
    assert attached.get_json()["url"] == f"/api/models/{right['id']}/package"
    assert client.get(attached.get_json()["url"], headers=bearer(tokens["viewer"])).data == hosted.read_bytes()


def test_hub_with_trusted_keys_accepts_only_packages_they_signed(app: Flask, made, tokens, data_dir) -> None:
    client = app.test_client()
    refused = upload(client, made["unsigned"], tokens["admin"])
    assert refused.status_code == 400 and "not signed" in refused.get_json()["detail"]
    stranger = upload(client, made["unknown signer"], tokens["admin"])
    assert stranger.status_code == 400 and "does not match any trusted key" in stranger.get_json()["detail"]
    for case in ("unsigned", "unknown signer"):
        assert not (data_dir / "packages" / f"{pkg.file_sha256(made[case])}.kdpkg").exists()
    assert upload(client, made["good"], tokens["admin"]).status_code == 201


def test_a_hub_that_trusts_no_key_takes_no_package_unless_told_to(
        make_app: Callable[..., Flask], made, tokens) -> None:
    """Secure by default: no trusted key, no upload (signed or not); allow_unsigned is the explicit way out."""
    client = make_app().test_client()
    for case in ("unsigned", "good"):
        refused = upload(client, made[case], tokens["admin"])
        detail = refused.get_json()["detail"]
        assert refused.status_code == 400 and "trusts no signing key" in detail and "trusted_keys" in detail
    loose = make_app(HUB_ALLOW_UNSIGNED=True).test_client()
    assert upload(loose, made["unsigned"], tokens["admin"]).status_code == 201


def test_a_refused_upload_leaves_no_file_in_the_packages_folder(app: Flask, made, tokens, data_dir) -> None:
    client = app.test_client()
    first = upload(client, made["good"], tokens["admin"]).get_json()
    before = sorted(p.name for p in (data_dir / "packages").iterdir())
    twin = upload(client, made["same version"], tokens["admin"])   # a valid package, its version taken
    assert twin.status_code == 400 and "registered already" in twin.get_json()["detail"]
    elsewhere = upload(client, made["same version"], tokens["admin"], url=f"/api/models/{first['id']}/package")
    assert elsewhere.status_code == 400 and "is not the file registered" in elsewhere.get_json()["detail"]
    assert sorted(p.name for p in (data_dir / "packages").iterdir()) == before
    assert not (data_dir / "packages" / f"{pkg.file_sha256(made['same version'])}.kdpkg").exists()


def test_a_device_updates_from_the_hub_resuming_a_partial_download(
        app: Flask, live_hub, made, tokens, tmp_path, signing_key) -> None:
    hub_url, seen = live_hub
    body = upload(app.test_client(), made["good"], tokens["admin"]).get_json()
    desired = messages.ModelDesired(model_id=body["name"], version=body["version"], url=body["url"],
                                    sha256=body["sha256"])
    models = tmp_path / "device-models"
    part = models / "downloads" / f"{body['sha256']}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(made["good"].read_bytes()[:7000])   # what an earlier, interrupted run left
    states: list[str] = []
    anonymous = Updater(models, [signing_key.public_key()], hub_url=hub_url, runtime="onnxruntime")
    with pytest.raises(UpdateError, match=r"401 .*check the agent's hub token"):
        anonymous.apply(desired)
    assert part.stat().st_size == 7000   # kept for the next try
    updater = Updater(models, [signing_key.public_key()], hub_url=hub_url, token=tokens["viewer"],
                      runtime="onnxruntime")
    updater.apply(desired, on_state=lambda s: states.append(s.state), size=body["size_bytes"])
    assert states == ["downloading", "verifying", "building", "testing", "active"]
    assert updater.current().path.read_bytes() == made["good"].read_bytes()
    assert seen[-1] == (body["url"], "bytes=7000-")


def test_the_registry_shows_a_package_s_metrics_and_lineage(app: Flask, tmp_path, unique, tokens, sign_in,
                                                           signing_key) -> None:
    metrics = {"mean": {"image_auroc": 0.971, "pixel_auroc": 0.952, "aupro": 0.8},
               "classes": {"plate": {"image_auroc": 0.971}}, "latency_ms": 3.2, "size_mb": 0.1,
               "drop_vs_fp32": {"image_auroc": 0.004, "pixel_auroc": 0.001, "aupro": 0.0}}
    path = build_package(tmp_path / "int8.kdpkg", model_id=f"lineage-{unique}", version="1.1.0", metrics=metrics,
                         parent="1.0.0", key=signing_key)
    body = upload(app.test_client(), path, tokens["admin"]).get_json()
    assert body["parent_version"] == "1.0.0"
    assert body["metrics"] == {"image_auroc": 0.971, "pixel_auroc": 0.952, "aupro": 0.8,
                               "classes": {"plate": 0.971}, "latency_ms": 3.2, "size_mb": 0.1,
                               "drop_vs_fp32": {"image_auroc": 0.004, "pixel_auroc": 0.001, "aupro": 0.0}}
    viewer, _ = sign_in("viewer")
    page = viewer.get("/models/").get_data(as_text=True)
    row = page[page.index(f"lineage-{unique}"):]
    row = row[:row.index("</tr>")]
    assert "0.971 / 0.952" in row and "-0.004" in row and "3.2 ms" in row and "1.0.0" in row
    assert 'title="plate 0.971"' in row


def test_trusted_keys_come_from_hub_toml_or_the_command_line(tmp_path, trusted_pub, db_url, hub_db) -> None:
    import subprocess
    import sys

    from hub.cli import build_parser, main, settings
    from shared.config import ConfigError
    from tests.conftest import free_port

    config = tmp_path / "hub.toml"
    config.write_text(f'db = "{db_url}"\ntrusted_keys = ["{trusted_pub}"]\n')
    from_file = settings(build_parser().parse_args(["serve", "--config", str(config)]))
    assert from_file.web_settings()["HUB_TRUSTED_KEYS"] == [str(trusted_pub)]
    assert len(from_file.load_trusted_keys()) == 1
    flag = settings(build_parser().parse_args(["serve", "--config", str(config), "--trusted-key", "missing.pub"]))
    assert flag.trusted_keys == ["missing.pub"]
    with pytest.raises(ConfigError, match=r"trusted_keys: cannot load missing\.pub"):
        flag.load_trusted_keys()
    assert main(["serve", "--config", str(config), "--trusted-key", str(tmp_path / "missing.pub")]) == 2
    with pytest.raises(ConfigError, match="allow_unsigned = true cannot go with trusted_keys"):
        settings(build_parser().parse_args(["serve", "--config", str(config), "--allow-unsigned"]))

    # the start-up log says which packages the hub takes
    hub = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--db", db_url, "--allow-unsigned",
                            "--port", str(free_port()), "--broker", "mqtt://127.0.0.1:1", "--data-dir",
                            str(tmp_path / "data")], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in hub.stderr:
            lines.append(line)
            if "dashboard on" in line:
                break
        assert any("allow_unsigned = true: UNSIGNED package uploads are accepted" in x for x in lines), lines
    finally:
        hub.terminate()
        hub.wait(20)


def test_a_model_page_shows_its_metrics_lineage_versions_and_the_devices_running_it(
        app: Flask, tmp_path, unique, tokens, sign_in, signing_key, hub_db, store, make_result) -> None:
    import re
    import time
    from datetime import UTC, datetime

    from hub.services.writes import BatchWriter, Envelope

    def evaluated(tpr: float) -> dict:
        figures = {"image_auroc": 0.93, "pixel_auroc": 0.9, "aupro": 0.7, "f1_max": 0.88,
                   "fpr_at_threshold": 0.0625, "tpr_at_threshold": tpr}
        return {"mean": figures, "classes": {"plate": {**figures, "reference_used": True}}, "latency_ms": 3.2,
                "size_mb": 0.1}

    name = f"page-{unique}"
    client = app.test_client()
    first = upload(client, build_package(tmp_path / "a.kdpkg", model_id=name, version="1.0.0",
                                         metrics=evaluated(0.75), key=signing_key), tokens["admin"]).get_json()
    second = upload(client, build_package(tmp_path / "b.kdpkg", model_id=name, version="1.1.0", parent="1.0.0",
                                          metrics=evaluated(0.875), key=signing_key), tokens["admin"]).get_json()
    site = f"models-{unique}"
    status = messages.Status(device="cam-m", online=True, ts=time.time(), station="press", model_id=name,
                             model_version="1.0.0", runtime="onnxruntime")
    BatchWriter(hub_db, store).write([Envelope(site, "cam-m", status, datetime.now(UTC))])

    viewer, _ = sign_in("viewer")
    listing = viewer.get("/models/").get_data(as_text=True)
    assert f'<a href="/models/{first["id"]}">{name}</a>' in listing   # the name leads to its page

    page = viewer.get(f"/models/{first['id']}").get_data(as_text=True)
    plate = re.search(r"<tr><td>plate</td>(.*?)</tr>", page, re.DOTALL).group(1)
    assert re.findall(r'<td class="n">([^<]+)</td>', plate) == ["0.930", "0.900", "0.700", "0.880", "75.0 %", "6.2 %"]
    assert f'href="/api/models/{first["id"]}/package">download</a>' in page
    assert f"signed by {pkg.key_fingerprint(signing_key.public_key())}" in page
    lineage = re.search(r'<ol class="lineage">(.*?)</ol>', page, re.DOTALL).group(1)
    assert "<strong>1.0.0</strong>" in lineage and f'<a href="/models/{second["id"]}">1.1.0</a>' in lineage
    running = page[page.index("Devices running it (1)"):page.index("Versions of")]
    assert f'href="/devices/{site}/cam-m">cam-m</a>' in running and "online" in running
    versions = page[page.index("Versions of"):]
    assert f'href="/models/{first["id"]}">1.0.0' in versions and f'href="/models/{second["id"]}">1.1.0' in versions
    assert f"kdfleet hub rollout start {first['id']} --site {site}" in page

    newer = viewer.get(f"/models/{second['id']}").get_data(as_text=True)
    lineage = re.search(r'<ol class="lineage">(.*?)</ol>', newer, re.DOTALL).group(1)
    assert f'<a href="/models/{first["id"]}">1.0.0</a>' in lineage and "<strong>1.1.0</strong>" in lineage
    assert "Devices running it (0)" in newer and "87.5 %" in newer
    assert viewer.get("/models/999999").status_code == 404
