"""A real in-process worker sends events, obeys enable/disable_events and autoscales."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from celeriac.app import Celery
from celeriac.events import EventReceiver
from celeriac.transport import memory
from celeriac.worker.worker import WorkController


def test_worker_events_toggle_heartbeats_and_autoscale() -> None:
    url = f"memory://wiring-{uuid.uuid4().hex}"
    app = Celery("w", broker=url, backend="memory://", set_as_current=False)
    gate = threading.Event()

    @app.task(name="w.add")
    def add(x: int, y: int) -> int:
        gate.wait(10)
        return x + y

    worker = WorkController(
        app, pool="threads", task_events=True, heartbeat_interval=0.2, autoscale=(4, 1),
        setup_logs=False, hostname="celery@wired",
    )
    thread = threading.Thread(target=worker.run)
    got: list[dict[str, Any]] = []

    def count(kind: str) -> int:
        return sum(e["type"].startswith(kind) for e in got)

    async def until(pred: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 15
        while not pred():
            assert time.monotonic() < deadline, [e["type"] for e in got]
            await asyncio.sleep(0.02)

    async def main() -> None:
        async with EventReceiver(app).stream() as events:

            async def read() -> None:
                async for e in events:
                    got.append(e)

            reader = asyncio.create_task(read())
            thread.start()
            await until(lambda: count("worker-online") == 1)
            assert worker.pool is not None and worker.pool.size == 1  # starts at min
            results = [await add.aapply_async((i, i)) for i in range(4)]
            await until(lambda: worker.pool is not None and worker.pool.size == 4)
            gate.set()
            await until(lambda: count("task-succeeded") == 4)
            assert [await r.aget(timeout=10) for r in results] == [0, 2, 4, 6]
            replies = await app.control.abroadcast("disable_events", reply=True, limit=1)
            assert replies == [{"celery@wired": {"ok": "task events disabled"}}]  # even with -E
            before = count("task-")
            assert await (await add.aapply_async((5, 5))).aget(timeout=10) == 10
            beats = count("worker-heartbeat")
            await until(lambda: count("worker-heartbeat") > beats + 1)  # heartbeats go on
            assert count("task-") == before
            stats = await app.control.abroadcast("stats", reply=True, limit=1)
            assert stats[0]["celery@wired"]["autoscaler"]["max"] == 4
            await app.control.abroadcast("autoscale", {"max": 6, "min": 2}, reply=True, limit=1)
            assert worker.pool.size >= 2
            worker.shutdown()
            await until(lambda: bool(got) and got[-1]["type"] == "worker-offline")
            reader.cancel()
        await app.aclose()

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()
        thread.join(20)
        memory.reset(url)
    assert count("task-received") == 4
