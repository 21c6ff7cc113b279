"""Delivery guarantees with real worker processes, on every broker: exactly-once under
several workers, recovery from a SIGKILLed worker, broker-kept countdowns, dead letters
for undecodable/unknown/unaccepted messages, and warm shutdown."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import orjson
import pytest

from celeriac import Celery, chord, states

from . import tasks
from .conftest import Broker, WorkerFactory, publish_raw, queue_size, wait_until


def test_many_workers_run_each_task_exactly_once(
    worker: WorkerFactory, app: Celery, tmp_path: Path
) -> None:
    workers = [worker(concurrency=1) for _ in range(3)]
    out = str(tmp_path / "ran.txt")
    with app.batch():
        results = [tasks.record.delay(out, str(i)) for i in range(200)]
    for r in results:
        r.get(timeout=60)
    ran = collections.Counter(tasks.lines(out))
    assert sorted(ran, key=int) == [str(i) for i in range(200)]
    assert [token for token, n in ran.items() if n > 1] == []
    assert queue_size(app, "celery") == 0
    busy = [w for w in workers if "succeeded in" in w.log()]
    assert len(busy) >= 2, "one worker took every task; the others never consumed"


def test_killed_worker_task_runs_on_another_worker(
    worker: WorkerFactory, app: Celery, tmp_path: Path
) -> None:
    """acks_late: SIGKILL the worker (and its pool) mid-task; another worker runs it."""
    log, release = str(tmp_path / "log.txt"), tmp_path / "release"
    doomed = worker(concurrency=1)
    r = tasks.late_held.delay(log, str(release))
    first = wait_until(lambda: tasks.lines(log), what="the task to start on the first worker")
    stats = (app.control.inspect([doomed.nodename], timeout=5).stats() or {})[doomed.nodename]
    assert stats["pid"] == doomed.pid
    assert sorted(stats["pool"]["processes"]) == sorted(doomed.note_children())
    assert first == [f"start {doomed.note_children()[0]}"]
    survivor = worker(concurrency=1)
    doomed.kill()
    # The broker notices the dead consumer and hands the message to the survivor.
    second = wait_until(
        lambda: tasks.lines(log)[1:], timeout=45, what="the task to start again elsewhere"
    )
    assert second[0].startswith("start ") and second[0] != first[0]
    release.touch()
    assert r.get(timeout=30) == "released"
    assert tasks.lines(log)[2:] == [second[0].replace("start", "done")]
    assert r.id in survivor.log()


def test_chord_body_runs_once_when_a_header_worker_is_killed(
    worker: WorkerFactory, app: Celery, tmp_path: Path
) -> None:
    """acks_late header members die with their worker; the body still runs exactly once."""
    log, body_log, release = str(tmp_path / "log"), str(tmp_path / "body"), tmp_path / "go"
    doomed = worker(concurrency=2)
    header = [tasks.late_member.s(log, str(release), i) for i in range(3)]
    res = chord(header, tasks.body_once.s(body_log))()
    wait_until(lambda: len(tasks.lines(log)) >= 2, what="two header members to start")
    doomed.kill()
    survivor = worker(concurrency=3)
    wait_until(
        lambda: len([x for x in tasks.lines(log) if x.startswith("start")]) >= 5,
        timeout=45,
        what="the survivor to take over the header members",
    )
    release.touch()
    assert res.get(timeout=30) == 0 + 1 + 2
    # A second body would come from a duplicate join; give it time to show up.
    time.sleep(1.0)
    assert tasks.lines(body_log) == ["body"]
    assert res.id in survivor.log()


def test_countdown_tasks_are_not_run_early(
    worker: WorkerFactory, app: Celery, tmp_path: Path
) -> None:
    worker()
    worker()
    out = str(tmp_path / "times.txt")
    sent: dict[str, float] = {}
    results = []
    for i, countdown in enumerate([0.5, 1.0, 1.5, 2.0, 1.0, 0.5]):
        token = f"{i}:{countdown}"
        sent[token] = time.time()
        results.append(tasks.stamp.apply_async((out, token), countdown=countdown))
    for r in results:
        r.get(timeout=30)
    for line in tasks.lines(out):
        token, ran_at = line.split()
        countdown = float(token.split(":")[1])
        early = sent[token] + countdown - float(ran_at)
        assert early <= 0.2, f"{token} ran {early:.2f} s before its countdown"


def _wait_dead(app: Celery, queue: str, n: int) -> None:
    wait_until(lambda: queue_size(app, f"{queue}.dead") >= n, what=f"{n} dead letters")
    assert queue_size(app, f"{queue}.dead") == n


def test_garbage_messages_are_dead_lettered(
    worker: WorkerFactory, app: Celery, broker: Broker
) -> None:
    w = worker()
    not_a_task = orjson.dumps(
        {
            "body": "e30=",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {"body_encoding": "base64", "delivery_tag": "x", "priority": 0},
        }
    )
    publish_raw(app, "celery", [b"not json", b'{"valid": "json, not a task"}', not_a_task], broker)
    assert tasks.add.delay(1, 2).get(timeout=20) == 3
    assert tasks.noop.delay().get(timeout=20) is None
    _wait_dead(app, "celery", 3)
    assert queue_size(app, "celery") == 0
    assert tasks.hello.delay("still here").get(timeout=20) == "hello still here"
    assert w.alive()
    reports = [line for line in w.log().splitlines() if "celery.dead" in line]
    assert len(reports) == 3, reports  # one error line per dead letter


def test_unregistered_task_is_dead_lettered_and_logged_once(
    worker: WorkerFactory, app: Celery
) -> None:
    w = worker()
    r = app.send_task("tests.e2e.tasks.no_such_task", args=(1,))
    _wait_dead(app, "celery", 1)
    assert tasks.add.delay(2, 2).get(timeout=20) == 4
    mentions = [line for line in w.log().splitlines() if "no_such_task" in line]
    assert len(mentions) == 1, mentions
    assert r.state == states.PENDING
    assert w.alive()


def test_pickle_is_refused_when_only_json_is_accepted(
    worker: WorkerFactory, app: Celery, tmp_path: Path
) -> None:
    w = worker()
    marker = tmp_path / "unpickled"
    out = str(tmp_path / "ran.txt")
    r = tasks.record.apply_async((tasks.Boom(str(marker)), "x"), serializer="pickle")
    _wait_dead(app, "celery", 1)
    assert tasks.record.delay(out, "json is fine").get(timeout=20) == "json is fine"
    assert not marker.exists(), "the worker unpickled a message it must refuse"
    assert tasks.lines(out) == ["json is fine"]
    assert r.state == states.PENDING
    assert w.alive()


@pytest.mark.parametrize("how", ["SIGTERM to the worker", "Ctrl-C to its process group"])
def test_warm_shutdown_finishes_the_running_task(
    worker: WorkerFactory, app: Celery, tmp_path: Path, how: str
) -> None:
    w = worker()
    log = str(tmp_path / "log.txt")
    r = tasks.sleeper.delay(1.0, log)
    wait_until(lambda: tasks.lines(log), what="the task to start")
    if how.startswith("Ctrl-C"):
        # A terminal's Ctrl-C reaches the pool children too; as in Celery they ignore it.
        # The group is the session this test started the worker in.
        os.killpg(w.pid, signal.SIGINT)
    else:
        w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0, w.log()[-3000:]
    assert tasks.lines(log) == ["start", "done"]
    assert r.get(timeout=10) == "slept"
    assert f"{w.nodename} stopped." in w.log()


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_warm_shutdown_other_pools(
    worker: WorkerFactory, app: Celery, tmp_path: Path, pool: str
) -> None:
    w = worker(pool=pool)
    log = str(tmp_path / "log.txt")
    r = tasks.sleeper.delay(1.0, log)
    wait_until(lambda: tasks.lines(log), what="the task to start")
    os.kill(w.pid, signal.SIGTERM)
    assert w.proc.wait(30) == 0, w.log()[-3000:]
    assert r.get(timeout=10) == "slept"
