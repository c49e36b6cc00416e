"""The README is true to the code: every `kdfleet` command line it shows parses with the options it
uses, the command is where it says, and the PostgreSQL account the tests expect is the one it names."""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


class Parsed(Exception):
    """Raised instead of running the command, once its arguments parsed."""


def command_lines() -> list[str]:
    """The `kdfleet ...` lines of the README's shell blocks, continuations joined, comments cut."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("kdfleet "):
                lines.append(line)
    return lines


@pytest.mark.parametrize("line", command_lines())
def test_every_command_the_readme_shows_parses(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdfleet.cli import main

    def parse_only(self: argparse.ArgumentParser, args=None, namespace=None):
        _, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise AssertionError(f"{line}: {self.prog} does not know {unknown}")
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(Parsed):
        main(shlex.split(line)[1:])


def test_the_readme_says_how_to_get_kdfleet_on_the_path() -> None:
    text = README.read_text()
    assert "`. .venv/bin/activate`" in text and "`.venv/bin/kdfleet ...`" in text
    assert (Path(sys.executable).parent / "kdfleet").exists(), "make venv installs the command beside python"
    assert (Path(sys.executable).parent / "activate").exists()


def test_the_postgresql_account_the_tests_expect_is_the_one_the_readme_names(monkeypatch) -> None:
    from tests.conftest import _pg_admin_url

    text = " ".join(README.read_text().split())
    monkeypatch.delenv("KDFLEET_TEST_PG", raising=False)
    assert _pg_admin_url() == "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    assert "127.0.0.1:5432 to let user `postgres` in without a password" in text
    monkeypatch.setenv("KDFLEET_TEST_PG", "postgresql+psycopg://ci:pw@db:5433/postgres")
    assert _pg_admin_url() == "postgresql+psycopg://ci:pw@db:5433/postgres"
    assert "`KDFLEET_TEST_PG=postgresql+psycopg://USER:PASSWORD@HOST:PORT/postgres`" in text
