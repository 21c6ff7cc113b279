"""The settings table and the validating ``app.conf`` mapping (pure logic)."""

from __future__ import annotations

import copy
import datetime
import pickle
import sys
import types
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac.exceptions import ImproperlyConfigured
from celeriac.routing import Exchange, Queue
from celeriac.settings import (
    ALIASES,
    SETTINGS,
    Settings,
    UnknownSetting,
    check,
)

# -- the table -------------------------------------------------------------------------

CELERY_DEFAULTS: dict[str, Any] = {
    "broker_url": None,
    "broker_transport_options": {},
    "result_backend": None,
    "result_serializer": "json",
    "result_expires": datetime.timedelta(days=1),
    "result_extended": False,
    "accept_content": ["json"],
    "task_serializer": "json",
    "task_routes": None,
    "task_queues": None,
    "task_default_queue": "celery",
    "task_default_exchange_type": "direct",
    "task_default_priority": None,
    "task_default_delivery_mode": "persistent",
    "task_create_missing_queues": True,
    "task_acks_late": False,
    "task_acks_on_failure_or_timeout": True,
    "task_reject_on_worker_lost": False,
    "task_ignore_result": False,
    "task_store_errors_even_if_ignored": False,
    "task_track_started": False,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "task_store_eager_result": False,
    "task_annotations": None,
    "task_default_rate_limit": None,
    "task_send_sent_event": False,
    "task_protocol": 2,
    "worker_concurrency": None,
    "worker_prefetch_multiplier": 4,
    "worker_disable_rate_limits": False,
    "worker_max_tasks_per_child": None,
    "worker_max_memory_per_child": None,
    "worker_send_task_events": False,
    "worker_hijack_root_logger": True,
    "worker_pool": "prefork",
    "worker_enable_remote_control": True,
    "control_exchange": "celery",
    "timezone": None,
    "enable_utc": True,
    "beat_schedule": {},
    "beat_schedule_filename": "celerybeat-schedule",
    "imports": (),
    "include": (),
}

REQUIRED = [
    "broker_connection_retry_on_startup",
    "broker_heartbeat",
    "result_backend_transport_options",
    "result_persistent",
    "result_compression",
    "result_accept_content",
    "task_compression",
    "task_default_exchange",
    "task_default_routing_key",
    "task_queue_max_priority",
    "task_publish_retry",
    "task_remote_tracebacks",
    "task_inherit_parent_priority",
    "result_chord_join_timeout",
    "worker_log_format",
    "worker_task_log_format",
    "worker_redirect_stdouts",
    "worker_redirect_stdouts_level",
    "worker_lost_wait",
    "worker_state_db",
    "worker_timer_precision",
    "worker_cancel_long_running_tasks_on_connection_loss",
    "worker_deduplicate_successful_tasks",
    "worker_autoscaler",
    "event_queue_ttl",
    "event_queue_expires",
    "event_exchange",
    "event_serializer",
    "control_queue_ttl",
    "control_queue_expires",
    "beat_scheduler",
    "beat_max_loop_interval",
    "broker_pool_limit",
    "broker_connection_timeout",
    "broker_connection_retry",
    "broker_connection_max_retries",
]


@pytest.mark.parametrize(("name", "default"), sorted(CELERY_DEFAULTS.items()))
def test_table_has_celerys_default(name: str, default: Any) -> None:
    assert SETTINGS[name].default == default


@pytest.mark.parametrize("name", REQUIRED)
def test_table_has_setting(name: str) -> None:
    row = SETTINGS[name]
    assert row.doc and row.name == name


def test_every_default_passes_its_own_check() -> None:
    for name, row in SETTINGS.items():
        check(name, row.default)
        assert name.islower() and row.doc.strip()


def test_every_legacy_name_is_upper_case_and_maps_back() -> None:
    for old, name in ALIASES.items():
        assert old.isupper()
        assert old in SETTINGS[name].legacy


@pytest.mark.parametrize(
    ("old", "name"),
    [
        ("BROKER_URL", "broker_url"),
        ("CELERY_BROKER_URL", "broker_url"),
        ("CELERY_RESULT_BACKEND", "result_backend"),
        ("CELERY_TASK_SERIALIZER", "task_serializer"),
        ("CELERYD_CONCURRENCY", "worker_concurrency"),
        ("CELERYD_PREFETCH_MULTIPLIER", "worker_prefetch_multiplier"),
        ("CELERY_ALWAYS_EAGER", "task_always_eager"),
        ("CELERY_TASK_ALWAYS_EAGER", "task_always_eager"),
        ("CELERY_ACKS_LATE", "task_acks_late"),
        ("CELERY_ROUTES", "task_routes"),
        ("CELERY_QUEUES", "task_queues"),
        ("CELERY_DEFAULT_QUEUE", "task_default_queue"),
        ("CELERYD_TASK_TIME_LIMIT", "task_time_limit"),
        ("CELERY_TASK_RESULT_EXPIRES", "result_expires"),
        ("CELERY_RESULT_EXPIRES", "result_expires"),
        ("CELERY_SEND_EVENTS", "worker_send_task_events"),
        ("CELERY_EAGER_PROPAGATES_EXCEPTIONS", "task_eager_propagates"),
        ("CELERYBEAT_SCHEDULE", "beat_schedule"),
        ("CELERY_TIMEZONE", "timezone"),
        ("CELERY_ENABLE_UTC", "enable_utc"),
        ("CELERY_IMPORTS", "imports"),
        ("CELERY_ACCEPT_CONTENT", "accept_content"),
        ("CELERY_MESSAGE_COMPRESSION", "task_compression"),
    ],
)
def test_legacy_names_read_and_write_the_new_setting(old: str, name: str) -> None:
    conf = Settings()
    assert ALIASES[old] == name
    assert conf[old] == conf[name]
    value = SETTINGS[name].default
    conf[old] = value if value is not None else _sample(name)
    assert name in conf.changes
    assert conf[old] == conf[name]


def _sample(name: str) -> Any:
    return {
        "str": "x",
        "float": 1.5,
        "int": 3,
        "routes": {},
        "queues": [],
        "bool": True,
        "timezone": "UTC",
    }[SETTINGS[name].type]


# -- unknown names and wrong types ------------------------------------------------------


def test_unknown_setting_names_the_key_and_the_close_match() -> None:
    conf = Settings()
    with pytest.raises(ImproperlyConfigured) as info:
        conf["broker_ur"] = "redis://127.0.0.1"
    assert str(info.value) == "Unknown setting 'broker_ur'. Did you mean 'broker_url'?"
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'task_acks_late'"):
        conf.task_acks_lat = True
    assert conf.changes == {}


def test_unknown_setting_is_a_key_error_for_mapping_reads() -> None:
    conf = Settings()
    assert conf.get("no_such_setting") is None
    assert conf.get("no_such_setting", 5) == 5
    assert "no_such_setting" not in conf
    with pytest.raises(UnknownSetting):
        conf["no_such_setting"]
    with pytest.raises(AttributeError, match="Did you mean 'worker_concurrency'"):
        _ = conf.worker_concurency
    assert not hasattr(conf, "worker_concurency")


def test_unknown_upper_case_name_suggests_a_legacy_name() -> None:
    with pytest.raises(UnknownSetting, match="Did you mean 'CELERY_ALWAYS_EAGER'"):
        Settings()["CELERY_ALWAYS_EAGR"] = True


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("worker_concurrency", "four", "an int or None"),
        ("worker_concurrency", True, "an int or None"),
        ("worker_concurrency", 4.0, "an int or None"),
        ("task_acks_late", 1, "a bool"),
        ("task_acks_late", None, "a bool"),
        ("task_time_limit", "10", "a number or None"),
        ("result_expires", "1d", "a number of seconds or a datetime.timedelta or None"),
        ("accept_content", "json", "a list or tuple of str"),
        ("accept_content", ["json", 1], "a list or tuple of str"),
        ("broker_transport_options", [], "a dict"),
        ("task_default_queue", None, "a str"),
        ("task_default_delivery_mode", "sometimes", "'persistent', 'transient', 2 or 1"),
        ("task_routes", {"a": 5}, "a dict, a list/tuple of routers"),
        ("task_queues", [object()], "a list or tuple of Queue objects"),
        ("timezone", "Mars/Olympus_Mons", "an IANA time zone name"),
    ],
)
def test_wrong_type_names_setting_value_and_expected_type(
    name: str, value: Any, expected: str
) -> None:
    conf = Settings()
    with pytest.raises(ImproperlyConfigured) as info:
        conf[name] = value
    message = str(info.value)
    assert repr(name) in message
    assert repr(value) in message
    assert expected in message
    assert name not in conf.changes


def test_wrong_type_through_a_legacy_name_says_how_it_was_given() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"given as CELERYD_CONCURRENCY"):
        Settings(CELERYD_CONCURRENCY="4")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("task_time_limit", 10),
        ("task_time_limit", 2.5),
        ("result_expires", 3600),
        ("result_expires", datetime.timedelta(hours=1)),
        ("result_expires", None),
        ("accept_content", ("json", "msgpack")),
        ("accept_content", {"json"}),
        ("task_default_delivery_mode", 1),
        ("task_default_delivery_mode", "transient"),
        ("task_routes", "proj.routers.route_task"),
        ("task_routes", ({"a.*": "q"}, lambda *a, **k: None)),
        ("task_queues", (Queue("a"), Queue("b", Exchange("b", "topic"), "b.#"))),
        ("task_annotations", {"tasks.add": {"rate_limit": "10/s"}}),
        ("beat_scheduler", object),
        ("timezone", "Europe/Paris"),
        ("timezone", datetime.UTC),
        ("worker_concurrency", None),
    ],
)
def test_valid_values_are_stored_as_given(name: str, value: Any) -> None:
    conf = Settings()
    conf[name] = value
    assert conf[name] is value


# -- mapping behaviour --------------------------------------------------------------------


def test_unset_settings_read_their_default() -> None:
    conf = Settings()
    assert conf.task_serializer == "json"
    assert conf["worker_prefetch_multiplier"] == 4
    assert conf.broker_url is None
    assert len(conf) == len(SETTINGS)
    assert list(conf) == list(SETTINGS)
    assert dict(conf)["task_default_queue"] == "celery"


def test_mutable_defaults_are_per_instance_copies_that_keep_changes() -> None:
    a, b = Settings(), Settings()
    assert a.beat_schedule == {} and a.beat_schedule is not b.beat_schedule
    a.beat_schedule["tick"] = {"task": "t", "schedule": 1.0}
    assert a.beat_schedule == {"tick": {"task": "t", "schedule": 1.0}}
    assert b.beat_schedule == {}
    assert SETTINGS["beat_schedule"].default == {}
    assert a.changes == {"beat_schedule": {"tick": {"task": "t", "schedule": 1.0}}}
    a.accept_content.append("msgpack")
    assert SETTINGS["accept_content"].default == ["json"]


def test_attribute_and_item_access_agree() -> None:
    conf = Settings()
    conf.broker_url = "redis://127.0.0.1:6379/0"
    assert conf["broker_url"] == conf.broker_url == "redis://127.0.0.1:6379/0"
    conf["task_acks_late"] = True
    assert conf.task_acks_late is True
    del conf.task_acks_late
    assert conf.task_acks_late is False
    assert "broker_url" in dir(conf)


def test_update_checks_everything_before_writing() -> None:
    conf = Settings()
    with pytest.raises(ImproperlyConfigured):
        conf.update({"task_serializer": "msgpack"}, worker_concurrency="x")
    assert conf.changes == {}
    conf.update({"task_serializer": "msgpack"}, CELERYD_CONCURRENCY=2)
    conf.update([("task_acks_late", True)])
    assert conf.changes == {
        "task_serializer": "msgpack",
        "worker_concurrency": 2,
        "task_acks_late": True,
    }


def test_setdefault_only_fills_what_nothing_configured() -> None:
    conf = Settings(task_serializer="msgpack")
    assert conf.setdefault("task_serializer", "json") == "msgpack"
    assert conf.setdefault("result_serializer", "msgpack") == "msgpack"
    assert conf.changes["result_serializer"] == "msgpack"
    with pytest.raises(ImproperlyConfigured):
        conf.setdefault("task_acks_late", "yes")


def test_delete_pop_popitem_and_clear_work_on_configured_values() -> None:
    conf = Settings(task_acks_late=True, worker_concurrency=3)
    assert conf.pop("task_acks_late") is True
    assert conf.task_acks_late is False
    assert conf.pop("task_acks_late", "none") == "none"
    with pytest.raises(KeyError):
        conf.pop("task_acks_late")
    with pytest.raises(KeyError):
        del conf["task_acks_late"]
    assert conf.popitem() == ("worker_concurrency", 3)
    with pytest.raises(KeyError):
        conf.popitem()
    conf.update(task_serializer="msgpack", beat_schedule={"a": {}})
    conf.clear()
    assert conf.changes == {}
    assert conf.task_serializer == "json"


def test_derived_defaults_follow_the_default_queue_as_in_celery() -> None:
    conf = Settings(task_default_queue="main")
    assert conf.task_default_exchange == "main"
    assert conf.task_default_routing_key == "main"
    conf.task_default_exchange = "tasks"
    assert conf.task_default_exchange == "tasks"
    assert conf.result_accept_content == ["json"]
    conf.accept_content = ["json", "msgpack"]
    assert conf.result_accept_content == ["json", "msgpack"]


def test_copy_and_pickle_keep_values_and_env() -> None:
    conf = Settings({"task_serializer": "msgpack"}, env={"CELERIAC_BROKER_URL": "memory://"})
    for clone in (conf.copy(), copy.copy(conf), pickle.loads(pickle.dumps(conf))):
        assert clone.task_serializer == "msgpack"
        assert clone.broker_url == "memory://"
        clone.task_serializer = "json"
        assert conf.task_serializer == "msgpack"


def test_find_value_for_key_uses_celerys_short_names() -> None:
    conf = Settings(task_always_eager=True, worker_concurrency=2)
    assert conf.find_value_for_key("always_eager", "task") is True
    assert conf.find_value_for_key("concurrency", "worker") == 2
    assert conf.find_value_for_key("broker_url") is None
    assert conf.find_value_for_key("ALWAYS_EAGER") is True
    with pytest.raises(UnknownSetting):
        conf.find_value_for_key("nothing_like_it", "task")


def test_table_censors_secrets() -> None:
    conf = Settings(
        broker_url="amqp://guest:s3cret@127.0.0.1:5672//",
        security_key_password="hunter2",
        task_default_routing_key="rk",
    )
    table = conf.table()
    assert table["broker_url"] == "amqp://guest:********@127.0.0.1:5672//"
    assert table["security_key_password"] == "********"
    assert table["task_default_routing_key"] == "rk"
    assert conf.table(censored=False)["broker_url"].endswith("s3cret@127.0.0.1:5672//")
    assert conf.table(with_defaults=True)["task_serializer"] == "json"


# -- environment and casting --------------------------------------------------------------


def test_env_supplies_unconfigured_urls() -> None:
    env = {
        "CELERIAC_BROKER_URL": "redis://127.0.0.1:6379/1",
        "CELERY_BROKER_URL": "amqp://127.0.0.1//",
        "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/2",
    }
    conf = Settings.from_env(env)
    assert conf.broker_url == "redis://127.0.0.1:6379/1"  # CELERIAC_ wins over CELERY_
    assert conf.result_backend == "redis://127.0.0.1:6379/2"
    assert conf.changes == {}
    conf.broker_url = "memory://"
    assert conf.broker_url == "memory://"  # explicit config overrides the environment
    conf.broker_url = None
    assert conf.broker_url == "redis://127.0.0.1:6379/1"  # None means "not configured"
    del conf.broker_url
    conf.clear()
    assert conf.broker_url == "redis://127.0.0.1:6379/1"
    assert Settings(env={"CELERIAC_BROKER_URL": ""}).broker_url is None
    assert Settings().broker_url is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("true", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("NO", False),
        ("off", False),
    ],
)
def test_cast_bool(text: str, value: bool) -> None:
    assert Settings.cast("task_acks_late", text) is value


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("worker_concurrency", "4", 4),
        ("worker_concurrency", "none", None),
        ("task_time_limit", "2.5", 2.5),
        ("result_expires", "60", 60.0),
        ("accept_content", "json, msgpack,", ["json", "msgpack"]),
        ("imports", "proj.tasks", ["proj.tasks"]),
        ("broker_transport_options", '{"visibility_timeout": 30}', {"visibility_timeout": 30}),
        ("task_routes", '{"a.*": "q"}', {"a.*": "q"}),
        ("task_routes", "proj.routers:route", "proj.routers:route"),
        ("task_queues", "a,b", ["a", "b"]),
        ("task_default_delivery_mode", "1", 1),
        ("task_default_delivery_mode", "Transient", "transient"),
        ("broker_url", "memory://", "memory://"),
        ("CELERYD_CONCURRENCY", "2", 2),
    ],
)
def test_cast_reads_env_and_cli_text(name: str, text: str, value: Any) -> None:
    assert Settings.cast(name, text) == value


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("task_acks_late", "maybe"),
        ("worker_concurrency", "four"),
        ("task_time_limit", "soon"),
        ("broker_transport_options", "{not json"),
        ("broker_transport_options", "[1, 2]"),
        ("task_acks_late", ""),
    ],
)
def test_cast_errors_name_key_and_text(name: str, text: str) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        Settings.cast(name, text)
    assert repr(name) in str(info.value)
    assert repr(text) in str(info.value)


def test_cast_unknown_setting() -> None:
    with pytest.raises(UnknownSetting, match="Did you mean 'worker_concurrency'"):
        Settings.cast("worker_concurency", "2")


# -- typed reads -------------------------------------------------------------------------


def test_result_expires_seconds() -> None:
    conf = Settings()
    assert conf.result_expires_seconds == 86400.0
    conf.result_expires = 30
    assert conf.result_expires_seconds == 30.0
    conf.result_expires = datetime.timedelta(minutes=2)
    assert conf.seconds("result_expires") == 120.0
    conf.result_expires = None
    assert conf.result_expires_seconds is None
    assert conf.seconds("task_time_limit") is None


def test_tz() -> None:
    conf = Settings()
    assert conf.tz().utcoffset(datetime.datetime(2024, 1, 1)) == datetime.timedelta(0)
    conf.timezone = "Europe/Paris"
    assert conf.tz() == zoneinfo.ZoneInfo("Europe/Paris")
    conf.timezone = datetime.timezone(datetime.timedelta(hours=2))
    assert conf.tz() is conf.timezone
    conf.timezone = None
    conf.enable_utc = False
    assert isinstance(conf.tz(), datetime.tzinfo)


def test_tz_error_names_the_zone() -> None:
    with pytest.raises(ImproperlyConfigured, match="Nowhere/Special"):
        Settings(timezone="Nowhere/Special")


# -- config_from_object -------------------------------------------------------------------


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _router(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
    return None


def test_load_object_reads_module_settings_and_skips_helpers() -> None:
    class Helper:
        pass

    module = _module(
        "celeryconfig",
        broker_url="redis://127.0.0.1:6379/0",
        task_routes=_router,  # a function, but the value of a known setting
        beat_scheduler=Helper,  # a class, but the value of a known setting
        CELERY_TASK_SERIALIZER="msgpack",  # legacy upper-case name
        DEBUG=True,  # unrelated upper-case names are ignored
        _helper_url="x",  # private names are ignored
        os=sys.modules["os"],  # modules are ignored
        timedelta=datetime.timedelta,  # classes are ignored
        helper=lambda: 1,  # functions are ignored
        default_exchange=Exchange("default"),  # Queue/Exchange helpers are ignored
    )
    conf = Settings()
    conf.load_object(module)
    assert conf.changes == {
        "broker_url": "redis://127.0.0.1:6379/0",
        "task_routes": _router,
        "beat_scheduler": Helper,
        "task_serializer": "msgpack",
    }


def test_load_object_rejects_unknown_lowercase_names_and_writes_nothing() -> None:
    conf = Settings()
    with pytest.raises(ImproperlyConfigured) as info:
        conf.load_object({"broker_url": "memory://", "task_serializr": "json"})
    assert "Unknown setting 'task_serializr'. Did you mean 'task_serializer'?" in str(info.value)
    assert "Prefix helper variables with '_'" in str(info.value)
    assert conf.changes == {}


def test_load_object_reports_every_problem_at_once() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        Settings().load_object(_module("cfg", broker_ur="x", worker_concurrency="2"))
    message = str(info.value)
    assert message.startswith("2 problems in configuration 'cfg':")
    assert "'broker_ur'" in message and "'worker_concurrency'" in message


def test_load_object_rejects_old_and_new_names_that_disagree() -> None:
    with pytest.raises(ImproperlyConfigured, match="given twice"):
        Settings().load_object({"broker_url": "memory://", "BROKER_URL": "redis://127.0.0.1"})
    conf = Settings()
    conf.load_object({"broker_url": "memory://", "BROKER_URL": "memory://"})
    assert conf.broker_url == "memory://"


def test_load_object_from_a_class() -> None:
    class Config:
        task_acks_late = True
        CELERYD_PREFETCH_MULTIPLIER = 1

        def method(self) -> None:
            pass

    conf = Settings()
    conf.load_object(Config)
    assert conf.changes == {"task_acks_late": True, "worker_prefetch_multiplier": 1}


def test_load_object_with_django_namespace() -> None:
    django_settings = types.SimpleNamespace(
        DEBUG=False,
        INSTALLED_APPS=["django.contrib.admin"],
        TIME_ZONE="Europe/Paris",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/0",
        CELERY_RESULT_BACKEND="redis://127.0.0.1:6379/1",
        CELERY_TASK_ALWAYS_EAGER=True,
        CELERY_ACKS_LATE=True,  # an old name written with the prefix still works
        CELERY_TIMEZONE="Europe/Paris",
        CELERY_TASK_ROUTES=_router,
    )
    conf = Settings()
    conf.load_object(django_settings, namespace="CELERY")
    assert conf.changes == {
        "broker_url": "redis://127.0.0.1:6379/0",
        "result_backend": "redis://127.0.0.1:6379/1",
        "task_always_eager": True,
        "task_acks_late": True,
        "timezone": "Europe/Paris",
        "task_routes": _router,
    }


def test_load_object_namespace_rejects_unknown_prefixed_names() -> None:
    with pytest.raises(UnknownSetting) as info:
        Settings().load_object({"CELERY_BROKR_URL": "x", "OTHER": 1}, namespace="CELERY")
    assert str(info.value) == (
        "Unknown setting 'CELERY_BROKR_URL' (read as 'brokr_url'). "
        "Did you mean 'CELERY_BROKER_URL'?"
    )


@pytest.fixture
def config_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable package of config modules in tmp_path, forgotten afterwards."""
    package = tmp_path / "cfgpkg_settings"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "celeryconfig.py").write_text(
        "broker_url = 'memory://'\nclass Config:\n    task_serializer = 'msgpack'\n"
    )
    (package / "broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith("cfgpkg_settings"):
            del sys.modules[name]


@pytest.mark.parametrize(
    ("path", "changes"),
    [
        ("cfgpkg_settings.celeryconfig", {"broker_url": "memory://"}),
        ("cfgpkg_settings.celeryconfig:Config", {"task_serializer": "msgpack"}),
        ("cfgpkg_settings.celeryconfig.Config", {"task_serializer": "msgpack"}),
    ],
)
def test_load_object_imports_dotted_paths(
    config_modules: Path, path: str, changes: dict[str, Any]
) -> None:
    conf = Settings()
    conf.load_object(path)
    assert conf.changes == changes


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("cfgpkg_settings.missing", "cfgpkg_settings.missing"),
        ("cfgpkg_settings.celeryconfig:Nope", "no module or attribute 'Nope'"),
        ("no_such_top_level_pkg_xyz", "no_such_top_level_pkg_xyz"),
        ("cfgpkg_settings.broken", "no_such_dependency_xyz"),
    ],
)
def test_load_object_import_errors_are_clear(
    config_modules: Path, path: str, fragment: str
) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        Settings().load_object(path)
    assert "Cannot import configuration" in str(info.value)
    assert fragment in str(info.value)
