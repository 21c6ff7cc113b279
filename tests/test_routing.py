"""Queue/Exchange values and the task router (pure logic)."""

from __future__ import annotations

import dataclasses
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac.exceptions import ImproperlyConfigured, QueueNotFound
from celeriac.routing import Exchange, Queue, Route, Router, coerce_queues, prepare_routes
from celeriac.settings import SETTINGS, Settings
from celeriac.transport.base import QueueSpec

# -- Exchange and Queue -----------------------------------------------------------------


def test_exchange_defaults_and_repr() -> None:
    ex = Exchange("media", "topic")
    assert (ex.name, ex.type, ex.durable, ex.auto_delete, ex.delivery_mode) == (
        "media",
        "topic",
        True,
        False,
        None,
    )
    assert repr(ex) == "<Exchange media(topic)>"
    assert Exchange("media", "topic") == ex
    assert hash(Exchange("media", "topic")) == hash(ex)


def test_exchange_rejects_unsupported_types_and_keywords() -> None:
    with pytest.raises(ValueError, match="'headers' is not supported"):
        Exchange("h", "headers")
    with pytest.raises(TypeError):
        Exchange("x", "direct", passive=True)  # type: ignore[call-arg]


def test_queue_without_exchange_gets_its_own_direct_exchange() -> None:
    q = Queue("queue1")
    assert q.exchange == Exchange("queue1", "direct")
    assert q.routing_key == "queue1"
    assert repr(q) == "<Queue queue1 -> <Exchange queue1(direct)> -> queue1>"
    assert Queue("queue1") == q


def test_queue_accepts_an_exchange_name() -> None:
    q = Queue("videos", "media", "media.video")
    assert q.exchange == Exchange("media")
    assert q.routing_key == "media.video"
    assert Queue("v", Exchange("m", "topic")).routing_key == "v"


def test_queue_unknown_keyword_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="'routing_keys'"):
        Queue("q", routing_keys="q")
    with pytest.raises(TypeError, match="'bindings'"):
        Queue("q", bindings=[])
    make: Any = Queue
    with pytest.raises(TypeError):
        make("q", Exchange("q"), "q", None)  # kombu's 4th positional is a channel


def test_queue_keeps_kombu_keywords() -> None:
    q = Queue("q", alias="quick", no_declare=True, max_length=10)
    assert q.options == {"alias": "quick", "no_declare": True}
    assert q.queue_arguments == {"x-max-length": 10}


@pytest.mark.parametrize(
    ("mode", "persistent"), [(1, False), ("transient", False), (2, True), ("persistent", True)]
)
def test_queue_delivery_mode(mode: Any, persistent: bool) -> None:
    assert Queue("t", routing_key="t", delivery_mode=mode).persistent is persistent


def test_queue_delivery_mode_defaults_to_its_exchange_then_unset() -> None:
    assert Queue("t").persistent is None
    assert Queue("t", Exchange("t", delivery_mode=1)).persistent is False
    with pytest.raises(ValueError, match="delivery_mode"):
        Queue("t", delivery_mode=3)


def test_queue_max_priority_and_arguments_are_kept() -> None:
    q = Queue("p", max_priority=10)
    assert q.max_priority == 10 and q.queue_arguments == {"x-max-priority": 10}
    q = Queue("p", queue_arguments={"x-max-priority": 10, "x-queue-mode": "lazy"})
    assert q.max_priority == 10
    assert q.queue_arguments == {"x-max-priority": 10, "x-queue-mode": "lazy"}
    with pytest.raises(ValueError, match="disagrees"):
        Queue("p", max_priority=5, queue_arguments={"x-max-priority": 10})


def test_queue_to_spec() -> None:
    q = Queue(
        "videos",
        Exchange("media", "topic", durable=False),
        "media.#",
        durable=False,
        auto_delete=True,
        max_priority=9,
        expires=60,
        message_ttl=1.5,
        queue_arguments={"x-queue-mode": "lazy"},
    )
    assert q.to_spec() == QueueSpec(
        name="videos",
        exchange="media",
        exchange_type="topic",
        routing_key="media.#",
        durable=False,
        auto_delete=True,
        max_priority=9,
        arguments={
            "x-queue-mode": "lazy",
            "x-max-priority": 9,
            "x-expires": 60000,
            "x-message-ttl": 1500,
        },
    )
    assert Queue("celery").to_spec() == QueueSpec("celery", "celery", "direct", "celery")


def test_queue_is_a_frozen_value() -> None:
    q = Queue("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.name = "b"  # type: ignore[misc]
    assert q.replace(name="b") == Queue("b")
    assert q.replace(max_priority=5).max_priority == 5
    assert q.replace(max_priority=5).replace(max_priority=7).queue_arguments == {
        "x-max-priority": 7
    }


class KombuLikeQueue:
    """Stands in for a kombu.Queue object from an unchanged Celery config."""

    def __init__(self) -> None:
        self.name = "legacy"
        self.exchange = type(
            "Ex",
            (),
            {
                "name": "legacy_ex",
                "type": "topic",
                "durable": True,
                "auto_delete": False,
                "delivery_mode": 1,
            },
        )()
        self.routing_key = "legacy.#"
        self.durable = True
        self.queue_arguments = {"x-max-priority": 5}


def test_queue_coerce() -> None:
    assert Queue.coerce("a") == Queue("a")
    assert Queue.coerce({"name": "a", "routing_key": "k"}) == Queue("a", routing_key="k")
    legacy = Queue.coerce(KombuLikeQueue())
    assert (legacy.exchange.name, legacy.exchange.type) == ("legacy_ex", "topic")
    assert legacy.routing_key == "legacy.#"
    assert legacy.max_priority == 5
    assert legacy.persistent is False
    with pytest.raises(TypeError):
        Queue.coerce(5)


def test_coerce_queues_forms() -> None:
    assert coerce_queues(None) == []
    assert coerce_queues(["a", Queue("b")]) == [Queue("a"), Queue("b")]
    old_style = coerce_queues(
        {
            "default": {"exchange": "default", "routing_key": "default"},
            "feeds": {"exchange": "tasks", "exchange_type": "topic", "binding_key": "feed.#"},
        }
    )
    assert old_style == [
        Queue("default", Exchange("default"), "default"),
        Queue("feeds", Exchange("tasks", "topic"), "feed.#"),
    ]
    with pytest.raises(ValueError, match="listed twice: a"):
        coerce_queues([Queue("a"), Queue("a")])
    with pytest.raises(TypeError):
        coerce_queues("a")


# -- the router -------------------------------------------------------------------------


def test_router_fallbacks_match_the_settings_table() -> None:
    """Router reads plain dicts too; its fallbacks must be the table's defaults."""
    assert Router({}).default_queue_name == SETTINGS["task_default_queue"].default
    assert Router({}).default_exchange_type == SETTINGS["task_default_exchange_type"].default
    assert Router({}).create_missing is SETTINGS["task_create_missing_queues"].default
    assert Router({}).default_persistent is True


def test_default_route_publishes_to_the_default_queue_by_name() -> None:
    router = Router(Settings())
    route = router.route("proj.add", (1, 2), {})
    assert route == Route(
        queue=Queue("celery", Exchange("celery"), "celery"),
        exchange="",
        routing_key="celery",
        persistent=True,
        priority=None,
    )
    assert router.declared_queues() == [Queue("celery")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.exchange = "x"  # type: ignore[misc]


def test_tutorial_routes() -> None:
    """vege3.py from the tutorial: two named routes, plus a glob."""
    conf = Settings(
        task_routes={
            "vege3.add": {"queue": "queue1"},
            "vege3.hello": {"queue": "queue2"},
            "vege.*": {"queue": "vege"},
        }
    )
    router = Router(conf)
    assert router.route("vege3.add").queue.name == "queue1"
    assert router.route("vege3.add").routing_key == "queue1"
    assert router.route("vege3.hello").queue.name == "queue2"
    assert router.route("vege.hello").queue.name == "vege"
    assert router.route("vege3.other").queue.name == "celery"
    assert router.route("vegetable.add").queue.name == "celery"
    # the worker of the tutorial: celery -A vege3 worker -Q queue1,queue2
    assert [q.name for q in router.queues_for_worker(["queue1,queue2"])] == ["queue1", "queue2"]


def test_exact_names_beat_patterns_and_patterns_keep_their_order() -> None:
    router = Router(
        {
            "task_routes": {
                "feed.*": "feeds",
                re.compile(r"(video|image)\.tasks\..*"): "media",
                "feed.tasks.special": "special",
                "feed.tasks.*": "never",
            }
        }
    )
    assert router.route("feed.tasks.special").queue.name == "special"
    assert router.route("feed.tasks.import").queue.name == "feeds"
    assert router.route("video.tasks.encode").queue.name == "media"
    assert router.route("audio.tasks.encode").queue.name == "celery"


def test_list_of_pattern_pairs_keeps_order() -> None:
    router = Router(
        {"task_routes": ([("feed.tasks.*", {"queue": "feeds"}), ("feed.*", {"queue": "other"})],)}
    )
    assert router.route("feed.tasks.a").queue.name == "feeds"
    assert router.route("feed.b").queue.name == "other"
    bare = Router({"task_routes": [("a.*", "qa"), ("b.*", {"queue": "qb"})]})
    assert bare.route("b.x").queue.name == "qb"


def test_explicit_options_beat_task_routes_and_merge_with_them() -> None:
    router = Router(
        {
            "task_routes": {"proj.*": {"queue": "routed", "priority": 3, "serializer": "msgpack"}},
            "task_default_priority": 1,
        }
    )
    route = router.route("proj.add", options={"queue": "explicit"})
    assert route.queue.name == "explicit"
    assert route.priority == 3  # the route's other keys still apply
    assert route.options == {"serializer": "msgpack"}
    route = router.route("proj.add", options={"priority": 9, "serializer": "json", "queue": None})
    assert (route.queue.name, route.priority, route.options) == ("routed", 9, {})
    assert router.route("other.task").priority == 1


def test_callable_routers_in_a_list_first_non_none_wins() -> None:
    seen: list[tuple[Any, ...]] = []

    def by_arg(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        seen.append((name, tuple(args), dict(kwargs), dict(options), task))
        if kwargs.get("big"):
            return {"queue": "big", "routing_key": "ignored.on.direct"}
        return None

    marker = object()
    router = Router({"task_routes": [by_arg, {"proj.*": "proj"}, lambda *a, **k: "last"]})
    assert (
        router.route("proj.add", (1,), {"big": True}, {"countdown": 5}, task=marker).queue.name
        == "big"
    )
    assert seen[0] == ("proj.add", (1,), {"big": True}, {"countdown": 5}, marker)
    assert router.route("proj.add", (1,), {}).queue.name == "proj"
    assert router.route("x.y").queue.name == "last"


def test_old_style_router_class() -> None:
    class OldRouter:
        def route_for_task(self, task: str, args: Any = None, kwargs: Any = None) -> Any:
            return {"queue": "old"} if task == "a" else None

    router = Router({"task_routes": (OldRouter(),)})
    assert router.route("a").queue.name == "old"
    assert router.route("b").queue.name == "celery"


@pytest.fixture
def router_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "routers_for_test_xyz.py").write_text(
        "def route_task(name, args, kwargs, options, task=None, **kw):\n"
        "    return 'from_path' if name.startswith('path.') else None\n"
        "class OldRouter:\n"
        "    def route_for_task(self, task, args=None, kwargs=None):\n"
        "        return {'queue': 'old_path'}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "routers_for_test_xyz"
    sys.modules.pop("routers_for_test_xyz", None)


def test_dotted_path_routers(router_module: str) -> None:
    router = Router({"task_routes": (f"{router_module}.route_task", f"{router_module}:OldRouter")})
    assert router.route("path.a").queue.name == "from_path"
    assert router.route("other").queue.name == "old_path"


def test_dotted_path_router_that_cannot_be_imported() -> None:
    router = Router({"task_routes": "no_such_module_xyz.route"})  # lazy: no error yet
    with pytest.raises(ImproperlyConfigured, match="no_such_module_xyz"):
        router.route("a")


def test_invalid_routes_are_configuration_errors() -> None:
    with pytest.raises(ImproperlyConfigured, match="task_routes"):
        Router({"task_routes": {"a": 5}})
    with pytest.raises(TypeError):
        prepare_routes(5)
    router = Router({"task_routes": lambda *a, **k: 42})
    with pytest.raises(ImproperlyConfigured, match="returned 42"):
        router.route("a")


def test_missing_queues_are_created_or_refused() -> None:
    router = Router({"task_routes": {"a": "fresh"}, "task_queues": [Queue("celery")]})
    route = router.route("a")
    assert route.queue == Queue("fresh", Exchange("fresh", "direct"), "fresh")
    assert [q.name for q in router.declared_queues()] == ["celery", "fresh"]
    strict = Router(
        {
            "task_routes": {"a": "fresh"},
            "task_queues": [Queue("celery")],
            "task_create_missing_queues": False,
        }
    )
    with pytest.raises(QueueNotFound, match="'fresh' missing from task_queues"):
        strict.route("a")
    assert strict.route("b").queue.name == "celery"


def test_configured_queue_is_used_with_its_options() -> None:
    router = Router(
        {
            "task_queues": [Queue("hi", max_priority=10, delivery_mode="transient")],
            "task_routes": {"urgent.*": "hi"},
        }
    )
    route = router.route("urgent.page")
    assert route.queue.max_priority == 10
    assert route.persistent is False  # the queue's delivery_mode is honoured
    assert route.exchange == "" and route.routing_key == "hi"


def test_persistence_precedence() -> None:
    router = Router(
        {
            "task_queues": [Queue("t", delivery_mode=1), Queue("celery")],
            "task_routes": {"r": {"queue": "celery", "delivery_mode": "transient"}},
        }
    )
    assert router.route("a", options={"queue": "t"}).persistent is False
    assert router.route("a", options={"queue": "t", "delivery_mode": 2}).persistent is True
    assert router.route("r").persistent is False
    assert router.route("a").persistent is True
    transient = Router(Settings(task_default_delivery_mode="transient"))
    assert transient.route("a").persistent is False
    assert (
        Router({"task_queues": [Queue("p", Exchange("p", delivery_mode=1))]})
        .route("a", options={"queue": "p"})
        .persistent
        is False
    )


def test_topic_exchange_publishes_with_the_routing_key() -> None:
    media = Exchange("media", "topic")
    router = Router(
        {
            "task_queues": [Queue("celery"), Queue("videos", media, "media.video")],
            "task_routes": {
                "video.*": {"queue": "videos"},
                "image.*": {"queue": "videos", "routing_key": "media.image"},
            },
        }
    )
    assert (router.route("video.encode").exchange, router.route("video.encode").routing_key) == (
        "media",
        "media.video",
    )
    assert router.route("image.crop").routing_key == "media.image"


def test_direct_queue_with_explicit_exchange_and_key() -> None:
    router = Router({})
    only_key = router.route("a", options={"routing_key": "x"})
    assert (only_key.exchange, only_key.routing_key) == ("", "celery")
    both = router.route("a", options={"exchange": "custom", "routing_key": "x"})
    assert (both.exchange, both.routing_key) == ("custom", "x")
    obj = router.route("a", options={"exchange": Exchange("t", "topic")})
    assert (obj.exchange, obj.routing_key) == ("t", "celery")


def test_celerys_topic_recipe() -> None:
    """Celery's routing guide: queues without exchange join the topic default exchange."""
    conf = Settings(
        task_default_queue="default",
        task_default_exchange="tasks",
        task_default_exchange_type="topic",
        task_default_routing_key="task.default",
        task_queues=(
            Queue("default", routing_key="task.#"),
            Queue("feed_tasks", routing_key="feed.#"),
        ),
        task_routes={
            "feeds.tasks.import_feed": {"queue": "feed_tasks", "routing_key": "feed.import"}
        },
    )
    router = Router(conf)
    feed = router.route("feeds.tasks.import_feed")
    assert (feed.queue.name, feed.exchange, feed.routing_key) == (
        "feed_tasks",
        "tasks",
        "feed.import",
    )
    other = router.route("proj.add")  # Celery: the queue's own key before the default key
    assert (other.queue.name, other.exchange, other.routing_key) == ("default", "tasks", "task.#")
    assert {q.to_spec().exchange for q in router.declared_queues()} == {"tasks"}
    assert [q.routing_key for q in router.declared_queues()] == ["task.#", "feed.#"]


def test_custom_direct_default_exchange_keeps_queue_names_as_keys() -> None:
    router = Router(Settings(task_default_exchange="tasks", task_queues=["a", "b"]))
    assert [(q.exchange.name, q.routing_key) for q in router.declared_queues()] == [
        ("tasks", "a"),
        ("tasks", "b"),
    ]
    assert router.route("x", options={"queue": "a"}).exchange == ""


def test_queue_max_priority_setting_applies_to_every_queue() -> None:
    router = Router(
        {"task_queue_max_priority": 10, "task_queues": [Queue("a"), Queue("b", max_priority=3)]}
    )
    assert [q.max_priority for q in router.declared_queues()] == [10, 3]
    assert router.route("x", options={"queue": "new"}).queue.max_priority == 10
    assert Router({"task_queue_max_priority": 4}).declared_queues()[0].max_priority == 4


def test_priority_must_be_an_int() -> None:
    with pytest.raises(ImproperlyConfigured, match="priority"):
        Router({}).route("a", options={"priority": "high"})
    assert Router({}).route("a", options={"priority": "5"}).priority == 5


def test_queues_for_worker() -> None:
    router = Router({"task_queues": [Queue("celery"), Queue("a"), Queue("b")]})
    assert [q.name for q in router.queues_for_worker()] == ["celery", "a", "b"]
    assert [q.name for q in router.queues_for_worker(None, ["a"])] == ["celery", "b"]
    assert [q.name for q in router.queues_for_worker(["b", "new", "b"], ["a,celery"])] == [
        "b",
        "new",
    ]
    assert router.queues["new"] == Queue("new")
    assert [q.name for q in Router({}).queues_for_worker()] == ["celery"]
    strict = Router({"task_create_missing_queues": False})
    with pytest.raises(QueueNotFound):
        strict.queues_for_worker(["nope"])


def test_task_attributes_beat_task_routes_and_options_beat_both() -> None:
    """Celery's order: apply_async options > task attributes > task_routes > defaults."""
    router = Router(
        {"task_routes": {"proj.*": {"queue": "routed", "priority": 3}}, "task_default_priority": 1}
    )
    task = types.SimpleNamespace(queue="own", priority=5, routing_key=None, delivery_mode=1)
    route = router.route("proj.add", task=task)
    assert (route.queue.name, route.priority, route.persistent) == ("own", 5, False)
    route = router.route("proj.add", options={"queue": "explicit", "priority": 7}, task=task)
    assert (route.queue.name, route.priority) == ("explicit", 7)
    plain = types.SimpleNamespace(queue=None, priority=None)
    assert router.route("proj.add", task=plain).queue.name == "routed"
    assert router.route("other", task=types.SimpleNamespace(priority=4)).priority == 4
