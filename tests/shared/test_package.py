import io
import json
import tarfile

import pytest

from shared import package as pkg


def manifest(**over):
    m = dict(model_id="unified", version="1.0.0", method="stfpm", backbone="efficientnet-lite0",
             classes=["brick", "screw"], input_size=256, map_size=64, sigma=1.0,
             mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], precision="fp32",
             quantization=None, calibration={c: {"center": 1.0, "scale": 0.5, "threshold": 1.5}
                                              for c in ("brick", "screw")},
             metrics={"image_auroc": 0.97}, parent=None)
    m.update(over)
    return m


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"onnx-bytes" * 100)
    return p


def test_write_read_round_trip(tmp_path, model_file):
    golden = [pkg.GoldenImage("000.png", b"\x89PNGdata", "brick", 0.7)]
    out = pkg.write_package(tmp_path / "m.kdpkg", manifest(), model_file, golden)
    p = pkg.read_package(out)
    assert p.model == model_file.read_bytes()
    assert p.manifest.files["model.onnx"] == pkg.sha256(p.model)
    assert p.manifest.classes == ("brick", "screw") and p.manifest.calibration["screw"].threshold == 1.5
    assert p.manifest.resize == "letterbox" and p.manifest.class_input is None   # defaults of older packages
    assert p.golden == tuple(golden)
    assert p.signed_by is None


def test_signed_package_verifies_only_with_trusted_key(tmp_path, model_file):
    key, other = pkg.new_key(), pkg.new_key()
    out = pkg.write_package(tmp_path / "m.kdpkg", manifest(), model_file, key=key)
    p = pkg.read_package(out, trusted_keys=[other.public_key(), key.public_key()])
    assert p.signed_by == pkg.key_fingerprint(key.public_key())
    with pytest.raises(pkg.PackageError, match="does not match any trusted key"):
        pkg.read_package(out, trusted_keys=[other.public_key()])


def test_unsigned_package_refused_when_keys_required(tmp_path, model_file):
    out = pkg.write_package(tmp_path / "m.kdpkg", manifest(), model_file)
    with pytest.raises(pkg.PackageError, match="not signed"):
        pkg.read_package(out, trusted_keys=[pkg.new_key().public_key()])


def rewrite(path, change):
    with tarfile.open(path) as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar}
    change(members)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tampered_model_is_refused(tmp_path, model_file):
    out = pkg.write_package(tmp_path / "m.kdpkg", manifest(), model_file)
    rewrite(out, lambda m: m.__setitem__("model.onnx", m["model.onnx"] + b"evil"))
    with pytest.raises(pkg.PackageError, match="does not match its sha256"):
        pkg.read_package(out)


def test_tampered_manifest_breaks_signature(tmp_path, model_file):
    key = pkg.new_key()
    out = pkg.write_package(tmp_path / "m.kdpkg", manifest(), model_file, key=key)

    def lower_threshold(m):
        doc = json.loads(m["manifest.json"])
        doc["calibration"]["brick"]["threshold"] = 99.0
        m["manifest.json"] = json.dumps(doc).encode()

    rewrite(out, lower_threshold)
    with pytest.raises(pkg.PackageError, match="signature"):
        pkg.read_package(out, trusted_keys=[key.public_key()])


def test_truncated_and_extra_members_are_refused(tmp_path, model_file):
    out = pkg.write_package(tmp_path / "m.kdpkg", manifest(), model_file)
    data = out.read_bytes()
    (tmp_path / "cut.kdpkg").write_bytes(data[: data.index(b"onnx-bytes") + 50])  # cut inside the model
    with pytest.raises(pkg.PackageError):
        pkg.read_package(tmp_path / "cut.kdpkg")
    rewrite(out, lambda m: m.__setitem__("extra.bin", b"x"))
    with pytest.raises(pkg.PackageError, match="not listed"):
        pkg.read_package(out)


@pytest.mark.parametrize("over, reason", [
    ({"method": "magic"}, "unknown method"),
    ({"classes": []}, "non-empty"),
    ({"calibration": {"brick": {"center": 0, "scale": 1, "threshold": 1}}}, "no calibration"),
    ({"input_size": "256"}, "wrong type"),
    ({"classes": ["brick", "brick"]}, "twice"),
    ({"resize": "crop"}, "'resize' must be one of"),
    ({"std": [0.2]}, "one length"),
    ({"precision": "int3"}, "unknown precision"),
    ({"calibration": {c: {"center": 0, "scale": 1, "threshold": 1, "reference": {"mean": [[0.0]], "spread": [[0.0]]}}
                      for c in ("brick", "screw")}}, "malformed position reference"),
])
def test_invalid_manifest_is_refused(tmp_path, model_file, over, reason):
    with pytest.raises(pkg.PackageError, match=reason):
        pkg.write_package(tmp_path / "m.kdpkg", manifest(**over), model_file)


def test_keypair_files_round_trip(tmp_path):
    key = pkg.new_key()
    pub_path = pkg.save_keypair(key, tmp_path / "keys" / "signing.key")
    assert (tmp_path / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600
    loaded = pkg.load_private_key(tmp_path / "keys" / "signing.key")
    assert pkg.key_fingerprint(loaded.public_key()) == pkg.key_fingerprint(pkg.load_public_key(pub_path))
