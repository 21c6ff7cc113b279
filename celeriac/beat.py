"""Beat: send periodic tasks, once per due time, even with several beats running.

How exactly-once works (state lives in the broker; ``-s/--schedule`` files are unused):

1. **Leader lock.** Every pass a beat calls ``try_lock("celeriac.beat", owner, ttl)``
   (owner ``host:pid:random``). Only the holder sends; the others stand by and retry
   every ``ttl / 3`` seconds. A beat that stops cleanly releases the lock (renews it with
   ttl 0), so a standby takes over within one retry; a beat that dies is replaced once
   its lock expires (``lock_ttl``, 30 s by default).
2. **Deterministic due times.** For ``schedule``, ``crontab`` and ``solar`` the due
   times are a pure function of the clock (intervals sit on a grid of multiples of
   ``run_every`` since the Unix epoch), so every beat names a due time identically.
   Missed due times are coalesced into one run (the latest), as in Celery.
3. **Per-due-time claim.** Before sending entry ``E`` for due time ``T`` the leader takes
   ``try_lock("celeriac.beat.claim.E@T", owner, ttl)``, held until the following due time
   plus a 30 s margin for clock skew. A due time is only ever considered while it is the
   latest one, so no beat can claim it again after the claim expires. A leader that lost
   the lock while paused, or a new leader looking back over the handover, finds the
   claim taken and skips: the claim *is* the shared "last run" record.
4. **Taking over.** A beat that becomes leader (first time, or after losing the lock)
   looks back ``catch_up`` seconds (``beat_cron_starting_deadline`` if set, else
   ``2 * lock_ttl``) and fires the latest unclaimed due time in that window, so a due
   time falling inside a failover is sent once, by whichever beat claims it.

Limits: a beat dying between claim and publish loses that one run (at most once, not
twice). Schedule classes that only implement Celery's ``is_due`` (not ``next_after``)
get leader-only sending without claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import signals
from .exceptions import ImproperlyConfigured
from .schedules import BaseSchedule, crontab, maybe_schedule

if TYPE_CHECKING:
    from .app import Celery
    from .transport.base import Transport

__all__ = [
    "Beat",
    "PersistentScheduler",
    "ScheduleEntry",
    "Scheduler",
    "add_periodic_task",
    "embedded_beat",
    "scheduler_class",
]

logger = logging.getLogger("celeriac.beat")

LEADER_LOCK = "celeriac.beat"
DEFAULT_LOCK_TTL = 30.0
DEFAULT_MAX_INTERVAL = 300.0
CLAIM_MARGIN = 30.0
RETRY_DELAY = 1.0
_ENTRY_KEYS = frozenset({"task", "schedule", "args", "kwargs", "options", "relative"})
_CELERY_SCHEDULERS = {
    "celery.beat:PersistentScheduler",
    "celery.beat.PersistentScheduler",
    "celery.beat:Scheduler",
    "celery.beat.Scheduler",
}


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class ScheduleEntry:
    """One periodic task: what to send and when it last ran (a due time, in UTC)."""

    name: str
    task: str
    schedule: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    last_run_at: dt.datetime | None = None
    total_run_count: int = 0

    def is_due(self) -> Any:
        return self.schedule.is_due(self.last_run_at or _utcnow())

    def __repr__(self) -> str:
        call = ", ".join([*map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"<ScheduleEntry: {self.name} {self.task}({call}) {self.schedule!r}>"


def _slotted(sched: Any) -> bool:
    """True if due times come from ``next_after`` (so they can be claimed)."""
    kind = type(sched)
    return (
        isinstance(sched, BaseSchedule)
        and kind.is_due is BaseSchedule.is_due
        and kind.remaining_estimate is BaseSchedule.remaining_estimate
    )


class Scheduler:
    """Keeps the entries, holds the leader lock and sends what is due.

    ``beat_schedule`` is re-read on every pass, so entries added later (for example by
    :func:`add_periodic_task`) are picked up without a restart.
    """

    Entry = ScheduleEntry

    def __init__(
        self,
        app: Celery,
        *,
        max_interval: float | None = None,
        lock_ttl: float | None = None,
        catch_up: float | None = None,
        lock_name: str = LEADER_LOCK,
        owner: str | None = None,
        schedule_filename: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.app = app
        conf = app.conf
        self.max_interval = float(
            max_interval or conf.beat_max_loop_interval or DEFAULT_MAX_INTERVAL
        )
        self.lock_ttl = float(lock_ttl or DEFAULT_LOCK_TTL)
        self.renew_interval = self.lock_ttl / 3.0
        deadline = conf.beat_cron_starting_deadline
        self.cron_deadline: float | None = float(deadline) if deadline is not None else None
        if catch_up is None:
            catch_up = self.cron_deadline if self.cron_deadline is not None else 2 * self.lock_ttl
        self.catch_up = float(catch_up)
        self.lock_name = lock_name
        self.claim_prefix = f"{lock_name}.claim."
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.schedule_filename = schedule_filename
        self.schedule: dict[str, ScheduleEntry] = {}
        self._raw: dict[str, dict[str, Any]] = {}
        self._leader = False
        self._renewed_at = 0.0
        self._standby_logged = False
        self.setup_schedule()

    # -- entries --------------------------------------------------------------------------

    def setup_schedule(self) -> None:
        signals.send_app_configured(self.app)
        self.sync_entries(strict=True)

    def sync_entries(self, strict: bool = False) -> None:
        """Bring ``self.schedule`` in line with ``beat_schedule``, keeping run history."""
        wanted = self.app.conf.beat_schedule or {}
        for name, spec in wanted.items():
            old = self._raw.get(name)
            if old is not None and old == spec:
                continue
            try:
                entry = self._make_entry(name, spec)
            except (TypeError, ValueError) as exc:
                if strict:
                    raise ImproperlyConfigured(f"beat_schedule[{name!r}]: {exc}") from None
                logger.error("beat_schedule[%r] ignored: %s", name, exc)
                self._raw[name] = dict(spec) if isinstance(spec, Mapping) else {}
                continue
            prev = self.schedule.get(name)
            if prev is not None and prev.schedule == entry.schedule:
                entry.last_run_at, entry.total_run_count = prev.last_run_at, prev.total_run_count
            self.schedule[name] = entry
            self._raw[name] = dict(spec)
        for gone in set(self.schedule) - set(wanted):
            del self.schedule[gone]
            self._raw.pop(gone, None)

    def _make_entry(self, name: str, spec: Any) -> ScheduleEntry:
        if not isinstance(spec, Mapping):
            raise TypeError(f"expected a dict with 'task' and 'schedule', not {spec!r}")
        unknown = set(spec) - _ENTRY_KEYS
        if unknown:
            raise TypeError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
        if not spec.get("task"):
            raise ValueError("missing 'task' (the task name to send)")
        sched = maybe_schedule(spec.get("schedule"), bool(spec.get("relative")), app=self.app)
        if sched is None or not hasattr(sched, "is_due"):
            raise TypeError(f"'schedule' must be seconds, a timedelta or a schedule, not {sched!r}")
        return self.Entry(
            name=name,
            task=str(spec["task"]),
            schedule=sched,
            args=tuple(spec.get("args") or ()),
            kwargs=dict(spec.get("kwargs") or {}),
            options=dict(spec.get("options") or {}),
        )

    # -- running --------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leader

    def claim_name(self, entry: ScheduleEntry, due: dt.datetime) -> str:
        return f"{self.claim_prefix}{entry.name}@{due.astimezone(dt.UTC).isoformat()}"

    async def tick(self, transport: Transport) -> float:
        """One pass: renew or take the leader lock, send what is due; seconds to sleep."""
        started = time.monotonic()
        try:
            self.sync_entries()
        except Exception:
            logger.exception("beat: reading beat_schedule failed")
        if not await transport.try_lock(self.lock_name, self.owner, self.lock_ttl):
            if self._leader:
                logger.warning("beat: lost the leader lock to another beat; standing by")
                self._leader = False
            elif not self._standby_logged:
                logger.info("beat: another beat is the leader; standing by")
            self._standby_logged = True
            return self.renew_interval
        continuous = self._leader and started - self._renewed_at < self.lock_ttl
        self._renewed_at = started
        now = _utcnow()
        if not continuous:
            self._leader = True
            self._standby_logged = False
            logger.info("beat: acting as the leader (%s)", self.owner)
            self._take_over(now)
        wait = self.max_interval
        for entry in list(self.schedule.values()):
            if time.monotonic() - started > self.renew_interval:
                return 0.0  # renew the lock before going on
            wait = min(wait, await self._run_entry(transport, entry, _utcnow()))
        return max(0.0, min(wait, self.renew_interval))

    def _start_point(self, entry: ScheduleEntry, now: dt.datetime) -> dt.datetime:
        if _slotted(entry.schedule):
            start: dt.datetime = entry.schedule.anchor(now - dt.timedelta(seconds=self.catch_up))
            return start
        return now

    def _take_over(self, now: dt.datetime) -> None:
        """New leader: look back ``catch_up`` seconds, keeping what this beat sent itself."""
        for entry in self.schedule.values():
            start = self._start_point(entry, now)
            if entry.last_run_at is None or entry.last_run_at < start:
                entry.last_run_at = start

    async def _run_entry(
        self, transport: Transport, entry: ScheduleEntry, now: dt.datetime
    ) -> float:
        sched = entry.schedule
        if entry.last_run_at is None:
            entry.last_run_at = self._start_point(entry, now)
        if not _slotted(sched):  # a Celery-style schedule: is_due() only
            state = sched.is_due(entry.last_run_at)
            if state[0]:
                await self.apply_entry(entry, now)
                entry.last_run_at = now
                entry.total_run_count += 1
            return float(state[1])
        due = sched.last_due(entry.last_run_at, now)
        if due is not None:
            late = (now - due).total_seconds()
            if (
                self.cron_deadline is not None
                and isinstance(sched, crontab)
                and late > self.cron_deadline
            ):
                logger.warning(
                    "Scheduler: Skipping %s due at %s: %.0f s late "
                    "(beat_cron_starting_deadline is %s)",
                    entry.name, due.isoformat(), late, self.cron_deadline,
                )
            else:
                ttl = max((sched.next_after(due) - now).total_seconds(), 0.0) + CLAIM_MARGIN
                if await transport.try_lock(self.claim_name(entry, due), self.owner, ttl):
                    try:
                        await self.apply_entry(entry, due)
                    except Exception as exc:
                        # The claim stays ours, so the retry cannot be a duplicate.
                        logger.error("Message Error: %s sending %s; retrying", exc, entry.name)
                        return RETRY_DELAY
                    entry.total_run_count += 1
                else:
                    logger.debug("Scheduler: %s due at %s was sent by another beat",
                                 entry.name, due.isoformat())
            entry.last_run_at = due
        return float((sched.next_after(entry.last_run_at) - now).total_seconds())

    async def apply_entry(self, entry: ScheduleEntry, due: dt.datetime) -> Any:
        """Send one run of ``entry``; ``due`` is the due time it is for."""
        logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        result = await self.app.asend_task(entry.task, entry.args, entry.kwargs, **entry.options)
        logger.debug("%s sent. id->%s", entry.task, getattr(result, "id", None))
        return result

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule until ``stop`` is set; then release the leader lock."""
        conns = await self.app.connection_for_current_loop()
        transport = conns.transport
        try:
            while not stop.is_set():
                try:
                    delay = await self.tick(transport)
                except Exception:
                    logger.exception("beat: a scheduling pass failed; retrying")
                    delay = RETRY_DELAY
                if delay <= 0:
                    await asyncio.sleep(0)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            await self.close(transport)

    async def close(self, transport: Transport) -> None:
        if not self._leader:
            return
        self._leader = False
        try:
            await transport.try_lock(self.lock_name, self.owner, 0.0)
        except Exception as exc:
            logger.warning("beat: could not release the leader lock: %s", exc)

    def info(self) -> str:
        return (
            f"{len(self.schedule)} entries, leader lock {self.lock_name!r} "
            f"ttl {self.lock_ttl:g}s"
        )


class PersistentScheduler(Scheduler):
    """Celery's default name. Run state lives in the broker (claims), not in a file."""


def scheduler_class(app: Celery, spec: Any = None) -> type[Scheduler]:
    """The scheduler class from ``-S``/``beat_scheduler``: a class or ``module:Class``."""
    spec = spec or app.conf.beat_scheduler or PersistentScheduler
    if isinstance(spec, str):
        if spec in _CELERY_SCHEDULERS:
            return PersistentScheduler
        module, sep, attr = spec.partition(":")
        if not sep:
            module, _, attr = spec.rpartition(".")
        try:
            spec = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ImproperlyConfigured(f"beat scheduler {spec!r} cannot be loaded: {exc}") from None
    if not (isinstance(spec, type) and issubclass(spec, Scheduler)):
        raise ImproperlyConfigured(
            f"beat scheduler {spec!r} is not a celeriac scheduler "
            f"(subclass celeriac.beat.Scheduler); Celery schedulers such as "
            f"django_celery_beat's do not run on celeriac."
        )
    return spec


async def embedded_beat(app: Celery, stop: asyncio.Event, **options: Any) -> None:
    """Beat inside a worker's loop (``worker -B``): run until ``stop`` is set."""
    scheduler = scheduler_class(app, options.pop("scheduler", None))(app, **options)
    signals.beat_embedded_init.send(sender=scheduler)
    logger.info("beat: Starting (embedded; %s)", scheduler.info())
    await scheduler.run(stop)


class Beat:
    """The ``celeriac beat`` service: one process, one loop, stops on SIGTERM/SIGINT."""

    def __init__(
        self,
        app: Celery,
        *,
        max_interval: float | None = None,
        scheduler: Any = None,
        schedule: str | None = None,
        lock_ttl: float | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        self.scheduler_cls = scheduler_class(app, scheduler)
        self.options: dict[str, Any] = {
            "max_interval": max_interval,
            "lock_ttl": lock_ttl,
            "schedule_filename": schedule or app.conf.beat_schedule_filename,
            **options,
        }
        self.scheduler: Scheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def banner(self) -> str:
        from . import __version__
        from .transport.base import redact_url

        interval = self.options["max_interval"] or self.app.conf.beat_max_loop_interval
        return "\n".join([
            f"celeriac beat v{__version__} is starting.",
            f"LocalTime -> {dt.datetime.now().replace(microsecond=0)}",
            "Configuration ->",
            f"    . broker -> {redact_url(self.app.broker_url_resolved())}",
            f"    . scheduler -> {self.scheduler_cls.__module__}.{self.scheduler_cls.__name__}",
            "    . state -> kept in the broker (leader lock and per-run claims)",
            f"    . maxinterval -> {float(interval or DEFAULT_MAX_INTERVAL):g}s",
        ])

    def setup(self) -> Scheduler:
        """Import the app's modules and build the scheduler (errors surface here, early)."""
        if self.scheduler is None:
            self.app.loader_import_default_modules()
            self.scheduler = self.scheduler_cls(self.app, **self.options)
        return self.scheduler

    def run(self) -> int:
        self.setup()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(self._main())
        return 0

    async def _main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        handled: list[int] = []
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
                handled.append(signum)
        try:
            scheduler = self.setup()
            signals.beat_init.send(sender=self)
            logger.info("beat: Starting... (%s)", scheduler.info())
            await scheduler.run(stop)
        finally:
            for number in handled:
                loop.remove_signal_handler(number)
            await self.app.aclose()
            logger.info("beat: stopped.")

    def _on_signal(self, signum: int) -> None:
        logger.warning("beat: Shutting down (%s)", signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        """Ask the service to stop; safe from any thread."""
        loop, stop = self._loop, self._stop
        if loop is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed already
            loop.call_soon_threadsafe(stop.set)


def add_periodic_task(
    app: Celery,
    schedule: Any,
    sig: Any,
    args: Any = (),
    kwargs: Any = (),
    name: str | None = None,
    **opts: Any,
) -> str:
    """``app.add_periodic_task(10.0, add.s(2, 2), name='add every 10')``; returns the key.

    Stored in ``beat_schedule`` (keyed by ``name``, else the signature's repr), as Celery
    does, so a running beat picks it up on its next pass.
    """
    from .canvas import Signature

    kw = dict(kwargs or {})
    if isinstance(sig, Signature):
        sig = sig.clone(args, kw)
    elif isinstance(sig, Mapping):
        sig = Signature(sig, app=app).clone(args, kw)
    else:
        sig = app.signature(getattr(sig, "name", sig), args, kw)
    key = name or repr(sig)
    app.conf.beat_schedule[key] = {
        "schedule": schedule,
        "task": sig.name,
        "args": tuple(sig.args),
        "kwargs": dict(sig.kwargs),
        "options": {**sig.options, **opts},
    }
    return key
