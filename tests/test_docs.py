"""The project's docs, read as a newcomer reads them: every command of the `dispatcher` CLI
is documented, and nothing points outside the repository (no ../shared paths, no issue numbers
of the tracker the project was built from)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.cli import parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bots" / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def _text() -> str:
    return "\n".join(p.read_text() for p in DOCS if p.exists())


def _commands(node: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    """Every leaf command line of the CLI, e.g. `dispatcher pool status`."""
    subparsers = [a for a in node._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield " ".join(("dispatcher", *prefix))
        return
    for name, sub in subparsers[0].choices.items():
        yield from _commands(sub, (*prefix, name))


COMMANDS = sorted(_commands(parser()))


def test_the_cli_has_the_commands_this_test_knows() -> None:
    assert "dispatcher pool status" in COMMANDS and "dispatcher serve" in COMMANDS
    assert len(COMMANDS) >= 6


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_documented(command: str) -> None:
    words = command.split()[1:]
    # `dispatcher sessions show ID`, or the uv-run form: the words in order on one line.
    pattern = re.compile(r"\b" + r"\s+".join(map(re.escape, words)) + r"\b")
    lines = [ln for ln in _text().splitlines() if "dispatcher" in ln and pattern.search(ln)]
    assert lines, f"`{command}` is not documented in {', '.join(p.name for p in DOCS)}"


def test_nothing_refers_outside_the_repository() -> None:
    text = _text()
    assert "../shared" not in text
    found = re.findall(r"(?i)\bissues?\s+#?\d+|\(#\d+\)", text)
    assert not found, f"the docs cite issue numbers: {found}"
