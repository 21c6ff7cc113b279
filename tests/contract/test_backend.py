"""One contract suite for every result backend (memory, sqlite, redis db 14), on real servers.

Each test runs its own event loop with ``asyncio.run``; other threads and processes use
their own backend instances on the same URL, as a worker and a client would.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from celeriac import states
from celeriac.backends import create_backend
from celeriac.backends.base import ResultBackend, ResultMeta
from celeriac.exceptions import NotSupported
from celeriac.serialization import codec

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/14"
BROKER_TABLES = {"messages", "bindings", "consumers", "broadcast", "locks"}


# -- fixtures -------------------------------------------------------------------------


class Target:
    """A backend URL plus a way to run a coroutine against a fresh instance on a new loop."""

    def __init__(self, kind: str, url: str, tmp_path: Path) -> None:
        self.kind, self.url, self.tmp_path = kind, url, tmp_path

    def run(self, fn: Callable[[ResultBackend], Awaitable[T]]) -> T:
        async def main() -> T:
            backend = create_backend(self.url)
            await backend.connect()
            try:
                return await fn(backend)
            finally:
                await backend.close()

        return asyncio.run(main())

    def python(self, script: str, *args: str) -> subprocess.Popen[str]:
        """Start ``script`` in a new interpreter with this URL as argv[1]."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(
            [sys.executable, "-c", script, self.url, *args],
            env=env,
            cwd=self.tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def _redis_or_skip() -> None:
    """Flush db 14; fail under CI=true, skip otherwise, if Redis or its backend is missing."""
    problem = None
    if importlib.util.find_spec("celeriac.backends.redis") is None:
        problem = "celeriac/backends/redis.py does not exist"
    else:
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=6379, db=14, socket_connect_timeout=2) as r:
                r.flushdb()
        except redis.RedisError as exc:
            problem = f"Redis at 127.0.0.1:6379 is not reachable: {exc}"
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    kind: str = request.param
    if kind == "memory":
        url = f"memory://contract-{uuid.uuid4().hex}"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    else:
        _redis_or_skip()
        url = REDIS_URL
    yield Target(kind, url, tmp_path)
    if kind == "memory":
        from celeriac.backends import memory

        memory.reset(url)
    elif kind == "redis":
        _redis_or_skip()


@pytest.fixture
def persistent(target: Target) -> Target:
    """Backends other processes can reach."""
    if target.kind == "memory":
        pytest.skip("memory:// lives in one process")
    return target


def uid() -> str:
    return uuid.uuid4().hex


def done(task_id: str, result: Any = None, status: str = states.SUCCESS) -> ResultMeta:
    return ResultMeta(task_id=task_id, status=status, result=result, date_done="2026-01-01")


# -- results --------------------------------------------------------------------------


def test_store_get_round_trip_success_and_failure(target: Target) -> None:
    ok = ResultMeta(
        task_id=uid(),
        status=states.SUCCESS,
        result={"sum": 4, "items": [1, "two", None]},
        children=[[["child-id", None], None]],
        date_done="2026-01-01T00:00:00+00:00",
        extended={"name": "tasks.add", "args": [2, 2], "kwargs": {}},
    )
    failed = ResultMeta(
        task_id=uid(),
        status=states.FAILURE,
        result={"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"},
        traceback='Traceback (most recent call last):\n  File "x"\nValueError: boom\n',
        date_done="2026-01-01T00:00:01+00:00",
    )

    async def body(b: ResultBackend) -> None:
        for meta in (ok, failed):
            await b.store(meta, ttl=None)
        for meta in (ok, failed):
            got = await b.get(meta.task_id)
            assert got is not None
            assert got.to_dict() == meta.to_dict()
        got_failed = await b.get(failed.task_id)
        assert got_failed is not None and got_failed.ready
        assert got_failed.result["exc_type"] == "ValueError"
        assert got_failed.traceback is not None and "boom" in got_failed.traceback

    target.run(body)


def test_store_overwrites_earlier_state(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        tid = uid()
        await b.store(ResultMeta(task_id=tid, status=states.STARTED), ttl=None)
        started = await b.get(tid)
        assert started is not None and started.status == states.STARTED and not started.ready
        await b.store(done(tid, 5), ttl=None)
        finished = await b.get(tid)
        assert finished is not None and finished.status == states.SUCCESS
        assert finished.result == 5

    target.run(body)


def test_get_unknown_is_none(target: Target) -> None:
    assert target.run(lambda b: b.get(uid())) is None


def test_get_many_returns_only_known(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        a, c = uid(), uid()
        await b.store(done(a, "A"), ttl=None)
        await b.store(done(c, "C", states.FAILURE), ttl=None)
        got = await b.get_many([a, uid(), c])
        assert set(got) == {a, c}
        assert got[a].result == "A" and got[c].status == states.FAILURE
        assert await b.get_many([]) == {}

    target.run(body)


def test_store_raw(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        tid = uid()
        data = codec(b.serializer).encode(done(tid, [1, 2]).to_dict())
        await b.store_raw(tid, data, ttl=None)
        got = await b.get(tid)
        assert got is not None and got.status == states.SUCCESS and got.result == [1, 2]

    target.run(body)


def test_forget(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        tid, keep = uid(), uid()
        await b.store(done(tid, 1), ttl=None)
        await b.store(done(keep, 2), ttl=None)
        await b.forget(tid)
        await b.forget(uid())  # forgetting what was never stored is fine
        assert await b.get(tid) is None
        assert await b.get(keep) is not None

    target.run(body)


def test_ttl_expiry(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        tid, keep, gid = uid(), uid(), uid()
        assert await b.chord_join(gid, "a", 2, ttl=1) is False
        await b.save_group(gid, ["a", "b"], ttl=1)
        await b.store(done(tid, 1), ttl=1)
        await b.store(done(keep, 2), ttl=None)
        deadline = time.monotonic() + 20
        while await b.get(tid) is not None or await b.load_group(gid) is not None:
            assert time.monotonic() < deadline, "results with ttl=1 never expired"
            await asyncio.sleep(0.1)
        assert await b.get(keep) is not None
        # The join set was written first with the same ttl, so it is gone too.
        assert await b.chord_join(gid, "b", 2, ttl=1) is False

    target.run(body)


# -- wait -----------------------------------------------------------------------------


def test_wait_yields_in_ready_order(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        ids = [uid() for _ in range(3)]
        await b.store(ResultMeta(task_id=ids[0], status=states.STARTED), ttl=None)
        it = aiter(b.wait(ids, timeout=30))
        for tid in (ids[2], ids[0], ids[1]):
            pending = asyncio.ensure_future(anext(it))
            await b.store(done(tid, tid), ttl=None)
            meta = await pending
            assert (meta.task_id, meta.result) == (tid, tid)
        with pytest.raises(StopAsyncIteration):
            await anext(it)

    target.run(body)


def test_wait_yields_already_ready_results(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        ids = [uid() for _ in range(3)]
        for tid in ids:
            await b.store(done(tid, tid), ttl=None)
        got = [m.task_id async for m in b.wait(ids, timeout=5)]
        assert sorted(got) == sorted(ids)

    target.run(body)


def test_wait_timeout(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        ready, missing = uid(), uid()
        await b.store(done(ready), ttl=None)
        seen: list[str] = []
        start = time.monotonic()
        with pytest.raises(TimeoutError):  # builtin; celeriac's TimeoutError subclasses it
            async for meta in b.wait([ready, missing], timeout=0.3):
                seen.append(meta.task_id)
        assert seen == [ready]
        assert time.monotonic() - start >= 0.2

    target.run(body)


def test_wait_wakes_on_store_from_another_thread(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        early, late = uid(), uid()
        await b.store(done(early), ttl=None)
        it = aiter(b.wait([early, late], timeout=60))
        assert (await anext(it)).task_id == early  # the wait is now running
        store = target.run
        _, meta = await asyncio.gather(
            asyncio.to_thread(store, lambda other: other.store(done(late, 42), ttl=None)),
            anext(it),
        )
        assert (meta.task_id, meta.result) == (late, 42)

    target.run(body)


STORE_SCRIPT = """
import asyncio, sys
from celeriac.backends import create_backend
from celeriac.backends.base import ResultMeta

async def main(url, task_id):
    backend = create_backend(url)
    await backend.connect()
    try:
        await backend.store(ResultMeta(task_id=task_id, status="SUCCESS", result=7), ttl=None)
    finally:
        await backend.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_wait_wakes_on_store_from_another_process(persistent: Target) -> None:
    async def body(b: ResultBackend) -> None:
        early, late = uid(), uid()
        await b.store(done(early), ttl=None)
        it = aiter(b.wait([early, late], timeout=60))
        assert (await anext(it)).task_id == early
        proc = persistent.python(STORE_SCRIPT, late)
        try:
            meta = await anext(it)
        finally:
            _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err
        assert (meta.task_id, meta.result) == (late, 7)

    persistent.run(body)


# -- groups and chords ----------------------------------------------------------------


def test_groups(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        gid, ids = uid(), [uid() for _ in range(3)]
        assert await b.load_group(gid) is None
        await b.save_group(gid, ids, ttl=None)
        assert await b.load_group(gid) == ids
        assert await b.chord_join(gid, ids[0], 2) is False
        await b.forget_group(gid)
        assert await b.load_group(gid) is None
        # forget_group also drops the join set: ids[0] no longer counts.
        assert await b.chord_join(gid, ids[1], 2) is False
        assert await b.chord_join(gid, ids[0], 2) is True

    target.run(body)


def test_chord_join_exactly_once(target: Target) -> None:
    async def body(b: ResultBackend) -> None:
        gid = uid()
        assert await b.chord_join(gid, "a", 3) is False
        assert await b.chord_join(gid, "b", 3) is False
        assert await b.chord_join(gid, "a", 3) is False  # redelivered before completion
        assert await b.chord_join(gid, "c", 3) is True  # completes the set
        for member in ("a", "b", "a"):  # redelivered after completion
            assert await b.chord_join(gid, member, 3) is False
        # The completing member re-runs after a crash before its ack: it fires again,
        # so the body is not lost, and still nobody else ever does.
        assert await b.chord_join(gid, "c", 3) is True
        assert await b.chord_join(gid, "c", 3) is True
        assert await b.chord_join(gid, "b", 3) is False

    target.run(body)


def test_chord_join_concurrent_threads(target: Target) -> None:
    size, gid = 8, uid()
    joins = [f"m{i}" for i in range(size)] * 2  # every member is delivered twice
    barrier = threading.Barrier(len(joins))

    def join(member: str) -> tuple[str, bool]:
        async def go(b: ResultBackend) -> bool:
            await asyncio.to_thread(barrier.wait, 30)
            return await b.chord_join(gid, member, size)

        return member, target.run(go)

    with ThreadPoolExecutor(len(joins)) as pool:
        results = list(pool.map(join, joins))
    winners = [member for member, fired in results if fired]
    # Only the completing member fires, and both its deliveries do (the re-run case).
    assert len(winners) == 2 and len(set(winners)) == 1, results


JOIN_SCRIPT = """
import asyncio, os, sys, time
from celeriac.backends import create_backend

async def main(url, group_id, member, size, gate):
    backend = create_backend(url)
    await backend.connect()
    try:
        while not os.path.exists(gate):
            await asyncio.sleep(0.005)
        print(await backend.chord_join(group_id, member, int(size)))
    finally:
        await backend.close()

asyncio.run(main(*sys.argv[1:]))
"""


def test_chord_join_concurrent_processes(persistent: Target) -> None:
    size, gid = 6, uid()
    gate = persistent.tmp_path / "go"
    procs = [
        persistent.python(JOIN_SCRIPT, gid, f"m{i}", str(size), str(gate)) for i in range(size)
    ]
    try:
        gate.touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    assert sorted(out.strip() for out, _ in outputs) == ["False"] * (size - 1) + ["True"]


# -- memory specifics -----------------------------------------------------------------


def test_memory_state_is_shared_per_url_across_threads() -> None:
    from celeriac.backends import memory

    url, other = f"memory://{uid()}", f"memory://{uid()}"
    tid = uid()
    writer = Target("memory", url, Path("."))
    kept = memory.MemoryBackend(url)  # made before the reset, still shares state after it
    try:
        with ThreadPoolExecutor(1) as pool:  # another thread, so another event loop
            pool.submit(writer.run, lambda b: b.store(done(tid, 1), ttl=None)).result(30)
        assert writer.run(lambda b: b.get(tid)) is not None
        assert asyncio.run(kept.get(tid)) is not None
        assert Target("memory", other, Path(".")).run(lambda b: b.get(tid)) is None
        memory.reset(url)
        assert writer.run(lambda b: b.get(tid)) is None
        asyncio.run(kept.store(done(tid, 2), ttl=None))
        got = writer.run(lambda b: b.get(tid))
        assert got is not None and got.result == 2
    finally:
        memory.reset(url)
        memory.reset(other)


def test_memory_wait_is_woken_by_a_push_hint() -> None:
    from celeriac.backends import memory

    url, tid = f"memory://{uid()}", uid()

    async def body() -> None:
        b = memory.MemoryBackend(url)
        watch = b._changes(["celery-task-meta-" + tid])
        try:
            writer = Target("memory", url, Path("."))
            _, key = await asyncio.gather(
                asyncio.to_thread(writer.run, lambda o: o.store(done(tid), ttl=None)),
                asyncio.wait_for(anext(watch), 30),
            )
            assert key == "celery-task-meta-" + tid
        finally:
            await watch.aclose()
        assert not memory._store_for(url).watches  # closed watches leave nothing behind

    try:
        asyncio.run(body())
    finally:
        memory.reset(url)


# -- sqlite specifics -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite://", "celeriac.sqlite"),
        ("sqlite:///", "celeriac.sqlite"),
        ("sqlite:///relative.sqlite", "relative.sqlite"),
        ("sqlite:///dir/relative.sqlite", "dir/relative.sqlite"),
        ("sqlite:////abs/results.sqlite", "/abs/results.sqlite"),
        ("sqlite:////abs/results.sqlite?timeout=5", "/abs/results.sqlite"),
    ],
)
def test_sqlite_url_to_path(url: str, path: str) -> None:
    from celeriac.backends.sqlite import database_path

    assert database_path(url) == path


def test_sqlite_bare_url_uses_the_shared_file_and_own_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = Target("sqlite", "sqlite://", tmp_path)
    tid = uid()
    target.run(lambda b: b.store(done(tid), ttl=None))
    target.run(lambda b: b.chord_join(uid(), "a", 2))
    with sqlite3.connect(tmp_path / "celeriac.sqlite") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert tables == {"celeriac_results", "celeriac_sets", "celeriac_members"}
    assert not tables & BROKER_TABLES
    assert mode == "wal"


def test_sqlite_member_ranks_come_from_the_set_row(tmp_path: Path) -> None:
    """A join reads and writes one set row and one member row, never the whole set."""
    from celeriac.backends.sqlite import SQLiteBackend

    path = tmp_path / "r.sqlite"

    async def body() -> None:
        b = SQLiteBackend(f"sqlite:///{path}")
        try:
            ranks = [await b._add_member("k", f"m{i}", 60) for i in range(300)]
            assert ranks == list(range(1, 301))
            assert await b._add_member("k", "m7", 60) == 8  # re-added: its first rank
            assert await b._add_member("k", "m7", None) == 8
            assert await b._add_member("other", "m7", None) == 1
        finally:
            await b.close()

    before = time.time()
    asyncio.run(body())
    with sqlite3.connect(path) as conn:
        sets = dict(conn.execute("SELECT key, size FROM celeriac_sets"))
        expires = conn.execute("SELECT expires FROM celeriac_sets WHERE key = 'k'").fetchone()
        members = conn.execute("SELECT count(*) FROM celeriac_members WHERE key = 'k'").fetchone()
    conn.close()
    assert sets == {"k": 300, "other": 1}
    assert members == (300,)
    assert expires[0] >= before + 60  # refreshed by the last join with a ttl


def test_sqlite_sweep_deletes_expired_rows_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celeriac.backends import sqlite as backend_module

    monkeypatch.setattr(backend_module, "_SWEEP_BATCH", 7)
    monkeypatch.setattr(backend_module, "_SWEEP_SETS", 2)
    path = tmp_path / "r.sqlite"

    async def body() -> None:
        b = backend_module.SQLiteBackend(f"sqlite:///{path}")
        try:
            for i in range(30):
                await b.store_raw(f"old{i}", b"{}", ttl=0.05)
            for g in range(5):
                for m in range(3):
                    await b._add_member(f"set{g}", f"m{m}", 0.05)
            await b._add_member("kept", "m", None)
            await b.store_raw("keep", b"{}", ttl=None)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and await b.get_many([f"old{i}" for i in range(30)]):
                await asyncio.sleep(0.02)  # wait for the rows to pass their expiry
            b._next_sweep = 0.0
            await b.store_raw("trigger", b"{}", ttl=None)  # runs the sweep
        finally:
            await b.close()

    asyncio.run(body())
    with sqlite3.connect(path) as conn:
        results = {k for (k,) in conn.execute("SELECT key FROM celeriac_results")}
        sets = {k for (k,) in conn.execute("SELECT key FROM celeriac_sets")}
        members = {k for (k,) in conn.execute("SELECT key FROM celeriac_members")}
    conn.close()
    assert results == {"celery-task-meta-keep", "celery-task-meta-trigger"}
    assert sets == members == {"kept"}


def test_sqlite_loop_stays_responsive_while_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.sqlite"
    url = f"sqlite:///{path}"
    Target("sqlite", url, tmp_path).run(lambda b: b.connect())  # create the tables
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")

        async def body() -> None:
            b = create_backend(url, {"busy_timeout": 30})
            await b.connect()
            gaps: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.ensure_future(ticker())
            try:
                store = asyncio.ensure_future(b.store(done("t1", 1), ttl=None))
                while len(gaps) < 30:  # the store is waiting for the lock meanwhile
                    await asyncio.sleep(0.01)
                assert not store.done()
                holder.execute("COMMIT")
                await asyncio.wait_for(store, 30)
                got = await b.get("t1")
                assert got is not None and got.result == 1
            finally:
                stop.set()
                await tick
                await b.close()
            # Each attempt waits at most a few ms inside SQLite; a thread-free backend
            # that blocked instead would freeze the ticker for the whole wait.
            assert max(gaps) < 0.25, max(gaps)

        asyncio.run(body())
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


def test_sqlite_gives_up_after_busy_timeout(tmp_path: Path) -> None:
    from celeriac.exceptions import BackendError

    path = tmp_path / "r.sqlite"
    url = f"sqlite:///{path}"
    Target("sqlite", url, tmp_path).run(lambda b: b.connect())
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")

        async def body() -> None:
            b = create_backend(url, {"busy_timeout": 0.3})
            await b.connect()
            try:
                with pytest.raises(BackendError, match="busy_timeout"):
                    await b.store(done("t1"), ttl=None)
            finally:
                await b.close()

        asyncio.run(body())
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# -- disabled -------------------------------------------------------------------------


def test_disabled_backend_explains_itself() -> None:
    from celeriac.backends.disabled import DisabledBackend

    backend = create_backend("disabled://")
    assert isinstance(backend, DisabledBackend)
    assert backend.persistent is False

    async def body() -> None:
        tid = uid()
        await backend.connect()
        await backend.store(done(tid), ttl=None)  # no-ops, so tasks still run
        await backend.store_raw(tid, b"{}", ttl=None)
        await backend.forget(tid)
        calls: list[Awaitable[Any]] = [
            backend.get(tid),
            backend.get_many([tid]),
            backend.save_group("g", [tid], ttl=None),
            backend.load_group("g"),
            backend.chord_join("g", tid, 1),
        ]
        for call in calls:
            with pytest.raises(NotSupported, match=r"No result backend is configured\. Set result"):
                await call
        with pytest.raises(NotSupported, match="sqlite://"):
            backend.wait([tid], timeout=1)
        await backend.close()

    asyncio.run(body())
