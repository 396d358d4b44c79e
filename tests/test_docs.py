"""The documentation, read as a newcomer reads it: every relative link of README.md, bots/ and
docs/ reaches a file (and a heading, when it names one) that exists, no page points outside the
repository (no ../shared paths, no issue numbers of the tracker the project was built from),
and every command of the `dispatcher` CLI is documented."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from dispatcher.cli import parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [ROOT / "README.md", ROOT / "bots" / "README.md", *(ROOT / "docs").rglob("*.md")],
    key=str,
)
# [text](target) and [text](target "title"); images too. Code spans and blocks are left out.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
# Paths that lead out of the repository: the shared design folder beside it, or an absolute one.
OUTSIDE = re.compile(r"\.\./shared|/work/")


def _prose(text: str) -> str:
    """The page without its code blocks and code spans, where links are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|(?<=\w)_", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors of a Markdown page's headings (a repeated heading gets `-1`, `-2`, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(_prose(path.read_text()))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto: ...
    ]


def test_the_docs_are_found() -> None:
    """The pages this suite checks exist: the README, bots/README.md and docs/."""
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "bots/README.md", "docs/configuration.md", "docs/http-api.md"} <= names


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file_and_heading(page: Path) -> None:
    """Each relative link of a page names a file of the repository, and a heading of it when
    the link has an anchor."""
    broken = []
    for target in _relative_links(page):
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not linked.exists() or not linked.is_relative_to(ROOT):
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_points_outside_the_repository(page: Path) -> None:
    """No page mentions the shared folder beside the repository (`../shared`) or an absolute
    path of the machine it was written on, in prose or in code."""
    found = [line for line in page.read_text().splitlines() if OUTSIDE.search(line)]
    assert not found, f"{page.relative_to(ROOT)}: {found}"


def test_no_source_points_outside_the_repository() -> None:
    """No module, of the service, the bots, the testkit or the benches, points at the shared
    folder or a path of the machine it was written on: its references are in docs/reference."""
    sources = [
        path
        for package in ("dispatcher", "bot_runtime", "bots", "testkit", "bench", "tests")
        for path in (ROOT / package).rglob("*.py")
        if path != Path(__file__).resolve()
    ]
    assert len(sources) > 100
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, found


def test_the_readme_starts_with_the_two_commands() -> None:
    """The first code block of the README is `make run` then `make test`, as a newcomer runs
    them."""
    first = FENCE.search((ROOT / "README.md").read_text())
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(0).splitlines()[1:-1]]
    assert commands == ["make run", "make test"]


def test_the_readme_stays_short() -> None:
    """The README is an entry point of at most about 200 lines; the rest lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


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
    """`dispatcher sessions show ID` or its `uv run` form: the words in order on one line."""
    words = command.split()[1:]
    pattern = re.compile(r"\b" + r"\s+".join(map(re.escape, words)) + r"\b")
    text = "\n".join(p.read_text() for p in DOCS)
    lines = [ln for ln in text.splitlines() if "dispatcher" in ln and pattern.search(ln)]
    assert lines, f"`{command}` is not documented in README.md, bots/ or docs/"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_cites_issue_numbers(page: Path) -> None:
    """Issue numbers mean nothing to a reader of the repository."""
    found = re.findall(r"(?i)\bissues?\s+#?\d+|\(#\d+\)", page.read_text())
    assert not found, f"{page.relative_to(ROOT)} cites issue numbers: {found}"
