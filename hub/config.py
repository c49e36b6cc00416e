"""The hub's settings: a strict, typed TOML file (optional) with command-line overrides.

Example ``hub.toml`` (every key optional; unknown keys are refused)::

    db = "postgresql+psycopg://kdfleet@db/kdfleet"
    data_dir = "/var/lib/kdfleet-hub"
    broker = "mqtts://kdfleet-hub:secret@broker:8884"   # the hub's own listener
    trusted_keys = ["/keys/fleet.pub"]   # uploads must be signed by one of these

    [broker_tls]
    ca_file = "/etc/kdfleet/tls/ca.crt"

    [ingest]
    batch_size = 500
    flush_ms = 200

    [web]
    host = "0.0.0.0"
    port = 8443
    cert_file = "/etc/kdfleet/tls/hub.crt"   # HTTPS; or leave TLS to a reverse proxy
    key_file = "/etc/kdfleet/tls/hub.key"

    [images]                  # default: the folder <data_dir>/images
    backend = "s3"            # any S3-compatible store: AWS S3, MinIO, SeaweedFS, Ceph RGW
    endpoint = "http://seaweedfs:8333"
    bucket = "kdfleet-images"
    credentials_file = "/etc/kdfleet/s3.credentials"   # or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY

    [retention]
    results_days = 365
    images_days = 30
    images_max_gb = 50.0

    [mqtt_auth]
    password_file = "/etc/mosquitto/kdfleet.passwd"
    hub_password_file = "/etc/mosquitto/kdfleet-hub.passwd"
    acl_file = "/etc/mosquitto/kdfleet.acl"
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import topics
from shared.config import BrokerConfig, ConfigError, build, load_toml

if TYPE_CHECKING:
    from hub.services.retention import Policy

MAX_CLIENT_ID = 64
ROLLOUTS_SUFFIX = "-rollouts"  # `serve`'s rollout driver: its ingest worker's id and this


@dataclass(frozen=True, slots=True)
class IngestConfig:
    site: str = "+"  # one site's topics only, or "+" for every site
    shared_group: str = "hub"  # MQTT 5 shared subscription; "" makes every process read all
    client_id: str = ""  # "" -> kdfleet-hub-<hostname>; must differ between ingest processes; no '@'
    batch_size: int = 500  # rows per transaction at most
    flush_ms: int = 200  # longest a received message waits for its transaction
    linger_ms: int = 5  # a batch is written once no message came for this long
    inflight: int = 1000  # unacknowledged messages the broker may send (MQTT 5 Receive Maximum)
    persistent: bool = True  # broker keeps QoS 1 messages for the hub while it restarts
    manual_ack: bool = True  # acknowledge after the commit: a hub crash loses nothing

    def validate(self) -> None:
        if self.site != "+":
            _check_name(self.site, "site", "ingest.site")
        if self.shared_group:
            _check_name(self.shared_group, "group", "ingest.shared_group")
        if not 1 <= self.batch_size <= 10_000:
            raise ConfigError(f"ingest.batch_size: {self.batch_size} is not within 1..10000")
        if not 1 <= self.flush_ms <= 60_000:
            raise ConfigError(f"ingest.flush_ms: {self.flush_ms} is not within 1..60000")
        if not 0 <= self.linger_ms <= self.flush_ms:
            raise ConfigError(f"ingest.linger_ms: {self.linger_ms} is not within 0..flush_ms")
        if not 1 <= self.inflight <= 65_535:
            raise ConfigError(f"ingest.inflight: {self.inflight} is not within 1..65535")
        # devices' listeners give every device its user name (device@site) as its client id
        if "@" in self.client_id or len(self.client_id) > MAX_CLIENT_ID - len(ROLLOUTS_SUFFIX):
            raise ConfigError(
                f"ingest.client_id: {self.client_id!r} must have no '@' (devices' ids have one) "
                f"and at most {MAX_CLIENT_ID - len(ROLLOUTS_SUFFIX)} characters"
            )

    def resolved_client_id(self) -> str:
        return self.client_id or f"kdfleet-hub-{socket.gethostname()}"[: MAX_CLIENT_ID - len(ROLLOUTS_SUFFIX)]

    def rollouts_client_id(self) -> str:
        """The id of `serve`'s rollout driver, beside its ingest worker."""
        return self.resolved_client_id() + ROLLOUTS_SUFFIX


@dataclass(frozen=True, slots=True)
class BrokerTlsConfig:
    """Files for an ``mqtts://`` broker URL (PEM)."""

    ca_file: str | None = None  # the CA that signed the broker's certificate; None: the system store
    cert_file: str | None = None  # a client certificate, for a broker that asks for one
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class WebConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 to serve the plant network
    port: int = 8080
    secret_key: str | None = None  # None -> a random key kept in <data_dir>/secret_key
    silent_after_s: int = 120  # an online device unheard this long shows as silent
    refresh_s: int = 10  # the fleet page reloads itself this often; 0: never
    session_hours: int = 12  # a login lasts this long
    secure_cookies: bool = False  # always mark the session cookie Secure (it is, anyway, on HTTPS requests)
    proxy_hops: int = 0  # reverse proxies in front of the hub whose X-Forwarded-For/-Proto it trusts
    live_poll_ms: int = 1000  # how often the live feed looks for new results
    cert_file: str | None = None  # serve HTTPS with this certificate (PEM), or leave TLS to a reverse proxy
    key_file: str | None = None  # ... and its private key

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"web.port: {self.port} is not a TCP port (1..65535)")
        if not 1 <= self.session_hours <= 24 * 30:
            raise ConfigError(f"web.session_hours: {self.session_hours} is not within 1..720")
        if not 50 <= self.live_poll_ms <= 60_000:
            raise ConfigError(f"web.live_poll_ms: {self.live_poll_ms} is not within 50..60000")
        if self.secret_key is not None and len(self.secret_key) < 32:
            raise ConfigError(
                "web.secret_key: use at least 32 random characters, or leave it out "
                "to have one generated"
            )
        if not 0 <= self.proxy_hops <= 5:
            raise ConfigError(f"web.proxy_hops: {self.proxy_hops} is not within 0..5")
        if self.silent_after_s < 1 or self.refresh_s < 0:
            raise ConfigError("web.silent_after_s must be positive and web.refresh_s not negative")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("web.cert_file and web.key_file go together (HTTPS needs both)")


IMAGE_BACKENDS = ("folder", "s3")
STORE_DOWN = ("wait", "without_images")


@dataclass(frozen=True, slots=True)
class ImagesConfig:
    """Where heat maps, thumbnails, frames and crops live: the folder <data_dir>/images, or an
    S3-compatible bucket every hub host reads and writes (needed for more than one hub host)."""

    backend: str = "folder"  # "folder" or "s3"
    endpoint: str = ""  # s3: http(s)://host:port of the store (AWS: https://s3.<region>.amazonaws.com)
    bucket: str = ""
    region: str = "us-east-1"  # what the signature names; most stores other than AWS accept any
    prefix: str = ""  # keys start with this (e.g. "images/"), so a bucket may hold other things
    # an AWS shared-credentials file ([default] aws_access_key_id / aws_secret_access_key);
    # "": the AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables
    credentials_file: str = ""
    profile: str = "default"  # the credentials file's section
    ca_file: str | None = None  # https endpoint signed by a private CA (PEM)
    create_bucket: bool = False  # create the bucket when it is missing (else: a start-up error)
    uploads: int = 16  # parallel uploads per process
    # the store unreachable: "wait" keeps the results with the broker and the agents (no receipt) until
    # it is back; "without_images" stores them at once, their images lost
    when_down: str = "wait"

    def validate(self) -> None:
        if self.backend not in IMAGE_BACKENDS:
            raise ConfigError(f"images.backend: {self.backend!r} is not one of {', '.join(IMAGE_BACKENDS)}")
        if self.when_down not in STORE_DOWN:
            raise ConfigError(f"images.when_down: {self.when_down!r} is not one of {', '.join(STORE_DOWN)}")
        if not 1 <= self.uploads <= 256:
            raise ConfigError(f"images.uploads: {self.uploads} is not within 1..256")
        if self.backend == "s3":
            if not self.endpoint.startswith(("http://", "https://")):
                raise ConfigError(f"images.endpoint: {self.endpoint!r} is not http://host:port or "
                                  "https://host:port (backend = \"s3\" needs the store's address)")
            if not self.bucket:
                raise ConfigError("images.bucket: backend = \"s3\" needs the bucket's name")

    def credentials(self) -> Any:
        """The access key and secret (hub.s3.Credentials); ConfigError saying where they were looked for."""
        import configparser
        import os

        from hub.s3 import Credentials

        if self.credentials_file:
            parser = configparser.ConfigParser()
            try:
                with open(self.credentials_file) as f:
                    parser.read_file(f)
            except (OSError, configparser.Error) as exc:
                raise ConfigError(f"images.credentials_file: cannot read {self.credentials_file}: {exc}") from None
            section = parser[self.profile] if parser.has_section(self.profile) else None
            if section is None or not {"aws_access_key_id", "aws_secret_access_key"} <= section.keys():
                raise ConfigError(f"images.credentials_file: {self.credentials_file} has no [{self.profile}] "
                                  "section with aws_access_key_id and aws_secret_access_key")
            return Credentials(section["aws_access_key_id"], section["aws_secret_access_key"])
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if not key or not secret:
            raise ConfigError("images: backend = \"s3\" needs credentials: set images.credentials_file, or "
                              "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
        return Credentials(key, secret)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """What `kdfleet hub prune` (and `serve`, every `interval_min`) deletes. Reviewed results,
    their crops and images are never deleted. 0 switches a limit off."""

    results_days: int = 365  # results captured longer ago are deleted (with their crops)
    images_days: int = 30  # images no result received since then names are deleted
    images_max_gb: float = 0.0  # beyond this, the least recently used images go first
    interval_min: int = 60  # how often `serve` prunes; 0: only `kdfleet hub prune`

    def validate(self) -> None:
        if min(self.results_days, self.images_days, self.interval_min) < 0:
            raise ConfigError("retention: days and interval_min must not be negative")
        if self.images_max_gb < 0:
            raise ConfigError(f"retention.images_max_gb: {self.images_max_gb} is negative")
        if self.results_days and not 0 < self.images_days <= self.results_days:
            raise ConfigError(
                f"retention.images_days ({self.images_days}) must be within 1..results_days "
                f"({self.results_days}): images of deleted results would linger"
            )


@dataclass(frozen=True, slots=True)
class MqttAuthConfig:
    """Where `kdfleet hub add-device` writes the broker's password file and ACL.

    Point Mosquitto at them (``password_file`` and ``acl_file`` in mosquitto.conf)
    and reload it (SIGHUP) after each change. The hub's own account is the user
    and password of the `broker` URL.
    """

    password_file: str = "var/hub/mosquitto/passwd"  # the devices' accounts (their listeners)
    hub_password_file: str = ""  # the hub's account alone (its listener); "": hub.passwd beside password_file
    acl_file: str = "var/hub/mosquitto/acl"
    group: str = "mosquitto"  # the files' group (mode 0640), so the broker may read them; "": leave

    device_broker: str = ""  # the devices' listener as agents reach it (mqtts://host:8883), for add-device

    def validate(self) -> None:
        if self.device_broker:
            BrokerConfig.from_url(self.device_broker)

    def hub_passwords(self) -> str:
        return self.hub_password_file or str(Path(self.password_file).with_name("hub.passwd"))


@dataclass(frozen=True, slots=True)
class HubConfig:
    db: str = "sqlite:///var/hub/hub.db"
    data_dir: str = "var/hub"  # images/ and secret_key live here
    broker: str = "mqtt://127.0.0.1:1883"
    broker_tls: BrokerTlsConfig = field(default_factory=BrokerTlsConfig)
    # public keys (PEM files, `kdfleet keys new`) one of which must have signed every uploaded package;
    # none: every upload is refused, unless allow_unsigned
    trusted_keys: list[str] = field(default_factory=list)
    allow_unsigned: bool = False  # take unsigned packages when no key is trusted (development only)
    # several `serve` processes on one database: the one holding the lease drives rollouts and prunes;
    # another takes over this long after it died (hub.leader)
    leader_lease_s: float = 30.0
    ingest: IngestConfig = field(default_factory=IngestConfig)
    web: WebConfig = field(default_factory=WebConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    mqtt_auth: MqttAuthConfig = field(default_factory=MqttAuthConfig)

    def validate(self) -> None:
        # the URL alone: a file's [broker_tls] may wait for the --broker the command line gives
        BrokerConfig.from_url(self.broker)
        if not 3 <= self.leader_lease_s <= 600:
            raise ConfigError(f"leader_lease_s: {self.leader_lease_s} is not within 3..600")
        self.ingest.validate()
        self.web.validate()
        self.images.validate()
        self.retention.validate()
        self.mqtt_auth.validate()
        if self.trusted_keys and self.allow_unsigned:
            raise ConfigError("allow_unsigned = true cannot go with trusted_keys: with keys every package must be "
                              "signed by one of them; remove one of the two settings")

    def load_trusted_keys(self) -> list[Any]:
        """The trusted public keys (`serve` loads them at start); ConfigError naming a file that is missing or
        not an Ed25519 public key."""
        from shared.package import PackageError, load_public_key

        keys = []
        for path in self.trusted_keys:
            try:
                keys.append(load_public_key(path))
            except (OSError, ValueError, PackageError) as exc:
                raise ConfigError(f"trusted_keys: cannot load {path}: {exc}; give a public key file "
                                  "(the .pub `kdfleet keys new` writes)") from None
        return keys

    def package_policy(self) -> str:
        """One line for the start-up log: which packages the hub takes."""
        if self.trusted_keys:
            return f"package uploads must be signed by one of {len(self.trusted_keys)} trusted key(s) " \
                   f"({', '.join(self.trusted_keys)})"
        if self.allow_unsigned:
            return "allow_unsigned = true: UNSIGNED package uploads are accepted (development only)"
        return "no trusted key is set: every package upload will be refused (set trusted_keys)"

    def broker_config(self) -> BrokerConfig:
        """The broker URL with [broker_tls]; ConfigError when they contradict each other."""
        t = self.broker_tls
        return dataclasses.replace(
            BrokerConfig.from_url(self.broker), ca_file=t.ca_file, cert_file=t.cert_file, key_file=t.key_file
        ).checked()

    def web_settings(self) -> dict[str, Any]:
        """The mapping `hub.web.create_app` takes."""
        settings: dict[str, Any] = {
            "HUB_DB_URL": self.db,
            "HUB_DATA_DIR": self.data_dir,
            "HUB_SILENT_AFTER_S": self.web.silent_after_s,
            "HUB_REFRESH_S": self.web.refresh_s,
            "HUB_LIVE_POLL_S": self.web.live_poll_ms / 1000,
            "PERMANENT_SESSION_LIFETIME": self.web.session_hours * 3600,
            "SESSION_COOKIE_SECURE": self.web.secure_cookies,
            "HUB_PROXY_HOPS": self.web.proxy_hops,
            "HUB_TRUSTED_KEYS": list(self.trusted_keys),
            "HUB_ALLOW_UNSIGNED": self.allow_unsigned,
        }
        if self.web.secret_key:
            settings["SECRET_KEY"] = self.web.secret_key
        return settings

    def retention_policy(self) -> Policy:
        """[retention] as `hub.services.retention.Policy` (what `prune` and serve's pruner apply)."""
        from hub.services.retention import Policy

        r = self.retention
        return Policy(r.results_days, r.images_days, int(r.images_max_gb * 1e9))

    @property
    def images_dir(self) -> Path:
        return Path(self.data_dir) / "images"

    def open_images(self) -> Any:
        """The image store the settings choose (a hub.store.Images); ConfigError when the object store
        cannot be used (credentials, bucket), naming what to fix."""
        from hub.store import ImageStore

        i = self.images
        if i.backend == "folder":
            return ImageStore(self.images_dir)
        from hub.objectstore import ObjectImageStore
        from hub.s3 import ObjectStoreError, S3Client

        client = S3Client(i.endpoint, i.bucket, i.credentials(), region=i.region, ca_file=i.ca_file)
        try:
            if not client.bucket_exists():
                if not i.create_bucket:
                    raise ConfigError(f"images.bucket: there is no bucket {i.bucket!r} at {i.endpoint}; create it "
                                      "or set images.create_bucket = true")
                client.create_bucket()
        except ObjectStoreError as exc:
            if exc.status in (0, 500, 502, 503, 504):  # down for now: ingest waits for it (images.when_down)
                logging.getLogger("hub").warning("images: %s; carrying on, waiting for it", exc)
            else:
                raise ConfigError(f"images: {exc}") from None
        return ObjectImageStore(client, i.prefix, uploads=i.uploads)


def _check_name(value: str, what: str, key: str) -> None:
    try:
        topics.check_name(value, what)
    except topics.TopicError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def load(path: str | Path | None) -> HubConfig:
    """The settings in `path` (TOML), or the defaults when `path` is None."""
    if path is None:
        return HubConfig()
    mapping = load_toml(path)  # its errors name the file and line already
    try:
        return build(HubConfig, mapping)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
