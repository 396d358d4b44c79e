"""The images' environments, measured: each Dockerfile's install replayed into a fresh directory.

    .venv/bin/python bench/image_sizes.py

Installs the dispatcher's set (`uv sync --frozen --no-default-groups --no-editable`) and the
bot's (`uv sync --frozen --only-group bot --no-install-project`, then the example bot's
requirements on top, constrained to the runtime's locked versions) with bytecode compiled, as
the Dockerfiles do, then prints each environment's size on disk, its gzip size (what a registry
layer roughly weighs), and its biggest packages. The base image (python:3.11-slim-bookworm) is
not measured here: add Docker Hub's published figure (about 125 MB unpacked, 45 MB compressed).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {
    "dispatcher": ["--no-default-groups", "--no-editable"],
    "bot": ["--only-group", "bot", "--no-install-project"],
}
# What the bot image installs on top of its locked set by default (Dockerfile.bot's BOT_DIR).
BOT_REQUIREMENTS = ROOT / "examples" / "bot" / "requirements.txt"


def uv() -> list[str]:
    """The uv command (on PATH, or as a module of this interpreter)."""
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def size(path: Path) -> int:
    """Bytes on disk under `path` (files only, symlinks not followed)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def gzip_size(path: Path) -> int:
    """Bytes of a gzip'd tar of `path`."""
    counter = _Counter()
    with (
        gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        tar.add(path, arcname=path.name)
    return counter.bytes


class _Counter:
    """A write-only file that counts what is written to it."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def install_on_top(env_dir: Path, requirements: Path, env: dict[str, str]) -> None:
    """Install a bot folder's requirements into the bot's environment, as Dockerfile.bot does:
    never changing a version the runtime locks."""
    constraints = env_dir / "runtime-constraints.txt"
    export = ["export", "--frozen", "--quiet", "--only-group", "bot", "--no-emit-project"]
    subprocess.run(  # noqa: S603 (uv, with our own flags)
        [*uv(), *export, "--no-hashes", "--output-file", str(constraints)],
        cwd=ROOT,
        env=env,
        check=True,
    )
    python = str(env_dir / "bin" / "python")
    install = ["pip", "install", "--quiet", "--python", python, "--constraints", str(constraints)]
    subprocess.run(  # noqa: S603
        [*uv(), *install, "--requirements", str(requirements)],
        cwd=ROOT,
        env=env,
        check=True,
    )
    constraints.unlink()


def main() -> int:
    mb = 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in IMAGES.items():
            env_dir = Path(tmp) / name
            env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(env_dir), "UV_COMPILE_BYTECODE": "1"}
            subprocess.run(  # noqa: S603 (uv, with our own flags)
                [*uv(), "sync", "--frozen", "--quiet", *flags], cwd=ROOT, env=env, check=True
            )
            if name == "bot":
                install_on_top(env_dir, BOT_REQUIREMENTS, env)
            site = next(env_dir.glob("lib/python*/site-packages"))
            packages = sorted(
                ((size(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True
            )
            biggest = ", ".join(f"{n} {s / mb:.0f}" for s, n in packages[:8])
            total, packed = size(env_dir) / mb, gzip_size(env_dir) / mb
            print(f"{name:10} env {total:5.0f} MB  gzip {packed:4.0f} MB  biggest (MB): {biggest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
