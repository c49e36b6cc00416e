"""The content-addressed image store: names by sha256, stores once, refuses what is not an image."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hub.store import ImageStore, StoreError


def test_images_are_named_by_content_and_stored_once(tmp_path: Path, make_result) -> None:
    store = ImageStore(tmp_path)
    r = make_result("s", "d")
    sha = store.put(r.thumbnail)
    assert sha == hashlib.sha256(r.thumbnail).hexdigest()
    path = tmp_path / sha[:2] / sha[2:4] / f"{sha}.jpg"
    assert path.read_bytes() == r.thumbnail
    assert store.put(r.thumbnail) == sha
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [path.name]  # no leftovers

    png = store.put(r.heatmap)
    assert store.get(png).media_type == "image/png" and store.get(sha).media_type == "image/jpeg"
    assert png in store and "0" * 64 not in store and store.get("0" * 64) is None


def test_refuses_non_images_and_names_that_are_not_a_sha(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(StoreError, match="not a JPEG or PNG"):
        store.put(b"<svg onload=alert(1)>")
    with pytest.raises(StoreError, match="not a sha256"):
        store.path("../../etc/passwd", "jpg")
    assert not any(tmp_path.iterdir())


def test_storing_an_image_again_marks_it_used_and_sync_flushes_a_batch(
    tmp_path: Path, make_result
) -> None:
    import os
    import time

    store = ImageStore(tmp_path)
    r = make_result("s", "d", crops=3)
    shas = [store.put(c.jpeg, sync=False) for c in r.crops]
    store.sync()  # one flush for the batch
    assert all(store.get(s) is not None for s in shas)
    path = store.find(shas[0])
    os.utime(path, (1_000_000, 1_000_000))
    assert store.put(r.crops[0].jpeg) == shas[0]
    assert path.stat().st_mtime == 1_000_000, "marked used at most once an hour per process"
    assert ImageStore(tmp_path).put(r.crops[0].jpeg) == shas[0]  # another process, say
    assert path.stat().st_mtime > time.time() - 60
    assert sorted(f.sha for f in store.files()) == sorted(shas)
