"""People (dashboard users with roles) and services (API tokens).

Passwords are kept as salted scrypt hashes (werkzeug.security); API tokens
as the sha256 of the token, which is random enough that a fast hash is the
right one: a token is looked up by its hash and never stored in clear.
Roles are ordered: an operator may do what a viewer may, an admin what an
operator may (`allows`).

Signing in is throttled (`sign_in`): after ACCOUNT_FAILURES wrong passwords
for one user name within THROTTLE_WINDOW, or ADDRESS_FAILURES from one
address, further attempts are refused unchecked until the oldest of those
failures is THROTTLE_WINDOW old. Failures are rows in the database, so the
count holds across every web process serving it; two attempts racing may
each get through the check, which costs the guesser one try, no more.
A success clears the user name's failures, as does a new password.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from hub.db.models import ADDRESS_LEN, NAME_LEN, ROLES, ApiToken, LoginFailure, User
from hub.services.common import NotFound, now_utc

_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
PASSWORD_METHOD = "scrypt"  # werkzeug's default: memory-hard, ~0.1 s per check
TOKEN_PREFIX = "kdf_"
TOUCH_EVERY = timedelta(minutes=1)  # how often a token's last use is written back
MIN_PASSWORD = 8
# checked when the user name is unknown, so a wrong name takes as long as a wrong password
_DUMMY_HASH = generate_password_hash("kdfleet: no such user")
THROTTLE_WINDOW = timedelta(minutes=15)  # how long a failed sign-in counts
ACCOUNT_FAILURES = 5  # wrong passwords for one user name within the window that pause its sign-in
ADDRESS_FAILURES = 20  # from one address: more, since a plant's terminals often share one (NAT, proxy)


class UserError(ValueError):
    """A user or token that cannot be created or changed as asked."""


class Throttled(Exception):
    """Sign-in is paused for a user name or an address; the message says for how long and why."""

    def __init__(self, what: str, retry_after: timedelta) -> None:
        self.retry_after_s = max(1, int(retry_after.total_seconds() + 0.999))
        minutes = -(-self.retry_after_s // 60)
        whom = "for this account" if what == "account" else "from this address"
        help_ = "ask an admin to set a new password, or wait" if what == "account" else "wait"
        super().__init__(
            f"Too many wrong passwords {whom}: signing in is paused for {minutes} more minute"
            f"{'s' if minutes != 1 else ''}. If the password is lost, {help_}."
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is making a request: a signed-in user or a service with a token."""

    id: int
    name: str
    role: str
    kind: str  # "user" | "token"
    epoch: int = 0  # the user's session epoch (sessions from before a change are refused)

    def allows(self, role: str) -> bool:
        return allows(self.role, role)


@dataclass(frozen=True, slots=True)
class UserView:
    id: int
    username: str
    role: str
    active: bool
    created_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True, slots=True)
class TokenView:
    id: int
    name: str
    prefix: str
    role: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def allows(have: str, need: str) -> bool:
    """True when role `have` may do what role `need` may."""
    return ROLES.index(have) >= ROLES.index(need)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def _check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password needs at least {MIN_PASSWORD} characters")
    return password


# -- users ------------------------------------------------------------------------


def has_admin(session: Session) -> bool:
    return session.scalar(select(func.count()).select_from(User).where(User.role == "admin")) > 0


def create_user(session: Session, username: str, password: str, role: str = "viewer") -> User:
    """Add a user with a salted password hash; the caller commits."""
    if not _USERNAME.match(username):
        raise UserError(
            f"user name {username!r}: use 1-{NAME_LEN} letters, digits, '_', '.', '@' or '-'"
        )
    _check_role(role)
    _check_password(password)
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(
        username=username,
        password_hash=generate_password_hash(password, method=PASSWORD_METHOD),
        role=role,
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise UserError(f"user {username!r} already exists") from None
    return user


def authenticate(session: Session, username: str, password: str) -> Principal | None:
    """The user when name and password match an active account, else None; records the login."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(user.password_hash, password) or not user.active:
        return None
    user.last_login_at = now_utc()
    return Principal(user.id, user.username, user.role, "user", user.session_epoch)


def sign_in(
    session: Session, username: str, password: str, address: str, *, now: datetime | None = None
) -> Principal | None:
    """`authenticate`, throttled per user name and per address (see the module docstring).

    Raises Throttled, checking no password, while either has too many recent failures;
    records a failure, or clears the user name's on success. The caller commits.
    """
    now = now or now_utc()
    name, address = username[:NAME_LEN], (address or "unknown")[:ADDRESS_LEN]
    since = now - THROTTLE_WINDOW
    for what, column, value, limit in (
        ("account", LoginFailure.username, name, ACCOUNT_FAILURES),
        ("address", LoginFailure.address, address, ADDRESS_FAILURES),
    ):
        # the limit-th newest failure within the window: it ends the pause when it grows old
        oldest = session.scalar(
            select(LoginFailure.at)
            .where(column == value, LoginFailure.at > since)
            .order_by(LoginFailure.at.desc())
            .offset(limit - 1)
            .limit(1)
        )
        if oldest is not None:
            raise Throttled(what, oldest + THROTTLE_WINDOW - now)
    principal = authenticate(session, username, password)
    if principal is None:
        session.execute(delete(LoginFailure).where(LoginFailure.at <= since))  # what no pause counts any more
        session.add(LoginFailure(username=name, address=address, at=now))
    else:
        _clear_failures(session, name)
    return principal


def _clear_failures(session: Session, username: str) -> None:
    session.execute(delete(LoginFailure).where(LoginFailure.username == username[:NAME_LEN]))


def session_user(session: Session, user_id: int, epoch: int) -> Principal | None:
    """The user a session cookie names, unless deactivated or changed since the login."""
    user = session.get(User, user_id)
    if user is None or not user.active or user.session_epoch != epoch:
        return None
    return Principal(user.id, user.username, user.role, "user", user.session_epoch)


def list_users(session: Session) -> list[UserView]:
    return [
        UserView(u.id, u.username, u.role, u.active, u.created_at, u.last_login_at)
        for u in session.scalars(select(User).order_by(User.username))
    ]


def _user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    return user


def _keep_an_admin(session: Session, user: User) -> None:
    others = session.scalar(
        select(func.count())
        .select_from(User)
        .where(User.role == "admin", User.active, User.id != user.id)
    )
    if user.role == "admin" and user.active and not others:
        raise UserError(f"{user.username!r} is the last active admin; make another admin first")


def update_user(
    session: Session, user_id: int, *, role: str | None = None, active: bool | None = None
) -> UserView:
    """Change a user's role or active flag; their open sessions end. The caller commits."""
    user = _user(session, user_id)
    if (role is not None and role != "admin") or active is False:
        _keep_an_admin(session, user)
    if role is not None:
        user.role = _check_role(role)
    if active is not None:
        user.active = active
    user.session_epoch += 1
    return UserView(user.id, user.username, user.role, user.active, user.created_at, user.last_login_at)


def set_password(
    session: Session, user_id: int, new_password: str, *, current_password: str | None = None
) -> None:
    """Set a new password (checking the current one when given); other sessions end."""
    user = _user(session, user_id)
    if current_password is not None and not check_password_hash(user.password_hash, current_password):
        raise UserError("the current password is not right; nothing was changed")
    user.password_hash = generate_password_hash(_check_password(new_password), method=PASSWORD_METHOD)
    user.session_epoch += 1
    _clear_failures(session, user.username)  # a new password ends a pause on wrong ones


# -- API tokens ------------------------------------------------------------------------


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str, role: str) -> tuple[TokenView, str]:
    """A new token for service `name`; returns its record and the token, shown this once."""
    if not _USERNAME.match(name):
        raise UserError(f"token name {name!r}: use 1-{NAME_LEN} letters, digits, '_', '.', '@' or '-'")
    _check_role(role)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise UserError(f"a token named {name!r} exists already; revoke it or choose another name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, token_hash=_digest(token), prefix=token[:12], role=role)
    session.add(row)
    session.flush()
    return _token_view(row), token


def _token_view(t: ApiToken) -> TokenView:
    return TokenView(t.id, t.name, t.prefix, t.role, t.created_at, t.last_used_at, t.revoked_at)


def token_principal(session: Session, token: str) -> Principal | None:
    """The service a bearer token belongs to, unless unknown or revoked; notes its use."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == _digest(token)))
    if row is None or row.revoked_at is not None:
        return None
    now = now_utc()
    if row.last_used_at is None or now - row.last_used_at > TOUCH_EVERY:
        row.last_used_at = now
    return Principal(row.id, row.name, row.role, "token")


def list_tokens(session: Session) -> list[TokenView]:
    return [_token_view(t) for t in session.scalars(select(ApiToken).order_by(ApiToken.name))]


def revoke_token(session: Session, *, name: str | None = None, token_id: int | None = None) -> TokenView:
    """Revoke a token by name or id; the caller commits."""
    stmt = select(ApiToken).where(ApiToken.name == name if name is not None else ApiToken.id == token_id)
    row = session.scalar(stmt)
    if row is None:
        raise NotFound(f"no API token {name if name is not None else token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = now_utc()
    return _token_view(row)
