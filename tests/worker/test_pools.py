"""Pools against a small stand-in for ``worker.trace``: the job name picks the behaviour."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from celeriac.exceptions import ImproperlyConfigured
from celeriac.transport.base import Envelope, Outgoing
from celeriac.worker.pools import POOLS, create_pool
from celeriac.worker.pools.base import ChordJoin, Job, Outcome, Pool
from celeriac.worker.pools.prefork import PreforkPool


def _busy(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "no limit fired"


def _raise(exc: Exception) -> None:
    raise exc


def _alloc(mib: float) -> int:
    block = bytearray(int(mib * 1024 * 1024))
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)


BEHAVIOURS: dict[str, Callable[[Job, str], Any]] = {
    "ok": lambda job, arg: arg,
    "pid": lambda job, arg: os.getpid(),
    "thread": lambda job, arg: threading.get_ident(),
    "raise": lambda job, arg: _raise(ValueError("boom")),
    "sleep": lambda job, arg: time.sleep(float(arg)),
    "busy": lambda job, arg: _busy(float(arg)),
    "exit": lambda job, arg: os._exit(int(arg)),
    "alloc": lambda job, arg: _alloc(float(arg)),
    # a name the pool learns is fast; a header can make one call slow
    "flex": lambda job, arg: time.sleep(job.headers.get("sleep", 0)),
}


class Runner:
    """Builds Outcomes the way trace does: task errors become FAILURE outcomes."""

    def execute(self, job: Job) -> Outcome:
        kind, _, arg = job.name.partition(":")
        if kind == "echo":
            return echo(job)
        try:
            value = BEHAVIOURS[kind](job, arg)
        except BaseException as exc:
            return Outcome(job.task_id, "FAILURE", exc_repr=repr(exc))
        return Outcome(job.task_id, "SUCCESS", retval_repr=repr(value))

    async def aexecute(self, job: Job) -> Outcome:
        kind, _, arg = job.name.partition(":")
        if kind != "asleep":
            return self.execute(job)
        await asyncio.sleep(float(arg))
        return Outcome(job.task_id, "SUCCESS", retval_repr=repr(threading.get_ident()))

    def lost(self, job: Job, exc: BaseException) -> Outcome:
        return Outcome(job.task_id, "FAILURE", exc_repr=repr(exc))


def echo(job: Job) -> Outcome:
    """An Outcome with every field set from ``job``, so a round trip can be compared whole."""
    env = Envelope(job.body[:64], {"id": job.task_id}, job.content_type, priority=3)
    return Outcome(
        job.task_id,
        "SUCCESS",
        meta=job.body,
        follow_ups=[Outgoing(env, "ex", "rk", not_before=1.5)],
        chord=ChordJoin("g1", 3, {"task": "t", "options": {}}, failed=True),
        retval_repr=repr(job),
        exc_repr="none",
        traceback="tb",
        runtime=0.25,
        requeue=False,
        ack=False,
        extra_results=[("other", b"doc")],
    )


def make_job(name: str, **options: Any) -> Job:
    return Job(
        task_id=options.pop("task_id", None) or uuid.uuid4().hex,
        name=name,
        body=b"[[], {}, {}]",
        content_type="application/json",
        content_encoding="utf-8",
        headers=options.pop("headers", {}),
        delivery_info={},
        hostname="test@localhost",
        **options,
    )


def run(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(factory())


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def assert_reaped(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # not our child any more: reaped, not a zombie
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} still exists"


async def timed(pool: Pool, jobs: list[Job]) -> tuple[list[Outcome], float]:
    started = time.monotonic()
    outcomes = await asyncio.gather(*(pool.run(j) for j in jobs))
    return list(outcomes), time.monotonic() - started


def started(kind: str, concurrency: int, **options: Any) -> Callable[[], Awaitable[Pool]]:
    async def make() -> Pool:
        pool = create_pool(kind, Runner(), concurrency, **options)
        await pool.start()
        return pool

    return make


ALL = ["solo", "threads", "asyncio", "prefork"]
MULTI = ["threads", "asyncio", "prefork"]


# -- every pool -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL)
def test_results_come_back(kind: str) -> None:
    async def main() -> None:
        pool = await started(kind, 2)()
        assert pool.kind == kind
        ok, bad = await asyncio.gather(pool.run(make_job("ok:7")), pool.run(make_job("raise")))
        assert (ok.state, ok.retval_repr) == ("SUCCESS", "'7'")
        assert bad.state == "FAILURE" and "boom" in (bad.exc_repr or "")
        many = [make_job(f"ok:{i}") for i in range(50)]
        outcomes, _ = await timed(pool, many)  # more jobs than slots: they wait in the pool
        assert [o.task_id for o in outcomes] == [j.task_id for j in many]
        assert [o.retval_repr for o in outcomes] == [repr(str(i)) for i in range(50)]
        await pool.stop(graceful=True)

    run(main)


@pytest.mark.parametrize("kind", MULTI)
def test_jobs_run_concurrently(kind: str) -> None:
    async def main() -> None:
        n = 4
        pool = await started(kind, n)()
        _, elapsed = await timed(pool, [make_job("sleep:0.3") for _ in range(n)])
        assert elapsed < (n - 1) * 0.3
        await pool.stop(graceful=True)

    run(main)


def test_solo_runs_one_at_a_time_off_the_loop() -> None:
    async def main() -> None:
        pool = await started("solo", 4)()
        assert pool.size == 1
        pool.grow(3)
        pool.shrink(1)
        assert pool.size == 1
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        outcomes, elapsed = await timed(pool, [make_job("sleep:0.2") for _ in range(2)])
        tick.cancel()
        assert elapsed >= 0.35  # one after the other
        assert ticks > 5  # the loop kept running meanwhile
        assert outcomes[0].retval_repr == "None"
        await pool.stop(graceful=True)

    run(main)


@pytest.mark.parametrize("kind", ["threads", "prefork"])
def test_soft_time_limit_raises_in_the_task(kind: str) -> None:
    async def main() -> None:
        pool = await started(kind, 1)()
        started_at = time.monotonic()
        outcome = await pool.run(make_job("busy:10", soft_time_limit=0.2))
        assert outcome.state == "FAILURE"
        assert "SoftTimeLimitExceeded" in (outcome.exc_repr or "")
        assert time.monotonic() - started_at < 5
        again = await pool.run(make_job("busy:0.3", soft_time_limit=2))  # limit not reached
        assert again.state == "SUCCESS"
        await pool.stop(graceful=True)

    run(main)


@pytest.mark.parametrize("kind", ["threads", "prefork"])
def test_hard_time_limit_reports_lost_and_pool_keeps_working(kind: str) -> None:
    async def main() -> None:
        pool = await started(kind, 1)()
        before = pool.pids()
        started_at = time.monotonic()
        outcome = await pool.run(make_job("sleep:1.5", time_limit=0.2))
        assert "TimeLimitExceeded" in (outcome.exc_repr or "")
        assert time.monotonic() - started_at < 1.2
        # the slot is back (a new thread, or a replacement child) while the old one is stuck
        after = await pool.run(make_job("pid"))
        assert after.state == "SUCCESS"
        assert time.monotonic() - started_at < 1.4
        if kind == "prefork":
            assert len(pool.pids()) == 1 and pool.pids() != before
            assert after.worker_pid == pool.pids()[0]
        await pool.stop(graceful=True)
        if kind == "prefork":
            assert_reaped(before + pool.pids())

    run(main)


@pytest.mark.parametrize("kind", ["threads", "asyncio", "prefork"])
def test_grow_and_shrink_change_size(kind: str) -> None:
    async def main() -> None:
        pool = await started(kind, 1)()
        pool.grow(2)
        assert pool.size == 3
        name, is_async = ("asleep:0.3", True) if kind == "asyncio" else ("sleep:0.3", False)
        _, elapsed = await timed(pool, [make_job(name, is_async=is_async) for _ in range(3)])
        assert elapsed < 0.75  # 0.9 s one at a time
        pool.shrink(2)
        assert pool.size == 1
        _, elapsed = await timed(pool, [make_job(name, is_async=is_async) for _ in range(2)])
        assert elapsed >= 0.55
        await pool.stop(graceful=True)

    run(main)


def test_terminate_threads_and_asyncio() -> None:
    async def main() -> None:
        for kind, name, is_async in [("threads", "busy:10", False), ("asyncio", "asleep:30", True)]:
            pool = await started(kind, 1)()
            job = make_job(name, is_async=is_async)
            waiting = make_job("asleep:0" if is_async else "ok:1", is_async=is_async)
            running = asyncio.ensure_future(pool.run(job))
            queued = asyncio.ensure_future(pool.run(waiting))
            await asyncio.sleep(0.1)
            assert pool.terminate(waiting.task_id, signal.SIGTERM)  # still waiting for a slot
            assert pool.terminate(job.task_id, signal.SIGTERM)
            assert not pool.terminate("no-such-task", signal.SIGTERM)
            outcome = await asyncio.wait_for(running, 5)
            assert "Terminated" in (outcome.exc_repr or ""), kind
            assert "Terminated" in ((await queued).exc_repr or "")
            await pool.stop(graceful=True)

    run(main)


def test_asyncio_pool_runs_async_jobs_on_the_loop() -> None:
    async def main() -> None:
        pool = await started("asyncio", 20)()
        jobs = [make_job("asleep:0.3", is_async=True) for _ in range(20)]
        outcomes, elapsed = await timed(pool, jobs)
        assert elapsed < 1.5
        assert {o.retval_repr for o in outcomes} == {repr(threading.get_ident())}
        sync = await pool.run(make_job("thread"))
        assert sync.retval_repr != repr(threading.get_ident())  # sync jobs run on threads
        await pool.stop(graceful=True)

    run(main)


def test_cold_stop_of_threads_reports_running_jobs_lost() -> None:
    async def main() -> None:
        pool = await started("threads", 1)()
        running = asyncio.ensure_future(pool.run(make_job("sleep:0.5")))
        await asyncio.sleep(0.05)
        await pool.stop(graceful=False)
        assert "WorkerLostError" in ((await running).exc_repr or "")

    run(main)


# -- prefork ---------------------------------------------------------------------------


def test_prefork_child_killed_mid_job_is_lost_and_replaced() -> None:
    async def main() -> None:
        pool = await started("prefork", 1)()
        (victim,) = pool.pids()
        job = make_job("sleep:30")
        running = asyncio.ensure_future(pool.run(job))
        await asyncio.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        outcome = await asyncio.wait_for(running, 5)
        assert "WorkerLostError" in (outcome.exc_repr or "")
        assert f"signal 9 (SIGKILL) Job: {job.task_id}" in (outcome.exc_repr or "")
        assert len(pool.pids()) == 1 and pool.pids() != [victim]
        exited = await pool.run(make_job("exit:3"))  # a task calling os._exit
        assert "exitcode 3" in (exited.exc_repr or "")
        assert (await pool.run(make_job("ok:1"))).state == "SUCCESS"
        pids = pool.pids()
        await pool.stop(graceful=True)
        assert_reaped([victim, *pids])

    run(main)


def test_prefork_max_tasks_per_child_replaces_children() -> None:
    async def main() -> None:
        pool = await started("prefork", 1, max_tasks_per_child=2)()
        seen = [int((await pool.run(make_job("pid"))).retval_repr) for _ in range(6)]
        assert len(set(seen)) == 3 and seen[0] == seen[1] and seen[2] == seen[3]
        await until(lambda: len(pool.pids()) == 1)
        await pool.stop(graceful=True)
        assert_reaped(seen)

    run(main)


def test_prefork_max_memory_per_child_replaces_the_child() -> None:
    async def main() -> None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pool = await started("prefork", 1, max_memory_per_child=rss + 30_000)()
        first = (await pool.run(make_job("pid"))).retval_repr
        assert (await pool.run(make_job("pid"))).retval_repr == first  # under the limit
        assert (await pool.run(make_job("alloc:80"))).state == "SUCCESS"
        after = (await pool.run(make_job("pid"))).retval_repr
        assert after != first
        await pool.stop(graceful=True)
        assert_reaped([int(first), int(after)])

    run(main)


def test_prefork_shrink_retires_idle_then_busy_children() -> None:
    async def main() -> None:
        pool = await started("prefork", 2)()
        pool.grow(1)
        assert pool.size == 3 and len(pool.pids()) == 3
        original = pool.pids()
        busy = asyncio.ensure_future(pool.run(make_job("sleep:0.4")))
        await asyncio.sleep(0.1)
        pool.shrink(2)  # one idle and then the busy one, after its job
        assert pool.size == 1
        assert (await busy).state == "SUCCESS"
        await until(lambda: len(pool.pids()) == 1)
        assert (await pool.run(make_job("ok:1"))).state == "SUCCESS"
        await pool.stop(graceful=True)
        assert_reaped(original)

    run(main)


def test_prefork_terminate_running_job() -> None:
    async def main() -> None:
        pool = await started("prefork", 1)()
        job = make_job("sleep:30")
        running = asyncio.ensure_future(pool.run(job))
        await asyncio.sleep(0.2)
        assert not pool.terminate("no-such-task", signal.SIGTERM)
        assert pool.terminate(job.task_id, signal.SIGTERM)
        outcome = await asyncio.wait_for(running, 5)
        assert "Terminated" in (outcome.exc_repr or "")
        assert (await pool.run(make_job("ok:1"))).state == "SUCCESS"
        await pool.stop(graceful=True)

    run(main)


def test_prefork_pipelines_fast_tasks_and_keeps_order_of_results() -> None:
    async def main() -> None:
        pool = await started("prefork", 2)()
        assert isinstance(pool, PreforkPool)
        await pool.run(make_job("flex"))  # learn that "flex" is fast
        jobs = [make_job("flex") for _ in range(500)]
        outcomes, _ = await timed(pool, jobs)
        assert [o.task_id for o in outcomes] == [j.task_id for j in jobs]
        assert all(o.state == "SUCCESS" for o in outcomes)
        assert {o.worker_pid for o in outcomes} == set(pool.pids())

        # a queued job behind a (normally fast) slow call is skipped by the child
        pool.shrink(1)
        await until(lambda: len(pool.pids()) == 1)
        head = asyncio.ensure_future(pool.run(make_job("flex", headers={"sleep": 0.5})))
        queued_job = make_job("flex")
        queued = asyncio.ensure_future(pool.run(queued_job))
        await asyncio.sleep(0.1)
        assert pool.terminate(queued_job.task_id, signal.SIGTERM)
        cancelled = await asyncio.wait_for(queued, 5)
        assert "Terminated" in (cancelled.exc_repr or "")
        assert (await head).state == "SUCCESS"

        # a hard kill of the head requeues the job queued behind it on the replacement
        head = asyncio.ensure_future(
            pool.run(make_job("flex", headers={"sleep": 5}, time_limit=0.3))
        )
        behind = asyncio.ensure_future(pool.run(make_job("pid")))
        second = asyncio.ensure_future(pool.run(make_job("flex")))
        assert "TimeLimitExceeded" in ((await head).exc_repr or "")
        assert (await second).state == "SUCCESS"
        assert int((await behind).retval_repr) == pool.pids()[0]
        await pool.stop(graceful=True)

    run(main)


def test_prefork_moves_whole_jobs_and_outcomes_of_any_size() -> None:
    async def main() -> None:
        pool = await started("prefork", 2)()
        jobs = [
            make_job(
                "echo",
                headers={"retries": i, "nested": {"a": [1, 2.5, None]}, "eta": None},
                soft_time_limit=30.0 if i % 2 else None,
                time_limit=60.0,
                is_async=bool(i % 3),
            )
            for i in range(40)
        ]
        for i in (3, 17):  # frames several times larger than one read, in both directions
            jobs[i].body = os.urandom(1 << 20) + b"end"
        for job in jobs:
            job.delivery_info = {"routing_key": "q", "priority": 5, "redelivered": True}
        outcomes, _ = await timed(pool, jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            assert outcome.retval_repr == repr(job)  # every Job field arrived intact
            assert outcome.meta == job.body
            assert outcome.worker_pid in pool.pids()
            expected = echo(job)
            expected.worker_pid = outcome.worker_pid
            assert outcome == expected  # follow-ups, chord join and the rest came back
        await pool.stop(graceful=True)

    run(main)


def test_prefork_job_that_does_not_pickle_fails_alone() -> None:
    async def main() -> None:
        pool = await started("prefork", 1)()
        bad = make_job("ok:1", headers={"fn": lambda: None})
        jobs = [make_job("ok:0"), bad, make_job("ok:2")]
        outcomes = await asyncio.wait_for(asyncio.gather(*(pool.run(j) for j in jobs)), 10)
        assert [o.state for o in outcomes] == ["SUCCESS", "FAILURE", "SUCCESS"]
        assert "lambda" in (outcomes[1].exc_repr or "")
        assert (await pool.run(make_job("ok:3"))).retval_repr == "'3'"
        await pool.stop(graceful=True)

    run(main)


def test_prefork_graceful_stop_waits_and_cold_stop_kills() -> None:
    async def main() -> None:
        pool = await started("prefork", 2)()
        pids = pool.pids()
        running = asyncio.ensure_future(pool.run(make_job("sleep:0.3")))
        await asyncio.sleep(0.05)
        await pool.stop(graceful=True)
        assert (await running).state == "SUCCESS"
        assert pool.pids() == []
        assert_reaped(pids)

        pool = await started("prefork", 2)()
        pids = pool.pids()
        running = asyncio.ensure_future(pool.run(make_job("sleep:30")))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(pool.stop(graceful=False), 5)
        assert "WorkerLostError" in ((await running).exc_repr or "")
        assert_reaped(pids)

    run(main)


def test_prefork_children_ignore_sigint_and_have_no_running_loop() -> None:
    async def main() -> None:
        BEHAVIOURS["probe"] = lambda job, arg: (
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
            asyncio.run(asyncio.sleep(0, result="fresh loop")),
        )
        try:
            pool = await started("prefork", 1)()
            outcome = await pool.run(make_job("probe"))
            assert outcome.retval_repr == repr((True, True, "fresh loop"))
            await pool.stop(graceful=True)
        finally:
            del BEHAVIOURS["probe"]

    run(main)


# -- the table -------------------------------------------------------------------------


def test_create_pool_errors() -> None:
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'prefork'"):
        create_pool("prefrok", Runner(), 1)
    for kind in ("eventlet", "gevent"):
        with pytest.raises(ImproperlyConfigured, match="asyncio"):
            create_pool(kind, Runner(), 1)
    assert {"prefork", "threads", "asyncio", "solo"} <= set(POOLS)
