"""Signatures and workflows as data: building, composing, freezing and the JSON round trip."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import Celery, Signature, chain, chord, chunks, group, signature, xmap, xstarmap
from celeriac.result import AsyncResult, GroupResult
from celeriac.serialization import json_dumps, json_loads
from celeriac.task import Task

SIG_KEYS = {"task", "args", "kwargs", "options", "subtask_type", "immutable"}


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("vege", broker="memory://canvas", backend="memory://canvas", set_as_current=False)

    @app.task(name="vege.add")
    def add(x: Any, y: Any = 0, z: Any = 0) -> Any:
        return x + y + z

    @app.task(name="vege.hello")
    def hello(name: str) -> str:
        return f"hello {name}"

    @app.task(name="vege.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    yield app


@pytest.fixture
def add(app: Celery) -> Task[..., Any]:
    return app.tasks["vege.add"]


@pytest.fixture
def hello(app: Celery) -> Task[..., Any]:
    return app.tasks["vege.hello"]


def wire(sig: Signature, app: Celery) -> Signature:
    """Send a signature through JSON, as a message field would, and rebuild it."""
    return signature(json_loads(json_dumps(sig)), app=app)


# -- reprs as in the tutorial --------------------------------------------------------


def test_signature_reprs_match_the_tutorial(hello: Task[..., Any], add: Task[..., Any]) -> None:
    assert repr(hello.signature(("haha",), countdown=5)) == "vege.hello('haha')"
    assert repr(hello.s("haha")) == "vege.hello('haha')"
    assert repr(add.s(2, y="a")) == "vege.add(2, y='a')"
    assert repr(add.si(1)) == "vege.add(1)!"
    assert repr(add.s(2) | hello.s()) == "vege.add(2) | vege.hello()"
    assert repr(group(add.s(1), add.s(2))) == "group([vege.add(1), vege.add(2)])"
    assert repr(chord([add.s(1)], hello.s())) == "chord([vege.add(1)], vege.hello())"
    assert repr(add.map([1, 2])) == "[vege.add(x) for x in [1, 2]]"
    assert repr(add.starmap([(1, 2)])) == "[vege.add(*x) for x in [[1, 2]]]"
    assert repr(add.chunks([(1, 2)], 1)) == "vege.add.chunks([[1, 2]], 1)"


def test_signature_options_from_signature_call(hello: Task[..., Any]) -> None:
    sig = hello.signature(("haha",), countdown=5)
    assert sig.options == {"countdown": 5}
    assert sig.args == ("haha",)
    assert sig.task == sig.name == "vege.hello"
    assert sig.type is hello


# -- the Celery JSON shape --------------------------------------------------------------


def test_signature_json_shape(add: Task[..., Any]) -> None:
    doc = json.loads(json_dumps(add.s(1, y=2).set(queue="q1")))
    assert doc == {
        "task": "vege.add",
        "args": [1],
        "kwargs": {"y": 2},
        "options": {"queue": "q1"},
        "subtask_type": None,
        "immutable": False,
    }


def test_chain_json_shape(add: Task[..., Any], hello: Task[..., Any]) -> None:
    doc = json.loads(json_dumps(add.s(2) | hello.s()))
    assert set(doc) == SIG_KEYS
    assert (doc["task"], doc["subtask_type"]) == ("celery.chain", "chain")
    assert [t["task"] for t in doc["kwargs"]["tasks"]] == ["vege.add", "vege.hello"]
    assert all(set(t) == SIG_KEYS for t in doc["kwargs"]["tasks"])


def test_group_json_shape(add: Task[..., Any]) -> None:
    doc = json.loads(json_dumps(group(add.s(1), add.s(2))))
    assert (doc["task"], doc["subtask_type"]) == ("celery.group", "group")
    assert [t["args"] for t in doc["kwargs"]["tasks"]] == [[1], [2]]


def test_chord_json_shape(add: Task[..., Any], hello: Task[..., Any]) -> None:
    doc = json.loads(json_dumps(chord([add.s(1), add.s(2)], hello.s())))
    assert (doc["task"], doc["subtask_type"]) == ("celery.chord", "chord")
    header, body = doc["kwargs"]["header"], doc["kwargs"]["body"]
    assert (header["task"], header["subtask_type"]) == ("celery.group", "group")
    assert [t["args"] for t in header["kwargs"]["tasks"]] == [[1], [2]]
    assert body["task"] == "vege.hello"


def test_map_starmap_chunks_json_shape(add: Task[..., Any]) -> None:
    m = json.loads(json_dumps(add.map([1, 2])))
    assert (m["task"], m["subtask_type"], m["kwargs"]["it"]) == ("celery.map", "xmap", [1, 2])
    assert m["kwargs"]["task"]["task"] == "vege.add"
    s = json.loads(json_dumps(add.starmap([(1, 2)])))
    assert (s["task"], s["subtask_type"], s["kwargs"]["it"]) == (
        "celery.starmap", "xstarmap", [[1, 2]],
    )
    c = json.loads(json_dumps(add.chunks([(1, 2), (3, 4)], 1)))
    assert (c["task"], c["subtask_type"], c["kwargs"]["n"]) == ("celery.chunks", "chunks", 1)
    assert c["kwargs"]["it"] == [[1, 2], [3, 4]]


# -- the round trip rebuilds the same types --------------------------------------------


def _cases(app: Celery) -> dict[str, Signature]:
    add, hello, tsum = app.tasks["vege.add"], app.tasks["vege.hello"], app.tasks["vege.tsum"]
    g = group(add.s(i, i) for i in range(3))
    return {
        "signature": add.s(1, y=2).set(countdown=3, queue="q"),
        "immutable": add.si(1, 2),
        "chain": add.s(2) | hello.s(),
        "group": g,
        "chord": chord(g, tsum.s()),
        "xmap": add.map([1, 2, 3]),
        "xstarmap": add.starmap([(1, 2), (3, 4)]),
        "chunks": add.chunks(zip(range(10), range(10), strict=True), 3),
        "chain_with_group": chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s()),
        "group_of_chains": group(add.s(1) | add.s(2), add.s(3) | add.s(4)),
        "chord_in_chain": chain(add.s(1, 1), chord([add.s(1), add.s(2)], tsum.s())),
        "chain_in_chord_body": chord([add.s(1, 1)], tsum.s() | add.s(5)),
        "linked": add.s(1).set(link=[hello.s()], link_error=[hello.si("oops")]),
    }


CASE_NAMES = [
    "signature", "immutable", "chain", "group", "chord", "xmap", "xstarmap", "chunks",
    "chain_with_group", "group_of_chains", "chord_in_chain", "chain_in_chord_body", "linked",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_json_round_trip_keeps_type_and_content(app: Celery, name: str) -> None:
    cases = _cases(app)
    assert sorted(cases) == sorted(CASE_NAMES)
    sig = cases[name]
    back = wire(sig, app)
    assert type(back) is type(sig)
    assert json.loads(json_dumps(back)) == json.loads(json_dumps(sig))
    if name != "linked":  # options stay plain JSON (links are rebuilt when used)
        assert back == sig
    assert repr(back) == repr(sig)
    assert json_dumps(wire(back, app)) == json_dumps(sig)  # and again


def test_round_trip_rebuilds_nested_types(app: Celery) -> None:
    cases = _cases(app)
    c = wire(cases["chain_with_group"], app)
    assert isinstance(c, chain)
    assert [type(t) for t in c.tasks] == [Signature, group, Signature]
    assert isinstance(c.tasks[1], group) and all(type(t) is Signature for t in c.tasks[1].tasks)

    g = wire(cases["group_of_chains"], app)
    assert isinstance(g, group) and all(isinstance(t, chain) for t in g.tasks)

    cc = wire(cases["chord_in_chain"], app)
    assert isinstance(cc, chain)
    inner = cc.tasks[1]
    assert isinstance(inner, chord)
    assert isinstance(inner.header, group) and len(inner.header.tasks) == 2
    assert type(inner.body) is Signature and inner.body.task == "vege.tsum"

    body_chain = wire(cases["chain_in_chord_body"], app)
    assert isinstance(body_chain, chord) and isinstance(body_chain.body, chain)

    ck = wire(cases["chunks"], app)
    assert isinstance(ck, chunks) and ck.kwargs["n"] == 3
    assert isinstance(wire(cases["xmap"], app), xmap)
    assert isinstance(wire(cases["xstarmap"], app), xstarmap)


def test_round_trip_keeps_links_as_signatures(app: Celery) -> None:
    back = wire(_cases(app)["linked"], app)
    link = signature(back.options["link"][0], app=app)
    errback = signature(back.options["link_error"][0], app=app)
    assert link.task == "vege.hello"
    assert errback.immutable and errback.args == ("oops",)


def test_rebuilt_signature_resolves_its_task(app: Celery, add: Task[..., Any]) -> None:
    back = wire(add.s(1), app)
    assert back.type is add
    assert back(2) == 3


def test_signature_from_name_and_app_signature(app: Celery, add: Task[..., Any]) -> None:
    sig = signature("vege.add", args=(1,), kwargs={"y": 2}, app=app)
    assert repr(sig) == "vege.add(1, y=2)"
    assert sig.type is add
    assert app.signature("vege.add", (1,), countdown=3).options == {"countdown": 3}
    assert signature(sig) is sig


def test_pickle_and_deepcopy(app: Celery) -> None:
    for sig in _cases(app).values():
        assert pickle.loads(pickle.dumps(sig)) == sig
        clone = copy.deepcopy(sig)
        assert clone == sig and clone is not sig


# -- partials, clone, set, link ----------------------------------------------------------


def test_partial_args_are_prepended_and_kwargs_merged(add: Task[..., Any]) -> None:
    sig = add.s(2, y=1)
    clone = sig.clone(args=(5,), kwargs={"z": 3}, countdown=1)
    assert clone.args == (5, 2)
    assert clone.kwargs == {"y": 1, "z": 3}
    assert clone.options == {"countdown": 1}
    assert (sig.args, sig.kwargs, sig.options) == ((2,), {"y": 1}, {})  # untouched
    assert sig.clone(kwargs={"y": 9}).kwargs == {"y": 9}
    assert add.s(2, z=1)(5) == 8  # calling a signature applies the partial too


def test_immutable_signature_ignores_partial_args(add: Task[..., Any]) -> None:
    sig = add.si(1, 2)
    assert sig.immutable
    clone = sig.clone(args=(9,), kwargs={"z": 1})
    assert (clone.args, clone.kwargs, clone.immutable) == ((1, 2), {}, True)


def test_set_updates_options_in_place(add: Task[..., Any]) -> None:
    sig = add.s(1)
    assert sig.set(queue="q", countdown=5) is sig
    assert sig.options == {"queue": "q", "countdown": 5}
    sig.set(immutable=True)
    assert sig.immutable
    sig.set_immutable(False)
    assert not sig.immutable


def test_link_and_link_error(add: Task[..., Any], hello: Task[..., Any]) -> None:
    sig = add.s(1)
    cb = sig.link(hello.s())
    eb = sig.link_error(hello.si("err"))
    assert isinstance(cb, Signature) and cb.task == "vege.hello"
    assert [s.task for s in sig.options["link"]] == ["vege.hello"]
    assert sig.options["link_error"][0].immutable
    assert eb.args == ("err",)
    sig.on_error(hello.si("again"))
    assert len(sig.options["link_error"]) == 2


# -- composition ------------------------------------------------------------------------


def test_pipe_builds_a_flat_chain(add: Task[..., Any], hello: Task[..., Any]) -> None:
    c = add.s(1) | add.s(2) | hello.s()
    assert isinstance(c, chain)
    assert [t.task for t in c.tasks] == ["vege.add", "vege.add", "vege.hello"]
    longer = c | (add.s(3) | add.s(4))
    assert isinstance(longer, chain) and len(longer.tasks) == 5
    assert len(chain(add.s(1), chain(add.s(2), add.s(3))).tasks) == 3
    assert len(chain([add.s(1), add.s(2)]).tasks) == 2  # one iterable works too


def test_chain_with_options_is_not_flattened(add: Task[..., Any]) -> None:
    inner = chain(add.s(2), add.s(3), queue="other")
    outer = chain(add.s(1), inner)
    assert len(outer.tasks) == 2 and isinstance(outer.tasks[1], chain)


def test_group_pipe_task_is_a_chord(add: Task[..., Any], hello: Task[..., Any]) -> None:
    g = group(add.s(1), add.s(2))
    c = g | hello.s()
    assert isinstance(c, chord)
    assert [t.args for t in c.header.tasks] == [(1,), (2,)]
    assert c.body.task == "vege.hello"
    assert isinstance(g | group(add.s(3)), chain)
    assert isinstance(hello.s() | g, chain)


def test_group_accepts_a_generator(add: Task[..., Any]) -> None:
    g = group(add.s(i, i) for i in range(4))
    assert [t.args for t in g.tasks] == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_chord_header_may_be_a_group_or_one_signature(
    add: Task[..., Any], hello: Task[..., Any]
) -> None:
    from_group = chord(group(add.s(1), add.s(2)), hello.s())
    assert len(from_group.header.tasks) == 2
    single = chord(add.s(1), hello.s())
    assert [t.args for t in single.header.tasks] == [(1,)]


def test_chord_without_body_says_how_to_add_one(add: Task[..., Any]) -> None:
    with pytest.raises(ValueError, match="has no body"):
        _ = chord([add.s(1)]).body


def test_chunks_group(add: Task[..., Any]) -> None:
    ck = add.chunks(zip(range(10), range(10), strict=True), 3)
    assert isinstance(ck, chunks)
    g = ck.group()
    assert isinstance(g, group)
    assert [type(t) for t in g.tasks] == [xstarmap] * 4
    assert g.tasks[0].kwargs["it"] == [[0, 0], [1, 1], [2, 2]]
    assert g.tasks[-1].kwargs["it"] == [[9, 9]]
    with pytest.raises(ValueError, match="chunk size"):
        add.chunks([(1, 1)], 0)


# -- freezing --------------------------------------------------------------------------


def test_freeze_signature_gives_a_stable_id(add: Task[..., Any]) -> None:
    sig = add.s(1)
    res = sig.freeze()
    assert isinstance(res, AsyncResult)
    assert sig.freeze().id == res.id == sig.id
    assert add.s(1).freeze("chosen").id == "chosen"


def test_freeze_group(add: Task[..., Any]) -> None:
    g = group(add.s(1), add.s(2))
    res = g.freeze()
    assert isinstance(res, GroupResult)
    assert res.id == g.id
    assert [r.id for r in res.results] == [t.id for t in g.tasks]
    assert [t.options["group_id"] for t in g.tasks] == [res.id, res.id]
    assert [t.options["group_index"] for t in g.tasks] == [0, 1]
    again = g.freeze()
    assert again.id == res.id and again.results == res.results


def test_freeze_chain_gives_stable_ids_and_parents(
    add: Task[..., Any], hello: Task[..., Any]
) -> None:
    c = chain(add.s(1), add.s(2), hello.s())
    res = c.freeze()
    assert res.id == c.tasks[-1].id
    assert c.freeze().id == res.id
    assert res.parent is not None and res.parent.id == c.tasks[1].id
    assert res.parent.parent.id == c.tasks[0].id
    assert (add.s(1) | add.s(2)).freeze("last").id == "last"


def test_freeze_chain_ending_in_a_group_makes_a_chord(app: Celery, add: Task[..., Any]) -> None:
    c = chain(add.s(1), group(add.s(1), add.s(2)), app.tasks["vege.tsum"].s())
    res = c.freeze()
    assert c.freeze().id == res.id
    assert isinstance(res.parent, GroupResult)  # the chord's header
    header = c.tasks[1]
    assert isinstance(header, group)
    assert [r.id for r in res.parent.results] == [t.id for t in header.tasks]
    assert res.parent.parent.id == c.tasks[0].id


def test_freeze_chord(add: Task[..., Any], hello: Task[..., Any]) -> None:
    c = chord([add.s(1), add.s(2)], hello.s())
    res = c.freeze()
    assert res.id == c.body.id
    assert isinstance(res.parent, GroupResult)
    assert [r.id for r in res.parent.results] == [t.id for t in c.header.tasks]
    assert c.freeze().id == res.id


def test_frozen_chain_keeps_its_ids_through_the_wire(app: Celery, add: Task[..., Any]) -> None:
    c = add.s(1) | add.s(2)
    res = c.freeze()
    back = wire(c, app)
    assert isinstance(back, chain)
    assert back.tasks[-1].id == res.id


def test_workflows_built_without_app_use_their_tasks_app(
    app: Celery, add: Task[..., Any], hello: Task[..., Any]
) -> None:
    """The fixture's app is not the current app; workflows must not fall back to it."""
    assert group(add.s(1), add.s(2)).app is app
    assert group(add.s(i) for i in range(2)).app is app
    assert chain(add.s(1), hello.s()).app is app
    assert (add.s(1) | hello.s()).app is app
    assert chord([add.s(1)], hello.s()).app is app
    assert (group(add.s(1)) | hello.s()).app is app
    assert xmap(add.s(), [1]).app is app
    assert chunks(add.s(), [(1, 1)], 1).app is app
    assert chunks(add.s(), [(1, 1)], 1).group().app is app
    assert group(add.s(1)).freeze().app is app
