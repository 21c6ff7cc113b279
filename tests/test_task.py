"""Tasks: argument checks at send time, eager runs with retries, request context."""

from __future__ import annotations

import asyncio
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import Celery, states
from celeriac.backends import memory as memory_backend
from celeriac.exceptions import Ignore, MaxRetriesExceededError, Reject, Retry
from celeriac.result import EagerResult
from celeriac.task import Context, Task, pop, push
from celeriac.transport import memory as memory_transport


@pytest.fixture
def app() -> Iterator[Celery]:
    url = f"memory://task-{uuid.uuid4().hex}"
    app = Celery("vege", broker=url, backend=url, set_as_current=False)
    yield app
    app.close()
    memory_transport.reset(url)
    memory_backend.reset(url)


# -- argument checks -----------------------------------------------------------------


def test_wrong_arguments_fail_at_delay_time(app: Celery) -> None:
    @app.task(name="vege.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match=r"vege\.add\(x.*missing a required argument: 'y'"):
        add.delay(1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        add.apply_async((1, 2), {"z": 3})
    with pytest.raises(TypeError):
        add.s(1, 2, 3).delay()
    with pytest.raises(TypeError):
        add.s(1).apply_async()


def test_typing_false_sends_anyway(app: Celery) -> None:
    @app.task(name="vege.loose", typing=False)
    def loose(x: int) -> int:
        return x

    with app.collecting() as sent:
        res = loose.delay(1, 2, 3)
    assert len(sent) == 1 and res.id
    assert sent[0][0].envelope.headers["argsrepr"] == "(1, 2, 3)"


def test_bound_task_arguments_skip_self(app: Celery) -> None:
    @app.task(name="vege.bound", bind=True)
    def bound(self: Task[..., Any], x: int) -> int:
        return x

    with app.collecting() as sent:
        bound.delay(1)
    assert len(sent) == 1
    with pytest.raises(TypeError):
        bound.delay()


def test_delay_publishes_to_the_broker(app: Celery) -> None:
    @app.task(name="vege.add")
    def add(x: int, y: int) -> int:
        return x + y

    res = add.delay(2, 3)
    assert res.task_name == "vege.add"
    assert res.state == states.PENDING

    async def queued() -> int:
        conns = await app.connection_for_current_loop()
        return await conns.transport.size("celery")

    assert app.portal.run(queued()) == 1


def test_adelay_from_async_code(app: Celery) -> None:
    @app.task(name="vege.add")
    def add(x: int, y: int) -> int:
        return x + y

    async def main() -> str:
        res = await add.adelay(1, 2)
        with pytest.raises(TypeError):
            await add.adelay(1)
        await app.aclose()
        return str(res.id)

    assert asyncio.run(main())


# -- calling and the request ---------------------------------------------------------------


def test_calling_a_task_runs_the_function(app: Celery) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        """Adds."""
        return x + y

    assert add(2, 3) == 5
    assert add.__doc__ == "Adds."
    assert vars(add)["__name__"] == "add"
    assert add.__wrapped__ is not None and add.__wrapped__(1, 1) == 2
    assert add.request.id is None  # not running


def test_bind_gives_self_request(app: Celery) -> None:
    @app.task(bind=True, name="vege.who")
    def who(self: Task[..., Any], x: int) -> tuple[Any, ...]:
        r = self.request
        return (r.id, r.args, r.kwargs, r.retries, r.is_eager, r.task)

    res = who.apply((1,), task_id="the-id")
    assert res.get() == ("the-id", (1,), {}, 0, True, "vege.who")
    assert who.request.id is None


def test_request_is_only_seen_by_the_running_task(app: Celery) -> None:
    @app.task(name="vege.a")
    def a() -> None:
        return None

    @app.task(name="vege.b")
    def b() -> None:
        return None

    token = push(a, Context(id="running-a", retries=2))
    try:
        assert a.request.id == "running-a" and a.request.retries == 2
        assert b.request.id is None
    finally:
        pop(token)
    assert a.request.id is None


def test_async_def_task_runs_eagerly(app: Celery) -> None:
    @app.task(name="vege.aadd")
    async def aadd(x: int, y: int) -> int:
        await asyncio.sleep(0)
        return x + y

    assert aadd.is_async
    assert aadd.apply((2, 3)).get() == 5


def test_class_based_task_run(app: Celery) -> None:
    class Double(Task[..., Any]):
        name = "vege.double"

        def run(self, x: int) -> int:
            return x * 2

    task = app.register_task(Double)
    assert task(4) == 8
    assert task.apply((5,)).get() == 10
    with pytest.raises(TypeError):
        task.delay()


def test_task_without_body_says_so(app: Celery) -> None:
    task = app.register_task(Task())
    with pytest.raises(NotImplementedError, match="override run"):
        task.run()


# -- eager apply and retries ------------------------------------------------------------------


def test_apply_retries_inline_until_success(app: Celery) -> None:
    seen: list[int] = []

    @app.task(bind=True, max_retries=3, name="vege.flaky")
    def flaky(self: Task[..., Any], fail_times: int) -> int:
        seen.append(self.request.retries)
        if self.request.retries < fail_times:
            raise self.retry(countdown=60)  # eager retries do not wait
        return self.request.retries

    res = flaky.apply((2,))
    assert isinstance(res, EagerResult)
    assert res.get() == 2 and res.state == states.SUCCESS
    assert seen == [0, 1, 2]


def test_retry_with_new_args(app: Celery) -> None:
    @app.task(bind=True, name="vege.countdown")
    def count(self: Task[..., Any], n: int) -> int:
        if n > 0:
            raise self.retry(args=(n - 1,), countdown=0)
        return self.request.retries

    assert count.apply((3,)).get() == 3


def test_max_retries_exceeded_raises_the_original_exception(app: Celery) -> None:
    @app.task(bind=True, max_retries=2, name="vege.always")
    def always(self: Task[..., Any]) -> None:
        try:
            raise ConnectionError("down")
        except ConnectionError as exc:
            raise self.retry(exc=exc, countdown=0) from None

    res = always.apply()
    assert res.state == states.FAILURE
    assert isinstance(res.result, ConnectionError)
    with pytest.raises(ConnectionError, match="down"):
        res.get()
    with pytest.raises(ConnectionError):
        always.apply(throw=True)


def test_max_retries_exceeded_without_exc(app: Celery) -> None:
    @app.task(bind=True, max_retries=1, name="vege.noexc")
    def noexc(self: Task[..., Any]) -> None:
        raise self.retry(countdown=0)

    res = noexc.apply()
    assert res.failed()
    assert isinstance(res.result, MaxRetriesExceededError)
    assert "vege.noexc" in str(res.result)


def test_retry_max_retries_override(app: Celery) -> None:
    calls: list[int] = []

    @app.task(bind=True, max_retries=10, name="vege.override")
    def override(self: Task[..., Any]) -> None:
        calls.append(self.request.retries)
        raise self.retry(countdown=0, max_retries=1)

    assert override.apply().failed()
    assert calls == [0, 1]


def test_autoretry_for(app: Celery) -> None:
    calls: list[int] = []

    @app.task(bind=True, autoretry_for=(KeyError,), max_retries=2, name="vege.auto")
    def auto(self: Task[..., Any]) -> str:
        calls.append(self.request.retries)
        if len(calls) < 3:
            raise KeyError("again")
        return "done"

    assert auto.apply().get() == "done"
    assert calls == [0, 1, 2]
    assert isinstance(auto.autoretry_for, tuple)


def test_retry_outside_a_task_is_an_error(app: Celery) -> None:
    @app.task(name="vege.plain")
    def plain() -> None:
        return None

    with pytest.raises(RuntimeError, match="outside of a running task"):
        plain.retry()


def test_retry_builds_the_next_call(app: Celery) -> None:
    @app.task(name="vege.r", max_retries=5)
    def r(x: int) -> None:
        return None

    token = push(r, Context(id="rid", args=(1,), kwargs={}, retries=1, root_id="root",
                            delivery_info={"routing_key": "q9", "exchange": ""}))
    try:
        err = r.retry(countdown=7, throw=False)
    finally:
        pop(token)
    assert isinstance(err, Retry)
    assert err.when == 7 and err.sig is not None
    opts = err.sig.options
    assert (opts["task_id"], opts["retries"], opts["root_id"], opts["countdown"]) == (
        "rid", 2, "root", 7,
    )
    assert opts["queue"] == "q9"  # back to the queue it came from
    assert err.sig.args == (1,)


def test_ignore_and_reject_in_eager_runs(app: Celery) -> None:
    @app.task(name="vege.ig")
    def ig() -> None:
        raise Ignore()

    @app.task(name="vege.rj")
    def rj() -> None:
        raise Reject("bad", requeue=False)

    assert ig.apply().state == states.IGNORED
    assert rj.apply().state == states.REJECTED


def test_eager_links_run_after_success(app: Celery) -> None:
    got: list[Any] = []

    @app.task(name="vege.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="vege.record")
    def record(value: Any) -> None:
        got.append(value)

    @app.task(name="vege.fail")
    def fail() -> None:
        raise ValueError("no")

    add.apply((1, 2), link=[record.s()])
    fail.apply(link_error=[record.s()], task_id="failed-id")
    assert got == [3, "failed-id"]
    # one signature instead of a list, as Celery allows
    add.apply((2, 2), link=record.s())
    fail.apply(link_error=record.si("immutable"))
    assert got == [3, "failed-id", 4, "immutable"]
    app.conf.task_always_eager = True
    add.s(3, 3).set(link=record.s()).delay()
    assert got[-1] == 6


# -- task_always_eager ---------------------------------------------------------------------


def test_always_eager(app: Celery) -> None:
    app.conf.task_always_eager = True

    @app.task(name="vege.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="vege.boom")
    def boom() -> None:
        raise KeyError("k")

    res = add.delay(1, 2)
    assert isinstance(res, EagerResult) and res.get() == 3 and res.successful()
    assert add.s(2, 2).delay().get() == 4
    failed = boom.delay()
    assert failed.failed() and "KeyError" in (failed.traceback or "")
    with pytest.raises(KeyError):
        failed.get()
    assert isinstance(failed.get(propagate=False), KeyError)
    with pytest.raises(TypeError):
        add.delay(1)  # still checked


def test_eager_propagates(app: Celery) -> None:
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True

    @app.task(name="vege.boom")
    def boom() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        boom.delay()
    assert boom.apply(throw=False).failed()


# -- signatures from tasks --------------------------------------------------------------------


def test_signature_helpers(app: Celery) -> None:
    @app.task(name="vege.hello")
    def hello(name: str) -> str:
        return f"hello {name}"

    assert repr(hello.signature(("haha",), countdown=5)) == "vege.hello('haha')"
    assert repr(hello.s("haha")) == "vege.hello('haha')"
    assert repr(hello.si("haha")) == "vege.hello('haha')!"
    assert hello.subtask(("x",)).args == ("x",)
    sig = hello.s("haha")
    assert sig.apply().get() == "hello haha"
    assert repr(hello) == "<@task: vege.hello of vege>"
    assert hello.AsyncResult("some-id").task_name == "vege.hello"


# -- exception classes ----------------------------------------------------------------------


def test_retry_exception() -> None:
    err = Retry(exc=ValueError("x"), when=5)
    assert str(err) == "Retry in 5s: ValueError('x')"
    assert str(Retry("custom message")) == "custom message"
    assert "at 2030" in str(Retry(when="2030-01-01"))
    back = pickle.loads(pickle.dumps(Retry("m", ValueError("q"), 3)))
    assert (back.message, back.when) == ("m", 3)
    assert isinstance(back.exc, ValueError)


def test_reject_and_ignore_exceptions() -> None:
    rej = Reject("poison", requeue=True)
    assert rej.reason == "poison" and rej.requeue is True
    assert repr(rej) == "reject requeue=True: poison"
    assert Reject().requeue is False
    assert isinstance(Ignore(), Exception)


def test_max_retries_exceeded_error_keeps_the_call() -> None:
    err = MaxRetriesExceededError("no more", task_args=(1,), task_kwargs={"a": 2})
    assert err.task_args == (1,) and err.task_kwargs == {"a": 2} and str(err) == "no more"
