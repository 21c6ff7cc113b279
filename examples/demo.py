"""A guided run of the tutorial against a real worker process (``bash scripts/demo.sh``).

It uses the embedded SQLite broker (a fresh file in a temporary directory, which also
holds the results), starts ``python -m celeriac -A vege worker -Q celery,queue1,queue2
-c 2 -l info``, runs the tutorial's examples one by one, printing each call and what came
back, and always stops the worker at the end. Exit status 0 means every example gave
the expected answer.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WAIT = 30.0  # seconds any single example may take before the demo gives up

_tty = sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _c(code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if _tty else text


def section(title: str) -> None:
    print()
    print(_c("1;36", f"== {title} " + "=" * max(0, 66 - len(title))))


def note(text: str) -> None:
    print(_c("2", f"# {text}"))


def show(code: str, value: Any, expected: Any = ..., extra: str = "") -> Any:
    """Print ``>>> code`` and its value; a value other than ``expected`` stops the demo."""
    print(_c("1", ">>> ") + code)
    line = repr(value)
    print(_c("32", line) + (_c("2", f"    # {extra}") if extra else ""))
    if expected is not ... and value != expected:
        raise DemoError(f"{code} returned {value!r}, expected {expected!r}")
    return value


def raises(code: str, fn: Callable[[], Any], exc_type: type[BaseException]) -> BaseException:
    """Run ``fn``, which must raise ``exc_type``; print what was raised."""
    print(_c("1", ">>> ") + code)
    try:
        value = fn()
    except exc_type as exc:
        print(_c("33", f"{type(exc).__name__}: {exc}"))
        return exc
    raise DemoError(f"{code} returned {value!r}; expected {exc_type.__name__}")


class DemoError(Exception):
    """An example gave a wrong answer."""


class Worker:
    """The worker subprocess, its log file, and a clean stop."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.argv = [
            sys.executable, "-m", "celeriac", "-A", "vege", "worker",
            "-Q", "celery,queue1,queue2", "-c", "2", "-l", "info",
        ]  # fmt: skip
        self.log_path = workdir / "worker.log"
        self.workdir = workdir
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, app: Any, timeout: float) -> float:
        """Poll with ``ping`` until the worker answers; fail early if it died."""
        assert self.proc is not None
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise DemoError(f"the worker exited with status {self.proc.returncode}")
            if app.control.ping(timeout=0.5):
                return time.monotonic() - start
        raise DemoError(f"the worker did not answer a ping within {timeout:.0f} s")

    def stop(self) -> str | None:
        """SIGTERM (a warm shutdown, as in Celery), then wait; SIGKILL only if it hangs.

        Returns what happened, for the report; raises DemoError if the exit was unclean.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return f"the worker had already exited, status {self.proc.returncode}"
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise DemoError("the worker did not stop within 30 s of SIGTERM; killed") from None
        if code != 0:
            raise DemoError(f"the worker exited with status {code} after SIGTERM")
        return "worker stopped by SIGTERM (warm shutdown), exit status 0"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no worker log)"
        return "\n".join(text.splitlines()[-lines:])


def cli(*args: str, env: dict[str, str], cwd: Path) -> str:
    """Run ``celeriac ARGS`` the way a user would and return what it printed."""
    argv = [sys.executable, "-m", "celeriac", *args]
    print(_c("1", "$ ") + "celeriac " + " ".join(args))
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT, check=False
    )
    out = (done.stdout + done.stderr).rstrip()
    print(_c("32", out))
    if done.returncode != 0:
        raise DemoError(f"`celeriac {' '.join(args)}` exited with status {done.returncode}")
    return out


def tour(env: dict[str, str], workdir: Path) -> None:
    """The tutorial's examples, in its order."""
    from vege import add, app, fail, hello, tsum, where

    from celeriac import ChordError, chain, chord, group

    section("Calling tasks")
    show("add.delay(2, 3).get()", add.delay(2, 3).get(timeout=WAIT), 5)
    show("hello.delay('world').get()", hello.delay("world").get(timeout=WAIT), "hello world")
    show("add.apply_async((2, 2)).get()", add.apply_async((2, 2)).get(timeout=WAIT), 4)

    section("Signatures")
    sig = hello.signature(("haha",), countdown=5)
    show("hello.signature(('haha',), countdown=5)", sig)
    started = time.monotonic()
    res = sig.delay()
    value = res.get(timeout=WAIT)
    waited = time.monotonic() - started
    show("_.delay().get()", value, "hello haha", f"after {waited:.1f} s: the broker held it")
    if waited < 4.9:
        raise DemoError(f"a countdown=5 task ran after only {waited:.2f} s")
    show("hello.s('haha')  # shortcut", hello.s("haha"))
    s1 = hello.s("haha")
    show("s1 = hello.s('haha'); s1.delay().get()", s1.delay().get(timeout=WAIT), "hello haha")
    note("a partial signature: the missing arguments come when it is called")
    partial = add.s(2)
    show("add.s(2).delay(3).get()", partial.delay(3).get(timeout=WAIT), 5)

    section("Routing: which queue did each call go to?")
    note("`where` returns self.request.delivery_info's routing key, as the worker saw it")
    r = where.delay("no route").get(timeout=WAIT)
    show("where.delay('no route').get()['queue']", r["queue"], "celery", "the default queue")
    r = where.apply_async(("explicit",), queue="queue1").get(timeout=WAIT)
    show("where.apply_async(('explicit',), queue='queue1').get()['queue']", r["queue"], "queue1")
    r = where.s("signature").set(queue="queue2").delay().get(timeout=WAIT)
    show("where.s('signature').set(queue='queue2').delay().get()['queue']", r["queue"], "queue2")
    note("task_routes, as in vege3.py (routing happens where the task is sent)")
    app.conf.task_routes = {"vege.where": {"queue": "queue2"}}
    try:
        print(_c("1", ">>> ") + "app.conf.task_routes = " + repr(app.conf.task_routes))
        r = where.delay("routed").get(timeout=WAIT)
        show("where.delay('routed').get()['queue']", r["queue"], "queue2")
        r = where.apply_async(("urgent",), priority=9).get(timeout=WAIT)
        show(
            "where.apply_async(('urgent',), priority=9).get()",
            {k: r[k] for k in ("queue", "priority")},
            {"queue": "queue2", "priority": 9},
            "priorities: 0-9, higher runs first",
        )
    finally:
        app.conf.task_routes = None

    section("Groups")
    show(
        "group(add.s(i, i) for i in range(10))().get()",
        group(add.s(i, i) for i in range(10))().get(timeout=WAIT),
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18],
    )
    g = group(add.s(i) for i in range(10))
    show(
        "g = group(add.s(i) for i in range(10)); g(10).get()   # partial group",
        g(10).get(timeout=WAIT),
        [10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    )
    gres = group(add.s(1, 1), add.s(2, 2))()
    gres.get(timeout=WAIT)
    show(
        "res = group(add.s(1, 1), add.s(2, 2))(); res.ready(), res.completed_count()",
        (gres.ready(), gres.completed_count()),
        (True, 2),
    )

    section("Chains")
    show(
        "chain(add.s('chris', 'kuan') | hello.s())().get()",
        chain(add.s("chris", "kuan") | hello.s())().get(timeout=WAIT),
        "hello chriskuan",
    )
    show(
        "(add.s('chris', 'kuan') | hello.s())().get()",
        (add.s("chris", "kuan") | hello.s())().get(timeout=WAIT),
        "hello chriskuan",
    )
    c = chain(add.s("kuan") | hello.s())
    show(
        "g = chain(add.s('kuan') | hello.s()); g('chris').get()",
        c("chris").get(timeout=WAIT),
        "hello chriskuan",
    )
    res = (add.s(1, 2) | add.s(3) | add.s(4))()
    res.get(timeout=WAIT)
    show(
        "res = (add.s(1, 2) | add.s(3) | add.s(4))(); res.get(), res.parent.get()",
        (res.get(timeout=WAIT), res.parent.get(timeout=WAIT)),
        (10, 6),
    )
    note("an error stops the chain; the later steps' results fail with the same error")
    bad = (add.s("a", "b") | fail.s() | hello.s())()
    raises("(add.s('a', 'b') | fail.s() | hello.s())().get()", lambda: bad.get(WAIT), ValueError)

    section("Chords: a group with a callback")
    show(
        "chord(add.s(i, i) for i in range(10))(tsum.s()).get()",
        chord(add.s(i, i) for i in range(10))(tsum.s()).get(timeout=WAIT),
        90,
    )
    show(
        "chord([add.s(1, 1), add.s(2, 2)], tsum.s()).delay().get()",
        chord([add.s(1, 1), add.s(2, 2)], tsum.s()).delay().get(timeout=WAIT),
        6,
    )
    broken = chord([add.s(1, 1), fail.s("header failed")], tsum.s())()
    raises("chord([add.s(1, 1), fail.s('header failed')], tsum.s())().get()",
           lambda: broken.get(WAIT), ChordError)  # fmt: skip

    section("map, starmap and chunks")
    show(
        "hello.map(['a', 'b', 'c']).delay().get()",
        hello.map(["a", "b", "c"]).delay().get(timeout=WAIT),
        ["hello a", "hello b", "hello c"],
    )
    show(
        "add.starmap([(2, 2), (4, 4), (8, 8)]).delay().get()",
        add.starmap([(2, 2), (4, 4), (8, 8)]).delay().get(timeout=WAIT),
        [4, 8, 16],
    )
    show(
        "add.chunks(zip(range(10), range(10)), 3)().get()",
        add.chunks(zip(range(10), range(10), strict=True), 3)().get(timeout=WAIT),
        [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]],
    )

    section("Remote control")
    replies = app.control.ping(timeout=1.0)
    show("app.control.ping()", replies)
    if not replies:
        raise DemoError("no worker answered app.control.ping()")
    queues = app.control.inspect(timeout=1.0).active_queues() or {}
    names = {node: sorted(q["name"] for q in qs) for node, qs in queues.items()}
    show("{node: names of app.control.inspect().active_queues()}", names)
    cli("-A", "vege", "status", env=env, cwd=workdir)
    cli("-A", "vege", "inspect", "ping", env=env, cwd=workdir)
    cli("-A", "vege", "inspect", "registered", env=env, cwd=workdir)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="celeriac-demo-"))
    db = workdir / "celeriac.sqlite"
    broker = f"sqlite:///{db}"
    # Set before `import vege`: the app reads the broker URL from the environment.
    os.environ["CELERIAC_BROKER_URL"] = broker
    os.environ.pop("CELERY_BROKER_URL", None)
    os.environ.pop("CELERIAC_RESULT_BACKEND", None)
    os.environ.pop("CELERY_RESULT_BACKEND", None)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    sys.path.insert(0, str(HERE))

    print(_c("1", "celeriac demo: the tutorial's examples against a real worker"))
    print(f"broker and results: {broker}")
    worker = Worker(workdir, env)
    ok = False
    try:
        from vege import app

        worker.start()
        assert worker.proc is not None
        print("worker: " + " ".join(["celeriac", *worker.argv[3:]]) + f"   (pid {worker.proc.pid})")
        took = worker.wait_ready(app, timeout=60.0)
        print(f"worker ready after {took:.1f} s; its log: {worker.log_path}")
        tour(env, workdir)
        ok = True
    except Exception as exc:
        print()
        print(_c("1;31", f"FAILED: {type(exc).__name__}: {exc}"))
        print(_c("2", "---- last lines of the worker log ----"))
        print(worker.log_tail())
    finally:
        try:
            what = worker.stop()
            if what is not None:
                section("Stopping")
                print(what)
        except DemoError as exc:
            print(_c("1;31", f"FAILED: {exc}"))
            ok = False
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
        print()
        print(_c("1;32", "All examples gave the expected results."))
        return 0
    print(f"(kept {workdir} for inspection)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
