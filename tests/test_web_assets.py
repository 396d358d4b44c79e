"""The committed web page (dispatcher/web/) is built from the current web/ sources and is
self-contained: no npm needed to run it, nothing fetched from a CDN."""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

# Its module-scoped fixtures are built once: on one xdist worker.
pytestmark = pytest.mark.xdist_group("web_assets")

ROOT = Path(__file__).resolve().parent.parent
WEB_SRC = ROOT / "web"
WEB_OUT = ROOT / "dispatcher" / "web"
REBUILD = "run `make web` and commit dispatcher/web/"

# Known CDNs and font hosts: none may appear anywhere in the served assets.
CDN_HOSTS = re.compile(
    r"(^|\.)(daily\.co|unpkg\.com|jsdelivr\.net|cdnjs\.cloudflare\.com|cloudflare\.com|"
    r"googleapis\.com|gstatic\.com|esm\.sh|skypack\.dev|jspm\.io|bootstrapcdn\.com|"
    r"jquery\.com|fontawesome\.com|typekit\.net|fonts\.net)$"
)
URL = re.compile(r"""(?:https?:)?//([a-z0-9.-]+\.[a-z]{2,})(?::\d+)?(?=[/"'`\s)?#]|$)""", re.I)
# Links that survive in the bundle's license comments; never fetched.
DOC_HOSTS = {"github.com"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hash_files(paths: list[Path], base: Path) -> tuple[str, dict[str, str]]:
    """web/build.mjs's hashFiles: per-file sha256, then sha256 of sha256sum-style lines."""
    files = {p.relative_to(base).as_posix(): _sha256(p) for p in paths}
    names = sorted(files)
    lines = "".join(f"{files[name]}  {name}\n" for name in names)
    return hashlib.sha256(lines.encode()).hexdigest(), {name: files[name] for name in names}


@pytest.fixture(scope="module")
def manifest() -> dict:
    path = WEB_OUT / "build.json"
    assert path.is_file(), f"{path} is missing: {REBUILD}"
    return json.loads(path.read_text())


def test_built_from_the_current_sources(manifest: dict) -> None:
    sources = [WEB_SRC / name for name in ("package.json", "package-lock.json", "build.mjs")]
    sources += sorted(p for p in (WEB_SRC / "src").rglob("*") if p.is_file())
    digest, files = _hash_files(sources, WEB_SRC)
    changed = sorted(
        name
        for name in files.keys() | manifest["sources"].keys()
        if files.get(name) != manifest["sources"].get(name)
    )
    assert not changed, (
        f"web sources changed since the last build ({', '.join(changed)}): {REBUILD}"
    )
    assert digest == manifest["sourceHash"], REBUILD


def test_outputs_are_the_built_ones(manifest: dict) -> None:
    served = sorted(p.name for p in WEB_OUT.iterdir() if p.is_file() and p.name != "build.json")
    assert served == sorted(manifest["outputs"]), f"unexpected files in dispatcher/web/: {REBUILD}"
    _, files = _hash_files([WEB_OUT / name for name in served], WEB_OUT)
    edited = [name for name in served if files[name] != manifest["outputs"][name]]
    assert not edited, (
        f"dispatcher/web/{edited[0]} differs from the build (edit web/src): {REBUILD}"
    )


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href", "srcset", "poster", "data", "action"} and value is not None:
                self.refs.append((tag, name, value))


def test_page_references_only_local_assets() -> None:
    parser = _Refs()
    parser.feed((WEB_OUT / "index.html").read_text())
    refs = {value for _, _, value in parser.refs}
    assert {"/web/app.js", "/web/app.css"} <= refs
    for tag, attr, value in parser.refs:
        local = value.startswith("/web/") and (WEB_OUT / value.removeprefix("/web/")).is_file()
        assert local or value.startswith("data:"), f"<{tag} {attr}={value!r}> is not a local asset"


@pytest.mark.parametrize("name", ["index.html", "app.css", "app.js"])
def test_no_cdn_urls(name: str) -> None:
    text = (WEB_OUT / name).read_text()
    hosts = {m.group(1).lower() for m in URL.finditer(text)}
    cdns = sorted(h for h in hosts if CDN_HOSTS.search(h))
    assert not cdns, f"dispatcher/web/{name} names a CDN: {cdns}"
    if name != "app.js":
        assert not hosts, f"dispatcher/web/{name} names an external host: {sorted(hosts)}"
    else:
        assert hosts <= DOC_HOSTS, f"app.js names unexpected hosts: {sorted(hosts - DOC_HOSTS)}"
