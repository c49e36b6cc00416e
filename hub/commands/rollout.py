"""`kdfleet hub rollout`: start, watch, pause, resume or abort a model rollout.

These change the plan in the database only (hub.services.rollouts); the
controller in `serve` (hub.rollouts) carries it out over MQTT.
"""

from __future__ import annotations

import argparse

from sqlalchemy.orm import Session

from hub.commands.common import CliError, common_flags, open_db, settings
from hub.services import rollouts
from hub.services.common import NotFound, QueryError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rollout",
        help="start, watch, pause, resume or abort a model rollout",
        description="Ship a registry model to devices: a canary first, then waves, each gated on "
        "health for a soak period. `serve` drives rollouts; these commands only change the plan.",
    )
    common_flags(p)
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
    p.set_defaults(handler=cmd_rollout)


def cmd_rollout(args: argparse.Namespace) -> int:
    cfg = settings(args)
    db = open_db(cfg)
    try:
        with db.transaction() as session:
            if args.action == "start":
                rollout_id = _start(session, args)
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
    _print_detail(detail)
    return 0


def _start(session: Session, args: argparse.Namespace) -> str:
    try:
        model_id = int(args.target)
    except ValueError:
        raise CliError(f"{args.target!r} is not a model id; `GET /api/models` lists them") from None
    policy = rollouts.Policy(args.canary, args.wave_size, args.soak, args.max_failures, args.max_anomaly_rate,
                             args.max_latency_ms, args.max_anomaly_rise, args.wave_timeout)
    devices = [d for d in (args.devices or "").split(",") if d] or None
    return rollouts.start_rollout(session, model_id, policy, site=args.site, devices=devices, note=args.note,
                                  queue=args.queue)


def _print_detail(detail: rollouts.RolloutDetail) -> None:
    from hub.web.format import ago

    counts = ", ".join(f"{n} {state}" for state, n in sorted(detail.counts().items()))
    print(f"rollout {detail.id}: {detail.model} {detail.version}, {detail.state} ({counts})")
    if detail.note:
        print(f"  {detail.note}")
    for t in detail.targets:
        seen = f", last seen {ago(t.last_seen)}" if t.connection != "online" else ""
        print(f"  wave {t.wave}  {t.site}/{t.device}  {t.state} since {ago(t.updated_at)}  "
              f"({t.connection}{seen})  {t.reason}".rstrip())
