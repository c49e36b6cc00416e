"""The `kdfleet` command: one entry point, each subcommand served by its own package.

A subcommand's package is imported only when it runs, so the agent's
commands work on a device that has no torch and no Flask.
"""
from __future__ import annotations

import importlib
import sys

from trainer import commands as trainer_commands

# name -> (module, function, one-line help); the trainer's own table supplies its commands
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("kdfleet.demo", "main", "run the whole fleet locally: data, model, broker, hub, 3 stations"),
    **{n: c for n, c in trainer_commands.COMMANDS.items() if n not in trainer_commands.GROUP_ONLY},
    "agent": ("agent.cli", "main", "the station agent (`agent run`, `agent check`, `agent bench`)"),
    "hub": ("hub.cli", "main", "the hub: MQTT ingest, database and dashboard"),
    "fleet": ("kdfleet.fleet", "main", "one site as local processes (`fleet up --agents N`, `fleet status`)"),
    "keys": ("kdfleet.package_cli", "keys_main", "signing keys for model packages (`keys new`)"),
    "package": ("kdfleet.package_cli", "package_main", "sign, verify and inspect model packages"),
    "trainer": ("kdfleet.cli", "trainer_main", "the trainer's commands as one group (`trainer serve`, ...)"),
}
# a program's subcommand served by another package: the station benchmark is no part of the agent
ROUTED: dict[tuple[str, str], tuple[str, str]] = {
    ("agent", "bench"): ("bench.agent", "main"),
}


def usage(names: list[str]) -> str:
    width = max(len(n) for n in names)
    lines = ["usage: kdfleet <command> [options]   (kdfleet <command> --help for more)", "", "commands:"]
    lines += [f"  {n.ljust(width)}  {COMMANDS[n][2]}" for n in names]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = list(COMMANDS)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(names))
        return 0
    name = argv[0]
    if name not in names:
        print(f"kdfleet: unknown command {name!r}\n\n{usage(names)}", file=sys.stderr)
        return 2
    if name in trainer_commands.COMMANDS:   # the trainer dispatches its own commands
        return trainer_commands.main(argv, prog="kdfleet")
    module, func, _ = COMMANDS[name]
    if len(argv) > 1 and (name, argv[1]) in ROUTED:
        module, func = ROUTED[name, argv[1]]
        argv = argv[1:]
    try:
        target = getattr(importlib.import_module(module), func)
    except ImportError as exc:
        print(f"kdfleet {name}: needs a package that is not installed ({exc.name}); "
              f"install it with: pip install 'kdfleet[{module.split('.')[0]}]'", file=sys.stderr)
        return 2
    result = target(argv[1:])
    return int(result or 0)


def trainer_main(argv: list[str]) -> int:
    """`kdfleet trainer <command>`: the trainer's group, the same as `python -m trainer`."""
    return trainer_commands.main(argv, prog="kdfleet trainer")


if __name__ == "__main__":
    sys.exit(main())
