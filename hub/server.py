"""Running the hub until SIGINT or SIGTERM: `serve` (dashboard, ingest, rollouts, retention in one
process) and extra `ingest` workers. `hub.commands.run` opens the database and hands it over."""
from __future__ import annotations

import logging
import signal
import ssl
import threading

from sqlalchemy.exc import SQLAlchemyError

from hub.config import HubConfig
from hub.db.session import Database
from hub.ingest import Ingest
from hub.leader import Leadership, default_holder
from hub.rollouts import RolloutController
from hub.services import retention
from hub.store import Images

log = logging.getLogger("hub")

STATS_EVERY_S = 60.0  # how often serve/ingest log their counters


class StartError(RuntimeError):
    """The hub cannot start (a port in use, an unreadable certificate); one line, no traceback."""


def make_ingest(cfg: HubConfig, db: Database, store: Images) -> Ingest:
    return Ingest(
        db,
        store,
        cfg.broker_config(),
        client_id=cfg.ingest.resolved_client_id(),
        site=cfg.ingest.site,
        shared_group=cfg.ingest.shared_group or None,
        batch_size=cfg.ingest.batch_size,
        flush_ms=cfg.ingest.flush_ms,
        linger_ms=cfg.ingest.linger_ms,
        inflight=cfg.ingest.inflight,
        persistent=cfg.ingest.persistent,
        manual_ack=cfg.ingest.manual_ack,
        images_when_down=cfg.images.when_down,
    )


def stop_on_signals() -> threading.Event:
    """An event SIGINT and SIGTERM set; installed before start-up, so a stop during it is clean too."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_for_signal(ingest: Ingest, stop: threading.Event) -> None:
    """Block until `stop` is set, logging the ingest counters now and then."""
    last = None
    while not stop.wait(STATS_EVERY_S):
        stats = ingest.stats()
        if stats != last:
            log.info("ingest: %s", stats)
            last = stats
    log.info("stopping")


def run_ingest(cfg: HubConfig, db: Database, store: Images, stop: threading.Event) -> None:
    """An ingest worker until `stop`: MQTT into the database and `store`, no web, no rollouts."""
    ingest = make_ingest(cfg, db, store).start()
    log.info("ingest from %s into %s", cfg.broker_config().url, db.display_url)
    try:
        wait_for_signal(ingest, stop)
    finally:
        ingest.stop()
        db.dispose()
        log.info("ingest stopped: %s", ingest.stats())


def retention_loop(cfg: HubConfig, db: Database, store: Images, leadership: Leadership,
                   stop: threading.Event) -> None:
    """Prune every retention.interval_min minutes until `stop`, when this process leads (one of several
    hub processes prunes); a failure waits for the next run."""
    interval = cfg.retention.interval_min * 60
    while not stop.wait(interval):
        if not leadership.leads():
            continue
        try:
            retention.prune(db, store, cfg.retention_policy())
        except Exception:
            log.exception("retention run failed; trying again in %d min", cfg.retention.interval_min)


def run_serve(cfg: HubConfig, db: Database, store: Images, stop: threading.Event, target: str = "") -> None:
    """The hub in one process until `stop`: the dashboard and API, ingest, the rollout controller and,
    every retention.interval_min, the retention policy. Start order: web server (so a port in use fails
    before anything else starts), ingest, rollouts, retention; shutdown in reverse. `db` is disposed."""
    # imported here: an ingest-only process needs no web stack
    from werkzeug.serving import make_server

    from hub.web import create_app

    app = create_app(cfg.web_settings() | {"HUB_CLI_TARGET": target, "HUB_IMAGE_STORE": store})
    tls = (cfg.web.cert_file, cfg.web.key_file) if cfg.web.cert_file else None
    try:
        server = make_server(cfg.web.host, cfg.web.port, app, threaded=True, ssl_context=tls)
    except ssl.SSLError as exc:
        db.dispose()
        raise StartError(
            f"cannot serve HTTPS with web.cert_file {cfg.web.cert_file} and web.key_file "
            f"{cfg.web.key_file}: {exc.reason or exc}; give a PEM certificate and its own key"
        ) from None
    except OSError as exc:
        db.dispose()
        if tls and exc.filename:
            raise StartError(
                f"cannot read {exc.filename}: {exc.strerror}; check web.cert_file and web.key_file"
            ) from None
        raise StartError(
            f"cannot listen on {cfg.web.host}:{cfg.web.port}: {exc.strerror}; "
            "choose another --port or stop what holds it"
        ) from None
    try:
        retention.ensure_partitions(db)  # the months ahead (also done by every retention run)
    except SQLAlchemyError as exc:  # another hub process creating them at the same moment, say
        log.warning("results partitions not checked now: %s", str(exc).splitlines()[0])
    ingest = make_ingest(cfg, db, store).start()
    app.extensions["hub.ingest"] = ingest  # /metrics reports its live counters
    # `serve` processes drive rollouts and prune, the one holding the lease (extra `ingest` workers do not)
    leadership = Leadership(db, default_holder(cfg.ingest.resolved_client_id()), ttl_s=cfg.leader_lease_s)
    controller = RolloutController(db, cfg.broker_config(), client_id=cfg.ingest.rollouts_client_id(),
                                   leadership=leadership).start()
    web = threading.Thread(target=server.serve_forever, name="hub-web", daemon=True)
    web.start()
    pruner = None
    if cfg.retention.interval_min:
        pruner = threading.Thread(
            target=retention_loop, args=(cfg, db, store, leadership, stop), name="hub-retention", daemon=True
        )
        pruner.start()
    (log.info if cfg.trusted_keys else log.warning)("%s", cfg.package_policy())
    log.info(
        "dashboard on %s://%s:%d/, ingest from %s into %s",
        "https" if tls else "http",
        cfg.web.host,
        server.server_port,
        cfg.broker_config().url,
        db.display_url,
    )
    try:
        wait_for_signal(ingest, stop)
    finally:
        stop.set()
        if pruner is not None:
            pruner.join(30)
        server.shutdown()
        web.join(10)
        controller.stop()
        leadership.release()
        ingest.stop()
        app.extensions["hub.db"].dispose()
        db.dispose()
        log.info("hub stopped: %s", ingest.stats())
