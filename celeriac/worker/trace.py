"""Run one task in any pool and classify what happened.

``Tracer`` is the pools' ``Runner``: it decodes the body, runs the task (sync or
``async def``), and returns an ``Outcome`` whose result document is already encoded and
whose follow-up messages (chain steps, callbacks, errbacks, retries) are already built,
through the app's send path in collecting mode. It performs no broker I/O itself; the
worker loop stores, publishes, joins chords and acks (``worker.settle``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import os
import time
import traceback as tb
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import signals, states
from ..canvas import signature
from ..exceptions import (
    ChordError,
    Ignore,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    WorkerLostError,
)
from ..protocol import decode_body, saferepr
from ..result import exception_to_dict
from ..serialization import codec
from ..task import Context, Task, pop, push
from ..transport.base import Envelope
from .pools.base import ChordJoin, Job, Outcome

if TYPE_CHECKING:
    from ..app import Celery

logger = logging.getLogger(__name__)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


@dataclass(slots=True)
class _Call:
    """One task call between ``_start`` and ``_finish``."""

    job: Job
    task: Task[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]
    ctx: Context
    token: Any
    start: float


class Tracer:
    """Runs jobs for one app; the same object is inherited by prefork children."""

    def __init__(self, app: Celery, hostname: str, accept: frozenset[str]) -> None:
        self.app = app
        self.hostname = hostname
        self.accept = accept
        self._result_codec = codec(app.conf.result_serializer)
        self._async: dict[str, bool] = {}  # task name -> async def (an inspect call each)

    # -- entry points (the pools' Runner protocol) ----------------------------------

    def execute(self, job: Job) -> Outcome:
        call = self._start(job)
        if isinstance(call, Outcome):
            return call
        task = call.task
        try:
            is_async = self._async.get(task.name)
            if is_async is None:
                is_async = self._async[task.name] = task.is_async
            if is_async:
                retval = self.app.portal.run(self._call_async(task, call.args, call.kwargs, job))
            else:
                retval = task.run(*call.args, **call.kwargs)
        except BaseException as exc:
            return self._finish(call, None, exc)
        return self._finish(call, retval, None)

    async def aexecute(self, job: Job) -> Outcome:
        if not job.is_async:
            return await asyncio.to_thread(self.execute, job)
        call = self._start(job)
        if isinstance(call, Outcome):
            return call
        try:
            retval = await self._call_async(call.task, call.args, call.kwargs, job)
        except asyncio.CancelledError:
            pop(call.token)
            raise
        except BaseException as exc:
            return self._finish(call, None, exc)
        return self._finish(call, retval, None)

    def _start(self, job: Job) -> _Call | Outcome:
        """Decode, push the request context and send task_prerun."""
        start = time.monotonic()
        prepared = self._prepare(job)
        if isinstance(prepared, Outcome):
            return prepared
        task, args, kwargs, ctx = prepared
        token = push(task, ctx)
        if signals.task_prerun:
            signals.task_prerun.send(task, task_id=job.task_id, task=task, args=args, kwargs=kwargs)
        return _Call(job, task, args, kwargs, ctx, token, start)

    def _finish(self, call: _Call, retval: Any, exc: BaseException | None) -> Outcome:
        """Classify the result while the context is still pushed (retry reads it), then pop."""
        outcome: Outcome | None = None
        try:
            if exc is not None:
                exc = self._maybe_autoretry(call.task, exc)
                outcome = self._failed(call.job, call.task, call.ctx, exc, call.start)
            else:
                outcome = self._succeeded(call.job, call.task, call.ctx, retval, call.start)
                if signals.task_success and outcome.state == states.SUCCESS:
                    signals.task_success.send(call.task, result=retval)
            return outcome
        finally:
            _postrun(call.task, call.job, call.args, call.kwargs, retval, outcome)
            pop(call.token)

    def lost(self, job: Job, exc: BaseException) -> Outcome:
        """The job's process died or hit its hard limit: record the failure."""
        task = self.app.tasks.get(job.name)
        ctx = self._context(job, [], {}, {})
        try:
            args, kwargs, embed = decode_body(_envelope(job), self.accept)
            ctx = self._context(job, args, kwargs, embed)
        except Exception:  # the body was readable before; be safe anyway
            pass
        outcome = self._failed(job, task, ctx, exc, time.monotonic(), run_errbacks=True)
        if isinstance(exc, WorkerLostError) and task is not None and self._reject_on_lost(task):
            outcome.ack = False
            outcome.requeue = True
        return outcome

    # -- pieces --------------------------------------------------------------------

    def _prepare(
        self, job: Job
    ) -> tuple[Task[..., Any], list[Any], dict[str, Any], Context] | Outcome:
        task = self.app.tasks.get(job.name)
        if task is None:
            return Outcome(
                job.task_id,
                states.REJECTED,
                ack=False,
                requeue=False,
                exc_repr=f"Received unregistered task of type {job.name!r}",
            )
        try:
            args, kwargs, embed = decode_body(_envelope(job), self.accept)
        except Exception as exc:
            return Outcome(
                job.task_id,
                states.REJECTED,
                ack=False,
                requeue=False,
                exc_repr=f"Cannot decode message body: {exc}",
            )
        return task, args, kwargs, self._context(job, args, kwargs, embed)

    def _context(
        self, job: Job, args: list[Any], kwargs: dict[str, Any], embed: Mapping[str, Any]
    ) -> Context:
        h = job.headers
        return Context(
            id=job.task_id,
            task=job.name,
            args=args,
            kwargs=kwargs,
            retries=int(h.get("retries") or 0),
            hostname=self.hostname,
            delivery_info=job.delivery_info,
            root_id=h.get("root_id"),
            parent_id=h.get("parent_id"),
            group=h.get("group"),
            group_index=h.get("group_index"),
            eta=h.get("eta"),
            expires=h.get("expires"),
            is_eager=False,
            callbacks=embed.get("callbacks"),
            errbacks=embed.get("errbacks"),
            chain=embed.get("chain"),
            chord=embed.get("chord"),
            correlation_id=job.task_id,
            reply_to=job.delivery_info.get("reply_to"),
            origin=h.get("origin"),
            timelimit=h.get("timelimit") or (None, None),
            ignore_result=bool(h.get("ignore_result")),
            headers=h,
            priority=job.delivery_info.get("priority"),
        )

    async def _call_async(
        self, task: Task[..., Any], args: list[Any], kwargs: dict[str, Any], job: Job
    ) -> Any:
        coro = task.run(*args, **kwargs)
        if not inspect.isawaitable(coro):
            return coro
        limit = job.soft_time_limit or job.time_limit
        if not limit:
            return await coro
        try:
            async with asyncio.timeout(limit):
                return await coro
        except TimeoutError as exc:
            if job.soft_time_limit:
                raise SoftTimeLimitExceeded(limit) from exc
            raise TimeLimitExceeded(limit) from exc

    def _maybe_autoretry(self, task: Task[..., Any], exc: BaseException) -> BaseException:
        if not task.autoretry_for or not isinstance(exc, task.autoretry_for):
            return exc
        if task.dont_autoretry_for and isinstance(exc, task.dont_autoretry_for):
            return exc
        opts = dict(task.retry_kwargs)
        if task.retry_backoff and "countdown" not in opts:
            opts["countdown"] = task.backoff_delay(task.request.retries)
        try:
            task.retry(exc=exc, **opts)
        except BaseException as raised:
            return raised
        return exc  # pragma: no cover - retry() always raises

    def _ignored(self, job: Job, task: Task[..., Any]) -> bool:
        if job.headers.get("ignore_result"):
            return True
        if task.ignore_result is not None:
            return bool(task.ignore_result)
        return bool(self.app.conf.task_ignore_result)

    def _meta(self, job: Job, status: str, result: Any, trace: str | None = None) -> bytes:
        doc: dict[str, Any] = {
            "status": status,
            "result": result,
            "traceback": trace,
            "children": [],
            "date_done": _now_iso(),
            "task_id": job.task_id,
        }
        if job.headers.get("group"):
            doc["group_id"] = job.headers["group"]
        if job.headers.get("parent_id"):
            doc["parent_id"] = job.headers["parent_id"]
        if self.app.conf.result_extended:
            doc.update(
                name=job.name,
                args=job.headers.get("argsrepr"),
                kwargs=job.headers.get("kwargsrepr"),
                worker=self.hostname,
                retries=job.headers.get("retries"),
                queue=job.delivery_info.get("routing_key"),
            )
        return self._result_codec.encode(doc)

    def _succeeded(
        self, job: Job, task: Task[..., Any], ctx: Context, retval: Any, start: float
    ) -> Outcome:
        runtime = time.monotonic() - start
        try:
            meta = None if self._ignored(job, task) else self._meta(job, states.SUCCESS, retval)
        except Exception as exc:
            err = TypeError(f"Result of {job.name} cannot be serialized: {exc}")
            return self._failed(job, task, ctx, err, start)
        out = Outcome(
            job.task_id,
            states.SUCCESS,
            meta=meta,
            runtime=runtime,
            retval_repr=saferepr(retval),
            worker_pid=os.getpid(),
        )
        if ctx.callbacks or ctx.chain:  # else skip the collecting() context per task
            try:
                with self.app.collecting() as sent:
                    for cb in ctx.callbacks or ():
                        sig = signature(cb, app=self.app)
                        sig.apply_async(() if sig.immutable else (retval,))
                    if ctx.chain:
                        rest = list(ctx.chain)
                        nxt = signature(rest.pop(), app=self.app)
                        nxt.apply_async(() if nxt.immutable else (retval,), chain=rest or None)
            except Exception as exc:
                logger.exception(
                    "Task %s[%s] succeeded but its follow-ups failed", job.name, job.task_id
                )
                return self._failed(job, task, ctx, exc, start)
            out.follow_ups = [o for o, _ in sent]
        out.chord = self._chord(ctx, failed=False)
        return out

    def _failed(
        self,
        job: Job,
        task: Task[..., Any] | None,
        ctx: Context,
        exc: BaseException,
        start: float,
        run_errbacks: bool = True,
    ) -> Outcome:
        runtime = time.monotonic() - start
        pid = os.getpid()
        if isinstance(exc, Ignore):
            return Outcome(job.task_id, states.IGNORED, runtime=runtime, worker_pid=pid)
        if isinstance(exc, Reject):
            return Outcome(
                job.task_id,
                states.REJECTED,
                runtime=runtime,
                worker_pid=pid,
                ack=False,
                requeue=bool(exc.requeue),
                exc_repr=repr(exc),
            )
        trace = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        if isinstance(exc, Retry):
            if signals.task_retry:
                signals.task_retry.send(task, request=ctx, reason=exc, einfo=trace)
            cause = exc.exc if isinstance(exc.exc, BaseException) else exc
            out = Outcome(
                job.task_id,
                states.RETRY,
                runtime=runtime,
                worker_pid=pid,
                exc_repr=str(exc),
                traceback=trace,
                meta=self._meta(job, states.RETRY, exception_to_dict(cause), trace),
            )
            if exc.sig is not None:
                with self.app.collecting() as sent:
                    exc.sig.apply_async()
                out.follow_ups = [o for o, _ in sent]
            return out
        ignored = (
            task is not None
            and self._ignored(job, task)
            and not (
                task.store_errors_even_if_ignored or self.app.conf.task_store_errors_even_if_ignored
            )
        )
        info = exception_to_dict(exc)
        if signals.task_failure:
            signals.task_failure.send(
                task,
                task_id=job.task_id,
                exception=exc,
                args=ctx.args,
                kwargs=ctx.kwargs,
                traceback=exc.__traceback__,
                einfo=trace,
            )
        out = Outcome(
            job.task_id,
            states.FAILURE,
            runtime=runtime,
            worker_pid=pid,
            exc_repr=repr(exc),
            traceback=trace,
            meta=None if ignored else self._meta(job, states.FAILURE, info, trace),
        )
        # The rest of a chain never runs: fail its results too, so waiting on the
        # chain's last result raises this error instead of hanging.
        for step in ctx.chain or ():
            step_id = (step.get("options") or {}).get("task_id")
            if step_id:
                out.extra_results.append((step_id, self._meta_for(step_id, info, trace)))
        if run_errbacks and ctx.errbacks:
            try:
                with self.app.collecting() as sent:
                    for eb in ctx.errbacks:
                        sig = signature(eb, app=self.app)
                        sig.apply_async(() if sig.immutable else (job.task_id,))
                out.follow_ups = [o for o, _ in sent]
            except Exception:
                logger.exception("Could not send the errbacks of %s[%s]", job.name, job.task_id)
        out.chord = self._chord(ctx, failed=True)
        if task is not None and not self._acks_on_failure(task):
            out.ack = False
            out.requeue = False
        return out

    def _meta_for(self, task_id: str, info: Any, trace: str | None) -> bytes:
        return self._result_codec.encode(
            {
                "status": states.FAILURE,
                "result": info,
                "traceback": trace,
                "children": [],
                "date_done": _now_iso(),
                "task_id": task_id,
            }
        )

    @staticmethod
    def _chord(ctx: Context, failed: bool) -> ChordJoin | None:
        if not ctx.chord or not ctx.group:
            return None
        body = dict(ctx.chord)
        size = int((body.get("options") or {}).get("chord_size") or 0)
        return ChordJoin(group_id=str(ctx.group), size=size, body=body, failed=failed)

    def _acks_on_failure(self, task: Task[..., Any]) -> bool:
        value = task.acks_on_failure_or_timeout
        return bool(self.app.conf.task_acks_on_failure_or_timeout if value is None else value)

    def _reject_on_lost(self, task: Task[..., Any]) -> bool:
        late = task.acks_late if task.acks_late is not None else self.app.conf.task_acks_late
        lost = task.reject_on_worker_lost
        if lost is None:
            lost = self.app.conf.task_reject_on_worker_lost
        return bool(late and lost)


def _postrun(
    task: Task[..., Any], job: Job, args: Any, kwargs: Any, retval: Any, outcome: Outcome | None
) -> None:
    if signals.task_postrun:
        signals.task_postrun.send(
            task,
            task_id=job.task_id,
            task=task,
            args=args,
            kwargs=kwargs,
            retval=retval,
            state=outcome.state if outcome else None,
        )


def _envelope(job: Job) -> Envelope:
    return Envelope(job.body, job.headers, job.content_type, job.content_encoding)


def chord_error(failed_id: str, info: Any) -> ChordError:
    exc_type = info.get("exc_type", "Exception") if isinstance(info, dict) else "Exception"
    message = info.get("exc_message") if isinstance(info, dict) else info
    if isinstance(message, list) and len(message) == 1:
        message = message[0]
    return ChordError(f"Dependency {failed_id} raised {exc_type}({message!r})")
