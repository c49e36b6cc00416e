"""Images in an S3 bucket: a real SeaweedFS (`weed server -s3`, signatures checked), the real ingest
over the real broker, retention deleting from the bucket, and the store going away for a while."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from hub.config import HubConfig, ImagesConfig
from hub.db.models import Crop, Result
from hub.db.session import Database
from hub.ingest import Ingest
from hub.services.writes import BatchWriter, Envelope
from hub.objectstore import ObjectImageStore
from hub.s3 import Credentials, ObjectStoreError, S3Client
from hub.services import retention, reviews
from hub.store import ImageStore, StoreError
from shared import messages, topics
from shared.config import BrokerConfig, ConfigError
from shared.mqtt import MqttLink


def _shas(r: messages.Result) -> list[str]:
    return [hashlib.sha256(d).hexdigest() for d in (r.heatmap, r.thumbnail, *(c.jpeg for c in r.crops))]


@pytest.fixture
def bucket(seaweedfs, unique: str) -> S3Client:
    return seaweedfs.bucket(f"img-{unique}")


def test_images_go_to_the_bucket_under_the_folder_store_s_keys_and_come_back(
        bucket: S3Client, tmp_path: Path, make_result) -> None:
    store = ObjectImageStore(bucket, "images")
    r = make_result("s", "d", crops=2, seed=3)
    sha = store.put(r.thumbnail)  # written at once
    later = [store.put(c.jpeg, sync=False) for c in r.crops] + [store.put(r.heatmap, sync=False)]
    store.sync()  # the parallel uploads, all done
    assert store.get(sha).data == r.thumbnail and store.get(sha).media_type == "image/jpeg"
    assert store.get(later[-1]).media_type == "image/png" and store.get(later[-1]).data == r.heatmap
    assert all(s in store for s in later) and "0" * 64 not in store and store.get("0" * 64) is None
    assert store.size(sha) == len(r.thumbnail)
    # the same key as the folder store's path: a folder copied into a bucket is a store
    folder = ImageStore(tmp_path)
    folder.put(r.thumbnail)
    assert {f.key for f in store.files()} >= {"images/" + str(folder.find(sha).relative_to(tmp_path))}
    assert sorted(f.sha for f in store.files()) == sorted({sha, *later})
    with pytest.raises(StoreError):
        store.put(b"<svg onload=alert(1)>")
    # another process (a second hub host) reads what this one stored
    other = ObjectImageStore(S3Client(bucket.endpoint, bucket.bucket, bucket._credentials), "images/")
    assert other.get(later[0]).data == r.crops[0].jpeg


def test_wrong_credentials_and_a_missing_bucket_are_named_at_start(seaweedfs, tmp_path: Path, unique: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    images = ImagesConfig(backend="s3", endpoint=seaweedfs.endpoint, bucket=f"none-{unique}",
                          credentials_file=str(seaweedfs.credentials_file(tmp_path / "creds")))
    with pytest.raises(ConfigError, match=f"no bucket 'none-{unique}'.*create_bucket"):
        HubConfig(images=images).open_images()
    store = HubConfig(images=_replace(images, create_bucket=True)).open_images()
    assert isinstance(store, ObjectImageStore) and store.client.bucket_exists()
    (tmp_path / "bad").write_text("[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n")
    with pytest.raises(ConfigError, match=r"403.*access key"):
        HubConfig(images=_replace(images, credentials_file=str(tmp_path / "bad"))).open_images()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        HubConfig(images=_replace(images, credentials_file="")).open_images()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.SECRET_KEY)
    assert HubConfig(images=_replace(images, credentials_file="", create_bucket=True)).open_images() is not None


def _replace(images: ImagesConfig, **changes: object) -> ImagesConfig:
    import dataclasses

    return dataclasses.replace(images, **changes)


def test_retention_deletes_from_the_bucket_and_keeps_reviewed_images(
        hub_db: Database, bucket: S3Client, unique: str, make_result) -> None:
    store = ObjectImageStore(bucket)
    site = f"s3ret-{unique}"
    made = {name: make_result(site, "cam", seed=seed, crops=2) for name, seed in (("kept", 81), ("gone", 82))}
    BatchWriter(hub_db, store).write([Envelope(site, "cam", r, datetime.now(UTC)) for r in made.values()])
    with hub_db.transaction() as session:
        reviews.add_review(session, made["kept"].id, "false_alarm", "glare", user_id=None)
    # a month on, nothing has named these images again
    later = datetime.now(UTC) + timedelta(days=31)
    dry = retention.prune(hub_db, store, retention.Policy(results_days=365, images_days=30), now=later,
                          dry_run=True)
    assert dry.images == 4 and all(bucket.head(store.key(s, k)) is not None
                                   for s, k in zip(_shas(made["gone"]), ("png", "jpg", "jpg", "jpg"), strict=True))
    report = retention.prune(hub_db, store, retention.Policy(results_days=365, images_days=30), now=later)
    assert report.images == 4 and report.image_bytes == sum(
        len(d) for d in (made["gone"].heatmap, made["gone"].thumbnail, *(c.jpeg for c in made["gone"].crops)))
    assert not any(s in ObjectImageStore(bucket) for s in _shas(made["gone"])), "still in the bucket"
    assert all(s in ObjectImageStore(bucket) for s in _shas(made["kept"])), "a reviewed result lost an image"
    assert {f.sha for f in store.files()} == set(_shas(made["kept"]))


def test_the_size_limit_deletes_the_least_recently_used_objects_first(
        hub_db: Database, bucket: S3Client, make_result) -> None:
    store = ObjectImageStore(bucket)
    old, new = make_result("s", "d", seed=91, crops=0), make_result("s", "d", seed=92, crops=0)
    for r in (old, new):
        store.put(r.thumbnail)
        store.put(r.heatmap)
        time.sleep(1.1)  # an object's time has whole seconds
    limit = len(new.thumbnail) + len(new.heatmap)
    later = datetime.now(UTC) + timedelta(hours=3)  # past the two hours the size limit spares
    report = retention.prune(hub_db, store, retention.Policy(results_days=0, images_days=0, images_max_bytes=limit),
                             now=later)
    assert report.images == 2
    assert {f.sha for f in store.files()} == set(_shas(new))


class Receipts:
    """Every receipt the hub sends to one device."""

    def __init__(self, broker: tuple[str, int], site: str, device: str, unique: str) -> None:
        self.got: list[messages.Receipt] = []
        self._lock = threading.Lock()
        self.link = MqttLink(BrokerConfig(*broker), f"receipts-{unique}", on_message=self._on,
                             subscriptions=[(topics.topic(site, device, topics.RECEIPT), 1)]).start()
        assert self.link.wait_connected(10) and self.link.subscribed.wait(10)

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.got.append(messages.decode(payload, expect=messages.Receipt))

    def ids(self) -> set[str]:
        with self._lock:
            return {i for r in self.got for i in r.ids}


@pytest.mark.parametrize("when_down", ["wait", "without_images"])
def test_while_the_store_is_down_no_result_is_stored_without_its_images_unless_the_settings_say_so(
        when_down: str, hub_db: Database, private_seaweedfs, broker: tuple[str, int], unique: str, publisher,
        make_result, wait_for: Callable[..., None]) -> None:
    bucket = private_seaweedfs.bucket(f"down-{unique}")
    store = ObjectImageStore(bucket)
    site = f"s3down-{unique}"
    ingest = Ingest(hub_db, store, BrokerConfig(*broker), client_id=f"hub-{unique}", site=site,
                    shared_group=f"g{unique}", batch_size=20, flush_ms=30, persistent=False,
                    images_when_down=when_down).start()
    receipts = Receipts(broker, site, "cam-1", unique)
    try:
        assert ingest.wait_ready(10)
        private_seaweedfs.stop()
        sent = [make_result(site, "cam-1", seed=200 + i, crops=1) for i in range(5)]
        for r in sent:
            publisher.send(site, "cam-1", r)

        def stored() -> list[Result]:
            with hub_db.session() as session:
                return list(session.scalars(select(Result).where(Result.id.in_([r.id for r in sent]))))

        if when_down == "without_images":
            wait_for(lambda: len(stored()) == 5, 15, what="5 results stored without their images")
            assert all(row.heatmap_sha is None and row.thumbnail_sha is None for row in stored())
            wait_for(lambda: receipts.ids() == {r.id for r in sent}, 10, what="receipts for the 5 results")
            return
        time.sleep(3)  # retrying all along
        assert stored() == [] and receipts.ids() == set(), "stored or confirmed without its images"
        assert ingest.stats().stored == 0
        private_seaweedfs.start()
        wait_for(lambda: len(stored()) == 5, 40, what="the 5 results, once the store is back")
        wait_for(lambda: receipts.ids() == {r.id for r in sent}, 10, what="receipts, once stored")
        reader = ObjectImageStore(private_seaweedfs.client(bucket.bucket))
        by_id = {r.id: r for r in sent}
        for row in stored():
            assert reader.get(row.heatmap_sha).data == by_id[row.id].heatmap
            assert reader.get(row.thumbnail_sha).data == by_id[row.id].thumbnail
        with hub_db.session() as session:
            crops = session.scalars(select(Crop.image_sha).where(Crop.result_id.in_(by_id))).all()
        assert len(crops) == 5 and all(reader.get(c) is not None for c in crops)
    finally:
        receipts.link.stop()
        ingest.stop()


def test_a_store_that_cannot_be_reached_is_an_os_error_naming_it() -> None:
    from tests.conftest import free_port

    client = S3Client(f"http://127.0.0.1:{free_port()}", "b", Credentials("k", "s"), timeout_s=2)
    with pytest.raises(ObjectStoreError, match="unreachable") as caught:
        client.put("k", b"\xff\xd8\xff", "image/jpeg")
    assert isinstance(caught.value, OSError)
    with pytest.raises(ValueError, match="not http"):
        S3Client("ftp://x", "b", Credentials("k", "s"))
