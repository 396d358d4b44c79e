"""Secret hygiene: whole sessions run with known secret values, and every log record, every
request sent to Fly and Daily, every answer to the client and the database are scanned for
them. The bot's own secrets (its callback token and Daily token) may appear in its machine's
env, and nowhere else."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dispatcher.config import Settings
from dispatcher.logs import JsonFormatter
from dispatcher.telemetry import Tracing
from testkit.fakes.common import Fault
from testkit.harness import SECRETS, dispatcher_stack, fly_emulator
from testkit.waits import eventually


def scan(haystacks: dict[str, str], needles: dict[str, str]) -> list[str]:
    """Where a needle shows up: `"<needle> in <haystack>"` entries."""
    return [
        f"{name} in {where}"
        for where, text in haystacks.items()
        for name, value in needles.items()
        if value and value in text
    ]


@pytest.mark.slow
async def test_no_secret_leaves_its_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Sessions that end, crash and fail to start; then every trace of them is scanned: log
    records (and their JSON lines), spans, answers, requests, settings, the database."""
    caplog.set_level(logging.DEBUG)
    fly = fly_emulator()
    answers: list[str] = []
    user_tokens: list[str] = []
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with dispatcher_stack(tmp_path, fly=fly, tracing=Tracing(provider)) as stack:
        assert stack.daily is not None

        async def run(body: object, *, user: str = "user-1") -> str:
            headers = stack.headers(user)
            user_tokens.append(headers["Authorization"].split()[1])
            response = await stack.http.post(
                "/start", json={"createDailyRoom": True, "body": body}, headers=headers
            )
            answers.append(response.text)
            return str(response.json().get("sessionId", ""))

        normal = await run({"greeting": "hi"})
        await stack.wait_state(normal, "ready")
        answers.append(
            (await stack.http.delete(f"/sessions/{normal}", headers=stack.headers())).text
        )
        crashed = await run({"testBot": {"exit_before_ready": 3}}, user="user-2")
        fly.faults.add("create", Fault(status=503, times=10))
        await run({}, user="user-3")  # a start that fails: 502, undone
        fly.faults.clear()
        wrong = await stack.http.get(f"/sessions/{normal}", headers={"Authorization": "Bearer x"})
        answers.append(wrong.text)
        await stack.wait_state(normal, "ended")
        await stack.wait_state(crashed, "failed", user="user-2")
        await eventually(
            lambda: all(m.state == "destroyed" for m in fly.machines.values()), what="cleanup"
        )
        machines = list(fly.machines.values())
        settings_repr = repr(stack.settings)
        fly_requests = json.dumps([r._asdict() for r in fly.requests], default=str)
        daily_requests = json.dumps([r._asdict() for r in stack.daily.requests], default=str)

    bot_secrets = {
        f"{m.name} {key}": m.config["env"][key]
        for m in machines
        for key in ("BOT_CALLBACK_TOKEN", "DAILY_TOKEN")
    }
    assert len(bot_secrets) == 4
    needles = {
        "FLY_API_TOKEN": SECRETS[0],
        "DAILY_API_KEY": SECRETS[1],
        "JWT_SECRET": SECRETS[2],
        **{f"user token {i}": t for i, t in enumerate(user_tokens)},
        **bot_secrets,
    }
    json_lines = JsonFormatter()
    records = [
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''} {vars(r)}"
        f" {json_lines.format(r)}"
        for r in caplog.records
    ]
    assert records, "nothing was logged: the scan would prove nothing"
    spans = [s.to_json() for s in exporter.get_finished_spans()]
    assert len(spans) > 10, "no spans: the scan would prove nothing"
    provider.shutdown()
    database = _dump(tmp_path / "dispatcher.db")
    # The bot's secrets appear once in the request that created its machine (its env), and
    # nowhere else in what was sent to Fly.
    create_bodies = [
        json.dumps(r.body)
        for r in fly.requests
        if r.method == "POST" and r.path.endswith("/machines")
    ]
    leaks = scan(
        {
            "logs": "\n".join(records),
            "spans": "\n".join(spans),
            "answers to clients": "\n".join(answers),
            "requests to Daily": daily_requests,
            "settings repr": settings_repr,
            "database": database,
        },
        needles,
    )
    leaks += scan({"requests to Fly": fly_requests}, {k: needles[k] for k in list(needles)[:3]})
    for name, value in bot_secrets.items():
        in_creates = sum(body.count(value) for body in create_bodies)
        assert fly_requests.count(value) == in_creates == 1, name
    assert not leaks, leaks


def _dump(path: Path) -> str:
    """Every row of every table of the SQLite database, as text."""
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return "\n".join(
            json.dumps(list(row), default=str)
            for table in tables
            for row in db.execute(f'SELECT * FROM "{table}"')  # noqa: S608
        )


def test_settings_repr_holds_no_secret() -> None:
    """`repr` of the settings (what a traceback or a debug log would print) shows no secret."""
    settings = Settings.from_env(
        {"JWT_SECRET": SECRETS[2], "DAILY_API_KEY": SECRETS[1], "FLY_API_TOKEN": SECRETS[0]}
        | {"FLY_BOT_APP": "bots", "BOT_IMAGE": "r/b:1", "DISPATCHER_URL": "http://d:1"}
    )
    text = repr(settings) + str(settings)
    assert not [s for s in SECRETS if s in text]
    assert "Secret('**********')" in text


async def test_fly_mode_without_auth_warns_on_every_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DISPATCHER_AUTH=none in fly mode is allowed only explicitly, and each start logs it."""
    async with dispatcher_stack(tmp_path, env={"DISPATCHER_AUTH": "none"}) as stack:
        assert stack.settings.auth == "none" and stack.settings.machine_backend == "fly"
        sids = []
        for _ in range(2):
            response = await stack.http.post("/start", json={"createDailyRoom": True})
            assert response.status_code == 200, response.text
            sids.append(response.json()["sessionId"])
        warnings = [r for r in caplog.records if "unauthenticated start" in r.getMessage()]
        assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
        for sid in sids:
            await stack.http.delete(f"/sessions/{sid}")
        for sid in sids:
            await stack.wait_state(sid, "ended", user="anonymous")
