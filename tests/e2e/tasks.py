"""Tasks for the end-to-end suite, imported by real worker processes (``-A tests.e2e.tasks``).

The broker and result backend come from ``CELERIAC_BROKER_URL`` and
``CELERIAC_RESULT_BACKEND``, which celeriac's settings honour, so one module serves every
broker. ``CELERIAC_E2E_CONF`` may hold a JSON object of extra settings for one worker.
Tasks that must be observed from the test talk through files in the test's tmp_path
(append-only lines, atomic on Linux for short writes), never through fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from celeriac import Celery, SoftTimeLimitExceeded

app = Celery("tests.e2e.tasks")
# The tutorial's vege3.py routing: add to queue1, hello to queue2.
app.conf.task_routes = {
    "tests.e2e.tasks.add": {"queue": "queue1"},
    "tests.e2e.tasks.hello": {"queue": "queue2"},
}
_extra = os.environ.get("CELERIAC_E2E_CONF")
if _extra:
    app.conf.update(json.loads(_extra))

#: Longest a task waits for the test to release it (the test fails long before).
RELEASE_TIMEOUT = 60.0


class CustomError(Exception):
    """A user-defined exception type that must come back to the client as itself."""


class Boom:
    """Unpickling this creates a directory: proof that a refused pickle was never loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def append_line(path: str, line: str) -> None:
    """Append one short line in a single write(2), so concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def wait_for_file(path: str, timeout: float = RELEASE_TIMEOUT) -> bool:
    """Block until the test creates ``path``; False if it never does."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- the tutorial's vege.py -------------------------------------------------------------


@app.task
def add(x: Any, y: Any) -> Any:
    return x + y


@app.task
def hello(name: str) -> str:
    return f"hello {name}"


@app.task
def tsum(nums: Any) -> Any:
    return sum(nums)


# -- the tutorial's crawler chain ---------------------------------------------------------


@app.task
def get_url() -> str:
    return "http://example.invalid/page"


@app.task
def fetch_page(url: str) -> dict[str, str]:
    return {"url": url, "html": "<title>celeriac</title>"}


@app.task
def parse_page(page: dict[str, str]) -> dict[str, str]:
    html = page["html"]
    return {"url": page["url"], "title": html.split("<title>")[1].split("</title>")[0]}


@app.task
def store_page(info: dict[str, str]) -> str:
    return f"stored {info['title']} from {info['url']}"


# -- bookkeeping tasks ----------------------------------------------------------------------


@app.task
def record(path: str, token: str) -> str:
    append_line(path, token)
    return token


@app.task
def stamp(path: str, token: str) -> str:
    """Record when the task body started, for checks that it was not run early."""
    append_line(path, f"{token} {time.time()}")
    return token


@app.task
def noop() -> None:
    return None


@app.task(ignore_result=True)
def ignored(path: str) -> str:
    append_line(path, "ran")
    return "you will never see this"


@app.task(track_started=True)
def held(release: str, started: str | None = None) -> str:
    """Run until the test creates ``release``; announce the start in ``started``."""
    if started:
        append_line(started, str(os.getpid()))
    return "released" if wait_for_file(release) else "timed out"


@app.task(acks_late=True)
def late_held(log: str, release: str) -> str:
    """acks_late: a worker killed mid-run leaves the message to be run again elsewhere."""
    append_line(log, f"start {os.getpid()}")
    ok = wait_for_file(release)
    append_line(log, f"done {os.getpid()}")
    return "released" if ok else "timed out"


@app.task(acks_late=True)
def late_member(log: str, release: str, value: int) -> int:
    """A chord header member that waits to be released, so its worker can be killed."""
    append_line(log, f"start {value} {os.getpid()}")
    wait_for_file(release)
    return value


@app.task
def body_once(values: list[int], log: str) -> int:
    """A chord body that leaves one line per run: the test counts them."""
    append_line(log, "body")
    return sum(values)


@app.task
def sleeper(seconds: float, log: str | None = None) -> str:
    if log:
        append_line(log, "start")
    time.sleep(seconds)
    if log:
        append_line(log, "done")
    return "slept"


@app.task(rate_limit="5/s")
def limited(path: str, token: str) -> str:
    append_line(path, f"{token} {time.time()}")
    return token


# -- failures, retries, limits ---------------------------------------------------------------


@app.task
def fail(kind: str, message: str) -> None:
    errors: dict[str, type[Exception]] = {
        "value": ValueError,
        "key": KeyError,
        "custom": CustomError,
        "zero": ZeroDivisionError,
    }
    raise errors[kind](message)


@app.task(bind=True, max_retries=5)
def flaky(self: Any, path: str) -> int:
    """Fail twice, then succeed: returns how many retries it took."""
    append_line(path, f"attempt {self.request.retries}")
    if self.request.retries < 2:
        raise self.retry(countdown=0.1)
    return int(self.request.retries)


@app.task(bind=True, autoretry_for=(KeyError,), max_retries=2, retry_kwargs={"countdown": 0.1})
def always_key_error(self: Any, path: str) -> None:
    append_line(path, f"attempt {self.request.retries}")
    raise KeyError(f"attempt {self.request.retries}")


@app.task(soft_time_limit=0.5)
def soft_limited() -> str:
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "no soft limit"


@app.task(time_limit=1)
def hard_limited() -> str:
    time.sleep(30)
    return "not killed"


@app.task
def get_inside() -> str:
    try:
        add.delay(1, 1).get(timeout=5)
    except RuntimeError as exc:
        return f"RuntimeError: {exc}"
    return "get() did not raise"


@app.task
async def async_add(x: int, y: int) -> int:
    await asyncio.sleep(0.01)
    return x + y


@app.task
def errback(task_id: str, path: str) -> str:
    """An old-style errback: Celery calls it with the failed task's id first."""
    append_line(path, task_id)
    return task_id


@app.task
def pid() -> int:
    return os.getpid()


def lines(path: str | Path) -> list[str]:
    """The lines a task appended so far (none if the file is not there yet)."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
