"""The worker loop's per-message path: Delivery -> checks -> pool -> settle -> ack.

Invariant: with late acks, everything a task causes (its result, the next chain step,
callbacks, the chord body) is stored or published *before* its message is acked, so a
crash in between repeats the work instead of losing it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import signals, states
from ..backends.base import ResultMeta, now_iso
from ..canvas import signature
from ..exceptions import ChordError, InvalidTaskError, TaskRevokedError
from ..protocol import parse_iso, upgrade_v1
from ..result import exception_to_dict
from ..transport.base import Delivery, Outgoing, with_dead_reason
from .pools.base import Job, Outcome
from .trace import chord_error

if TYPE_CHECKING:
    from ..app import Celery, Connections
    from ..transport.base import Consumer
    from .pools.base import Pool

logger = logging.getLogger("celeriac.worker")

_RATE = re.compile(r"^\s*([\d.]+)\s*(?:/\s*([smh]))?\s*$")


def parse_rate(rate: str | float | None) -> float | None:
    """'10/s', '100/m', '5/h' or a number (per second) -> tokens per second."""
    if rate in (None, "", 0):
        return None
    if isinstance(rate, int | float):
        return float(rate)
    match = _RATE.match(str(rate))
    if not match:
        raise ValueError(f"Invalid rate limit {rate!r}: use e.g. '10/s', '100/m' or '5/h'")
    per = {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) / per


class TokenBucket:
    """Rate gate for one task type; ``wait`` sleeps until a token is free."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 1.0
        self.stamp = time.monotonic()

    async def wait(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(1.0, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


class RequestInfo:
    """What inspect active/reserved report about one message in this worker."""

    __slots__ = ("acknowledged", "delivery", "headers", "job", "time_start", "worker_pid")

    def __init__(self, delivery: Delivery, job: Job) -> None:
        self.delivery = delivery
        self.job = job
        self.headers = delivery.envelope.headers
        self.time_start: float | None = None
        self.acknowledged = False
        self.worker_pid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        h = self.headers
        return {
            "id": self.job.task_id,
            "name": self.job.name,
            "args": h.get("argsrepr"),
            "kwargs": h.get("kwargsrepr"),
            "type": self.job.name,
            "hostname": self.job.hostname,
            "time_start": self.time_start,
            "acknowledged": self.acknowledged,
            "delivery_info": {
                "exchange": self.delivery.exchange,
                "routing_key": self.delivery.routing_key,
                "priority": self.delivery.envelope.priority,
                "redelivered": self.delivery.redelivered,
            },
            "worker_pid": self.worker_pid,
        }


class MessageHandler:
    """Turns deliveries into pool jobs and settles their outcomes."""

    def __init__(
        self,
        app: Celery,
        conns: Connections,
        consumer: Consumer,
        pool: Pool,
        hostname: str,
        accept: frozenset[str],
        revoked: set[str],
        on_event: Callable[..., None] | None = None,
        task_events: Callable[[], bool] | None = None,
    ) -> None:
        self.app = app
        self.conns = conns
        self.consumer = consumer
        self.pool = pool
        self.hostname = hostname
        self.accept = accept
        self.revoked = revoked
        self.active: dict[str, RequestInfo] = {}
        self.reserved: dict[str, RequestInfo] = {}
        self.buckets: dict[str, TokenBucket | None] = {}
        self.processed: dict[str, int] = {}
        self.on_event = on_event or (lambda *a, **kw: None)
        # Whether task-* events are wanted now (they can be switched at run time); lets
        # the per-task path skip building them.
        self.task_events = task_events or (lambda: on_event is not None)
        conf = app.conf
        self.disable_rate_limits = bool(conf.worker_disable_rate_limits)
        # Read once: each app.conf read walks three layers, and these were read per task.
        self.time_limit = conf.task_time_limit
        self.soft_time_limit = conf.task_soft_time_limit
        self.acks_late = conf.task_acks_late
        self.track_started = conf.task_track_started
        self.result_ttl = app.result_ttl()
        self.is_async: dict[str, bool] = {}  # task name -> async def (an inspect call each)

    # -- entry -------------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> None:
        try:
            await self._handle(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not kill the worker or lose the message
            logger.exception("Internal error handling a message; it is returned to its queue")
            try:
                await self.consumer.reject(delivery, requeue=True, reason=repr(exc))
            except Exception:
                logger.exception("Could not return the message to its queue")

    async def _dead_letter(self, delivery: Delivery, reason: str, *, acked: bool) -> None:
        logger.error("%s: the message was moved to %s.dead", reason, delivery.queue)
        if acked:
            env = with_dead_reason(delivery.envelope, reason)
            await self.conns.transport.publish(Outgoing(env, "", delivery.queue + ".dead"))
        else:
            await self.consumer.reject(delivery, requeue=False, reason=reason)

    async def _handle(self, delivery: Delivery) -> None:
        env = delivery.envelope
        if env.content_type not in self.accept:
            await self._dead_letter(
                delivery,
                f"Refusing message of content type {env.content_type!r} "
                f"(accept_content allows {sorted(self.accept)})",
                acked=False,
            )
            return
        if "task" not in env.headers:
            try:
                env = upgrade_v1(env, self.accept)
            except Exception as exc:
                await self._dead_letter(delivery, f"Invalid task message: {exc}", acked=False)
                return
        h = env.headers
        name, task_id = str(h.get("task")), str(h.get("id") or env.correlation_id or "")
        task = self.app.tasks.get(name)
        if task is None:
            await self._dead_letter(
                delivery,
                f"Received unregistered task of type {name!r}. "
                "Did you import the module that defines it (include= or -A)?",
                acked=False,
            )
            return
        try:
            eta = parse_iso(h.get("eta"))
            expires = parse_iso(h.get("expires"))
        except InvalidTaskError as exc:
            await self._dead_letter(delivery, f"Invalid task message {task_id}: {exc}", acked=False)
            return
        if task_id in self.revoked or (expires is not None and expires < dt.datetime.now(dt.UTC)):
            why = "revoked" if task_id in self.revoked else "expired"
            logger.info("Discarding %s task: %s[%s]", why, name, task_id)
            self.on_event(
                "task-revoked",
                uuid=task_id,
                terminated=False,
                signum=None,
                expired=why == "expired",
            )
            await self._store(
                ResultMeta(
                    task_id,
                    states.REVOKED,
                    exception_to_dict(TaskRevokedError(why)),
                    date_done=now_iso(),
                ),
                env.reply_to,
            )
            await self.consumer.ack(delivery)
            return
        if eta is not None and eta.timestamp() > time.time() + 0.05:
            # Arrived early (a Celery client sends ETA tasks at once): park it in the
            # broker until due, so it is never held unacked in worker memory.
            await self.conns.transport.publish(
                Outgoing(env, "", delivery.queue, not_before=eta.timestamp())
            )
            await self.consumer.ack(delivery)
            return
        limits = h.get("timelimit") or (None, None)
        hard = limits[0] if limits[0] is not None else (task.time_limit or self.time_limit)
        soft = (
            limits[1]
            if len(limits) > 1 and limits[1] is not None
            else (task.soft_time_limit or self.soft_time_limit)
        )
        is_async = self.is_async.get(name)
        if is_async is None:
            is_async = self.is_async[name] = task.is_async
        job = Job(
            task_id=task_id,
            name=name,
            body=env.body,
            content_type=env.content_type,
            content_encoding=env.content_encoding,
            headers=dict(h),
            delivery_info={
                "exchange": delivery.exchange,
                "routing_key": delivery.routing_key,
                "priority": env.priority,
                "redelivered": delivery.redelivered,
                "reply_to": env.reply_to,
            },
            hostname=self.hostname,
            soft_time_limit=soft,
            time_limit=hard,
            is_async=is_async,
        )
        info = RequestInfo(delivery, job)
        self.reserved[task_id] = info
        logger.info("Task %s[%s] received", name, task_id)
        if signals.task_received:
            signals.task_received.send(self, request=job)
        events = self.task_events()
        if events:
            self.on_event(
                "task-received",
                uuid=task_id,
                name=name,
                args=h.get("argsrepr"),
                kwargs=h.get("kwargsrepr"),
                root_id=h.get("root_id"),
                parent_id=h.get("parent_id"),
                retries=h.get("retries"),
                eta=h.get("eta"),
                expires=h.get("expires"),
            )
        try:
            bucket = self._bucket(name, task.rate_limit)
            if bucket is not None:
                await bucket.wait()
            late = task.acks_late if task.acks_late is not None else self.acks_late
            if not late:
                await self.consumer.ack(delivery)
                info.acknowledged = True
            track = task.track_started
            if track is None:
                track = self.track_started
            if track:
                await self._store(
                    ResultMeta(
                        task_id, states.STARTED, {"pid": os.getpid(), "hostname": self.hostname}
                    ),
                    env.reply_to,
                )
            if task_id in self.revoked:
                outcome = Outcome(task_id, states.REVOKED)
            else:
                self.reserved.pop(task_id, None)
                self.active[task_id] = info
                info.time_start = time.time()
                if events:
                    self.on_event("task-started", uuid=task_id)
                outcome = await self.pool.run(job)
        finally:
            self.reserved.pop(task_id, None)
            self.active.pop(task_id, None)
        await self.settle(delivery, info, outcome, late)

    def _bucket(self, name: str, rate: Any) -> TokenBucket | None:
        if self.disable_rate_limits:
            return None
        try:
            return self.buckets[name]
        except KeyError:
            per_sec = parse_rate(rate)
            bucket = self.buckets[name] = TokenBucket(per_sec) if per_sec else None
            return bucket

    def set_rate_limit(self, name: str, rate: Any) -> None:
        per_sec = parse_rate(rate)
        self.buckets[name] = TokenBucket(per_sec) if per_sec else None

    async def _store(self, meta: ResultMeta, reply_to: str | None = None) -> None:
        if self.conns.backend.persistent:
            await self.conns.backend.store(meta, ttl=self.result_ttl, reply_to=reply_to)

    # -- settle ------------------------------------------------------------------------

    async def settle(
        self, delivery: Delivery, info: RequestInfo, outcome: Outcome, late: bool
    ) -> None:
        job = info.job
        backend, ttl = self.conns.backend, self.result_ttl
        self.processed[job.name] = self.processed.get(job.name, 0) + 1
        if outcome.state == states.REVOKED:
            logger.info("Discarding revoked task: %s[%s]", job.name, job.task_id)
            self.on_event(
                "task-revoked", uuid=job.task_id, terminated=False, signum=None, expired=False
            )
            await self._store(
                ResultMeta(
                    job.task_id,
                    states.REVOKED,
                    exception_to_dict(TaskRevokedError("revoked")),
                    date_done=now_iso(),
                ),
                job.delivery_info.get("reply_to"),
            )
        elif (
            outcome.state == states.REJECTED
            and outcome.requeue is False
            and outcome.exc_repr
            and not outcome.worker_pid
        ):
            await self._dead_letter(delivery, outcome.exc_repr, acked=info.acknowledged)
            return
        if backend.persistent:
            reply_to = job.delivery_info.get("reply_to")
            if outcome.meta is not None:
                await backend.store_raw(job.task_id, outcome.meta, ttl=ttl, reply_to=reply_to)
            for tid, data in outcome.extra_results:
                await backend.store_raw(tid, data, ttl=ttl, reply_to=reply_to)
        if outcome.follow_ups:
            await self.conns.transport.publish_many(outcome.follow_ups)
        if outcome.chord is not None:
            await self._join_chord(job, outcome)
        self._log(job, outcome)
        if info.acknowledged:
            return
        if outcome.ack:
            await self.consumer.ack(delivery)
        else:
            await self.consumer.reject(
                delivery, requeue=bool(outcome.requeue), reason=outcome.exc_repr or outcome.state
            )

    async def _join_chord(self, job: Job, outcome: Outcome) -> None:
        join = outcome.chord
        assert join is not None
        backend = self.conns.backend
        ttl = self.result_ttl
        if join.size <= 0:
            # No chord_size in the body: a Celery client sent it (Celery keeps the size in
            # its backend and saves no group to list members by), so it cannot be joined
            # here. Fail the body's result loudly rather than never run it.
            exc = ChordError(f"chord {join.group_id} was sent by a Celery client; celeriac "
                             "workers cannot join Celery chords: run them on Celery workers")
            logger.error("%s", exc)
            body_id = (join.body.get("options") or {}).get("task_id")
            if body_id:
                failure = ResultMeta(body_id, states.FAILURE, exception_to_dict(exc),
                                     date_done=now_iso())
                await backend.store(failure, ttl=ttl)
            return
        if not await backend.chord_join(join.group_id, job.task_id, join.size, ttl=ttl):
            return
        ids = await backend.load_group(join.group_id) or []
        metas = await backend.get_many(ids)
        body = signature(join.body, app=self.app)
        failed = next(
            (i for i in ids if metas.get(i) is None or metas[i].status in states.PROPAGATE_STATES),
            None,
        )
        if failed is not None:
            meta = metas.get(failed)
            exc = chord_error(failed, meta.result if meta else "result missing")
            logger.error("Chord %s failed: %s", join.group_id, exc)
            body_id = body.options.get("task_id")
            if body_id:
                await backend.store(
                    ResultMeta(
                        body_id, states.FAILURE, exception_to_dict(exc), date_done=now_iso()
                    ),
                    ttl=ttl,
                )
            with self.app.collecting() as sent:
                for eb in body.options.get("link_error") or ():
                    errback = signature(eb, app=self.app)
                    errback.apply_async(() if errback.immutable else (body_id,))
        else:
            values = [metas[i].result for i in ids]
            with self.app.collecting() as sent:
                body.apply_async(() if body.immutable else (values,))
        if sent:
            await self.conns.transport.publish_many([o for o, _ in sent])

    def _log(self, job: Job, outcome: Outcome) -> None:
        state = outcome.state
        if state == states.SUCCESS:
            logger.info(
                "Task %s[%s] succeeded in %.6fs: %s",
                job.name,
                job.task_id,
                outcome.runtime,
                outcome.retval_repr,
            )
            if self.task_events():
                self.on_event(
                    "task-succeeded",
                    uuid=job.task_id,
                    result=outcome.retval_repr,
                    runtime=outcome.runtime,
                )
        elif state == states.FAILURE:
            logger.error(
                "Task %s[%s] raised unexpected: %s\n%s",
                job.name,
                job.task_id,
                outcome.exc_repr,
                outcome.traceback or "",
            )
            self.on_event(
                "task-failed",
                uuid=job.task_id,
                exception=outcome.exc_repr,
                traceback=outcome.traceback,
            )
        elif state == states.RETRY:
            logger.info("Task %s[%s] retry: %s", job.name, job.task_id, outcome.exc_repr)
            self.on_event(
                "task-retried",
                uuid=job.task_id,
                exception=outcome.exc_repr,
                traceback=outcome.traceback,
            )
        elif state == states.REJECTED:
            logger.warning(
                "Task %s[%s] rejected (requeue=%s): %s",
                job.name,
                job.task_id,
                outcome.requeue,
                outcome.exc_repr,
            )
            self.on_event("task-rejected", uuid=job.task_id, requeue=bool(outcome.requeue))
        elif state == states.IGNORED:
            logger.info("Task %s[%s] ignored", job.name, job.task_id)
