"""The CPU floor of a start: what each piece of work a start must do costs on this machine.

    .venv/bin/python bench/cpu_floor.py [--n 400] [--database-url postgresql://...] [--out f.json]

Issue 8 asks for under 2 ms of dispatcher CPU per start; bench/startup.py measures about 20.
This bench, in one run, measures the CPU of one operation of each library a cold start has to
use, N times each after a warm-up, and adds them up:

- request in: a JSON POST answered with JSON by uvicorn + starlette configured as
  `dispatcher serve` configures them (h11, asyncio), run as a separate process whose CPU is read
  from /proc/<pid>/stat;
- request out: the same POST sent by an httpx AsyncClient (keep-alive, the answer's JSON
  decoded), this process's CPU; a cold start sends two (Daily's room, Fly's create), a pooled
  start two as well (Daily's room, Fly's start);
- tokens: the caller's HS256 JWT verified and two meeting tokens signed (pyjwt);
- the store as the dispatcher uses it (dispatcher/store.py: SQLAlchemy's asyncio engine over
  aiosqlite, or asyncpg): the start's rate-limit buckets, the session's insert under its caps,
  the dispatched transition, and one SELECT by key for scale; next to them the same SELECT
  through aiosqlite alone and through the stdlib sqlite3 (synchronously), and the start's writes
  as one sqlite3 transaction.

It prints floors per start against the 2 ms target: the libraries alone up to the answer
(request in, two out, tokens: no store at all), the same up to the bot's ready (plus the
supervisor's first wait call out and the ready callback in), and the answer's path with the
store as it is, or with its writes through sqlite3 alone. What it leaves out, which a real start
also does: logging, metrics and the asyncio scheduling between all of these.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import httpx
import jwt
from sqlalchemy.ext.asyncio import create_async_engine

from bench.report import emit, process_cpu_s
from dispatcher.store import DISPATCHED, STARTING, Session, Store, engine_url
from testkit.net import free_port
from testkit.waits import eventually

ROOT = Path(__file__).resolve().parent.parent

TARGET_MS = 2.0
# How long the echo server subprocess may take to listen.
SERVER_UP_S = 120.0
SECRET = "cpu-floor-bench-secret-0123456789abcdef"  # noqa: S105 (a bench's own key)
# A /start body and a Fly create answer of realistic size.
BODY = {"createDailyRoom": True, "body": {"persona": "support", "language": "en"}}
ANSWER = {
    "id": "148ed193b95e89",
    "name": "s-7f3a9c21",
    "state": "created",
    "region": "iad",
    "instance_id": "01J0000000000000000000000",
    "private_ip": "fdaa:0:1:a7b:1::2",
    "config": {"image": "registry.fly.io/bots@sha256:" + "a" * 64, "env": {"SESSION_ID": "x"}},
}
Op = Callable[[int], Awaitable[None]]


def serve(port: int) -> None:
    """The answering side: uvicorn + starlette as `dispatcher serve` runs them."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def answer(request: Request) -> JSONResponse:
        json.loads(await request.body())
        return JSONResponse(ANSWER)

    app = Starlette(routes=[Route("/start", answer, methods=["POST"])])
    config = uvicorn.Config(app, port=port, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run()


async def per_op_ms(op: Op, n: int, warmup: int, pid: int | None = None) -> float:
    """CPU milliseconds per call of `op`: this process's, or process `pid`'s."""
    for i in range(warmup):
        await op(-1 - i)
    before = time.process_time() if pid is None else process_cpu_s(pid)
    for i in range(n):
        await op(i)
    after = time.process_time() if pid is None else process_cpu_s(pid)
    if before is None or after is None:
        raise RuntimeError(f"process {pid} is gone")
    return (after - before) * 1000 / n


async def measure_http(n: int, warmup: int) -> dict[str, float]:
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", str(port), cwd=ROOT
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def listening() -> bool:
                if server.returncode is not None:
                    raise RuntimeError(f"the echo server exited with {server.returncode}")
                try:
                    await client.get("/")
                except httpx.TransportError:
                    return False
                return True

            # A fresh interpreter importing Starlette and uvicorn: seconds on a busy machine.
            await eventually(listening, SERVER_UP_S, "the echo server to listen")

            async def post(_: int) -> None:
                (await client.post("/start", json=BODY)).raise_for_status().json()

            # One loop, two processes: this one's CPU is the client's, the server's its own.
            for i in range(warmup):
                await post(i)
            server_before, client_before = process_cpu_s(server.pid), time.process_time()
            for i in range(n):
                await post(i)
            server_after, client_after = process_cpu_s(server.pid), time.process_time()
    finally:
        server.terminate()
        await server.wait()
    assert server_before is not None and server_after is not None
    return {
        "request_in": (server_after - server_before) * 1000 / n,
        "request_out": (client_after - client_before) * 1000 / n,
    }


async def measure_tokens(n: int, warmup: int) -> float:
    caller = jwt.encode({"sub": "user-1", "exp": int(time.time()) + 600}, SECRET)

    async def tokens(_: int) -> None:
        jwt.decode(caller, SECRET, algorithms=["HS256"], leeway=30)
        for who in ("user", "bot"):
            jwt.encode({"r": "room", "ud": who, "exp": int(time.time()) + 600}, SECRET)

    return await per_op_ms(tokens, n, warmup)


def _session(i: int) -> Session:
    now = time.time()
    return Session(
        id=f"s-{i}",
        user_id=f"user-{i % 7}",
        state=STARTING,
        transport="daily",
        dispatcher="bench",
        created_at=now,
        updated_at=now,
        expires_at=now + 3600,
        room_name=f"s-{i}",
        room_url=f"https://bench.daily.co/s-{i}",
        callback_hash="0" * 64,
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    )


async def measure_store(url: str, n: int, warmup: int) -> dict[str, float]:
    """The store's operations of a start, through dispatcher/store.py; on PostgreSQL in a
    schema of its own, dropped after."""
    schema = None if url.startswith("sqlite") else f"cpu_floor_{secrets.token_hex(4)}"
    store = await Store.open(url, schema=schema)
    try:
        buckets = [("user:bench", 0.001, 60.0), ("ip:bench", 0.001, 60.0)]

        async def rate(_: int) -> None:
            await store.take_tokens(buckets, time.time())

        async def create(i: int) -> None:
            await store.create_session(
                _session(i),
                max_sessions=10**9,
                max_per_user=10**9,
                events=[("requested", {"user": "u", "transport": "daily", "region": None})],
            )

        async def dispatch(i: int) -> None:
            done = await store.transition(
                f"s-{i}",
                DISPATCHED,
                from_states=(STARTING,),
                machine_id="148ed193b95e89",
                region="iad",
                details={"machine_id": "148ed193b95e89", "region": "iad", "pooled": False},
                events=[("room_created", {"room": f"s-{i}"})],
            )
            assert done is not None

        async def select(i: int) -> None:
            await store.get(f"s-{i}")

        return {
            "rate_limit": await per_op_ms(rate, n, warmup),
            "create_session": await per_op_ms(create, n, warmup),
            "dispatched": await per_op_ms(dispatch, n, warmup),
            "select": await per_op_ms(select, n, warmup),
        }
    finally:
        await store.close()
        if schema:
            engine = create_async_engine(engine_url(url))
            try:
                async with engine.begin() as conn:
                    await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await engine.dispose()


async def measure_sqlite_drivers(path: Path, n: int, warmup: int) -> dict[str, float]:
    """One SELECT by key through aiosqlite and through sqlite3; the start's writes (session,
    two events, the dispatched update and its event) as sqlite3 transactions."""
    query = "SELECT * FROM sessions WHERE id = ?"
    async with aiosqlite.connect(path) as db:

        async def via_aiosqlite(i: int) -> None:
            async with db.execute(query, (f"s-{i}",)) as cursor:
                await cursor.fetchone()

        aio = await per_op_ms(via_aiosqlite, n, warmup)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    columns = list(_session(0).__dict__)
    marks = ", ".join("?" * len(columns))
    # The column names are the Session dataclass's; every value is bound.
    insert = f"INSERT INTO sessions ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608
    event = "INSERT INTO session_events (session_id, at, kind, state, details) VALUES (?,?,?,?,?)"

    async def via_sqlite3(i: int) -> None:
        conn.execute(query, (f"s-{i}",)).fetchone()

    async def writes(i: int) -> None:
        s = _session(10**6 + i if i >= 0 else 2 * 10**6 - i)
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(insert, tuple(s.__dict__.values()))
            conn.execute(event, (s.id, s.created_at, "state", s.state, "{}"))
            conn.execute(event, (s.id, s.created_at, "requested", None, '{"user":"u"}'))
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE sessions SET state = ?, machine_id = ? WHERE id = ? AND state = ?",
                (DISPATCHED, "148ed193b95e89", s.id, STARTING),
            )
            conn.execute(event, (s.id, time.time(), "state", DISPATCHED, "{}"))

    try:
        return {
            "select_aiosqlite": aio,
            "select_sqlite3": await per_op_ms(via_sqlite3, n, warmup),
            "start_writes_sqlite3": await per_op_ms(writes, n, warmup),
        }
    finally:
        conn.close()


async def run_floor(n: int, warmup: int, database_url: str | None = None) -> dict[str, Any]:
    ops: dict[str, float] = {}
    ops.update(await measure_http(n, warmup))
    ops["tokens"] = await measure_tokens(n, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "floor.db"
        stores = {"sqlite": await measure_store(f"sqlite:///{path}", n, warmup)}
        ops.update(await measure_sqlite_drivers(path, n, warmup))
    if database_url:
        stores["postgresql"] = await measure_store(database_url, n, warmup)
    libraries = ops["request_in"] + 2 * ops["request_out"] + ops["tokens"]
    floors = {
        "libraries_alone": libraries,
        # Up to the bot's ready: the follow's first wait out, the ready callback in.
        "libraries_to_ready": libraries + ops["request_out"] + ops["request_in"],
    }
    for name, store in stores.items():
        floors[f"with_store_{name}"] = (
            libraries + store["rate_limit"] + store["create_session"] + store["dispatched"]
        )
    floors["with_sqlite3_writes"] = libraries + ops["start_writes_sqlite3"]
    return {
        "n": n,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "ops_ms": ops,
        "store_ms": stores,
        "floor_ms": floors,
        "target_ms": TARGET_MS,
        "floor_over_target": {k: v / TARGET_MS for k, v in floors.items()},
    }


def format_report(report: dict[str, Any]) -> str:
    ops, floors = report["ops_ms"], report["floor_ms"]
    lines = [
        f"cpu floor: {report['n']} of each operation, CPU ms per operation; "
        f"{report['machine']['cpus']} CPUs, Python {report['machine']['python']}",
        f"  request in (uvicorn + starlette, JSON)      {ops['request_in']:.3f}",
        f"  request out (httpx AsyncClient, JSON)       {ops['request_out']:.3f}",
        f"  tokens (verify one HS256 JWT, sign two)     {ops['tokens']:.3f}",
    ]
    for name, store in report["store_ms"].items():
        lines.append(f"  store on {name} (dispatcher/store.py: SQLAlchemy asyncio):")
        lines.append(f"    rate-limit buckets                        {store['rate_limit']:.3f}")
        lines.append(f"    session insert under its caps             {store['create_session']:.3f}")
        lines.append(f"    dispatched transition                     {store['dispatched']:.3f}")
        lines.append(f"    one SELECT by key                         {store['select']:.3f}")
    lines += [
        f"  one SELECT by key, aiosqlite alone          {ops['select_aiosqlite']:.3f}",
        f"  one SELECT by key, sqlite3 alone            {ops['select_sqlite3']:.3f}",
        f"  a start's writes, sqlite3 transactions      {ops['start_writes_sqlite3']:.3f}",
        "",
        f"floor of one start (request in, two out, tokens; to ready: + the follow's first wait "
        f"out and the ready callback in; + the store), target {TARGET_MS:g} ms:",
    ]
    for name, value in floors.items():
        ratio = report["floor_over_target"][name]
        lines.append(f"  {name:28s} {value:7.3f} ms = {ratio:.2f} x the target")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="measured calls of each operation")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--database-url", help="also measure the store on this PostgreSQL")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    report = asyncio.run(run_floor(args.n, args.warmup, args.database_url))
    emit(format_report(report), report, args.out)


if __name__ == "__main__":
    main()
