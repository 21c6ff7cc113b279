"""Result handles on the memory backend, and rebuilding stored exceptions safely."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import Celery, states
from celeriac.backends import memory as memory_backend
from celeriac.backends.base import ResultMeta
from celeriac.exceptions import TaskRevokedError
from celeriac.exceptions import TimeoutError as CeleriacTimeout
from celeriac.result import (
    AsyncResult,
    EagerResult,
    GroupResult,
    ResultSet,
    exception_to_dict,
    exception_to_python,
    result_from_tuple,
)
from celeriac.task import Context, pop, push

DONE = "2024-01-02T03:04:05+00:00"


@pytest.fixture
def app() -> Iterator[Celery]:
    url = f"memory://results-{uuid.uuid4().hex}"
    app = Celery("vege", broker=url, backend=url, set_as_current=False)

    @app.task(name="vege.add")
    def add(x: int, y: int) -> int:
        return x + y

    yield app
    app.close()
    memory_backend.reset(url)


def store(app: Celery, task_id: str, status: str, result: Any = None, **kw: Any) -> None:
    app.portal.run(app.astore_result(ResultMeta(task_id, status, result, **kw)))


def store_failure(app: Celery, task_id: str, exc: BaseException) -> None:
    store(app, task_id, states.FAILURE, exception_to_dict(exc), traceback="Traceback: boom",
          date_done=DONE)


# -- exception_to_python -------------------------------------------------------------


def test_rebuilds_builtin_exceptions() -> None:
    exc = exception_to_python({"exc_type": "ValueError", "exc_message": ["bad", 1],
                               "exc_module": "builtins"})
    assert type(exc) is ValueError and exc.args == ("bad", 1)
    exc = exception_to_python({"exc_type": "KeyError", "exc_message": "k"})  # no module
    assert type(exc) is KeyError and exc.args == ("k",)


def test_rebuilds_importable_exceptions() -> None:
    exc = exception_to_python({"exc_type": "JSONDecodeError", "exc_message": ["msg", "doc", 0],
                               "exc_module": "json.decoder"})
    assert type(exc) is json.JSONDecodeError
    exc = exception_to_python({"exc_type": "TaskRevokedError", "exc_message": ["gone"],
                               "exc_module": "celeriac.exceptions"})
    assert type(exc) is TaskRevokedError and exc.args == ("gone",)


def test_round_trips_through_exception_to_dict() -> None:
    info = exception_to_dict(ZeroDivisionError("division by zero"))
    assert info == {"exc_type": "ZeroDivisionError", "exc_message": ["division by zero"],
                    "exc_module": "builtins"}
    exc = exception_to_python(json.loads(json.dumps(info)))
    assert type(exc) is ZeroDivisionError and str(exc) == "division by zero"


def test_unserializable_exception_args_are_stringified() -> None:
    info = exception_to_dict(ValueError(object()))
    assert isinstance(info["exc_message"][0], str)


def test_unknown_exception_gets_a_stand_in_class() -> None:
    info = {"exc_type": "PaymentDeclined", "exc_message": ["card"], "exc_module": "shop.errors"}
    exc = exception_to_python(info)
    assert isinstance(exc, Exception)
    assert type(exc).__name__ == "PaymentDeclined"
    assert type(exc).__module__ == "shop.errors"
    assert exc.args == ("card",)
    assert type(exception_to_python(info)) is type(exc)  # one stand-in per name


def test_never_calls_a_callable_that_is_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    exc = exception_to_python({"exc_type": "system", "exc_message": ["echo pwned"],
                               "exc_module": "os"})
    assert calls == []
    assert isinstance(exc, Exception) and type(exc).__name__ == "system"
    assert exc.args == ("echo pwned",)
    dotted = exception_to_python({"exc_type": "path.join", "exc_message": ["a", "b"],
                                  "exc_module": "os"})
    assert isinstance(dotted, Exception) and dotted.args == ("a", "b")
    not_a_class = exception_to_python({"exc_type": "__name__", "exc_message": [],
                                       "exc_module": "os"})
    assert isinstance(not_a_class, Exception)


def test_exception_whose_init_needs_other_args_still_rebuilds() -> None:
    exc = exception_to_python({"exc_type": "UnicodeDecodeError", "exc_message": ["only one"],
                               "exc_module": "builtins"})
    assert isinstance(exc, UnicodeDecodeError) and exc.args == ("only one",)


def test_non_dict_result_becomes_an_exception() -> None:
    exc = exception_to_python("plain text")
    assert isinstance(exc, Exception) and exc.args == ("plain text",)
    original = KeyError("x")
    assert exception_to_python(original) is original


# -- AsyncResult -------------------------------------------------------------------------


def test_success_result(app: Celery) -> None:
    store(app, "t-ok", states.SUCCESS, 42, date_done=DONE)
    res = AsyncResult("t-ok", app=app)
    assert res.get(timeout=5) == 42
    assert res.state == res.status == states.SUCCESS
    assert res.ready() and res.successful() and not res.failed()
    assert res.result == res.info == 42
    assert res.traceback is None
    assert res.date_done == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert res.id == res.task_id == str(res) == "t-ok"
    assert repr(res) == "<AsyncResult: t-ok>"


def test_failure_result(app: Celery) -> None:
    store_failure(app, "t-bad", ValueError("bad input"))
    res = app.AsyncResult("t-bad")
    assert res.state == states.FAILURE
    assert res.failed() and res.ready() and not res.successful()
    assert isinstance(res.result, ValueError) and str(res.result) == "bad input"
    assert res.traceback == "Traceback: boom"
    with pytest.raises(ValueError, match="bad input"):
        res.get(timeout=5)
    returned = res.get(timeout=5, propagate=False)
    assert isinstance(returned, ValueError) and returned.args == ("bad input",)


def test_revoked_result_raises_task_revoked(app: Celery) -> None:
    store(app, "t-rev", states.REVOKED, exception_to_dict(TaskRevokedError("revoked")))
    res = AsyncResult("t-rev", app=app)
    assert res.ready() and res.state == states.REVOKED
    with pytest.raises(TaskRevokedError):
        res.get(timeout=5)


def test_pending_result(app: Celery) -> None:
    res = AsyncResult("never-sent", app=app)
    assert res.state == states.PENDING
    assert not res.ready() and res.result is None and res.date_done is None
    with pytest.raises(CeleriacTimeout):
        res.get(timeout=0.1)


def test_custom_state_is_not_ready(app: Celery) -> None:
    store(app, "t-prog", "PROGRESS", {"done": 3})
    res = AsyncResult("t-prog", app=app)
    assert res.state == "PROGRESS" and res.info == {"done": 3} and not res.ready()


def test_forget(app: Celery) -> None:
    store(app, "t-forget", states.SUCCESS, 1)
    res = AsyncResult("t-forget", app=app)
    assert res.get(timeout=5) == 1
    res.forget()
    assert res.state == states.PENDING
    assert AsyncResult("t-forget", app=app).state == states.PENDING


def test_get_after_a_late_store(app: Celery) -> None:
    """A waiter sees a result stored after it started waiting (another thread stores it)."""
    import threading

    res = AsyncResult("t-late", app=app)
    storer = threading.Timer(0.05, store, (app, "t-late", states.SUCCESS, "late"))
    storer.start()
    try:
        assert res.get(timeout=10) == "late"
    finally:
        storer.join()


def test_async_result_needs_an_id(app: Celery) -> None:
    with pytest.raises(ValueError, match="task id"):
        AsyncResult("", app=app)


def test_equality_and_hash(app: Celery) -> None:
    a, b = AsyncResult("same", app=app), AsyncResult("same", app=app)
    assert a == b and a == "same" and hash(a) == hash(b)
    assert a != AsyncResult("other", app=app)


def test_get_inside_a_task_raises(app: Celery) -> None:
    store(app, "t-inside", states.SUCCESS, 7)
    res = AsyncResult("t-inside", app=app)
    group_res = GroupResult("g-inside", [res], app=app)
    token = push(app.tasks["vege.add"], Context(id="running"))
    try:
        with pytest.raises(RuntimeError, match=r"Never call result\.get"):
            res.get(timeout=1)
        with pytest.raises(RuntimeError, match=r"Never call result\.get"):
            group_res.get(timeout=1)
        assert res.get(timeout=1, disable_sync_subtasks=False) == 7
    finally:
        pop(token)
    assert res.get(timeout=1) == 7


def test_aget_from_async_code(app: Celery) -> None:
    store(app, "t-async", states.SUCCESS, "a")

    async def main() -> Any:
        return await AsyncResult("t-async", app=app).aget(timeout=5)

    import asyncio

    assert asyncio.run(main()) == "a"


def test_as_tuple_round_trip(app: Celery) -> None:
    parent = AsyncResult("p", app=app)
    child = AsyncResult("c", app=app, parent=parent)
    back = result_from_tuple(child.as_tuple(), app=app)
    assert back.id == "c" and back.parent.id == "p"
    g = GroupResult("g", [AsyncResult("a", app=app), AsyncResult("b", app=app)], app=app)
    back_g = result_from_tuple(g.as_tuple(), app=app)
    assert isinstance(back_g, GroupResult) and back_g == g


# -- groups ---------------------------------------------------------------------------------


def test_group_result_state_and_values_in_order(app: Celery) -> None:
    ids = ["g-a", "g-b", "g-c"]
    g = GroupResult("g1", [AsyncResult(i, app=app) for i in ids], app=app)
    store(app, "g-c", states.SUCCESS, "c")
    store(app, "g-a", states.SUCCESS, "a")
    assert not g.ready() and g.waiting() and g.completed_count() == 2
    store_failure(app, "g-b", KeyError("b"))
    assert g.ready() and g.failed() and not g.successful()
    values = g.get(timeout=5, propagate=False)
    assert values[0] == "a" and values[2] == "c" and isinstance(values[1], KeyError)
    with pytest.raises(KeyError):
        g.join(timeout=5)
    assert len(g) == 3 and g[0].id == "g-a" and [r.id for r in g] == ids
    assert g.children == g.results


def test_group_result_save_restore_delete(app: Celery) -> None:
    g = GroupResult("g-saved", [AsyncResult("s1", app=app), AsyncResult("s2", app=app)], app=app)
    assert g.save() is g
    back = GroupResult.restore("g-saved", app=app)
    assert back == g
    assert back is not None and [r.id for r in back.results] == ["s1", "s2"]
    assert GroupResult.restore("no-such-group", app=app) is None
    g.delete()
    assert GroupResult.restore("g-saved", app=app) is None


def test_group_result_timeout(app: Celery) -> None:
    g = GroupResult("g-t", [AsyncResult("never", app=app)], app=app)
    with pytest.raises(CeleriacTimeout):
        g.get(timeout=0.1)


def test_result_set(app: Celery) -> None:
    store(app, "rs1", states.SUCCESS, 1)
    rs = ResultSet([AsyncResult("rs1", app=app)], app=app)
    rs.add(AsyncResult("rs1", app=app))  # already there
    rs.add(AsyncResult("rs2", app=app))
    assert len(rs) == 2
    store(app, "rs2", states.SUCCESS, 2)
    assert rs.get(timeout=5) == [1, 2]


# -- EagerResult ----------------------------------------------------------------------------


def test_eager_result_success_and_failure(app: Celery) -> None:
    ok = EagerResult("e1", 5, states.SUCCESS, app=app)
    assert ok.get() == 5 and ok.successful() and ok.ready() and ok.result == 5
    err = ValueError("x")
    bad = EagerResult("e2", err, states.FAILURE, "tb", app=app)
    assert bad.failed() and bad.traceback == "tb" and bad.result is err
    with pytest.raises(ValueError):
        bad.get()
    assert bad.get(propagate=False) is err
    bad.forget()  # a no-op, no backend involved
    assert repr(ok) == "<EagerResult: e1>"
