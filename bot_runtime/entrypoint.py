"""The team's bot: the `async def bot(runner_args)` named by BOT_ENTRYPOINT, imported and checked.

BOT_ENTRYPOINT is `module:function` (the module found on `sys.path`, the working directory
first), or a path to a `.py` file with an optional `:function`; the function defaults to `bot`.
Unset, it is the example bot that ships with the runtime. A file is imported as Pipecat's
development runner imports it (`python bot.py`): under its own name, its folder first on
`sys.path`, so that its sibling modules import too.

The module may also define `async def on_session_stop(worker, reason)`: called before the
runtime ends a session it was asked to stop (SIGTERM, SIGINT, the time limit), with the
session's `PipelineWorker` and the reason, e.g. to queue a spoken goodbye.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bot_runtime.outcome import error_line

BOT_ENTRYPOINT = "BOT_ENTRYPOINT"
DEFAULT_FUNCTION = "bot"
STOP_HOOK = "on_session_stop"
# The example bot, beside the runtime in this repository (the image sets BOT_ENTRYPOINT).
DEFAULT_ENTRYPOINT = str(Path(__file__).resolve().parent.parent / "examples" / "bot" / "bot.py")

BotFunction = Callable[[Any], Coroutine[Any, Any, Any]]
StopHook = Callable[[Any, str], Coroutine[Any, Any, Any]]


class EntryPointError(Exception):
    """The entry point cannot be run; the message names the problem in the error's own words."""


@dataclass(frozen=True)
class EntryPoint:
    """The team's bot function, the module it lives in, and its optional stop hook."""

    name: str
    module: ModuleType
    function: BotFunction
    stop_hook: StopHook | None = None


@dataclass(frozen=True)
class EntryPointSpec:
    """BOT_ENTRYPOINT parsed: a file path or a module name, and the function's name."""

    raw: str
    function: str = DEFAULT_FUNCTION
    path: Path | None = None
    module: str | None = None

    @classmethod
    def parse(cls, raw: str | None) -> EntryPointSpec:
        """Parse BOT_ENTRYPOINT (None or blank: the example bot)."""
        raw = (raw or "").strip() or DEFAULT_ENTRYPOINT
        target, _, function = raw.rpartition(":") if _has_function(raw) else (raw, "", "")
        function = function.strip() or DEFAULT_FUNCTION
        if not function.isidentifier():
            raise EntryPointError(f"{BOT_ENTRYPOINT}={raw}: {function!r} is not a function name")
        target = target.strip()
        if target.endswith(".py") or "/" in target or "\\" in target:
            return cls(raw, function, path=Path(target).expanduser())
        if not all(part.isidentifier() for part in target.split(".")):
            raise EntryPointError(
                f"{BOT_ENTRYPOINT}={raw}: expected module:function or a path to a .py file"
            )
        return cls(raw, function, module=target)

    @property
    def name(self) -> str:
        """`module:function` or `path:function`, for logs and errors."""
        return f"{self.path or self.module}:{self.function}"


def _has_function(raw: str) -> bool:
    """Whether `raw` ends in `:function` (a Windows drive letter's colon does not count)."""
    head, sep, tail = raw.rpartition(":")
    return bool(sep) and "/" not in tail and "\\" not in tail and len(head) > 1


def spec_from_environ(environ: Mapping[str, str]) -> EntryPointSpec:
    """The entry point BOT_ENTRYPOINT names."""
    return EntryPointSpec.parse(environ.get(BOT_ENTRYPOINT))


def load(spec: EntryPointSpec) -> EntryPoint:
    """Import the module (running its module-level code) and check the function and the hook."""
    module = _import_file(spec) if spec.path is not None else _import_module(spec)
    function = getattr(module, spec.function, None)
    if function is None:
        raise EntryPointError(f"{spec.name}: {module.__name__} has no function {spec.function!r}")
    if not inspect.iscoroutinefunction(function):
        raise EntryPointError(
            f"{spec.name}: {spec.function} is not an async function "
            f"(expected `async def {spec.function}(runner_args)`)"
        )
    hook = getattr(module, STOP_HOOK, None)
    if hook is not None and not inspect.iscoroutinefunction(hook):
        raise EntryPointError(
            f"{spec.name}: {STOP_HOOK} must be `async def {STOP_HOOK}(worker, reason)`"
        )
    return EntryPoint(spec.name, module, function, hook)


def _import_module(spec: EntryPointSpec) -> ModuleType:
    assert spec.module is not None
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError) as exc:
        raise EntryPointError(f"{spec.name}: cannot import {spec.module}: {exc}") from exc
    if found is None:
        raise EntryPointError(f"{spec.name}: no module named {spec.module!r} on the path")
    return _run_import(spec, lambda: importlib.import_module(spec.module or ""))


def _import_file(spec: EntryPointSpec) -> ModuleType:
    assert spec.path is not None
    path = spec.path.resolve()
    if not path.is_file():
        raise EntryPointError(f"{spec.name}: no such file {path}")
    name = path.stem if path.stem.isidentifier() else "bot_entrypoint"
    if name in sys.modules:
        name = f"_bot_entrypoint_{name}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise EntryPointError(f"{spec.name}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module

    def execute() -> ModuleType:
        assert loader_spec is not None and loader_spec.loader is not None
        loader_spec.loader.exec_module(module)
        return module

    try:
        return _run_import(spec, execute)
    except EntryPointError:
        sys.modules.pop(name, None)
        raise


def _run_import(spec: EntryPointSpec, load_module: Callable[[], ModuleType]) -> ModuleType:
    """Run the module's code; whatever it raises becomes an EntryPointError in its own words."""
    try:
        return load_module()
    except (Exception, SystemExit) as exc:
        raise EntryPointError(f"{spec.name}: importing it raised {error_line(exc)}") from exc
