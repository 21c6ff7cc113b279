"""Work-flows on a real worker: the tutorial's "Designing Work-flows" word for word, then
Celery's map/starmap/chunks, failures inside chains and chords, and large/empty chords."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from celeriac import ChordError, chain, chord, group, signature
from celeriac.canvas import Signature

from . import tasks
from .conftest import WorkerFactory, wait_until
from .tasks import add, errback, fail, hello, record, tsum

TIMEOUT = 30


@pytest.fixture(autouse=True)
def _worker(worker: WorkerFactory) -> None:
    worker()


# -- the tutorial, word for word ---------------------------------------------------------


def test_signatures() -> None:
    sig = hello.signature(("haha",), countdown=5)
    assert repr(sig) == "tests.e2e.tasks.hello('haha')"
    assert sig.options["countdown"] == 5
    assert repr(hello.s("haha")) == "tests.e2e.tasks.hello('haha')"
    s1 = hello.s("haha")
    res = s1.delay()
    assert res.get(timeout=TIMEOUT) == "hello haha"


def test_group() -> None:
    assert group(add.s(i, i) for i in range(10))().get(timeout=TIMEOUT) == [
        0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
    ]


def test_partial_group() -> None:
    g = group(add.s(i) for i in range(10))
    assert g(10).get(timeout=TIMEOUT) == [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def test_chain_three_forms() -> None:
    assert chain(add.s("chris", "kuan") | hello.s())().get(timeout=TIMEOUT) == "hello chriskuan"
    assert (add.s("chris", "kuan") | hello.s())().get(timeout=TIMEOUT) == "hello chriskuan"
    g = chain(add.s("kuan") | hello.s())
    assert g("chris").get(timeout=TIMEOUT) == "hello chriskuan"


def test_chord() -> None:
    assert chord((add.s(i, i) for i in range(10)), tsum.s())().get(timeout=TIMEOUT) == 90


def test_crawler_chain() -> None:
    c = tasks.get_url.s() | tasks.fetch_page.s() | tasks.parse_page.s() | tasks.store_page.s()
    res = c()
    assert res.get(timeout=TIMEOUT) == "stored celeriac from http://example.invalid/page"
    # Each step's result is reachable through .parent, as in Celery.
    assert res.parent is not None
    assert res.parent.get(timeout=TIMEOUT) == {
        "url": "http://example.invalid/page", "title": "celeriac",
    }


# -- Celery's map, starmap, chunks ----------------------------------------------------------


def test_map() -> None:
    assert tsum.map([range(10), range(100)]).delay().get(timeout=TIMEOUT) == [45, 4950]


def test_starmap() -> None:
    assert add.starmap(zip(range(10), range(10), strict=True)).delay().get(timeout=TIMEOUT) == [
        0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
    ]


def test_chunks() -> None:
    res = add.chunks(zip(range(100), range(100), strict=True), 10)()
    assert res.get(timeout=TIMEOUT) == [
        [2 * i for i in range(start, start + 10)] for start in range(0, 100, 10)
    ]


def test_signature_from_name() -> None:
    assert signature("tests.e2e.tasks.add", args=(2, 3)).delay().get(timeout=TIMEOUT) == 5


# -- failures ------------------------------------------------------------------------------


def _failing_chain(tmp_path: Path) -> tuple[Signature, str, str]:
    after = str(tmp_path / "after.txt")
    errors = str(tmp_path / "errors.txt")
    c = chain(add.s(1, 1), fail.si("value", "middle step broke"), record.si(after, "ran"))
    return c, after, errors


def test_chain_with_failing_middle_step_errback_on_the_step(tmp_path: Path) -> None:
    after = str(tmp_path / "after.txt")
    errors = str(tmp_path / "errors.txt")
    middle = fail.si("value", "middle step broke")
    middle.link_error(errback.s(errors))
    res = chain(add.s(1, 1), middle, record.si(after, "ran"))()
    with pytest.raises(ValueError, match="middle step broke"):
        res.get(timeout=TIMEOUT)
    failed_id = wait_until(lambda: tasks.lines(errors), what="the errback to run")
    assert res.parent is not None and failed_id == [res.parent.id]
    assert res.parent.failed()
    assert res.parent.parent is not None and res.parent.parent.get(timeout=TIMEOUT) == 2
    assert tasks.lines(after) == []  # the step after the failure never ran


def test_chain_link_error_runs_when_a_middle_step_fails(tmp_path: Path) -> None:
    """Celery attaches a chain's errback to every step, so any failing step calls it."""
    c, after, errors = _failing_chain(tmp_path)
    c.link_error(errback.s(errors))
    res = c()
    with pytest.raises(ValueError, match="middle step broke"):
        res.get(timeout=TIMEOUT)
    failed_id = wait_until(lambda: tasks.lines(errors), what="the chain's errback to run")
    assert res.parent is not None and failed_id == [res.parent.id]
    assert tasks.lines(after) == []


def test_chain_apply_async_link_error(tmp_path: Path) -> None:
    c, after, errors = _failing_chain(tmp_path)
    res = c.apply_async(link_error=errback.s(errors))
    with pytest.raises(ValueError, match="middle step broke"):
        res.get(timeout=TIMEOUT)
    failed_id = wait_until(lambda: tasks.lines(errors), what="the chain's errback to run")
    assert res.parent is not None and failed_id == [res.parent.id]
    assert tasks.lines(after) == []


def test_chord_with_failing_header_raises_chord_error(tmp_path: Path) -> None:
    body_ran = str(tmp_path / "body.txt")
    header = [add.s(1, 1), fail.si("value", "header broke"), add.s(2, 2)]
    res = chord(header, record.si(body_ran, "ran"))()
    with pytest.raises(ChordError, match="header broke"):
        res.get(timeout=TIMEOUT)
    assert tasks.lines(body_ran) == []


def test_chord_of_no_members() -> None:
    assert chord([], tsum.s())().get(timeout=TIMEOUT) == 0


def test_chord_of_1000_members() -> None:
    res = chord((add.s(i, i) for i in range(1000)), tsum.s())()
    assert res.get(timeout=90) == sum(2 * i for i in range(1000))


def test_group_in_chain() -> None:
    # A group followed by a task becomes a chord; a task before the group feeds each member.
    # cast: mypy resolves `sig | group` to dict.__ror__ (canvas defines no __ror__).
    head = cast(Signature, add.s(1, 1) | group(add.s(10), add.s(20), add.s(30)))
    assert (head | tsum.s())().get(timeout=TIMEOUT) == 12 + 22 + 32


def test_group_as_last_chain_step() -> None:
    res = cast(Signature, add.s(2, 3) | group(add.s(1), hello.s()))()
    assert res.get(timeout=TIMEOUT) == [6, "hello 5"]
