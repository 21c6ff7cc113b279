"""Result handles: AsyncResult, GroupResult and EagerResult; ``get`` and ``aget``."""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import importlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import states
from .backends.base import ResultMeta
from .exceptions import TaskRevokedError
from .exceptions import TimeoutError as CeleriacTimeout

if TYPE_CHECKING:
    from .app import Celery

_created: dict[tuple[str, str], type[BaseException]] = {}


def exception_to_python(info: Any) -> BaseException:
    """Rebuild a stored exception; only real exception classes are ever instantiated."""
    if isinstance(info, BaseException):
        return info
    if not isinstance(info, dict) or "exc_type" not in info:
        return Exception(info)
    name = str(info.get("exc_type") or "Exception")
    module = str(info.get("exc_module") or "builtins")
    message = info.get("exc_message")
    args = tuple(message) if isinstance(message, list | tuple) else (message,)
    cls: Any = None
    try:
        obj: Any = builtins if module == "builtins" else importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        cls = obj
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        key = (module, name)
        if key not in _created:
            _created[key] = type(name.rsplit(".", 1)[-1], (Exception,), {"__module__": module})
        cls = _created[key]
    try:
        return cls(*args)  # type: ignore[no-any-return]
    except Exception:
        exc = Exception.__new__(cls)
        exc.args = args
        return exc  # type: ignore[no-any-return]


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    try:
        from .serialization import json_dumps

        json_dumps(list(exc.args))
        message: Any = list(exc.args)
    except TypeError:
        message = [str(exc)]
    return {"exc_type": cls.__qualname__, "exc_message": message, "exc_module": cls.__module__}


def _assert_may_block() -> None:
    from .task import current

    if current() is not None:
        raise RuntimeError(
            "Never call result.get() within a task!\n"
            "See https://docs.celeryq.dev/en/latest/userguide/tasks.html"
            "#avoid-launching-synchronous-subtasks"
        )


class AsyncResult:
    """The pending or finished result of one task call."""

    def __init__(
        self,
        id: str,
        backend: Any = None,
        task_name: str | None = None,
        app: Celery | None = None,
        parent: Any = None,
    ) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError(f"AsyncResult needs a task id string, got {id!r}")
        from .app import current_app

        self.id = id
        self.app = app or current_app()
        self.task_name = task_name
        self.parent = parent
        self._meta: ResultMeta | None = None

    task_id = property(lambda self: self.id)

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def as_tuple(self) -> Any:
        parent = self.parent.as_tuple() if self.parent is not None else None
        return [[self.id, parent], None]

    # -- state ---------------------------------------------------------------

    async def _afetch(self) -> ResultMeta:
        if self._meta is not None and self._meta.ready:
            return self._meta
        meta = await self.app.aget_result_meta(self.id)
        if meta is None:
            meta = ResultMeta(task_id=self.id, status=states.PENDING)
        if meta.ready:
            self._meta = meta
        return meta

    def _fetch(self) -> ResultMeta:
        if self._meta is not None and self._meta.ready:
            return self._meta
        return self.app.portal.run(self._afetch())

    @property
    def state(self) -> str:
        return self._fetch().status

    status = state

    @property
    def result(self) -> Any:
        meta = self._fetch()
        if meta.status in states.EXCEPTION_STATES:
            return exception_to_python(meta.result)
        return meta.result

    info = result

    @property
    def traceback(self) -> str | None:
        return self._fetch().traceback

    @property
    def date_done(self) -> dt.datetime | None:
        done = self._fetch().date_done
        return dt.datetime.fromisoformat(done) if done else None

    @property
    def children(self) -> list[Any]:
        return list(self._fetch().children)

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    # -- waiting -----------------------------------------------------------------

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        no_ack: bool = True,
        follow_parents: bool = True,
        callback: Any = None,
        on_message: Any = None,
        on_interval: Any = None,
        disable_sync_subtasks: bool = True,
        **kw: Any,
    ) -> Any:
        """Wait for the result; re-raise the task's exception if ``propagate``."""
        if disable_sync_subtasks:
            _assert_may_block()
        return self.app.portal.run(
            self.aget(
                timeout=timeout,
                propagate=propagate,
                follow_parents=follow_parents,
                disable_sync_subtasks=False,
            )
        )

    wait = get

    async def aget(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        follow_parents: bool = True,
        disable_sync_subtasks: bool = True,
        **kw: Any,
    ) -> Any:
        if disable_sync_subtasks:
            _assert_may_block()
        meta = self._meta if self._meta is not None and self._meta.ready else None
        if meta is None:
            try:
                waiting = self.app.await_results([self.id], timeout=timeout)
                async with contextlib.aclosing(waiting) as results:
                    async for found in results:
                        meta = found
                        break
            except builtins.TimeoutError:
                raise CeleriacTimeout("The operation timed out.") from None
            assert meta is not None
            self._meta = meta
        if follow_parents and propagate and meta.status in states.PROPAGATE_STATES:
            self._raise_parent_failure()
        return self._value(meta, propagate)

    def _raise_parent_failure(self) -> None:
        """A chain's last result is failed by an earlier step: raise that step's error."""
        node = self.parent
        while node is not None and isinstance(node, AsyncResult):
            m = node._meta
            if m is not None and m.status in states.PROPAGATE_STATES:
                raise self._exception(m)
            node = node.parent

    @staticmethod
    def _exception(meta: ResultMeta) -> BaseException:
        if meta.status == states.REVOKED:
            return TaskRevokedError(f"task {meta.task_id} was revoked")
        return exception_to_python(meta.result)

    def _value(self, meta: ResultMeta, propagate: bool) -> Any:
        if meta.status in states.PROPAGATE_STATES:
            exc = self._exception(meta)
            if propagate:
                raise exc
            return exc
        return meta.result

    def forget(self) -> None:
        self._meta = None
        self.app.portal.run(self.app.aforget(self.id))

    def revoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: str = "SIGTERM",
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.app.control.revoke(self.id, terminate=terminate, signal=signal)

    def then(self, callback: Any) -> None:
        raise NotImplementedError("AsyncResult.then is not supported; use link= or a chain")


class EagerResult(AsyncResult):
    """The result of ``apply()``/``task_always_eager``: already computed, no backend."""

    def __init__(
        self,
        id: str,
        value: Any,
        state: str,
        traceback: str | None = None,
        app: Celery | None = None,
        task_name: str | None = None,
    ) -> None:
        super().__init__(id, app=app, task_name=task_name)
        result = value
        if isinstance(value, BaseException):
            from .result import exception_to_dict

            result = exception_to_dict(value)
        self._value_obj = value
        self._meta = ResultMeta(task_id=id, status=state, result=result, traceback=traceback)

    def _fetch(self) -> ResultMeta:
        assert self._meta is not None
        return self._meta

    async def _afetch(self) -> ResultMeta:
        return self._fetch()

    def get(self, timeout: float | None = None, propagate: bool = True, **kw: Any) -> Any:  # type: ignore[override]
        meta = self._fetch()
        if meta.status in states.PROPAGATE_STATES:
            exc = (
                self._value_obj
                if isinstance(self._value_obj, BaseException)
                else self._exception(meta)
            )
            if propagate:
                raise exc
            return exc
        return meta.result

    async def aget(self, timeout: float | None = None, propagate: bool = True, **kw: Any) -> Any:  # type: ignore[override]
        return self.get(timeout, propagate)

    @property
    def result(self) -> Any:
        return self._value_obj

    def forget(self) -> None:
        pass

    def revoke(self, *a: Any, **kw: Any) -> None:
        self._meta = ResultMeta(task_id=self.id, status=states.REVOKED)

    def __repr__(self) -> str:
        return f"<EagerResult: {self.id}>"


class ResultSet:
    """A list of results waited on together; values come back in list order."""

    def __init__(
        self, results: Sequence[AsyncResult], app: Celery | None = None, **kw: Any
    ) -> None:
        from .app import current_app

        self.results = list(results)
        self.app = app or current_app()

    def __iter__(self) -> Iterator[AsyncResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> AsyncResult:
        return self.results[index]

    def add(self, result: AsyncResult) -> None:
        if result not in self.results:
            self.results.append(result)

    def _states(self) -> list[str]:
        metas = self.app.portal.run(self.app.aget_result_metas([r.id for r in self.results]))
        return [metas[r.id].status if r.id in metas else states.PENDING for r in self.results]

    def ready(self) -> bool:
        return all(s in states.READY_STATES for s in self._states())

    def successful(self) -> bool:
        return all(s == states.SUCCESS for s in self._states())

    def failed(self) -> bool:
        return any(s == states.FAILURE for s in self._states())

    def waiting(self) -> bool:
        return not self.ready()

    def completed_count(self) -> int:
        return sum(s == states.SUCCESS for s in self._states())

    def revoke(self, terminate: bool = False, signal: str = "SIGTERM", **kw: Any) -> None:
        self.app.control.revoke([r.id for r in self.results], terminate=terminate, signal=signal)

    def forget(self) -> None:
        for r in self.results:
            r.forget()

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        callback: Any = None,
        no_ack: bool = True,
        on_message: Any = None,
        disable_sync_subtasks: bool = True,
        **kw: Any,
    ) -> list[Any]:
        if disable_sync_subtasks:
            _assert_may_block()
        return self.app.portal.run(
            self.aget(timeout=timeout, propagate=propagate, disable_sync_subtasks=False)
        )

    join = get

    async def aget(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        disable_sync_subtasks: bool = True,
        **kw: Any,
    ) -> list[Any]:
        if disable_sync_subtasks:
            _assert_may_block()
        deadline = None if timeout is None else time.monotonic() + timeout
        flat = [r for r in self.results if isinstance(r, AsyncResult)]
        pending = [r.id for r in flat if r._meta is None or not r._meta.ready]
        by_id: dict[str, list[AsyncResult]] = {}
        for r in flat:
            by_id.setdefault(r.id, []).append(r)
        if pending:
            try:
                async for meta in self.app.await_results(pending, timeout=timeout):
                    for r in by_id.get(meta.task_id, ()):
                        r._meta = meta
            except builtins.TimeoutError:
                raise CeleriacTimeout("The operation timed out.") from None
        values: list[Any] = []
        for r in self.results:
            if isinstance(r, ResultSet):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                values.append(
                    await r.aget(timeout=left, propagate=propagate, disable_sync_subtasks=False)
                )
            else:
                assert r._meta is not None
                values.append(r._value(r._meta, propagate))
        return values

    ajoin = aget

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: [{', '.join(r.id for r in self.results)}]>"


class GroupResult(ResultSet):
    """The results of a group, with the group's id; can be saved and restored."""

    def __init__(
        self,
        id: str | None = None,
        results: Sequence[AsyncResult] | None = None,
        parent: Any = None,
        app: Celery | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(results or [], app=app)
        self.id = id
        self.parent = parent

    @property
    def children(self) -> list[AsyncResult]:
        return self.results

    def as_tuple(self) -> Any:
        parent = self.parent.as_tuple() if self.parent is not None else None
        return [[self.id, parent], [r.as_tuple() for r in self.results]]

    def save(self, backend: Any = None) -> GroupResult:
        assert self.id is not None
        self.app.portal.run(self.app.asave_group(self.id, [r.id for r in self.results]))
        return self

    def delete(self, backend: Any = None) -> None:
        assert self.id is not None
        self.app.portal.run(self.app.aforget_group(self.id))

    @classmethod
    def restore(cls, id: str, backend: Any = None, app: Celery | None = None) -> GroupResult | None:
        from .app import current_app

        app = app or current_app()
        ids = app.portal.run(app.aload_group(id))
        if ids is None:
            return None
        return cls(id, [AsyncResult(t, app=app) for t in ids], app=app)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return other.id == self.id and other.results == self.results
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"


def result_from_tuple(r: Any, app: Celery | None = None) -> Any:
    """Rebuild a result from its ``as_tuple()`` form."""
    (rid, parent), nodes = r
    parent_res = result_from_tuple(parent, app) if parent else None
    if nodes is not None:
        return GroupResult(
            rid, [result_from_tuple(n, app) for n in nodes], parent=parent_res, app=app
        )
    return AsyncResult(rid, app=app, parent=parent_res)
