"""Codecs: kombu's JSON type envelope, msgpack, the pickle guard, custom serializers."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import pickle
import uuid
from typing import Any

import pytest

from celeriac.exceptions import ContentDisallowed, DecodeError
from celeriac.serialization import (
    accepted_types,
    codec,
    compress,
    content_type_of,
    decompress,
    dumps,
    json_dumps,
    json_loads,
    loads,
    register_serializer,
)

SAMPLE: dict[str, Any] = {
    "aware": dt.datetime(2024, 1, 2, 3, 4, 5, 678, tzinfo=dt.UTC),
    "naive": dt.datetime(2024, 1, 2, 3, 4, 5),
    "date": dt.date(2024, 2, 29),
    "time": dt.time(23, 59, 1),
    "decimal": decimal.Decimal("1.10"),
    "uuid": uuid.UUID("6f1c1e2a-3b4c-4d5e-8f90-a1b2c3d4e5f6"),
    "text_bytes": b"abc",
    "binary": b"\xff\x00\x10",
    "nested": [{"price": decimal.Decimal("2.50"), "when": dt.date(2020, 1, 1)}],
    "plain": [1, "two", 3.0, None, True],
}


def test_json_round_trips_every_envelope_type() -> None:
    back = json_loads(json_dumps(SAMPLE))
    assert back == SAMPLE
    assert type(back["uuid"]) is uuid.UUID
    assert type(back["decimal"]) is decimal.Decimal
    assert type(back["aware"]) is dt.datetime and back["aware"].tzinfo is not None
    assert type(back["date"]) is dt.date
    assert type(back["time"]) is dt.time


def test_json_loads_accepts_text_as_well_as_bytes() -> None:
    assert json_loads(json_dumps(SAMPLE).decode()) == SAMPLE


def test_json_writes_kombus_envelope_shapes() -> None:
    """The exact forms kombu >= 5.3 writes, so Celery peers decode our messages."""
    doc = json.loads(json_dumps(SAMPLE))
    assert doc["aware"] == {
        "__type__": "datetime", "__value__": "2024-01-02T03:04:05.000678+00:00",
    }
    assert doc["date"] == {"__type__": "date", "__value__": "2024-02-29"}
    assert doc["time"] == {"__type__": "time", "__value__": "23:59:01"}
    assert doc["decimal"] == {"__type__": "decimal", "__value__": "1.10"}
    assert doc["uuid"] == {
        "__type__": "uuid",
        "__value__": {"hex": "6f1c1e2a3b4c4d5e8f90a1b2c3d4e5f6", "version": 4},
    }
    assert doc["text_bytes"] == {"__type__": "bytes", "__value__": "abc"}
    packed = base64.b64encode(b"\xff\x00\x10").decode()
    assert doc["binary"] == {"__type__": "base64", "__value__": packed}


def test_json_reads_what_kombu_writes() -> None:
    """A body written by Celery's json (stdlib json with spaces, kombu envelopes)."""
    u = uuid.uuid4()
    text = json.dumps(
        [
            [{"__type__": "uuid", "__value__": {"hex": u.hex, "version": 4}}],
            {"at": {"__type__": "datetime", "__value__": "2024-05-06T07:08:09+02:00"}},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        ]
    )
    args, kwargs, embed = json_loads(text.encode())
    assert args == [u]
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert kwargs["at"] == dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=plus_two)
    assert embed["chain"] is None


def test_json_uuid_as_plain_string_envelope_is_read_too() -> None:
    u = uuid.uuid4()
    assert json_loads(json.dumps({"__type__": "uuid", "__value__": str(u)})) == u


def test_json_leaves_lookalike_dicts_alone() -> None:
    unknown = {"__type__": "martian", "__value__": 1}
    assert json_loads(json.dumps(unknown)) == unknown
    extra = {"__type__": "datetime", "__value__": "2024-01-01T00:00:00", "more": 1}
    assert json_loads(json.dumps(extra)) == extra


def test_json_tuples_and_sets_become_lists() -> None:
    assert json_loads(json_dumps({"t": (1, 2), "s": {3}})) == {"t": [1, 2], "s": [3]}


def test_json_uses_dunder_json() -> None:
    class Money:
        def __json__(self) -> dict[str, Any]:
            return {"amount": "1.00", "currency": "EUR"}

    assert json_loads(json_dumps([Money()])) == [{"amount": "1.00", "currency": "EUR"}]


def test_dumps_names_the_serializer_for_unserializable_values() -> None:
    with pytest.raises(TypeError, match="with json"):
        dumps(object(), "json")


def test_dumps_returns_content_type_and_encoding() -> None:
    body, content_type, encoding = dumps([1], "json")
    assert (body, content_type, encoding) == (b"[1]", "application/json", "utf-8")
    assert content_type_of("json") == "application/json"
    assert codec("application/json").name == "json"


def test_msgpack_round_trip() -> None:
    pytest.importorskip("msgpack")
    body, content_type, encoding = dumps(SAMPLE, "msgpack")
    assert (content_type, encoding) == ("application/x-msgpack", "binary")
    back = loads(body, content_type, accepted_types(["msgpack"]))
    assert back == SAMPLE
    assert type(back["uuid"]) is uuid.UUID


def test_pickle_is_refused_unless_accepted() -> None:
    body, content_type, _ = dumps({"t": (1, 2)}, "pickle")
    assert content_type == "application/x-python-serialize"
    with pytest.raises(ContentDisallowed, match="accept_content"):
        loads(body, content_type, accepted_types(["json", "msgpack"]))
    assert loads(body, content_type, accepted_types(["json", "pickle"])) == {"t": (1, 2)}
    # the MIME type works in accept_content as well as the short name
    assert loads(body, content_type, accepted_types(["application/x-python-serialize"]))


def test_pickle_payload_never_runs_when_refused() -> None:
    class Trap:
        def __reduce__(self) -> Any:
            return (_trap, ())

    body = pickle.dumps(Trap())
    with pytest.raises(ContentDisallowed):
        loads(body, "application/x-python-serialize", accepted_types(["json"]))
    assert not _TRAPPED


_TRAPPED: list[bool] = []


def _trap() -> None:
    _TRAPPED.append(True)


def test_unknown_serializer_and_content_type() -> None:
    with pytest.raises(ContentDisallowed, match="known serializers"):
        dumps(1, "yaml")
    with pytest.raises(ContentDisallowed, match="application/x-yaml"):
        loads(b"1", "application/x-yaml")
    with pytest.raises(ContentDisallowed):
        accepted_types(["json", "yaml"])


def test_malformed_body_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="application/json"):
        loads(b"{not json", "application/json")


def test_register_serializer() -> None:
    register_serializer(
        "shout",
        lambda obj: json.dumps(obj).upper(),
        lambda data: json.loads(data.decode().lower()),
        "application/x-shout",
        "utf-8",
    )
    body, content_type, encoding = dumps(["hi"], "shout")
    assert (body, content_type, encoding) == (b'["HI"]', "application/x-shout", "utf-8")
    assert loads(body, content_type, accepted_types(["shout"])) == ["hi"]
    assert loads(body, "application/x-shout", accepted_types(["application/x-shout"])) == ["hi"]
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, accepted_types(["json"]))


def test_zlib_compression_uses_kombus_mime_header() -> None:
    data = json_dumps({"x": "y" * 1000})
    packed, header = compress(data, "zlib")
    assert header == "application/x-gzip"
    assert len(packed) < len(data)
    assert decompress(packed, header) == data
    assert decompress(packed, "zlib") == data
    with pytest.raises(ValueError, match="Unknown compression"):
        compress(data, "lz4")
    with pytest.raises(DecodeError):
        decompress(packed, "application/x-brotli")
