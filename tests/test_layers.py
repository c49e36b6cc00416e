"""The layout's rule, checked on the source: agent, hub and trainer import only shared/ and themselves;
shared/ imports only itself; the programs (kdfleet/) and benchmarks (bench/) sit on top of them all."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "hub", "trainer", "shared", "kdfleet", "bench")


def imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(PACKAGES)


@pytest.mark.parametrize("service", ["agent", "hub", "trainer", "shared"])
def test_a_service_imports_only_the_shared_language_and_itself(service: str) -> None:
    allowed = {service, "shared"}
    crossing = {str(p.relative_to(ROOT)): sorted(imported_packages(p) - allowed)
                for p in sorted((ROOT / service).rglob("*.py"))}
    assert {f: pkgs for f, pkgs in crossing.items() if pkgs} == {}


def test_the_trainer_s_commands_are_one_table_for_both_entry_points(capsys) -> None:
    from kdfleet.cli import COMMANDS, main
    from trainer import commands

    assert main(["serve"]) == 2 and "unknown command 'serve'" in capsys.readouterr().err   # only in its group
    assert all(COMMANDS[n] == c for n, c in commands.COMMANDS.items() if n not in commands.GROUP_ONLY)
    assert main(["trainer", "--help"]) == 0 and "serve" in capsys.readouterr().out
    assert commands.main(["nope"]) == 2 and "python -m trainer: unknown command 'nope'" in capsys.readouterr().err
