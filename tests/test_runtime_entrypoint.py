"""BOT_ENTRYPOINT: parsed as `module:function` or a `.py` path, imported, and checked."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot_runtime.entrypoint import (
    DEFAULT_ENTRYPOINT,
    EntryPointError,
    EntryPointSpec,
    load,
)


@pytest.fixture(autouse=True)
def clean_imports() -> Iterator[None]:
    """Modules and path entries a test imports are forgotten after it."""
    modules, path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


BOT = "async def bot(runner_args):\n    return runner_args\n"


@pytest.mark.parametrize(
    ("raw", "path", "module", "function"),
    [
        ("", DEFAULT_ENTRYPOINT, None, "bot"),
        ("  ", DEFAULT_ENTRYPOINT, None, "bot"),
        ("mybot", None, "mybot", "bot"),
        ("mybot:run", None, "mybot", "run"),
        ("team.bots.voice:main", None, "team.bots.voice", "main"),
        ("bot.py", "bot.py", None, "bot"),
        ("./app/bot.py:run", "app/bot.py", None, "run"),
        ("/srv/app/voice.py", "/srv/app/voice.py", None, "bot"),
        ("mybot:", None, "mybot", "bot"),
    ],
)
def test_forms_are_parsed(raw: str, path: str | None, module: str | None, function: str) -> None:
    """A module name or a path to a `.py` file, each with an optional `:function` (default
    `bot`); unset or blank is the example bot."""
    spec = EntryPointSpec.parse(raw)
    assert (str(spec.path) if spec.path else None, spec.module, spec.function) == (
        path,
        module,
        function,
    )


@pytest.mark.parametrize("raw", ["my bot", "mybot:not-a-name", "2fast:bot", "a..b"])
def test_malformed_values_are_refused(raw: str) -> None:
    """A value that is neither form is refused, naming BOT_ENTRYPOINT and the value."""
    with pytest.raises(EntryPointError, match="BOT_ENTRYPOINT"):
        EntryPointSpec.parse(raw)


def test_a_file_is_imported_with_its_folder_on_the_path(tmp_path: Path) -> None:
    """A file imports under its own name with its folder first on `sys.path`, so its sibling
    modules import too, as under `python bot.py`; the function and the stop hook are found."""
    write(tmp_path / "app", "helpers.py", "GREETING = 'hi'\n")
    path = write(
        tmp_path / "app",
        "voice.py",
        "from helpers import GREETING\n"
        "async def run(runner_args):\n    return GREETING\n"
        "async def on_session_stop(worker, reason):\n    pass\n",
    )
    entry = load(EntryPointSpec.parse(f"{path}:run"))
    assert entry.module.__name__ == "voice"
    assert entry.function.__name__ == "run"
    assert entry.stop_hook is not None
    assert sys.path[0] == str(tmp_path / "app")


def test_a_module_is_imported_from_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`module:function` imports the module from `sys.path` (the working directory first)."""
    write(tmp_path / "team_pkg", "__init__.py", "")
    write(tmp_path / "team_pkg", "voice.py", BOT)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = load(EntryPointSpec.parse("team_pkg.voice"))
    assert entry.name == "team_pkg.voice:bot"
    assert entry.stop_hook is None


def test_the_example_bot_loads_by_default() -> None:
    """Unset, BOT_ENTRYPOINT is the example bot, with its goodbye hook."""
    with warnings.catch_warnings():
        # pipecat.audio.utils imports audioop, deprecated in Python 3.11 (audioop-lts from 3.13).
        warnings.simplefilter("ignore", DeprecationWarning)
        entry = load(EntryPointSpec.parse(None))
    assert entry.name == f"{DEFAULT_ENTRYPOINT}:bot"
    assert entry.stop_hook is not None


@pytest.mark.parametrize(
    ("text", "function", "words"),
    [
        (None, "bot", "no such file"),
        ("def bot(runner_args):\n    pass\n", "bot", "bot is not an async function"),
        (BOT, "run", "has no function 'run'"),
        ("BOT = 1\nbot = BOT\n", "bot", "bot is not an async function"),
        ("raise RuntimeError('no model file')\n", "bot", "RuntimeError: no model file"),
        ("async def bot(runner_args)\n", "bot", "SyntaxError"),
        ("import not_installed_anywhere\n", "bot", "ModuleNotFoundError"),
        ("import sys\nsys.exit(3)\n", "bot", "SystemExit: 3"),
        (BOT + "def on_session_stop(worker, reason):\n    pass\n", "bot", "on_session_stop"),
    ],
    ids=[
        "missing-file",
        "not-async",
        "no-such-function",
        "not-a-function",
        "raises-at-import",
        "syntax-error",
        "missing-dependency",
        "exits-at-import",
        "sync-stop-hook",
    ],
)
def test_broken_files_are_refused_in_their_own_words(
    tmp_path: Path, text: str | None, function: str, words: str
) -> None:
    """Each way a file can be broken is an EntryPointError naming the entry point and, for an
    import that raised, the error's type and message."""
    path = tmp_path / "team_bot.py"
    if text is not None:
        path.write_text(text)
    with pytest.raises(EntryPointError) as raised:
        load(EntryPointSpec.parse(f"{path}:{function}"))
    assert words in str(raised.value)
    assert str(path) in str(raised.value)


def test_a_missing_module_is_refused() -> None:
    """A module that is not on the path is refused by name."""
    with pytest.raises(EntryPointError, match="no module named 'no_such_team_bot'"):
        load(EntryPointSpec.parse("no_such_team_bot:bot"))
