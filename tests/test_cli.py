"""The ``celeriac`` command line: help texts, app loading, argument parsing, pidfiles.

The worker command is checked up to the point where it builds ``WorkController``: a small
recording class stands in for the worker (no broker is involved), and a detached run is
checked in a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from celeriac.app import Celery
from celeriac.cli import AppLoadError, _hoist, find_app, main
from celeriac.cli import worker as worker_cli
from celeriac.cli.worker import Pidfile, default_nodename, host_format, node_format

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str, obj: Any = None, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), obj=obj, input=input)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A cwd holding user modules, with a unique name prefix so sys.modules never clashes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    prefix = f"proj_{uuid.uuid4().hex[:8]}"
    yield tmp_path, prefix
    for name in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[name]


def write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


APP_SOURCE = """
    from celeriac import Celery
    {name} = Celery("{label}", broker="memory://", set_as_current=False)
"""


# -- help, version ------------------------------------------------------------------------


def test_main_help_lists_subcommands_and_global_options() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for word in (
        "worker",
        "call",
        "result",
        "purge",
        "shell",
        "inspect",
        "control",
        "status",
        "-A, --app",
        "-b, --broker",
        "--result-backend",
        "--workdir",
        "--config",
    ):
        assert word in result.output


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (
            "worker",
            [
                "--loglevel",
                "--queues",
                "--exclude-queues",
                "--hostname",
                "--concurrency",
                "--pool",
                "--detach",
                "--pidfile",
                "--logfile",
                "--autoscale",
                "--beat",
                "--task-events",
                "--prefetch-multiplier",
                "--max-tasks-per-child",
                "--max-memory-per-child",
                "--statedb",
                "--without-heartbeat",
                "--umask",
            ],
        ),
        (
            "call",
            [
                "--args",
                "--kwargs",
                "--eta",
                "--countdown",
                "--expires",
                "--serializer",
                "--queue",
                "--exchange",
                "--routing-key",
            ],
        ),
        ("result", ["--task", "--traceback"]),
        ("purge", ["--force", "--queues", "--exclude-queues"]),
        ("shell", ["--ipython", "--python", "--without-tasks"]),
        ("status", ["--timeout", "--destination", "--json"]),
    ],
)
def test_subcommand_help(command: str, flags: list[str]) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    for flag in flags:
        assert flag in result.output


def test_inspect_and_control_help_list_their_commands() -> None:
    text = invoke("inspect", "--help").output
    for name in (
        "active",
        "reserved",
        "scheduled",
        "revoked",
        "registered",
        "stats",
        "active_queues",
        "ping",
        "query_task",
        "conf",
        "report",
        "clock",
    ):
        assert f"\n  {name}" in text
    assert "rate_limit" not in text
    text = invoke("control", "--help").output
    for name in (
        "enable_events",
        "disable_events",
        "rate_limit",
        "time_limit",
        "add_consumer",
        "cancel_consumer",
        "pool_grow",
        "pool_shrink",
        "autoscale",
        "shutdown",
        "revoke",
        "heartbeat",
        "--terminate",
        "--signal",
    ):
        assert name in text
    assert "<task_name> <rate_limit" in text


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.startswith("celeriac ")


def test_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "celeriac", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.startswith("celeriac ")


def test_unknown_subcommand_suggests() -> None:
    result = invoke("wroker")
    assert result.exit_code == 2
    assert "Did you mean 'worker'?" in result.output


# -- app loading --------------------------------------------------------------------------


def test_find_app_attribute_names(project: tuple[Path, str]) -> None:
    root, prefix = project
    write(root / f"{prefix}_a.py", APP_SOURCE.format(name="app", label="a"))
    write(root / f"{prefix}_c.py", APP_SOURCE.format(name="celery", label="c"))
    write(root / f"{prefix}_x.py", APP_SOURCE.format(name="whatever", label="x"))
    assert find_app(f"{prefix}_a").main == "a"
    assert find_app(f"{prefix}_c").main == "c"
    assert find_app(f"{prefix}_x").main == "x"
    assert find_app(f"{prefix}_x:whatever").main == "x"
    assert find_app(f"{prefix}_x.whatever").main == "x"


def test_find_app_factory_and_package_submodule(project: tuple[Path, str]) -> None:
    root, prefix = project
    write(
        root / f"{prefix}_f.py",
        """
        from celeriac import Celery
        def create_app():
            return Celery("made", broker="memory://", set_as_current=False)
    """,
    )
    assert find_app(f"{prefix}_f:create_app()").main == "made"
    write(root / prefix / "__init__.py", "")
    write(root / prefix / "celery.py", APP_SOURCE.format(name="app", label="pkg"))
    assert find_app(prefix).main == "pkg"


def test_find_app_errors(project: tuple[Path, str]) -> None:
    root, prefix = project
    with pytest.raises(AppLoadError, match=f"The module {prefix}_missing was not found"):
        find_app(f"{prefix}_missing")
    write(root / f"{prefix}_none.py", "x = 1\n")
    with pytest.raises(AppLoadError, match="no attribute 'app' or 'celery'"):
        find_app(f"{prefix}_none")
    with pytest.raises(AppLoadError, match="has no attribute 'nope'"):
        find_app(f"{prefix}_none:nope")
    with pytest.raises(AppLoadError, match="is a int, not a Celery application"):
        find_app(f"{prefix}_none:x")
    write(
        root / f"{prefix}_two.py",
        """
        from celeriac import Celery
        one = Celery("one", set_as_current=False)
        two = Celery("two", set_as_current=False)
    """,
    )
    with pytest.raises(AppLoadError, match="several Celery applications"):
        find_app(f"{prefix}_two")


def test_app_load_errors_on_the_command_line(project: tuple[Path, str]) -> None:
    root, prefix = project
    result = invoke("-A", f"{prefix}_gone", "purge", "-f")
    assert result.exit_code == 2
    assert (
        f"Error: Unable to load celery application. The module {prefix}_gone was not found."
    ) in result.output
    assert "Traceback" not in result.output

    write(
        root / f"{prefix}_broken.py",
        """
        import this_dependency_is_not_installed_anywhere
    """,
    )
    result = invoke("-A", f"{prefix}_broken", "purge", "-f")
    assert result.exit_code == 2
    assert f"While trying to load the module {prefix}_broken" in result.output
    assert "No module named 'this_dependency_is_not_installed_anywhere'" in result.output
    assert f'{prefix}_broken.py", line 2' in result.output
    assert "Traceback" not in result.output

    write(root / f"{prefix}_syntax.py", "def (:\n")
    result = invoke("-A", f"{prefix}_syntax", "purge", "-f")
    assert result.exit_code == 2 and "SyntaxError" in result.output


def test_workdir_and_celery4_style_app_option(project: tuple[Path, str], tmp_path: Path) -> None:
    root, prefix = project
    sub = root / "elsewhere"
    write(sub / f"{prefix}_w.py", APP_SOURCE.format(name="app", label="w"))
    calls = recording_worker_run(["--workdir", str(sub), "worker", "-A", f"{prefix}_w"])
    assert calls["app"].main == "w"


def test_hoist_moves_global_options_written_after_the_subcommand() -> None:
    cmds = {"worker", "status", "multi"}
    assert _hoist(["status", "-A", "vege3"], cmds) == ["--app", "vege3", "status"]
    assert _hoist(["worker", "-Avege", "-l", "info", "--broker=redis://x"], cmds) == [
        "--app",
        "vege",
        "--broker=redis://x",
        "worker",
        "-l",
        "info",
    ]
    assert _hoist(["-A", "worker", "worker"], cmds) == ["-A", "worker", "worker"]
    assert _hoist(["multi", "start", "w1", "-A", "proj"], cmds) == [
        "multi",
        "start",
        "w1",
        "-A",
        "proj",
    ]
    assert _hoist(["worker", "--", "-A", "x"], cmds) == ["worker", "--", "-A", "x"]


def test_broker_and_backend_options_override_conf() -> None:
    app = Celery("o", broker="memory://a", set_as_current=False)
    calls = recording_worker_run(
        ["-b", "memory://b", "--result-backend", "memory://r", "worker"], app=app
    )
    assert calls["app"].conf.broker_url == "memory://b"
    assert calls["app"].conf.result_backend == "memory://r"


# -- worker arguments -----------------------------------------------------------------------


class Recorder:
    calls: dict[str, Any] = {}
    exit_code = 0

    def __init__(self, app: Any, **kwargs: Any) -> None:
        Recorder.calls = {"app": app, **kwargs}

    def run(self) -> int:
        pidfile = os.environ.get("CELERIAC_TEST_PIDFILE")
        if pidfile:
            Recorder.calls["pidfile_content"] = Path(pidfile).read_text()
        return Recorder.exit_code


def recording_worker_run(args: list[str], app: Any = None, code: int = 0) -> dict[str, Any]:
    Recorder.calls, Recorder.exit_code = {}, code
    mp = pytest.MonkeyPatch()
    mp.setattr(worker_cli, "work_controller_class", lambda: Recorder)
    try:
        obj = {"app": app or Celery("w", broker="memory://", set_as_current=False)}
        result = invoke(*args, obj=obj)
    finally:
        mp.undo()
    assert result.exit_code == code, result.output
    Recorder.calls["output"] = result.output
    return Recorder.calls


def test_worker_defaults() -> None:
    calls = recording_worker_run(["worker"])
    assert calls["hostname"] == default_nodename(None)
    assert calls["hostname"].startswith("celery@")
    assert calls["queues"] is None and calls["exclude_queues"] is None
    assert calls["loglevel"] == "WARNING"
    assert calls["pool"] == "prefork"
    assert calls["concurrency"] is None and calls["autoscale"] is None
    assert calls["task_events"] is False and calls["beat"] is False


def test_worker_options_reach_the_controller() -> None:
    calls = recording_worker_run(
        [
            "worker",
            "-l",
            "info",
            "-Q",
            "a,b",
            "-Q",
            "c",
            "-X",
            "d",
            "-c",
            "4",
            "-P",
            "threads",
            "-n",
            "w1@%h",
            "-E",
            "-B",
            "--autoscale",
            "10,3",
            "--prefetch-multiplier",
            "2",
            "--max-tasks-per-child",
            "5",
            "--max-memory-per-child",
            "1000",
            "--without-heartbeat",
            "--heartbeat-interval",
            "0.5",
            "-O",
            "fair",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    assert calls["loglevel"] == "INFO"
    assert calls["queues"] == ["a", "b", "c"]
    assert calls["exclude_queues"] == ["d"]
    assert calls["concurrency"] == 4 and calls["pool"] == "threads"
    assert calls["hostname"] == f"w1@{host_format('%h')}"
    assert calls["task_events"] is True and calls["beat"] is True
    assert calls["autoscale"] == (10, 3)
    assert (
        calls["prefetch_multiplier"],
        calls["max_tasks_per_child"],
        calls["max_memory_per_child"],
    ) == (2, 5, 1000)
    assert calls["without_heartbeat"] is True and calls["heartbeat_interval"] == 0.5


def test_worker_exit_code_is_the_controllers() -> None:
    recording_worker_run(["worker"], code=3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-P", "eventlet"], "celeriac has no eventlet pool"),
        (["-P", "gevent"], "celeriac has no gevent pool"),
        (["-P", "nope"], "is not a pool"),
        (["--autoscale", "3,10"], "MAX >= MIN"),
        (["--autoscale", "x,1"], "two whole numbers"),
        (["--autoscale", "-1"], "MAX >= MIN >= 0"),
        (["-l", "chatty"], "'chatty' is not one of"),
        (["-c", "many"], "'many' is not a valid integer"),
        (["--umask", "9z"], "not an octal umask"),
    ],
)
def test_worker_rejects_bad_values(args: list[str], message: str) -> None:
    result = invoke("worker", *args, obj={"app": Celery("x", set_as_current=False)})
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root may switch users")
def test_uid_needs_root() -> None:
    result = invoke("worker", "--uid", "nobody", obj={"app": Celery("x", set_as_current=False)})
    assert result.exit_code == 2
    assert "need the worker to be started as root" in result.output


def test_unknown_uid_is_a_usage_error_for_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("only root gets as far as looking the user up")
    result = invoke(
        "worker",
        "--uid",
        f"no-such-user-{uuid.uuid4().hex[:6]}",
        obj={"app": Celery("x", set_as_current=False)},
    )
    assert result.exit_code == 2
    assert "unknown user or group" in result.output


def test_autoscale_single_value_means_min_zero() -> None:
    assert worker_cli.parse_autoscale("8") == (8, 0)


def test_name_expansion() -> None:
    assert host_format("%h|%n|%d|%i|%I|%%", host="box.example.com") == (
        "box.example.com|box|example.com|%i|%I|%"
    )
    assert node_format("%n-%h.log", "w1@box.example.com") == "w1-box.example.com.log"
    assert node_format("%p.pid", "w1@box") == "w1@box.pid"
    assert default_nodename("w2") == "celery@w2"


# -- pidfiles --------------------------------------------------------------------------------


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def test_pidfile_written_during_run_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.pid"
    monkeypatch.setenv("CELERIAC_TEST_PIDFILE", str(path))
    calls = recording_worker_run(["worker", f"--pidfile={path}"])
    assert calls["pidfile_content"].strip() == str(os.getpid())
    assert not path.exists()


def test_pidfile_of_a_live_process_refuses_to_start(tmp_path: Path, live_pid: int) -> None:
    path = tmp_path / "w.pid"
    path.write_text(f"{live_pid}\n")
    result = invoke(
        "worker", "--pidfile", str(path), obj={"app": Celery("x", set_as_current=False)}
    )
    assert result.exit_code == 1
    assert f"process {live_pid} is still running" in result.output
    assert path.read_text() == f"{live_pid}\n"


def test_stale_pidfile_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "w.pid"
    path.write_text(f"{dead_pid()}\n")
    lock = Pidfile(str(path))
    lock.acquire()
    assert path.read_text().strip() == str(os.getpid())
    lock.release()
    assert not path.exists()


def test_empty_pidfile_option_writes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recording_worker_run(["worker", "--pidfile="])
    assert list(tmp_path.iterdir()) == []


DETACH_SCRIPT = """
import json, os, sys
from celeriac.app import Celery
from celeriac.cli import main
from celeriac.cli import worker as w

out = sys.argv[1]

class Detached:
    def __init__(self, app, **kwargs):
        self.kwargs = kwargs

    def run(self):
        print("hello from the daemon", flush=True)
        pidfile = os.path.join(os.getcwd(), "celery.pid")
        doc = {"pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(),
               "pidfile": open(pidfile).read().strip(), "logfile": self.kwargs["logfile"],
               "stdin": sys.stdin.read()}
        with open(out + ".tmp", "w") as fh:
            json.dump(doc, fh)
        os.rename(out + ".tmp", out)
        return 0

w.work_controller_class = lambda: Detached
main(args=["worker", "-D", "-n", "celery@box", "-f", "%n.log"],
     obj={"app": Celery("d", broker="memory://")}, prog_name="celeriac")
"""


def test_detach_double_forks_writes_default_pidfile_and_logs(tmp_path: Path) -> None:
    script = tmp_path / "detach.py"
    script.write_text(DETACH_SCRIPT)
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.run(
        [sys.executable, str(script), str(report)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert launcher.returncode == 0, launcher.stderr
    deadline = time.monotonic() + 60
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    doc = json.loads(report.read_text())
    assert doc["pidfile"] == str(doc["pid"])  # %n.pid with the node name "celery"
    assert doc["sid"] != os.getsid(0)  # a session of its own, away from our terminal
    assert doc["sid"] != doc["pid"]  # and not its leader: it can never regain a terminal
    assert doc["cwd"] == str(tmp_path)
    assert doc["logfile"] == "celery.log"
    assert doc["stdin"] == ""
    pidfile = tmp_path / "celery.pid"
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pidfile.exists()
    assert "hello from the daemon" in (tmp_path / "celery.log").read_text()


# -- call, result, shell ------------------------------------------------------------------------


def test_call_rejects_bad_json_naming_the_option() -> None:
    app = Celery("c", broker="memory://", set_as_current=False)
    result = invoke("call", "t.add", "--args", "[1,", obj={"app": app})
    assert result.exit_code == 2
    assert "'--args'" in result.output and "is not valid JSON" in result.output
    result = invoke("call", "t.add", "--kwargs", "[1]", obj={"app": app})
    assert result.exit_code == 2
    assert "'--kwargs'" in result.output and "not a JSON object" in result.output
    result = invoke("call", "t.add", "--eta", "tomorrow", obj={"app": app})
    assert result.exit_code == 2 and "ISO-8601" in result.output


def test_call_prints_the_task_id(tmp_path: Path) -> None:
    app = Celery("c", broker=f"sqlite:///{tmp_path / 'b.sqlite'}", set_as_current=False)
    try:
        result = invoke("call", "t.add", "--args", "[2, 2]", "--countdown", "5", obj={"app": app})
        assert result.exit_code == 0, result.output
        assert str(uuid.UUID(result.output.strip())) == result.output.strip()
    finally:
        app.close()


def test_result_prints_value_error_or_traceback(tmp_path: Path) -> None:
    from celeriac.backends.base import ResultMeta

    app = Celery("r", broker=f"sqlite:///{tmp_path / 'b.sqlite'}", set_as_current=False)
    try:
        app.portal.run(app.astore_result(ResultMeta("ok-id", "SUCCESS", result=4)))
        app.portal.run(
            app.astore_result(
                ResultMeta(
                    "bad-id",
                    "FAILURE",
                    result={
                        "exc_type": "ValueError",
                        "exc_message": ["boom"],
                        "exc_module": "builtins",
                    },
                    traceback="Traceback (most recent call last):\nValueError: boom\n",
                )
            )
        )
        result = invoke("result", "ok-id", obj={"app": app})
        assert (result.exit_code, result.output) == (0, "4\n")
        result = invoke("result", "bad-id", obj={"app": app})
        assert result.exit_code == 1
        assert "Error: ValueError: boom" in result.output
        result = invoke("result", "--traceback", "bad-id", obj={"app": app})
        assert result.exit_code == 0 and result.output.startswith("Traceback")
    finally:
        app.close()


def test_shell_namespace_and_plain_python() -> None:
    app = Celery("s", broker="memory://", set_as_current=False)

    @app.task(name="proj.tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    from celeriac.cli.shell import namespace

    ns = namespace(app)
    assert ns["app"] is app and ns["celery"] is app
    assert ns["add"] is app.tasks["proj.tasks.add"]
    for name in ("signature", "chain", "group", "chord", "chunks"):
        assert name in ns
    assert "add" not in namespace(app, with_tasks=False)
    result = invoke(
        "shell",
        "--python",
        obj={"app": app},
        input="print('sum', add.name, type(group).__name__)\n",
    )
    assert result.exit_code == 0, result.output
    assert "sum proj.tasks.add" in result.output
