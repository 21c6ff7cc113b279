"""Autoscaler against a real thread pool; pressure is a plain counter the test moves."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from celeriac.worker.autoscale import Autoscaler
from celeriac.worker.pools import create_pool
from celeriac.worker.pools.base import Job, Outcome, Pool


class Runner:
    """Jobs wait on a shared barrier, so a pass proves that many ran at the same time."""

    def __init__(self) -> None:
        self.barrier: threading.Barrier | None = None

    def execute(self, job: Job) -> Outcome:
        if self.barrier is not None:
            self.barrier.wait(timeout=10)
        return Outcome(job.task_id, "SUCCESS", retval_repr=repr(threading.get_ident()))

    async def aexecute(self, job: Job) -> Outcome:
        return self.execute(job)

    def lost(self, job: Job, exc: BaseException) -> Outcome:
        return Outcome(job.task_id, "FAILURE", exc_repr=repr(exc))


def job() -> Job:
    return Job(uuid.uuid4().hex, "t", b"[[], {}, {}]", "application/json", "utf-8", {}, {}, "w")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def threads(n: int, runner: Runner | None = None) -> Pool:
    pool = create_pool("threads", runner or Runner(), n)
    await pool.start()
    return pool


def scaler(pool: Pool, pressure: list[int], **kw: Any) -> Autoscaler:
    return Autoscaler(pool, 6, 3, get_pressure=lambda: pressure[0], **kw)


def test_grows_at_once_and_shrinks_only_after_keepalive(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="celeriac.worker.autoscale")

    async def main() -> None:
        pool = await threads(3)
        pressure, clock, sizes = [0], Clock(), list[int]()
        auto = scaler(pool, pressure, keepalive=30.0, clock=clock, on_resize=sizes.append)
        assert auto.maybe_scale() == 0  # at min with no work: nothing to do
        pressure[0] = 5
        assert auto.maybe_scale() == 2 and pool.size == 5
        pressure[0] = 40
        assert auto.maybe_scale() == 1 and pool.size == 6  # capped at max
        pressure[0] = 1
        clock.now += 29
        assert auto.maybe_scale() == 0 and pool.size == 6  # still within keepalive
        clock.now += 2
        assert auto.maybe_scale() == -3 and pool.size == 3  # down to min, not to 1
        assert sizes == [5, 6, 3]
        assert auto.info() == {"max": 6, "min": 3, "current": 3, "qty": 1}
        await pool.stop(graceful=True)

    asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Scaling up 2 processes.",
        "Scaling up 1 processes.",
        "Scaling down 3 processes.",
    ]


def test_busy_moments_restart_the_keepalive() -> None:
    async def main() -> None:
        pool = await threads(3)
        pressure, clock = [6], Clock()
        auto = scaler(pool, pressure, keepalive=10.0, clock=clock)
        auto.maybe_scale()
        assert pool.size == 6
        pressure[0] = 2
        clock.now += 8
        auto.maybe_scale()
        pressure[0] = 6  # busy again: the quiet spell starts over
        clock.now += 1
        auto.maybe_scale()
        pressure[0] = 2
        clock.now += 8
        assert auto.maybe_scale() == 0 and pool.size == 6
        clock.now += 3
        assert auto.maybe_scale() == -3 and pool.size == 3
        await pool.stop(graceful=True)

    asyncio.run(main())


def test_grown_pool_really_runs_that_many_at_once() -> None:
    async def main() -> None:
        runner = Runner()
        pool = await threads(3, runner)
        pressure = [6]
        auto = scaler(pool, pressure)
        auto.maybe_scale()
        runner.barrier = threading.Barrier(6)  # six jobs must all be running to pass it
        outcomes = await asyncio.gather(*(pool.run(job()) for _ in range(6)))
        assert all(o.state == "SUCCESS" for o in outcomes)
        assert len({o.retval_repr for o in outcomes}) == 6  # six distinct threads
        await pool.stop(graceful=True)

    asyncio.run(main())


def test_run_loop_follows_pressure_until_stopped() -> None:
    async def until(predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, "autoscaler did not get there"
            await asyncio.sleep(0.01)

    async def main() -> None:
        pool = await threads(3)
        pressure = [0]
        auto = scaler(pool, pressure, keepalive=0.0, interval=0.01)
        stop = asyncio.Event()
        loop = asyncio.create_task(auto.run(stop))
        pressure[0] = 4
        await until(lambda: pool.size == 4)
        pressure[0] = 0
        await until(lambda: pool.size == 3)
        stop.set()
        await asyncio.wait_for(loop, 10)
        await pool.stop(graceful=True)

    asyncio.run(main())


def test_update_and_forced_resizes_move_the_bounds() -> None:
    async def main() -> None:
        pool = await threads(3)
        pressure = [0]
        auto = scaler(pool, pressure)
        assert auto.update(max=8, min=5) == (8, 5) and pool.size == 5  # new min: grow now
        assert auto.update(max=4) == (4, 4) and pool.size == 4  # below size: shrink now
        auto.force_scale_up(2)  # pool_grow past max raises max
        assert (auto.max_concurrency, pool.size) == (6, 6)
        auto.force_scale_down(5)  # pool_shrink past min lowers min
        assert (auto.min_concurrency, pool.size) == (1, 1)
        with pytest.raises(ValueError, match="below min"):
            Autoscaler(pool, 1, 2, get_pressure=lambda: 0)
        await pool.stop(graceful=True)

    asyncio.run(main())


def test_a_pool_that_cannot_grow_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        pool = create_pool("solo", Runner(), 1)
        await pool.start()
        auto = Autoscaler(pool, 4, 1, get_pressure=lambda: 4)
        assert auto.maybe_scale() == 0
        assert auto.maybe_scale() == 0
        await pool.stop(graceful=True)

    with caplog.at_level(logging.WARNING, logger="celeriac.worker.autoscale"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.name == "celeriac.worker.autoscale"]
    assert warnings == ["The solo pool cannot be resized; --autoscale has no effect"]
