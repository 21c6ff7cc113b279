"""Celery message protocol v2 as celery-wire.md §4.1 describes it: headers, body, v1."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import Celery
from celeriac.exceptions import ContentDisallowed, InvalidTaskError
from celeriac.protocol import build_task_message, decode_body, parse_iso, saferepr, upgrade_v1
from celeriac.serialization import accepted_types, json_dumps
from celeriac.task import Context, pop, push
from celeriac.transport.base import Envelope

V2_HEADER_KEYS = [
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
]
EMPTY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
JSON_ONLY = accepted_types(["json"])


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("vege", broker="memory://protocol", set_as_current=False)

    @app.task(name="vege.add")
    def add(x: int, y: int) -> int:
        return x + y

    yield app


def _message(app: Celery, *args: Any, **options: Any) -> tuple[Any, Any, str]:
    return app.prepare_message("vege.add", args or (2, 2), {}, **options)


def test_headers_have_every_v2_key(app: Celery) -> None:
    out, _, task_id = _message(app)
    env = out.envelope
    h = env.headers
    assert list(h) == V2_HEADER_KEYS
    assert h["lang"] == "py"
    assert h["task"] == "vege.add"
    assert h["id"] == task_id == env.correlation_id
    assert uuid.UUID(task_id)
    assert h["root_id"] == task_id  # the first task of a workflow is its own root
    assert h["parent_id"] is None
    assert h["retries"] == 0
    assert h["timelimit"] == [None, None]
    assert h["argsrepr"] == "(2, 2)"
    assert h["kwargsrepr"] == "{}"
    assert h["origin"].startswith("gen") and "@" in h["origin"]
    assert h["ignore_result"] is False
    assert h["replaced_task_nesting"] == 0
    assert h["stamped_headers"] is None
    assert h["stamps"] == {}
    assert (h["eta"], h["expires"], h["group"], h["group_index"], h["shadow"]) == (None,) * 5
    assert env.content_type == "application/json"
    assert env.content_encoding == "utf-8"
    assert env.persistent is True
    assert out.not_before is None


def test_body_is_args_kwargs_embed(app: Celery) -> None:
    out, _, _ = app.prepare_message("vege.add", (2,), {"y": 2})
    assert json.loads(out.envelope.body) == [[2], {"y": 2}, EMPTY_EMBED]
    assert decode_body(out.envelope, JSON_ONLY) == ([2], {"y": 2}, EMPTY_EMBED)


def test_decode_body_reads_celerys_own_bytes() -> None:
    """The body of celery-wire.md's example message, as Celery's json writes it."""
    body = base64.b64decode(
        "W1syLCAyXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVs"
        "bCwgImNob3JkIjogbnVsbH1d"
    )
    env = Envelope(body, {"task": "vege.add", "id": "x"}, "application/json")
    assert decode_body(env, JSON_ONLY) == ([2, 2], {}, EMPTY_EMBED)


def test_timelimit_is_hard_then_soft(app: Celery) -> None:
    out, _, _ = _message(app, time_limit=30, soft_time_limit=10)
    assert out.envelope.headers["timelimit"] == [30, 10]


def test_countdown_becomes_an_eta_header_and_not_before(app: Celery) -> None:
    before = time.time()
    out, _, _ = _message(app, countdown=30)
    after = time.time()
    eta = dt.datetime.fromisoformat(out.envelope.headers["eta"])
    assert eta.tzinfo is not None
    assert before + 30 <= eta.timestamp() <= after + 30
    assert out.not_before == pytest.approx(eta.timestamp())


def test_eta_datetime_and_string(app: Celery) -> None:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    out, _, _ = _message(app, eta=when)
    assert out.envelope.headers["eta"] == when.isoformat()
    assert out.not_before == pytest.approx(when.timestamp())
    out, _, _ = _message(app, eta=when.isoformat())
    assert dt.datetime.fromisoformat(out.envelope.headers["eta"]) == when


def test_past_eta_is_sent_for_now(app: Celery) -> None:
    out, _, _ = _message(app, eta=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    assert out.envelope.headers["eta"] is not None
    assert out.not_before is None


def test_naive_eta_is_in_the_app_timezone() -> None:
    app = Celery("tz", broker="memory://protocol-tz", timezone="Asia/Taipei", set_as_current=False)
    out, _, _ = app.prepare_message("x", (), {}, eta=dt.datetime(2030, 1, 1, 8, 0))
    eta = dt.datetime.fromisoformat(out.envelope.headers["eta"])
    assert eta == dt.datetime(2030, 1, 1, 0, 0, tzinfo=dt.UTC)


def test_expires_seconds_become_an_absolute_iso_time(app: Celery) -> None:
    before = dt.datetime.now(dt.UTC)
    out, _, _ = _message(app, expires=60)
    expires = dt.datetime.fromisoformat(out.envelope.headers["expires"])
    assert expires.tzinfo is not None
    assert before + dt.timedelta(seconds=59) <= expires <= before + dt.timedelta(seconds=61)
    assert out.not_before is None  # expiry is not a delay


def test_group_retries_shadow_priority_reply_to(app: Celery) -> None:
    out, _, _ = _message(
        app, group_id="g1", group_index=3, retries=2, shadow="nice-name", priority=7,
        reply_to="client-oid", task_id="fixed-id",
    )
    h = out.envelope.headers
    assert (h["group"], h["group_index"], h["retries"], h["shadow"], h["id"]) == (
        "g1", 3, 2, "nice-name", "fixed-id",
    )
    assert out.envelope.priority == 7
    assert out.envelope.reply_to == "client-oid"
    assert out.envelope.correlation_id == "fixed-id"


def test_extra_headers_are_merged(app: Celery) -> None:
    out, _, _ = _message(app, headers={"x-tenant": "acme"})
    assert out.envelope.headers["x-tenant"] == "acme"
    assert out.envelope.headers["lang"] == "py"


def test_parent_and_root_come_from_the_running_task(app: Celery) -> None:
    token = push(app.tasks["vege.add"], Context(id="parent-1", root_id="root-0"))
    try:
        out, _, _ = _message(app)
    finally:
        pop(token)
    assert out.envelope.headers["parent_id"] == "parent-1"
    assert out.envelope.headers["root_id"] == "root-0"


def test_links_chain_and_chord_go_in_the_embed(app: Celery) -> None:
    add = app.tasks["vege.add"]
    out, _, _ = app.prepare_message(
        "vege.add", (1, 1), {}, link=add.s(1), link_error=[add.si(0, 0)],
        chain=[dict(add.s(3))], chord=add.s(4),
    )
    _, _, embed = decode_body(out.envelope, JSON_ONLY)
    assert [s["task"] for s in embed["callbacks"]] == ["vege.add"]
    assert embed["callbacks"][0]["args"] == [1]
    assert embed["errbacks"][0]["immutable"] is True
    assert embed["chain"][0]["args"] == [3]
    assert embed["chord"]["args"] == [4]


def test_argsrepr_is_bounded() -> None:
    env = build_task_message(
        name="t", task_id="i", args=["x" * 5000], kwargs={"k": list(range(999))}
    )
    assert len(env.headers["argsrepr"]) <= 1024
    assert len(env.headers["kwargsrepr"]) <= 1024


def test_saferepr_survives_a_broken_repr() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert "Broken" in saferepr(Broken())


def test_args_and_kwargs_types_are_checked_on_send() -> None:
    with pytest.raises(TypeError, match="list or tuple"):
        build_task_message(name="t", task_id="i", args="ab", kwargs={})
    with pytest.raises(TypeError, match="mapping"):
        build_task_message(name="t", task_id="i", args=[], kwargs=[])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"[1, 2]", "triple"),
        (b'{"a": 1}', "triple"),
        (b"[1, 2, 3, 4]", "triple"),
        (b'[{}, {}, {}]', "args must be a list"),
        (b"[[], [], {}]", "kwargs must be a mapping"),
        (b'"text"', "triple"),
    ],
)
def test_decode_body_rejects_malformed_bodies(body: bytes, match: str) -> None:
    env = Envelope(body, {"task": "t", "id": "i"}, "application/json")
    with pytest.raises(InvalidTaskError, match=match):
        decode_body(env, JSON_ONLY)


def test_decode_body_applies_accept_content() -> None:
    env = Envelope(b"\x80\x04K\x01.", {"task": "t"}, "application/x-python-serialize")
    with pytest.raises(ContentDisallowed):
        decode_body(env, JSON_ONLY)


def test_compression_round_trip(app: Celery) -> None:
    out, _, _ = app.prepare_message("vege.add", ("x" * 2000, "y"), {}, compression="zlib")
    env = out.envelope
    assert env.headers["compression"] == "application/x-gzip"
    assert b"xxxx" not in env.body
    assert decode_body(env, JSON_ONLY) == (["x" * 2000, "y"], {}, EMPTY_EMBED)


def test_task_compression_setting_applies() -> None:
    app = Celery("c", broker="memory://protocol-c", task_compression="gzip", set_as_current=False)
    out, _, _ = app.prepare_message("x", (1,), {})
    assert out.envelope.headers["compression"] == "application/x-gzip"
    assert decode_body(out.envelope, JSON_ONLY)[0] == [1]


def test_serializer_option(app: Celery) -> None:
    pytest.importorskip("msgpack")
    out, _, _ = _message(app, serializer="msgpack")
    assert out.envelope.content_type == "application/x-msgpack"
    assert decode_body(out.envelope, accepted_types(["msgpack"]))[0] == [2, 2]


V1_BODY = {
    "task": "vege.add",
    "id": "v1-id",
    "args": [1, 2],
    "kwargs": {"z": 3},
    "retries": 2,
    "eta": "2030-01-01T00:00:00",
    "expires": None,
    "taskset": "g-v1",
    "timelimit": [20, 10],
    "callbacks": None,
    "errbacks": None,
    "chord": None,
}


def test_upgrade_v1_builds_v2_headers_and_body() -> None:
    env = Envelope(json_dumps(V1_BODY), {}, "application/json", priority=3, reply_to="oid")
    v2 = upgrade_v1(env, JSON_ONLY)
    h = v2.headers
    assert list(h)[: len(V2_HEADER_KEYS)] == V2_HEADER_KEYS
    assert (h["task"], h["id"], h["retries"], h["group"]) == ("vege.add", "v1-id", 2, "g-v1")
    assert h["timelimit"] == [20, 10]
    assert parse_iso(h["eta"]) == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # naive means UTC
    assert (v2.priority, v2.reply_to, v2.correlation_id) == (3, "oid", "v1-id")
    assert decode_body(v2, JSON_ONLY) == ([1, 2], {"z": 3}, EMPTY_EMBED)


def test_decode_body_understands_a_v1_body_directly() -> None:
    env = Envelope(json_dumps(V1_BODY), {}, "application/json")
    assert decode_body(env, JSON_ONLY) == ([1, 2], {"z": 3}, EMPTY_EMBED)


def test_upgrade_v1_rejects_what_is_not_a_task() -> None:
    env = Envelope(json_dumps({"hello": "world"}), {}, "application/json")
    with pytest.raises(InvalidTaskError, match="protocol v1"):
        upgrade_v1(env, JSON_ONLY)


def test_parse_iso() -> None:
    assert parse_iso(None) is None
    assert parse_iso("") is None
    assert parse_iso("2024-01-01T00:00:00+01:00") == dt.datetime(
        2023, 12, 31, 23, 0, tzinfo=dt.UTC
    )
    assert parse_iso(0) == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(InvalidTaskError, match="ISO-8601"):
        parse_iso("tomorrow")
