"""The hub's command line (``kdfleet hub COMMAND`` or ``python -m hub COMMAND``).

serve, ingest: run the hub; init-db: create or upgrade the schema; add-user,
create-admin: dashboard users; add-token, revoke-token: API tokens for
services; add-device, revoke-device, write-mqtt-auth: broker credentials and
ACL; make-certs: a CA and the broker's TLS certificate; bridge-config: a site
broker's bridge to a central one; prune: the retention policy;
export-training: reviewed results as a training set.

Settings come from an optional TOML file (``--config``, see hub.config) and
are overridden by the flags given; `serve` and `ingest` run in hub.server,
`check` is hub.check.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from hub import mosquitto, server
from hub.config import HubConfig, load
from hub.db.models import ROLES
from shared.vocabulary import REVIEW_FALSE_ALARM, REVIEW_LABELS
from hub.db.session import Database, SchemaError, check_schema, head_revision, sqlite_file, upgrade
from hub.services import devices, retention, reviews, rollouts, users
from hub.services.common import NotFound, QueryError, parse_time
from hub.store import Images
from shared import topics
from shared.config import BrokerConfig, ConfigError
from shared.logs import add_log_arguments, setup_logging

log = logging.getLogger("hub")

class CliError(RuntimeError):
    """A failure to report in one line, without a traceback."""


# -- arguments ------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="TOML settings file (see hub/config.py); flags override it"
    )
    p.add_argument(
        "--db",
        metavar="URL",
        help="database URL: sqlite:///path/hub.db (default "
        "sqlite:///var/hub/hub.db) or postgresql+psycopg://user@host/dbname",
    )
    _log_flags(p)


def _log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_log_arguments(p)


def _data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR", help="image store and secret key (default var/hub)")


def _broker(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        metavar="URL",
        help="MQTT broker, mqtt://[user:pass@]host[:port] or mqtts://... "
        "(default mqtt://127.0.0.1:1883)",
    )
    p.add_argument("--site", help="ingest one site's messages only (default: every site)")
    p.add_argument(
        "--client-id",
        help="MQTT client id; give each ingest process its own (default kdfleet-hub-<hostname>)",
    )
    p.add_argument(
        "--shared-group",
        metavar="NAME",
        help="MQTT 5 shared-subscription group that ingest "
        "processes split the load in (default hub; '' to have every process read everything)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdfleet hub",
        description="kdfleet hub: ingest inspection results from MQTT into SQL "
        "and serve the dashboard (also `python -m hub`).",
        epilog="First run: `kdfleet hub init-db`, `kdfleet hub create-admin NAME`, "
        "`kdfleet hub serve`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="ingest from MQTT and serve the dashboard",
        description="Run the ingest worker and the web dashboard in one process.",
    )
    _common(p)
    _data_dir(p)
    _broker(p)
    p.add_argument(
        "--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the plant network)"
    )
    p.add_argument("--port", type=int, help="TCP port (default 8080)")
    p.add_argument(
        "--trusted-key",
        dest="trusted_keys",
        metavar="PUB",
        action="append",
        help="a public key file one of which must have signed every uploaded package (repeatable; "
        "replaces trusted_keys of the config)",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_const",
        const=True,
        help="take unsigned package uploads when no key is trusted (development only)",
    )
    p.set_defaults(handler=_serve)

    p = sub.add_parser(
        "ingest",
        help="ingest from MQTT only (run several to scale out)",
        description="Run only the ingest worker; several processes with the same shared "
        "group split the results between them on an MQTT 5 broker.",
    )
    _common(p)
    _data_dir(p)
    _broker(p)
    p.set_defaults(handler=lambda a: cmd_ingest(settings(a)))

    p = sub.add_parser(
        "check",
        help="check database, image store, trusted keys and broker; exit 1 if any fails",
        description="Check what `serve` needs: the database at the newest schema, a writable image "
        "store, the trusted keys and the broker. One line each, ok or FAIL with what to do.",
    )
    _common(p)
    _data_dir(p)
    _broker(p)
    p.add_argument("--trusted-key", dest="trusted_keys", metavar="PUB", action="append",
                   help="a public key package uploads must be signed with (repeatable)")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser(
        "rollout",
        help="start, watch, pause, resume or abort a model rollout",
        description="Ship a registry model to devices: a canary first, then waves, each gated on "
        "health for a soak period. `serve` drives rollouts; these commands only change the plan.",
    )
    _common(p)
    p.add_argument("action", choices=("start", "status", "pause", "resume", "abort"))
    p.add_argument("target", help="start: the registry model id; otherwise: the rollout id")
    p.add_argument("--site", help="start: devices of this site only (default: every site)")
    p.add_argument("--devices", help="start: comma-separated device names (default: all of the site)")
    p.add_argument("--canary", default="1", help="start: devices first, a count or a percentage (default 1)")
    p.add_argument("--wave-size", type=int, default=0, help="start: devices per later wave (default 0: all)")
    p.add_argument("--soak", type=float, default=60.0, help="start: healthy seconds before the next wave")
    p.add_argument("--max-failures", type=int, default=1, help="start: failed updates that stop it (default 1)")
    p.add_argument("--max-anomaly-rate", type=float, help="start: stop above this anomaly rate (0-1)")
    p.add_argument("--max-latency-ms", type=float, help="start: stop above this p95 latency")
    p.add_argument("--max-anomaly-rise", type=float,
                   help="start: stop when an updated device's anomaly rate rises more than this above its rate on "
                   "the model before (0.2: 20 points; catches a threshold gone wrong)")
    p.add_argument("--wave-timeout", type=float, default=rollouts.Policy().wave_timeout_s,
                   help="start: seconds a told device has to finish (default %(default)g); an online one that "
                   "does not fails, an offline one is left behind and told again when it reconnects")
    p.add_argument("--queue", action="store_true",
                   help="start: if devices are busy in another rollout, wait and start once they are free")
    p.add_argument("--note", default="", help="why (shown on the dashboard)")
    p.set_defaults(handler=lambda a: cmd_rollout(settings(a), a))

    p = sub.add_parser(
        "init-db",
        help="create or upgrade the database schema",
        description="Run the Alembic migrations up to the newest revision. Safe to repeat: "
        "existing tables and data are kept.",
    )
    _common(p)
    p.set_defaults(handler=lambda a: cmd_init_db(settings(a)))

    for name, text in (
        ("add-user", "add a dashboard user"),
        ("create-admin", "add the first admin (refused once an admin exists)"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _common(p)
        p.add_argument("username")
        if name == "add-user":
            p.add_argument("--role", choices=ROLES, default="viewer", help="default viewer")
        p.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input instead of asking",
        )
        p.set_defaults(handler=lambda a, admin=name == "create-admin": cmd_add_user(
            settings(a), a.username, "admin" if admin else a.role, a.password_stdin, first_admin=admin))

    p = sub.add_parser(
        "add-token",
        help="create an API token for a service (printed once)",
        description="Create a bearer token for the JSON API. Only its hash is stored: "
        "the token is printed this once.",
    )
    _common(p)
    p.add_argument("name", help="the service, e.g. trainer")
    p.add_argument("--role", choices=ROLES, default="viewer", help="default viewer")
    p.set_defaults(handler=lambda a: cmd_add_token(settings(a), a.name, a.role))

    p = sub.add_parser("revoke-token", help="revoke an API token by name")
    _common(p)
    p.add_argument("name")
    p.set_defaults(handler=lambda a: cmd_revoke_token(settings(a), a.name))

    p = sub.add_parser(
        "add-device",
        help="give a device MQTT credentials; rewrite Mosquitto's password file and ACL",
        description="Create broker credentials for SITE/DEVICE (printed once), then rewrite "
        "the password file and ACL (settings [mqtt_auth]) so the device may publish only its "
        "own topics and read only its own model topic. The hub's account comes from the "
        "user and password in --broker. Reload Mosquitto afterwards (SIGHUP).",
    )
    _common(p)
    _broker_only(p)
    p.add_argument("site")
    p.add_argument("device")
    p.add_argument(
        "--new-password", action="store_true", help="replace the password of a provisioned device"
    )
    p.set_defaults(handler=lambda a: cmd_add_device(settings(a), a.site, a.device, a.new_password))

    p = sub.add_parser(
        "revoke-device",
        help="take a device's MQTT credentials away; rewrite the password file and ACL",
    )
    _common(p)
    _broker_only(p)
    p.add_argument("site")
    p.add_argument("device")
    p.set_defaults(handler=lambda a: cmd_revoke_device(settings(a), a.site, a.device))

    p = sub.add_parser(
        "write-mqtt-auth",
        help="rewrite Mosquitto's password file and ACL from the database",
        description="Rewrite the password file and ACL, e.g. after changing the hub's own "
        "broker password in --broker.",
    )
    _common(p)
    _broker_only(p)
    p.set_defaults(handler=lambda a: cmd_write_mqtt_auth(settings(a)))

    p = sub.add_parser(
        "make-certs",
        help="make a CA and the broker's TLS certificate (files that exist are kept)",
        description="Write ca.crt and ca.key (a CA for this site) and broker.crt and broker.key, "
        "signed by it, for the broker's TLS listeners, into DIR. Give every name and address "
        "stations and the hub use to reach the broker. Agents, the hub and bridges trust ca.crt.",
    )
    p.add_argument("dir", help="output folder")
    p.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="a host name or IP address of the broker (repeat for each)")
    p.add_argument("--group", default="", help="group of broker.key (mode 0640), e.g. mosquitto")
    _log_flags(p)
    p.set_defaults(handler=lambda a: cmd_make_certs(a.dir, a.host, a.group))

    p = sub.add_parser(
        "bridge-config",
        help="print a site broker's bridge to a central broker (mosquitto.conf lines)",
        description="Print the Mosquitto bridge that forwards a site's device messages to the "
        "central broker, where the hub ingests, and brings desired models and receipts back.",
    )
    p.add_argument("name", help="the bridge's name (its connection line)")
    p.add_argument("address", help="the central broker, HOST:PORT")
    p.add_argument("--site", default="+", help="forward this site's topics only (default: every site)")
    p.add_argument("--username", help="the bridge's account on the central broker")
    p.add_argument("--password-stdin", action="store_true", help="read its password from standard input")
    p.add_argument("--cafile", help="the CA of the central broker's TLS certificate (a TLS port)")
    p.add_argument("--acl", action="store_true",
                   help="print instead the central broker's ACL lines for the bridge's account (--username)")
    _log_flags(p)
    p.set_defaults(handler=cmd_bridge_config)

    p = sub.add_parser(
        "prune",
        help="apply the retention policy once (reviewed results are never deleted)",
        description="Delete results and images past the limits of the [retention] settings. "
        "Results with a review keep their rows, crops and images.",
    )
    _common(p)
    _data_dir(p)
    p.add_argument("--results-days", type=int, help="override retention.results_days")
    p.add_argument("--images-days", type=int, help="override retention.images_days")
    p.add_argument("--images-max-gb", type=float, help="override retention.images_max_gb")
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.set_defaults(handler=lambda a: cmd_prune(settings(a), a.dry_run))

    p = sub.add_parser(
        "export-training",
        help="write reviewed results as a training set (false alarms: CLASS/train/good)",
        description="Write the frames of results whose latest review is LABEL into OUT in the "
        "MVTec AD layout (false alarms into CLASS/train/good, confirmed defects into "
        "CLASS/test/reviewed_defect) with a manifest.jsonl; files already there are kept.",
    )
    _common(p)
    _data_dir(p)
    p.add_argument("out", help="output folder")
    p.add_argument("--label", choices=REVIEW_LABELS, default=REVIEW_FALSE_ALARM)
    p.add_argument("--cls", help="one product class only")
    p.add_argument("--since", help="reviewed at or after this ISO 8601 time")
    p.set_defaults(handler=lambda a: cmd_export_training(settings(a), a.out, a.label, a.cls, a.since))
    return parser


def _broker_only(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        metavar="URL",
        help="the hub's broker URL with its own account, mqtt://USER:PASSWORD@host:port",
    )


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def settings(args: argparse.Namespace) -> HubConfig:
    """The config file's settings with the command-line flags applied on top, validated."""
    cfg = load(args.config)
    cfg = dataclasses.replace(
        cfg,
        **_given(args, "db", "data_dir", "broker", "trusted_keys", "allow_unsigned"),
        ingest=dataclasses.replace(cfg.ingest, **_given(args, "site", "client_id", "shared_group")),
        web=dataclasses.replace(cfg.web, **_given(args, "host", "port")),
        retention=dataclasses.replace(
            cfg.retention, **_given(args, "results_days", "images_days", "images_max_gb")
        ),
    )
    cfg.validate()
    cfg.broker_config()  # the URL and [broker_tls] together
    return cfg


# -- commands ------------------------------------------------------------------------


def _open_db(cfg: HubConfig, *, check: bool = True) -> Database:
    """The hub's database; with `check` (every command but init-db) it must exist at the newest schema,
    and a SQLite file that does not exist is not created."""
    path = sqlite_file(cfg.db) if check else None
    if path is not None and not path.exists():
        raise CliError(
            f"no hub database at {path}: give the hub's --config FILE (its `db`) or --db URL, "
            "or create one with `kdfleet hub init-db`"
        )
    db = Database(cfg.db)
    try:
        if check:
            check_schema(db)
    except OperationalError as exc:
        db.dispose()
        raise CliError(
            f"cannot reach the database {db.display_url}: {str(exc.orig).strip().splitlines()[0]}"
        ) from None
    return db


def _serve(args: argparse.Namespace) -> int:
    cfg = settings(args)
    return cmd_serve(cfg, cli_target(args, cfg))


def cmd_check(args: argparse.Namespace) -> int:
    """`kdfleet hub check`: the settings first (a bad one ends the check there), then `hub.check`."""
    from hub.check import check_hub
    from shared.checks import Checklist

    checks = Checklist()
    try:
        cfg = settings(args)
    except ConfigError as exc:
        checks.report("config", str(exc))
        return checks.exit_code
    checks.report("config")
    check_hub(cfg, checks)
    return checks.exit_code


def cmd_init_db(cfg: HubConfig) -> int:
    db = _open_db(cfg, check=False)
    try:
        revision = upgrade(db)
    except OperationalError as exc:
        raise CliError(
            f"cannot migrate {db.display_url}: {str(exc.orig).strip().splitlines()[0]}"
        ) from None
    finally:
        db.dispose()
    print(f"database {db.display_url} is at revision {revision} (newest: {head_revision()})")
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password on: pipe it in with --password-stdin")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise CliError("the passwords differ; nothing was changed")
    return first


def cmd_add_user(
    cfg: HubConfig, username: str, role: str, password_stdin: bool, *, first_admin: bool
) -> int:
    db = _open_db(cfg)
    try:
        if first_admin:
            with db.transaction() as session:
                if users.has_admin(session):
                    raise CliError(
                        "an admin exists already; add further users with "
                        "`kdfleet hub add-user NAME --role ROLE`"
                    )
        password = _read_password(password_stdin)
        with db.transaction() as session:
            users.create_user(session, username, password, role)
    except users.UserError as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    print(f"added {role} {username!r}")
    return 0


def _open_images(cfg: HubConfig) -> Images:
    try:
        store = cfg.open_images()
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    log.info("images in %s", store.describe())
    return store


def cmd_ingest(cfg: HubConfig) -> int:
    stop = server.stop_on_signals()
    db = _open_db(cfg)
    server.run_ingest(cfg, db, _open_images(cfg), stop)
    return 0


def cmd_rollout(cfg: HubConfig, args: argparse.Namespace) -> int:
    db = _open_db(cfg)
    try:
        with db.transaction() as session:
            if args.action == "start":
                try:
                    model_id = int(args.target)
                except ValueError:
                    raise CliError(f"{args.target!r} is not a model id; `GET /api/models` lists them") from None
                policy = rollouts.Policy(args.canary, args.wave_size, args.soak, args.max_failures,
                                         args.max_anomaly_rate, args.max_latency_ms, args.max_anomaly_rise,
                                         args.wave_timeout)
                devices = [d for d in (args.devices or "").split(",") if d] or None
                rollout_id = rollouts.start_rollout(session, model_id, policy, site=args.site, devices=devices,
                                                    note=args.note, queue=args.queue)
            else:
                rollout_id = args.target
                action = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort}
                if args.action in action:
                    action[args.action](session, rollout_id, args.note)
            detail = rollouts.rollout_detail(session, rollout_id)
    except (NotFound, QueryError) as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    counts = ", ".join(f"{n} {state}" for state, n in sorted(detail.counts().items()))
    print(f"rollout {detail.id}: {detail.model} {detail.version}, {detail.state} ({counts})")
    if detail.note:
        print(f"  {detail.note}")
    from hub.web.format import ago

    for t in detail.targets:
        seen = f", last seen {ago(t.last_seen)}" if t.connection != "online" else ""
        print(f"  wave {t.wave}  {t.site}/{t.device}  {t.state} since {ago(t.updated_at)}  "
              f"({t.connection}{seen})  {t.reason}".rstrip())
    return 0


def cli_target(args: argparse.Namespace, cfg: HubConfig) -> str:
    """The flags that point other `kdfleet hub` commands (a rollout the Models page suggests) at this
    hub's database: its config file, made absolute, and --db when given or when there is no config;
    a relative SQLite path made absolute, a password in the URL masked."""
    from sqlalchemy.engine import make_url

    from hub.db.session import normalise_url

    parts = []
    if args.config:
        parts += ["--config", str(Path(args.config).resolve())]
    if args.db or not args.config:
        url = make_url(normalise_url(cfg.db))
        path = sqlite_file(cfg.db)
        if path is not None:
            url = url.set(database=str(path.resolve()))
        parts += ["--db", url.render_as_string(hide_password=True)]
    return shlex.join(parts)


def cmd_serve(cfg: HubConfig, target: str = "") -> int:
    stop = server.stop_on_signals()   # before start-up, so a stop during it is clean too
    cfg.load_trusted_keys()  # a missing or unreadable key file stops the start, naming it
    db = _open_db(cfg)
    server.run_serve(cfg, db, _open_images(cfg), stop, target)
    return 0


def cmd_add_token(cfg: HubConfig, name: str, role: str) -> int:
    db = _open_db(cfg)
    try:
        with db.transaction() as session:
            view, token = users.create_token(session, name, role)
    except users.UserError as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    print(f"API token for {view.name!r} ({view.role}); it is shown only now, store it safely:")
    print(token)
    return 0


def cmd_revoke_token(cfg: HubConfig, name: str) -> int:
    db = _open_db(cfg)
    try:
        with db.transaction() as session:
            users.revoke_token(session, name=name)
    except NotFound as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    print(f"revoked API token {name!r}")
    return 0


def _hub_account(cfg: HubConfig) -> tuple[str, str]:
    broker = cfg.broker_config()
    if not broker.username or not broker.password:
        raise CliError(
            f"the broker URL {broker.url} names no user and password for the hub: once devices "
            "need passwords the hub needs one too. Give it as --broker "
            "mqtt://kdfleet-hub:PASSWORD@HOST:PORT or as `broker` in the hub config"
        )
    return broker.username, broker.password


def _write_mqtt_auth(cfg: HubConfig, db: Database) -> None:
    hub_user, hub_password = _hub_account(cfg)
    with db.session() as session:
        accounts = devices.mqtt_accounts(session)
    try:
        mosquitto.write_files(
            cfg.mqtt_auth.password_file,
            cfg.mqtt_auth.hub_passwords(),
            cfg.mqtt_auth.acl_file,
            hub_user,
            hub_password,
            accounts,
            group=cfg.mqtt_auth.group,
        )
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot write the Mosquitto files: {exc}") from None
    print(
        f"wrote {cfg.mqtt_auth.password_file} ({len(accounts)} devices), {cfg.mqtt_auth.hub_passwords()} "
        f"(the hub's account {hub_user!r}) and {cfg.mqtt_auth.acl_file}; "
        "reload Mosquitto to apply them (systemctl reload mosquitto, or kill -HUP its pid)"
    )


def cmd_add_device(cfg: HubConfig, site: str, device: str, replace: bool) -> int:
    _hub_account(cfg)  # refuse before changing anything
    db = _open_db(cfg)
    password = mosquitto.new_password()
    try:
        with db.transaction() as session:
            account = devices.provision(
                session, site, device, mosquitto.hash_password(password), replace=replace
            )
        _write_mqtt_auth(cfg, db)
    except QueryError as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    print(f"device {device!r} at site {site!r}: MQTT user {account.username!r}, password shown only now:")
    print(password)
    if cfg.mqtt_auth.device_broker:
        b = BrokerConfig.from_url(cfg.mqtt_auth.device_broker)
        print(f"agent broker URL: mqtt{'s' if b.tls else ''}://{account.username.replace('@', '%40')}:"
              f"{password}@{b.host}:{b.port}")
    return 0


def cmd_revoke_device(cfg: HubConfig, site: str, device: str) -> int:
    _hub_account(cfg)
    db = _open_db(cfg)
    try:
        with db.transaction() as session:
            devices.revoke(session, site, device)
        _write_mqtt_auth(cfg, db)
    except NotFound as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    print(f"revoked the broker credentials of {device!r} at site {site!r}")
    return 0


def cmd_write_mqtt_auth(cfg: HubConfig) -> int:
    db = _open_db(cfg)
    try:
        _write_mqtt_auth(cfg, db)
    finally:
        db.dispose()
    return 0


def cmd_make_certs(folder: str, hosts: list[str], group: str) -> int:
    from hub.tls import write_site_certs

    try:
        written = write_site_certs(folder, hosts, group=group)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot write the certificates into {folder}: {exc}") from None
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{folder} has a CA and a broker certificate already; nothing changed")
    return 0


def cmd_bridge_config(args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else None
    try:
        if args.acl:
            if not args.username:
                raise CliError("--acl needs --username: the bridge's account on the central broker")
            print(mosquitto.render_bridge_acl(args.username, args.site), end="")
            return 0
        print(mosquitto.render_bridge(args.name, args.address, site=args.site, username=args.username,
                                      password=password, cafile=args.cafile), end="")
    except (ValueError, topics.TopicError) as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_prune(cfg: HubConfig, dry_run: bool) -> int:
    db = _open_db(cfg)
    try:
        report = retention.prune(db, _open_images(cfg), cfg.retention_policy(), dry_run=dry_run)
    finally:
        db.dispose()
    print(report)
    return 0


def cmd_export_training(
    cfg: HubConfig, out: str, label: str, cls: str | None, since: str | None
) -> int:
    """Write the frames of results whose latest review is `label` in the MVTec AD layout."""
    db = _open_db(cfg)
    store = _open_images(cfg)
    folder = ("train", "good") if label == REVIEW_FALSE_ALARM else ("test", "reviewed_defect")
    root = Path(out)
    written = missing = 0
    try:
        since_at = parse_time(since, "--since") if since else None
        root.mkdir(parents=True, exist_ok=True)
        with db.session() as session, open(root / "manifest.jsonl", "a") as manifest:
            before = None
            while True:
                page = reviews.training_data(
                    session, label=label, cls=cls, since=since_at, before=before, limit=500
                )
                for item in page.items:
                    sha = item.frame_sha or item.thumbnail_sha
                    stored = store.get(sha) if sha else None
                    if stored is None:
                        missing += 1
                        continue
                    suffix = ".png" if stored.media_type == "image/png" else ".jpg"
                    target = root / item.cls / folder[0] / folder[1] / f"{item.result_id}{suffix}"
                    if not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(stored.data)
                        record = {
                            "file": str(target.relative_to(root)),
                            "result_id": item.result_id,
                            "label": item.label,
                            "note": item.note,
                            "reviewer": item.reviewer,
                            "reviewed_at": item.created_at.isoformat(),
                            "site": item.site,
                            "device": item.device,
                            "station": item.station,
                            "cls": item.cls,
                            "score": item.score,
                            "threshold": item.threshold,
                            "full_frame": item.frame_sha is not None,
                        }
                        manifest.write(json.dumps(record) + "\n")
                        written += 1
                if page.next_before is None:
                    break
                before = page.next_before
    except QueryError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write into {root}: {exc}") from None
    finally:
        db.dispose()
    print(
        f"wrote {written} images to {root} ({label}); {missing} reviewed results had no image left"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_json, args.log_level)  # --log-json, else KDFLEET_LOG_JSON
    if args.log_level != "DEBUG":  # Alembic narrates every step at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"hub: configuration error: {exc}", file=sys.stderr)
        return 2
    except (CliError, server.StartError, SchemaError, ValueError) as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 1
