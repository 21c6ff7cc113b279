"""The app: settings, task registration and naming, and the send path (memory broker)."""

from __future__ import annotations

import sys
import textwrap
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, Task, current_app, shared_task, task
from celeriac import app as app_module
from celeriac.app import set_current_app
from celeriac.backends import memory as memory_backend
from celeriac.exceptions import ImproperlyConfigured
from celeriac.result import AsyncResult
from celeriac.transport import memory as memory_transport


@pytest.fixture
def url() -> Iterator[str]:
    url = f"memory://app-{uuid.uuid4().hex}"
    yield url
    memory_transport.reset(url)
    memory_backend.reset(url)


@pytest.fixture
def app(url: str) -> Iterator[Celery]:
    app = Celery("vege", broker=url, backend=url, set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def restore_current_app() -> Iterator[None]:
    """Tests that make an app current put the previous one back."""
    previous = current_app()
    yield
    set_current_app(previous)


@pytest.fixture
def isolated_shared_tasks(
    monkeypatch: pytest.MonkeyPatch, restore_current_app: None
) -> Iterator[None]:
    """Shared tasks declared by a test must not be registered on later tests' apps."""
    monkeypatch.setattr(app_module, "_shared", [])
    yield


# -- construction and settings --------------------------------------------------------------


def test_constructor_arguments_become_settings(url: str) -> None:
    app = Celery("vege", broker=url, backend="memory://other", include=["vege.tasks", "x.y"],
                 set_as_current=False, task_default_queue="q1", worker_concurrency=3)
    assert app.main == "vege"
    assert app.conf.broker_url == url
    assert app.conf.result_backend == "memory://other"
    assert tuple(app.conf.include) == ("vege.tasks", "x.y")
    assert app.conf.task_default_queue == "q1"
    assert app.conf.worker_concurrency == 3
    assert repr(app).startswith("<Celery vege at 0x")


def test_unknown_setting_in_constructor_suggests_the_right_name() -> None:
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'task_default_queue'"):
        Celery("vege", task_defualt_queue="q", set_as_current=False)


def test_unknown_setting_on_conf_suggests(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'broker_url'"):
        app.conf.update(broker_urll="memory://")
    with pytest.raises(ImproperlyConfigured, match="result_backend"):
        app.conf.result_backnd = "memory://"


def test_config_from_object_dict(app: Celery) -> None:
    app.config_from_object({"task_default_queue": "from-dict", "task_acks_late": True})
    assert app.conf.task_default_queue == "from-dict"
    assert app.conf.task_acks_late is True


def test_config_from_object_class(app: Celery) -> None:
    class Config:
        task_default_queue = "from-class"
        task_serializer = "json"

    app.config_from_object(Config)
    assert app.conf.task_default_queue == "from-class"


def test_config_from_object_module_and_dotted_name(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = types.ModuleType("vegeconfig")
    module.task_default_queue = "from-module"  # type: ignore[attr-defined]
    module.worker_prefetch_multiplier = 2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vegeconfig", module)
    app.config_from_object("vegeconfig")
    assert app.conf.task_default_queue == "from-module"
    assert app.conf.worker_prefetch_multiplier == 2
    app.config_from_object({"task_default_queue": "dict-again"})
    app.config_from_object(module)
    assert app.conf.task_default_queue == "from-module"


def test_config_from_object_with_namespace(app: Celery) -> None:
    class DjangoSettings:
        DEBUG = True
        CELERY_TASK_DEFAULT_QUEUE = "django-q"
        CELERY_TASK_ALWAYS_EAGER = True

    app.config_from_object(DjangoSettings, namespace="CELERY")
    assert app.conf.task_default_queue == "django-q"
    assert app.conf.task_always_eager is True


def test_config_from_object_unknown_setting_suggests(app: Celery) -> None:
    class Bad:
        task_defualt_queue = "q"

    with pytest.raises(ImproperlyConfigured, match="Did you mean 'task_default_queue'"):
        app.config_from_object(Bad)


def test_config_from_object_missing_module(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match="no_such_config_module"):
        app.config_from_object("no_such_config_module")


def test_broker_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERIAC_BROKER_URL", "memory://from-env")
    app = Celery("env", set_as_current=False)
    assert app.broker_url_resolved() == "memory://from-env"
    explicit = Celery("env", broker="memory://explicit", set_as_current=False)
    assert explicit.broker_url_resolved() == "memory://explicit"


def test_result_backend_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERIAC_RESULT_BACKEND", "memory://results-env")
    app = Celery("env", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    assert app.backend_url_resolved() == "memory://results-env"


@pytest.mark.parametrize(
    ("broker", "backend", "expected"),
    [
        ("sqlite:///tmp/x.db", None, "sqlite:///tmp/x.db"),
        ("memory://", None, "memory://"),
        ("memory://named", None, "memory://named"),
        ("redis://127.0.0.1:6379/0", None, "disabled://"),
        ("amqp://guest:guest@127.0.0.1:5672//", None, "disabled://"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/1"),
    ],
)
def test_backend_url_defaults(
    monkeypatch: pytest.MonkeyPatch, broker: str, backend: str | None, expected: str
) -> None:
    monkeypatch.delenv("CELERIAC_RESULT_BACKEND", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    app = Celery("b", broker=broker, backend=backend, set_as_current=False)
    assert app.backend_url_resolved() == expected


def test_default_broker_is_the_embedded_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CELERIAC_BROKER_URL", "CELERY_BROKER_URL", "CELERIAC_RESULT_BACKEND",
                "CELERY_RESULT_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    app = Celery("d", set_as_current=False)
    assert app.broker_url_resolved().startswith("sqlite://")
    assert app.backend_url_resolved() == app.broker_url_resolved()


# -- registering tasks -----------------------------------------------------------------------


def test_task_names_default_to_module_and_function(app: Celery) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == f"{__name__}.add"
    assert app.tasks[add.name] is add
    assert add.app is app


def test_main_module_tasks_are_named_after_the_app(app: Celery) -> None:
    def hello(name: str) -> str:
        return f"hello {name}"

    hello.__module__ = "__main__"
    registered = app.task(hello)
    assert registered.name == "vege.hello"
    assert repr(registered) == "<@task: vege.hello of vege>"


def test_task_decorator_with_options(app: Celery) -> None:
    @app.task(name="custom.name", bind=True, max_retries=7, queue="q1", ignore_result=True,
              rate_limit="10/s", autoretry_for=[KeyError], acks_late=True)
    def work(self: Task[..., Any]) -> None:
        return None

    assert work.name == "custom.name"
    assert (work.bind, work.max_retries, work.queue, work.ignore_result) == (True, 7, "q1", True)
    assert work.rate_limit == "10/s" and work.acks_late is True
    assert work.autoretry_for == (KeyError,)
    assert app.tasks["custom.name"] is work


def test_unknown_task_option_is_a_type_error_with_a_suggestion(app: Celery) -> None:
    with pytest.raises(TypeError, match="Did you mean 'max_retries'"):

        @app.task(max_retires=3)
        def oops() -> None:
            return None


def test_task_decorator_rejects_positional_options(app: Celery) -> None:
    with pytest.raises(TypeError, match="keyword"):
        app.task("name")  # type: ignore[call-overload]


def test_registering_the_same_function_twice_keeps_one_task(app: Celery) -> None:
    def f() -> None:
        return None

    assert app.task(f) is app.task(f)


def test_custom_task_base(app: Celery) -> None:
    class Base(Task[..., Any]):
        custom_flag = "yes"
        max_retries = 9

    @app.task(base=Base, custom_flag="overridden")
    def t() -> None:
        return None

    assert isinstance(t, Base)
    assert t.custom_flag == "overridden" and t.max_retries == 9


def test_app_task_cls(url: str) -> None:
    class Base(Task[..., Any]):
        serializer = "json"

    app = Celery("vege", broker=url, task_cls=Base, set_as_current=False)

    @app.task
    def t() -> None:
        return None

    assert isinstance(t, Base)


def test_register_class_based_task(app: Celery) -> None:
    class Multiply(Task[..., Any]):
        name = "math.multiply"

        def run(self, x: int, y: int) -> int:
            return x * y

    registered = app.register_task(Multiply)
    assert app.tasks["math.multiply"] is registered
    assert registered.app is app
    assert registered(3, 4) == 12

    class Unnamed(Task[..., Any]):
        def run(self) -> int:
            return 1

    assert app.register_task(Unnamed()).name == f"{__name__}.Unnamed"


def test_task_annotations(url: str) -> None:
    app = Celery("vege", broker=url, set_as_current=False, task_annotations={
        "vege.slow": {"rate_limit": "1/s"},
    })

    @app.task(name="vege.slow")
    def slow() -> None:
        return None

    @app.task(name="vege.fast")
    def fast() -> None:
        return None

    assert slow.rate_limit == "1/s"
    assert fast.rate_limit is None


def test_task_annotations_wildcard_and_callables(url: str) -> None:
    def annotate(t: Task[..., Any]) -> dict[str, Any] | None:
        return {"priority": 7} if t.name == "vege.b" else None

    app = Celery("vege", broker=url, set_as_current=False,
                 task_annotations=[{"*": {"acks_late": True}}, annotate])

    @app.task(name="vege.a")
    def a() -> None:
        return None

    @app.task(name="vege.b")
    def b() -> None:
        return None

    assert a.acks_late is True and a.priority is None
    assert b.acks_late is True and b.priority == 7


def test_builtin_tasks_are_registered(app: Celery) -> None:
    for name in ("celery.map", "celery.starmap", "celery.chunks", "celery.ping",
                 "celery.backend_cleanup"):
        assert name in app.tasks
    assert app.tasks["celery.ping"]() == "pong"


def test_include_modules_are_imported(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "vegepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(textwrap.dedent("""
        from celeriac import current_app

        @current_app().task
        def hello(name):
            return f"hello {name}"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vegepkg", raising=False)
    monkeypatch.delitem(sys.modules, "vegepkg.tasks", raising=False)
    previous = current_app()
    app = Celery("vege", broker=url, include=["vegepkg.tasks"])
    try:
        app.loader_import_default_modules()
        assert "vegepkg.tasks.hello" in app.tasks
        other = Celery("other", broker=url, set_as_current=False)
        other.autodiscover_tasks(["vegepkg", "not_a_package_at_all"])
    finally:
        set_current_app(previous)
        sys.modules.pop("vegepkg.tasks", None)
        sys.modules.pop("vegepkg", None)


# -- shared_task and the tutorial's `from celery import task` ------------------------------


def test_shared_task_registers_on_every_app(url: str, isolated_shared_tasks: None) -> None:
    first = Celery("first", broker=url)

    @shared_task
    def shared_add(x: int, y: int) -> int:
        return x + y

    name = f"{__name__}.shared_add"
    assert name in first.tasks
    second = Celery("second", broker=url)  # created later: gets it too
    assert name in second.tasks
    assert second.tasks[name].app is second
    assert shared_add.name == name
    assert shared_add(1, 2) == 3
    assert shared_add.app is current_app() is second
    assert repr(shared_add.s(1, 2)) == f"{name}(1, 2)"


def test_shared_task_with_options(url: str, isolated_shared_tasks: None) -> None:
    app = Celery("opts", broker=url)

    @shared_task(name="shared.custom", ignore_result=True, bind=True)  # type: ignore[untyped-decorator]
    def custom(self: Task[..., Any]) -> str:
        return self.name

    assert app.tasks["shared.custom"].ignore_result is True
    assert custom() == "shared.custom"


def test_tutorial_task_decorator(url: str, isolated_shared_tasks: None) -> None:
    app = Celery("vege", broker=url)

    @task()  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    assert f"{__name__}.add" in app.tasks
    assert add(1, 2) == 3


def test_shared_task_in_main_module_resolves_on_the_current_app(
    url: str, isolated_shared_tasks: None
) -> None:
    def job() -> str:
        return "ran"

    job.__module__ = "__main__"
    Celery("one", broker=url)
    proxy = shared_task(job)
    Celery("two", broker=url)
    assert proxy() == "ran"
    assert proxy.name == "two.job"


# -- sending ---------------------------------------------------------------------------------


def test_send_task_by_name_builds_the_message(app: Celery) -> None:
    with app.collecting() as sent:
        res = app.send_task("remote.only.task", (1, 2), {"k": "v"}, countdown=5, priority=3)
    assert isinstance(res, AsyncResult)
    assert res.task_name == "remote.only.task"
    (out, spec), = sent
    assert out.envelope.headers["task"] == "remote.only.task"
    assert out.envelope.headers["id"] == res.id
    assert out.envelope.priority == 3
    assert out.not_before is not None
    assert spec is not None and spec.name == "celery"


def test_send_task_publishes_on_the_memory_broker(app: Celery) -> None:
    app.send_task("remote.task", (1,))
    app.send_task("remote.task", (2,), queue="other")

    async def sizes() -> tuple[int, int]:
        conns = await app.connection_for_current_loop()
        return await conns.transport.size("celery"), await conns.transport.size("other")

    assert app.portal.run(sizes()) == (1, 1)


def test_batch_publishes_once_at_the_end(app: Celery) -> None:
    with app.batch() as items:
        for i in range(3):
            app.send_task("remote.task", (i,))
        assert len(items) == 3

    async def size() -> int:
        conns = await app.connection_for_current_loop()
        return await conns.transport.size("celery")

    assert app.portal.run(size()) == 3


def test_task_queue_option_routes_the_message(app: Celery) -> None:
    @app.task(name="vege.routed", queue="special")
    def routed() -> None:
        return None

    with app.collecting() as sent:
        routed.delay()
    assert sent[0][1] is not None and sent[0][1].name == "special"


def test_app_result_helpers(app: Celery) -> None:
    res = app.AsyncResult("some-id")
    assert isinstance(res, AsyncResult) and res.app is app
    group = app.GroupResult("gid", [res])
    assert group.id == "gid" and group.results == [res]


def test_set_as_current(url: str, restore_current_app: None) -> None:
    app = Celery("current", broker=url)
    assert current_app() is app
    other = Celery("not-current", broker=url, set_as_current=False)
    assert current_app() is app and other is not app
