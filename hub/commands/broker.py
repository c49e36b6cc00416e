"""The broker's side of the hub: device credentials, Mosquitto's password file and ACL, TLS and bridges.

`add-device`, `revoke-device` and `write-mqtt-auth` keep the device accounts
in the database and rewrite the files Mosquitto reads from them (hub.mosquitto);
`make-certs` makes a site CA and the broker's certificate (hub.tls);
`bridge-config` prints a site broker's bridge to a central one.
"""

from __future__ import annotations

import argparse
import sys

from hub import mosquitto
from hub.commands.common import CliError, common_flags, hub_broker_flag, log_flags, open_db, settings
from hub.config import HubConfig
from hub.db.session import Database
from hub.services import devices
from hub.services.common import NotFound, QueryError
from shared import topics
from shared.config import BrokerConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "add-device",
        help="give a device MQTT credentials; rewrite Mosquitto's password file and ACL",
        description="Create broker credentials for SITE/DEVICE (printed once), then rewrite "
        "the password file and ACL (settings [mqtt_auth]) so the device may publish only its "
        "own topics and read only its own model topic. The hub's account comes from the "
        "user and password in --broker. Reload Mosquitto afterwards (SIGHUP).",
    )
    common_flags(p)
    hub_broker_flag(p)
    p.add_argument("site")
    p.add_argument("device")
    p.add_argument(
        "--new-password", action="store_true", help="replace the password of a provisioned device"
    )
    p.set_defaults(handler=cmd_add_device)

    p = sub.add_parser(
        "revoke-device",
        help="take a device's MQTT credentials away; rewrite the password file and ACL",
    )
    common_flags(p)
    hub_broker_flag(p)
    p.add_argument("site")
    p.add_argument("device")
    p.set_defaults(handler=cmd_revoke_device)

    p = sub.add_parser(
        "write-mqtt-auth",
        help="rewrite Mosquitto's password file and ACL from the database",
        description="Rewrite the password file and ACL, e.g. after changing the hub's own "
        "broker password in --broker.",
    )
    common_flags(p)
    hub_broker_flag(p)
    p.set_defaults(handler=cmd_write_mqtt_auth)

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
    log_flags(p)
    p.set_defaults(handler=cmd_make_certs)

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
    log_flags(p)
    p.set_defaults(handler=cmd_bridge_config)


# -- device credentials and Mosquitto's files -----------------------------------------


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


def cmd_add_device(args: argparse.Namespace) -> int:
    cfg = settings(args)
    site, device = args.site, args.device
    _hub_account(cfg)  # refuse before changing anything
    db = open_db(cfg)
    password = mosquitto.new_password()
    try:
        with db.transaction() as session:
            account = devices.provision(
                session, site, device, mosquitto.hash_password(password), replace=args.new_password
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


def cmd_revoke_device(args: argparse.Namespace) -> int:
    cfg = settings(args)
    _hub_account(cfg)
    db = open_db(cfg)
    try:
        with db.transaction() as session:
            devices.revoke(session, args.site, args.device)
        _write_mqtt_auth(cfg, db)
    except NotFound as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    print(f"revoked the broker credentials of {args.device!r} at site {args.site!r}")
    return 0


def cmd_write_mqtt_auth(args: argparse.Namespace) -> int:
    cfg = settings(args)
    db = open_db(cfg)
    try:
        _write_mqtt_auth(cfg, db)
    finally:
        db.dispose()
    return 0


# -- the site's broker: TLS and bridges ------------------------------------------------


def cmd_make_certs(args: argparse.Namespace) -> int:
    from hub.tls import write_site_certs

    folder = args.dir
    try:
        written = write_site_certs(folder, args.host, group=args.group)
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
