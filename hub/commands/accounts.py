"""Who may use the hub: dashboard users (`add-user`, `create-admin`) and API tokens (`add-token`, `revoke-token`)."""

from __future__ import annotations

import argparse
import getpass
import sys

from hub.commands.common import CliError, common_flags, open_db, settings
from hub.config import HubConfig
from hub.db.models import ROLES
from hub.services import users
from hub.services.common import NotFound


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("add-user", help="add a dashboard user", description="Add a dashboard user.")
    common_flags(p)
    p.add_argument("username")
    p.add_argument("--role", choices=ROLES, default="viewer", help="default viewer")
    _password_stdin_flag(p)
    p.set_defaults(handler=cmd_add_user)

    p = sub.add_parser(
        "create-admin",
        help="add the first admin (refused once an admin exists)",
        description="Add the first admin (refused once an admin exists).",
    )
    common_flags(p)
    p.add_argument("username")
    _password_stdin_flag(p)
    p.set_defaults(handler=cmd_create_admin)

    p = sub.add_parser(
        "add-token",
        help="create an API token for a service (printed once)",
        description="Create a bearer token for the JSON API. Only its hash is stored: "
        "the token is printed this once.",
    )
    common_flags(p)
    p.add_argument("name", help="the service, e.g. trainer")
    p.add_argument("--role", choices=ROLES, default="viewer", help="default viewer")
    p.set_defaults(handler=cmd_add_token)

    p = sub.add_parser("revoke-token", help="revoke an API token by name")
    common_flags(p)
    p.add_argument("name")
    p.set_defaults(handler=cmd_revoke_token)


def _password_stdin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of asking",
    )


def cmd_add_user(args: argparse.Namespace) -> int:
    return _add_user(settings(args), args.username, args.role, args.password_stdin, first_admin=False)


def cmd_create_admin(args: argparse.Namespace) -> int:
    return _add_user(settings(args), args.username, "admin", args.password_stdin, first_admin=True)


def _add_user(cfg: HubConfig, username: str, role: str, password_stdin: bool, *, first_admin: bool) -> int:
    db = open_db(cfg)
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


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password on: pipe it in with --password-stdin")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise CliError("the passwords differ; nothing was changed")
    return first


def cmd_add_token(args: argparse.Namespace) -> int:
    db = open_db(settings(args))
    try:
        with db.transaction() as session:
            view, token = users.create_token(session, args.name, args.role)
    except users.UserError as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    print(f"API token for {view.name!r} ({view.role}); it is shown only now, store it safely:")
    print(token)
    return 0


def cmd_revoke_token(args: argparse.Namespace) -> int:
    db = open_db(settings(args))
    try:
        with db.transaction() as session:
            users.revoke_token(session, name=args.name)
    except NotFound as exc:
        raise CliError(str(exc)) from None
    finally:
        db.dispose()
    print(f"revoked API token {args.name!r}")
    return 0
