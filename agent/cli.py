"""`kdfleet agent`: run a station or check that it could run.

(`kdfleet agent bench`, the station benchmark, is `bench.agent`: the `kdfleet` command routes it
there, so that the agent never imports a benchmark.)"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from agent.config import AgentConfig, load
from agent.runtimes import KINDS
from shared.checks import Checklist
from shared.config import ConfigError
from shared.logs import add_log_arguments, setup_logging

log = logging.getLogger("agent")


def _add_quick_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", type=Path, help="agent TOML config (flags below override it)")
    ap.add_argument("--package", help="model package (.kdpkg)")
    ap.add_argument("--broker", help="broker URL, e.g. mqtt://user:pass@host:1883")
    ap.add_argument("--site", help="site name")
    ap.add_argument("--device", help="device name")
    ap.add_argument("--station", help="station name")
    ap.add_argument("--folder", "--source", dest="source",
                    help="one source (folder, video file, camera index or stream URL) instead of [[sources]]")
    ap.add_argument("--cls", help="the class the --source shows")
    ap.add_argument("--fps", type=float, default=0.0, help="pace of --source (0: as fast as possible)")
    ap.add_argument("--loop", action="store_true", help="replay --source forever")
    ap.add_argument("--watch", action="store_true", help="keep watching the --source folder for new files")
    ap.add_argument("--runtime", choices=KINDS)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--spool", help="spool database path")
    ap.add_argument("--trusted-key", dest="trusted_keys", metavar="PUB", action="append",
                    help="public key file packages must be signed with (repeatable; replaces trusted_keys)")
    ap.add_argument("--allow-unsigned", action="store_const", const=True,
                    help="run unsigned packages when no key is trusted (development only)")


def _config(args: argparse.Namespace) -> AgentConfig:
    overrides = {k: getattr(args, k) for k in ("package", "broker", "site", "device", "station", "runtime",
                                                "threads", "trusted_keys", "allow_unsigned")}
    if args.source:
        if not args.cls:
            raise ConfigError("--source needs --cls (the class it shows)")
        overrides["sources"] = [{"uri": args.source, "cls": args.cls, "fps": args.fps, "loop": args.loop,
                                 "watch": args.watch}]
    if args.spool:
        overrides["spool"] = {"path": args.spool}
    cfg = load(args.config, overrides)
    return cfg


def _add_run_flags(ap: argparse.ArgumentParser) -> None:
    _add_quick_flags(ap)
    ap.add_argument("--until-drained", action="store_true",
                    help="exit once every source has ended and every result is delivered")
    ap.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_log_arguments(ap)


def run_station(args: argparse.Namespace) -> int:
    """`kdfleet agent run`: the station until Ctrl-C (or, with --until-drained, until delivered)."""
    setup_logging(args.log_json, args.log_level)   # --log-json, else KDFLEET_LOG_JSON
    try:
        from agent.pipeline import Agent

        agent = Agent(_config(args))
    except (ConfigError, ValueError, OSError) as exc:
        print(f"kdfleet agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0   # stopped while loading: nothing was made yet

    def on_stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if agent.stop.is_set():   # a second Ctrl-C must not cut the shutdown short and lose the drain
            log.info("stopping already (%s again): queued frames first, then the hub's receipts for a few "
                     "seconds at most; the spool keeps what it has not confirmed", name)
        else:
            log.info("stopping (%s)", name)
        agent.stop.set()

    # both end in the same orderly shutdown; a KeyboardInterrupt could strike in the middle of it
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    agent.run(until_drained=args.until_drained)
    if agent.link.fatal:
        print(f"kdfleet agent: {agent.link.fatal}", file=sys.stderr)
        return 1
    return 0


def check_station(args: argparse.Namespace) -> int:
    """`kdfleet agent check`: validate the config, the package, the runtime and the broker; print what is wrong."""
    checks = Checklist()
    report = checks.report
    try:
        cfg = _config(args)
        report("config", None)
    except ConfigError as exc:
        report("config", str(exc))
        return 1
    from shared.package import PackageError, load_public_key, read_package

    package = None
    try:
        keys = [load_public_key(k) for k in cfg.trusted_keys] or None
        package = read_package(cfg.package, trusted_keys=keys)
        m = package.manifest
        missing = [s.cls for s in cfg.sources if s.cls not in m.classes]
        report(f"package {m.model_id} {m.version} ({m.precision}, "
               f"{'signed' if package.signed_by else 'unsigned'})",
               f"classes {missing} not in the model {list(m.classes)}" if missing else None)
    except (PackageError, OSError, ValueError) as exc:
        report("package", str(exc))
    if package is not None:
        try:
            from agent.runtimes import open_runtime
            from agent.updater import UpdateError, self_test

            rt = open_runtime(cfg.runtime, package.model, package.manifest, cfg.threads)
            try:
                worst = self_test(rt, package)
                report(f"runtime {rt.name}, golden self-test ({len(package.golden)} images, worst error "
                       f"{worst:.1e})")
            except UpdateError as exc:
                report(f"runtime {rt.name}, golden self-test", str(exc))
        except Exception as exc:  # any runtime failure is what check must report
            report("runtime", f"{type(exc).__name__}: {exc}")
    import threading

    from agent.sources import SourceError, open_source, redact

    for s in cfg.sources:
        try:
            open_source(s.uri, s.fps, threading.Event(), s.loop, s.watch).probe()
            report(f"source {redact(s.uri)}", None)
        except SourceError as exc:
            report(f"source {redact(s.uri)}", str(exc))
    from shared.mqtt import MqttLink

    link = MqttLink(cfg.broker_config(), f"kdfleet-check-{cfg.device}").start()
    connected = link.wait_connected(5)
    report(f"broker {cfg.broker_config().url}", None if connected else (link.fatal or "no connection within 5 s"))
    link.stop()
    return checks.exit_code


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kdfleet agent", description="The station agent (also `python -m agent`).",
                                 epilog="`kdfleet agent bench`: the station benchmark (python -m bench.agent).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a station until Ctrl-C", description="Run a station until Ctrl-C.")
    _add_run_flags(run)
    run.set_defaults(handler=run_station)
    check = sub.add_parser("check", help="check config, package, runtime and broker",
                           description="Check config, package, runtime and broker; exit 1 if any fails.")
    _add_quick_flags(check)
    check.set_defaults(handler=check_station)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
