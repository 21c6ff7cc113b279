"""WorkController: build the worker's pieces, start them in order, stop them in reverse.

Start-up is one straight coroutine: connect, declare, start the pool, consume, listen
for remote control; one event loop does all broker and backend I/O.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from .. import __version__, signals
from ..beat import embedded_beat
from ..events import EventDispatcher, Heart
from ..serialization import accepted_types
from ..settings import import_symbol
from .autoscale import Autoscaler
from .consumer import MessageHandler
from .pools import create_pool
from .trace import Tracer

if TYPE_CHECKING:
    from ..app import Celery, Connections
    from ..routing import Queue
    from ..transport.base import Consumer
    from .pools.base import Pool

logger = logging.getLogger("celeriac.worker")

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
PIDBOX = "celeriac.pidbox"


def setup_logging(loglevel: str, logfile: str | None) -> None:
    level = getattr(logging, str(loglevel).upper(), None)
    if not isinstance(level, int):
        raise ValueError(f"Unknown log level {loglevel!r}")
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again any that swallowed it.

    Python 3.11's ``asyncio.wait_for`` (redis-py wraps socket writes in it) can lose a
    cancellation that races with completion (CPython gh-86296), so one cancel() could
    leave the consume loop running and a warm shutdown hanging forever.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    await asyncio.gather(*tasks, return_exceptions=True)


class _Revoked(set[str]):
    """Revoked ids, bounded like Celery's (oldest forgotten first)."""

    def __init__(self, limit: int = 50_000) -> None:
        super().__init__()
        self._order: collections.deque[str] = collections.deque()
        self._limit = limit

    def add(self, item: str) -> None:
        if item not in self:
            super().add(item)
            self._order.append(item)
            while len(self._order) > self._limit:
                self.discard(self._order.popleft())


class WorkController:
    """One worker node (``celery@host``): consumes its queues and runs tasks in a pool."""

    def __init__(
        self,
        app: Celery,
        *,
        hostname: str | None = None,
        queues: list[str] | None = None,
        exclude_queues: list[str] | None = None,
        concurrency: int | None = None,
        pool: str | None = None,
        loglevel: str = "WARNING",
        logfile: str | None = None,
        prefetch_multiplier: int | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        task_events: bool = False,
        autoscale: tuple[int, int] | None = None,
        beat: bool = False,
        without_heartbeat: bool = False,
        heartbeat_interval: float | None = None,
        statedb: str | None = None,
        setup_logs: bool = True,
        **ignored: Any,
    ) -> None:
        self.app = app
        self.hostname = hostname or f"celery@{socket.gethostname()}"
        conf = app.conf
        self.pool_kind = pool or conf.worker_pool or "prefork"
        self.autoscale_range = autoscale
        base = concurrency or conf.worker_concurrency or os.cpu_count() or 1
        self.concurrency = autoscale[0] if autoscale else int(base)
        self.min_concurrency = autoscale[1] if autoscale else int(base)
        multiplier = (
            prefetch_multiplier
            if prefetch_multiplier is not None
            else conf.worker_prefetch_multiplier
        )
        self.prefetch_multiplier = int(multiplier)
        self.max_tasks_per_child = max_tasks_per_child or conf.worker_max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child or conf.worker_max_memory_per_child
        self.events_enabled = bool(task_events or conf.worker_send_task_events)
        self.without_heartbeat = without_heartbeat
        self.heartbeat_interval = float(heartbeat_interval or 2.0)
        self.dispatcher: EventDispatcher | None = None
        self.heart: Heart | None = None
        self.autoscaler: Autoscaler | None = None
        self.loglevel, self.logfile = loglevel, logfile
        if setup_logs:
            setup_logging(loglevel, logfile)
        self.queue_names, self.exclude = queues, exclude_queues
        self.revoked: set[str] = _Revoked()
        self.statedb = statedb
        self.beat = beat
        self.accept = accepted_types(conf.accept_content)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Set once the worker consumes; lets an in-process worker (tests) wait for it.
        self.ready = threading.Event()
        self._cold = False
        self._signals = 0
        self.handler: MessageHandler | None = None
        self.pool: Pool | None = None
        self.consumer: Consumer | None = None
        self.conns: Connections | None = None
        self.queues: list[Queue] = []
        self.started = time.time()
        self._clock = 0
        self.exitcode = 0

    # -- running ---------------------------------------------------------------------

    def run(self) -> int:
        self.app.loader_import_default_modules()
        self.queues = self.app.router.queues_for_worker(self.queue_names, self.exclude)
        if not self.queues:
            raise SystemExit("Error: no queues left to consume from (check -Q and -X)")
        print(self.banner(), file=sys.stderr, flush=True)
        self._load_state()
        try:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(self._main())
        finally:
            self._save_state()
        return self.exitcode

    def _load_state(self) -> None:
        """``--statedb``: revoked ids survive a restart (JSON, not Celery's shelve)."""
        if not self.statedb or not os.path.exists(self.statedb):
            return
        import orjson

        try:
            with open(self.statedb, "rb") as fh:
                state = orjson.loads(fh.read())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SystemExit(f"Error: cannot read --statedb {self.statedb!r}: {exc}") from None
        for task_id in state.get("revoked", []):
            self.revoked.add(str(task_id))

    def _save_state(self) -> None:
        if not self.statedb:
            return
        import orjson

        tmp = f"{self.statedb}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps({"revoked": sorted(self.revoked)}))
        os.replace(tmp, self.statedb)

    def prefetch(self) -> int:
        return self.concurrency * self.prefetch_multiplier if self.prefetch_multiplier else 0

    async def _main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.app.portal.adopt(loop)
        tracer = Tracer(self.app, self.hostname, self.accept)
        if signals.worker_init:
            signals.worker_init.send(self)
        if signals.worker_process_init and self.pool_kind == "prefork":
            os.register_at_fork(after_in_child=_process_init)
        self.pool = create_pool(
            self.pool_kind,
            tracer,
            self.min_concurrency if self.autoscale_range else self.concurrency,
            max_tasks_per_child=self.max_tasks_per_child,
            max_memory_per_child=self.max_memory_per_child,
        )
        await self.pool.start()
        try:
            self.conns = conns = await self.app.connection_for_current_loop()
            specs = [q.to_spec() for q in self.queues]
            await conns.transport.declare(
                specs
                + [
                    q.to_spec()
                    for q in self.app.router.declared_queues()
                    if q.name not in {s.name for s in specs}
                ]
            )
            if threading.current_thread() is threading.main_thread():  # else: in-process
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                    loop.add_signal_handler(sig, self._on_signal, sig)
            consumer_id = f"{self.hostname}.{uuid.uuid4().hex[:8]}"
            self.dispatcher = EventDispatcher(
                conns.transport, self.hostname, task_events=self.events_enabled
            )
            if not self.without_heartbeat:
                self.heart = Heart(
                    self.dispatcher, interval=self.heartbeat_interval, info=self._heart_info
                )
            async with conns.transport.consumer(
                specs, prefetch=self.prefetch(), consumer_id=consumer_id
            ) as consumer:
                self.consumer = consumer
                self.handler = MessageHandler(
                    self.app,
                    conns,
                    consumer,
                    self.pool,
                    self.hostname,
                    self.accept,
                    self.revoked,
                    on_event=self.dispatcher.send,
                    task_events=self._task_events,
                )
                try:
                    await self._serve(consumer)
                finally:
                    await self._stop_events()
        finally:
            await self.pool.stop(graceful=not self._cold)
            self.app.portal.release()
            await self.app.aclose()
            if signals.worker_shutdown:
                signals.worker_shutdown.send(self)
            logger.info("%s stopped.", self.hostname)

    async def _serve(self, consumer: Consumer) -> None:
        assert self._stop is not None and self.handler is not None
        control = asyncio.create_task(self._control_loop())
        running: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(max(self.prefetch(), self.concurrency))

        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()

        async def consume() -> None:
            assert self.handler is not None
            iterator = consumer.__aiter__()
            while True:
                await slots.acquire()
                try:
                    delivery = await iterator.__anext__()
                except BaseException:
                    slots.release()
                    raise
                task = asyncio.create_task(self.handler.handle(delivery))
                running.add(task)
                task.add_done_callback(done)

        await asyncio.sleep(0)
        if self.heart is not None:
            await self.heart.start()
        scaling = self._start_autoscaler()
        logger.info("%s ready.", self.hostname)
        self.ready.set()
        if signals.worker_ready:
            signals.worker_ready.send(self)
        beat = asyncio.create_task(embedded_beat(self.app, self._stop)) if self.beat else None
        fetch = asyncio.create_task(consume())
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        fetch.cancel()
        if fetch.done() and not fetch.cancelled() and fetch.exception():
            logger.error("Consuming failed: %r", fetch.exception())
            self.exitcode = 1
        if running and not self._cold:
            logger.info("Waiting for %d running task(s) to finish...", len(running))
            cold = asyncio.create_task(self._wait_cold())
            await asyncio.wait({cold, *running}, return_when=asyncio.FIRST_COMPLETED)
            while running and not cold.done():
                await asyncio.wait({cold, *running}, return_when=asyncio.FIRST_COMPLETED)
            cold.cancel()
        if beat is not None:
            await asyncio.gather(beat, return_exceptions=True)
        for t in running:
            t.cancel()
        control.cancel()
        stop.cancel()
        if scaling is not None:
            scaling.cancel()
        await _cancel_all([fetch, control, stop, *running, *([scaling] if scaling else [])])

    def _start_autoscaler(self) -> asyncio.Task[None] | None:
        if not self.autoscale_range or self.pool is None or self._stop is None:
            return None
        handler = self.handler
        assert handler is not None
        max_, min_ = self.autoscale_range
        cls = self.app.conf.worker_autoscaler
        if isinstance(cls, str):
            cls = import_symbol(cls, "worker_autoscaler")
        self.autoscaler = cls(
            self.pool,
            max_,
            min_,
            get_pressure=lambda: len(handler.active) + len(handler.reserved),
            keepalive=float(os.environ.get("AUTOSCALE_KEEPALIVE", 30.0)),
        )
        return asyncio.create_task(self.autoscaler.run(self._stop))

    def _task_events(self) -> bool:
        dispatcher = self.dispatcher
        return dispatcher is not None and dispatcher.enabled and dispatcher.task_events

    def _heart_info(self) -> dict[str, int]:
        handler = self.handler
        if handler is None:
            return {"active": 0, "processed": 0}
        return {"active": len(handler.active), "processed": sum(handler.processed.values())}

    async def _stop_events(self) -> None:
        try:
            if self.heart is not None:
                await self.heart.stop()  # worker-offline
            if self.dispatcher is not None:
                await self.dispatcher.close()
        except Exception:
            logger.exception("Could not send the last events")

    def send_heartbeat(self) -> None:
        """The ``heartbeat`` control command: a worker-heartbeat event now."""
        if self.heart is not None:
            self.heart.beat()

    async def _wait_cold(self) -> None:
        while not self._cold:
            await asyncio.sleep(0.05)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1 and signum != signal.SIGQUIT:
            logger.warning("worker: Warm shutdown (%s)", name)
        else:
            logger.warning("worker: Cold shutdown (%s)", name)
            self._cold = True
        if self._stop is not None:
            self._stop.set()

    def shutdown(self) -> None:
        """Start a warm shutdown; safe to call from any thread."""
        logger.warning("worker: Warm shutdown (remote control)")
        loop, stop = self._loop, self._stop
        if loop is None or stop is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            stop.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stop.set)

    async def _control_loop(self) -> None:
        from .commands import dispatch

        assert self.conns is not None
        transport = self.conns.transport
        while True:
            try:
                async with transport.subscribe(PIDBOX) as messages:
                    async for payload in messages:
                        await self._on_control(transport, dispatch, payload)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Remote control listener failed; restarting it")
                await asyncio.sleep(1.0)

    async def _on_control(self, transport: Any, dispatch: Any, payload: bytes) -> None:
        import orjson

        try:
            request = orjson.loads(payload)
        except orjson.JSONDecodeError:
            logger.error("Ignoring a remote-control message that is not JSON")
            return
        self._clock += 1
        reply = await dispatch(self, request)
        reply_to = request.get("reply_to") or {}
        if reply is None or not request.get("ticket") or not reply_to.get("routing_key"):
            return
        body = orjson.dumps({"ticket": request["ticket"], "node": reply}, default=str)
        await transport.broadcast(f"celeriac.reply.{reply_to['routing_key']}", body)

    # -- remote-control target -----------------------------------------------------------

    def active_requests(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.handler.active.values()] if self.handler else []

    def reserved_requests(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.handler.reserved.values()] if self.handler else []

    def scheduled_requests(self) -> list[dict[str, Any]]:
        return []  # ETA tasks wait in the broker, not in worker memory

    def stats(self) -> dict[str, Any]:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        processed = dict(self.handler.processed) if self.handler else {}
        return {
            "total": processed,
            "pid": os.getpid(),
            "clock": self._clock,
            "uptime": int(time.time() - self.started),
            "pool": {
                "implementation": self.pool_kind,
                "max-concurrency": self.pool.size if self.pool else self.concurrency,
                "processes": self.pool.pids() if self.pool else [],
                "max-tasks-per-child": self.max_tasks_per_child,
            },
            "prefetch_count": self.prefetch(),
            **({"autoscaler": self.autoscaler.info()} if self.autoscaler else {}),
            "broker": {"transport": self.conns.transport.describe() if self.conns else None},
            "rusage": {"utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss": usage.ru_maxrss},
            "sw_ident": "celeriac",
            "sw_ver": __version__,
            "sw_sys": platform.system(),
        }

    def active_queues(self) -> list[dict[str, Any]]:
        specs = self.consumer.queues if self.consumer else [q.to_spec() for q in self.queues]
        return [
            {
                "name": s.name,
                "exchange": {"name": s.exchange, "type": s.exchange_type},
                "routing_key": s.routing_key,
                "durable": s.durable,
                "auto_delete": s.auto_delete,
                "max_priority": s.max_priority,
            }
            for s in specs
        ]

    async def add_consumer(
        self,
        queue: str,
        exchange: str | None = None,
        exchange_type: str = "direct",
        routing_key: str | None = None,
    ) -> None:
        from ..routing import Exchange, Queue

        q = Queue(
            queue, Exchange(exchange or queue, type=exchange_type), routing_key=routing_key or queue
        )
        assert self.consumer is not None and self.conns is not None
        await self.conns.transport.declare([q.to_spec()])
        await self.consumer.add_queue(q.to_spec())

    async def cancel_consumer(self, queue: str) -> None:
        assert self.consumer is not None
        await self.consumer.cancel_queue(queue)

    def revoke(self, ids: list[str], terminate: bool, signal: str) -> None:
        import signal as _signal

        for tid in ids:
            self.revoked.add(tid)
            if terminate and self.pool is not None:
                signum = getattr(
                    _signal, signal if signal.startswith("SIG") else f"SIG{signal}", _signal.SIGTERM
                )
                self.pool.terminate(tid, int(signum))

    def set_rate_limit(self, task_name: str, rate: str | None) -> None:
        task = self.app.tasks[task_name]
        task.rate_limit = rate
        if self.handler is not None:
            self.handler.set_rate_limit(task_name, rate)

    def set_time_limit(self, task_name: str, soft: float | None, hard: float | None) -> None:
        task = self.app.tasks[task_name]
        task.soft_time_limit, task.time_limit = soft, hard

    def pool_grow(self, n: int) -> None:
        assert self.pool is not None
        if self.autoscaler is not None:
            self.autoscaler.force_scale_up(n)
            self.concurrency = self.autoscaler.max_concurrency
        else:
            self.pool.grow(n)
            self.concurrency = self.pool.size
        self._resize_prefetch()

    def pool_shrink(self, n: int) -> None:
        assert self.pool is not None
        if self.autoscaler is not None:
            self.autoscaler.force_scale_down(n)  # prefetch stays at max * multiplier
            return
        self.pool.shrink(n)
        self.concurrency = self.pool.size
        self._resize_prefetch()

    def autoscale(self, max: int, min: int) -> None:
        if self.autoscaler is None:
            raise ValueError("Autoscale not enabled")
        self.autoscale_range = self.autoscaler.update(max, min)
        self.concurrency = self.autoscaler.max_concurrency
        self._resize_prefetch()

    def _resize_prefetch(self) -> None:
        if self.consumer is not None:
            asyncio.get_running_loop().create_task(self.consumer.set_prefetch(self.prefetch()))

    def enable_events(self) -> bool:
        was = self.events_enabled
        self.events_enabled = True
        if self.dispatcher is not None:
            self.dispatcher.task_events = True
        return not was

    def disable_events(self) -> bool:
        was = self.events_enabled
        self.events_enabled = False
        if self.dispatcher is not None:
            self.dispatcher.task_events = False
        return was

    def clock(self) -> int:
        return self._clock

    # -- banner ---------------------------------------------------------------------------

    def banner(self) -> str:
        app = self.app
        transport = _redact(app.broker_url_resolved())
        results = _redact(app.backend_url_resolved())
        lines = [
            f" -------------- {self.hostname} v{__version__} (celeriac)",
            f"--- ***** ----- {platform.platform()} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "-- ******* ---- ",
            "- *** --- * --- ",
            "- ** ---------- [config]",
            f"- ** ---------- .> app:         {app.main or '__main__'}:{id(app):#x}",
            f"- ** ---------- .> transport:   {transport}",
            f"- ** ---------- .> results:     {results}",
            "- *** --- * --- .> concurrency: "
            + (
                f"{{min={self.min_concurrency}, max={self.concurrency}}}"
                if self.autoscale_range
                else f"{self.concurrency}"
            )
            + f" ({self.pool_kind})",
            "-- ******* ---- .> task events: "
            + ("ON" if self.events_enabled else "OFF (enable -E to monitor tasks in this worker)"),
            "--- ***** ----- ",
            " -------------- [queues]",
        ]
        for q in self.queues:
            spec = q.to_spec()
            lines.append(
                f"                .> {spec.name:<16} exchange={spec.exchange or spec.name}"
                f"({spec.exchange_type}) key={spec.routing_key or spec.name}"
            )
        lines.append("")
        lines.append("[tasks]")
        for name in sorted(n for n in app.tasks if not n.startswith("celery.")):
            lines.append(f"  . {name}")
        return "\n".join(lines) + "\n"


def _process_init() -> None:
    signals.worker_process_init.send(None)


def _redact(url: str) -> str:
    from ..transport.base import redact_url

    return redact_url(url)
