"""`kdfleet keys` and `kdfleet package`, run for real on real packages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared import package as pkg
from kdfleet.cli import main as kdfleet
from tests.package_factory import build_package, members, rewrite_member, truncate


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_package(tmp_path_factory.mktemp("pkg") / "darkness.kdpkg", metrics={"image_auroc": 0.9875})


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """Two key pairs made through the CLI: (ours, someone else's) private key paths."""
    ours, theirs = tmp_path / "keys" / "ours.key", tmp_path / "keys" / "theirs.key"
    assert kdfleet(["keys", "new", str(ours)]) == 0
    assert kdfleet(["keys", "new", str(theirs)]) == 0
    return ours, theirs


def test_keys_new_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys) -> None:
    out = tmp_path / "signing.key"
    assert kdfleet(["keys", "new", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o600
    key = pkg.load_private_key(out)
    fingerprint = pkg.key_fingerprint(key.public_key())
    assert fingerprint in printed
    assert pkg.key_fingerprint(pkg.load_public_key(tmp_path / "signing.pub")) == fingerprint
    before = out.read_bytes()
    assert kdfleet(["keys", "new", str(out)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_sign_then_verify_with_the_trusted_key(tmp_path, unsigned, keys, capsys) -> None:
    ours, theirs = keys
    target = tmp_path / "m.kdpkg"
    target.write_bytes(unsigned.read_bytes())
    assert kdfleet(["package", "sign", str(target), "--key", str(ours)]) == 0
    capsys.readouterr()
    assert kdfleet(["package", "verify", str(target), "--trusted", str(theirs.with_suffix(".pub")),
                    "--trusted", str(ours.with_suffix(".pub"))]) == 0
    fingerprint = pkg.key_fingerprint(pkg.load_public_key(ours.with_suffix(".pub")))
    assert f"signed by {fingerprint}" in capsys.readouterr().out
    # the signed package still reads, bit for bit the same members besides the signature
    assert {k: v for k, v in members(target).items() if k != pkg.SIGNATURE} == members(unsigned)


@pytest.mark.parametrize("case, reason", [
    ("unsigned", "not signed"),
    ("wrong signer", "does not match any trusted key"),
    ("tampered model", "model.onnx does not match its sha256"),
    ("tampered golden", "golden/1.png does not match its sha256"),
    ("truncated", "not a readable package"),
])
def test_verify_refuses_with_a_clear_reason(tmp_path, unsigned, keys, capsys, case, reason) -> None:
    ours, theirs = keys
    signed = tmp_path / "signed.kdpkg"
    signed.write_bytes(unsigned.read_bytes())
    pkg.sign_package(signed, pkg.load_private_key(ours))
    target = {
        "unsigned": lambda: unsigned,
        "wrong signer": lambda: pkg.sign_package(signed, pkg.load_private_key(theirs)),
        "tampered model": lambda: rewrite_member(signed, tmp_path / "x.kdpkg", "model.onnx",
                                                 members(signed)["model.onnx"] + b"\0"),
        "tampered golden": lambda: rewrite_member(signed, tmp_path / "x.kdpkg", "golden/1.png",
                                                  members(signed)["golden/0.png"]),
        "truncated": lambda: truncate(signed, tmp_path / "x.kdpkg", 0.5),
    }[case]()
    capsys.readouterr()
    assert kdfleet(["package", "verify", str(target), "--trusted", str(ours.with_suffix(".pub"))]) == 1
    err = capsys.readouterr().err
    assert "REFUSED" in err and reason in err, err


def test_tampering_is_caught_even_without_a_trusted_key(tmp_path, unsigned, capsys) -> None:
    assert kdfleet(["package", "verify", str(unsigned)]) == 0
    assert "integrity only" in capsys.readouterr().out
    bad = rewrite_member(unsigned, tmp_path / "bad.kdpkg", "model.onnx", b"not a model")
    assert kdfleet(["package", "verify", str(bad)]) == 1
    assert "does not match its sha256" in capsys.readouterr().err


def test_sign_refuses_a_tampered_package(tmp_path, unsigned, keys, capsys) -> None:
    bad = rewrite_member(unsigned, tmp_path / "bad.kdpkg", "model.onnx", b"not a model")
    before = bad.read_bytes()
    assert kdfleet(["package", "sign", str(bad), "--key", str(keys[0])]) == 1
    assert "refusing to sign" in capsys.readouterr().err
    assert bad.read_bytes() == before


def test_inspect_summarises_the_manifest_and_names_the_signer(tmp_path, unsigned, keys, capsys) -> None:
    assert kdfleet(["package", "inspect", str(unsigned)]) == 0
    text = capsys.readouterr().out
    for expected in ("model id    darkness", "version     1.0.0", "method      stfpm", "precision   fp32",
                     "classes     plate", "image AUROC: 0.9875", "signer      unsigned"):
        assert expected in text, text
    signed = tmp_path / "signed.kdpkg"
    signed.write_bytes(unsigned.read_bytes())
    pkg.sign_package(signed, pkg.load_private_key(keys[0]))
    capsys.readouterr()
    assert kdfleet(["package", "inspect", str(signed), "--json",
                    "--trusted", str(keys[0].with_suffix(".pub"))]) == 0
    info = json.loads(capsys.readouterr().out)
    fingerprint = pkg.key_fingerprint(pkg.load_public_key(keys[0].with_suffix(".pub")))
    assert info["signer"] == f"signed by {fingerprint}"
    assert info["classes"] == ["plate"] and info["golden"] == 2 and info["size_bytes"] == signed.stat().st_size
    assert kdfleet(["package", "inspect", str(signed), "--trusted", str(keys[1].with_suffix(".pub"))]) == 0
    assert "signed by none of the given trusted keys" in capsys.readouterr().out


def test_inspect_prints_an_evaluated_package_s_metrics_as_a_table(tmp_path, capsys) -> None:
    """The metrics `kdfleet export` writes: a row per class and the mean, a column per figure."""
    figures = {"image_auroc": 0.9375, "pixel_auroc": float("nan"), "aupro": 0.71, "f1_max": 0.9,
               "fpr_at_threshold": 0.0625, "tpr_at_threshold": 0.875}
    metrics = {"mean": figures, "classes": {"plate": {**figures, "reference_used": True}}, "latency_ms": 3.2,
               "size_mb": 0.1, "runtime": "onnxruntime", "drop_vs_fp32": {"image_auroc": 0.004}}
    path = build_package(tmp_path / "evaluated.kdpkg", metrics=metrics)
    assert kdfleet(["package", "inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("metrics") + 1:]
    assert table[0].split() == ["class", "image", "AUROC", "pixel", "AUROC", "AUPRO", "F1", "max", "defects",
                                "caught", "false", "alarms", "reference", "used"]
    assert table[1].split() == ["plate", "0.9375", "-", "0.71", "0.9", "87.5", "%", "6.2", "%", "True"]
    assert table[2].split()[:2] == ["mean", "0.9375"]
    assert "  latency: 3.2 ms" in table and "  size: 0.1 MB" in table and "  runtime: onnxruntime" in table
    assert "  drop vs fp32: image AUROC 0.004" in table
    assert not any("{" in line for line in lines), "no raw dict"


def test_keys_new_help_names_the_public_key_file_it_writes(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        kdfleet(["keys", "new", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "OUT.pub" not in text and "keys/fleet.key -> keys/fleet.pub" in text
    assert kdfleet(["keys", "new", str(tmp_path / "fleet.key")]) == 0
    assert (tmp_path / "fleet.pub").exists() and not (tmp_path / "fleet.key.pub").exists()
    assert str(tmp_path / "fleet.pub") in capsys.readouterr().out
