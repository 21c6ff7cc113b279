"""``celeriac worker``: start a worker, optionally detached, with Celery's flags."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from typing import Any

import click

from . import CLIContext, CommaSeparatedList

logger = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")
POOLS = {
    "prefork": "prefork",
    "processes": "prefork",
    "threads": "threads",
    "asyncio": "asyncio",
    "solo": "solo",
}
DEFAULT_NODENAME = "celery@%h"
DEFAULT_DETACHED_PIDFILE = "%n.pid"

_FORMAT = re.compile(r"%(.)")


def host_format(text: str, host: str | None = None, name: str | None = None, **extra: str) -> str:
    """Expand %h (host), %n (name), %d (domain) and ``extra`` keys; %% is a literal %.

    Unknown keys, such as the prefork index placeholders %i and %I, are left as they are.
    """
    host = host or socket.gethostname()
    hname, _, domain = host.partition(".")
    keys = {"h": host, "n": name or hname, "d": domain, "%": "%", **extra}
    return _FORMAT.sub(lambda m: keys.get(m.group(1), m.group(0)), text)


def default_nodename(hostname: str | None) -> str:
    """``name@host``; a value without ``@`` is a host, as in Celery (``-n w1`` -> celery@w1)."""
    text = host_format(hostname or DEFAULT_NODENAME)
    if "@" not in text:
        return f"celery@{text}"
    return text


def node_format(text: str, nodename: str) -> str:
    """Expand a --logfile/--pidfile pattern for this node: %n is the part before ``@``."""
    name, _, host = nodename.partition("@")
    return host_format(text, host or None, name, p=nodename)


def parse_autoscale(value: str | None) -> tuple[int, int] | None:
    """``MAX[,MIN]`` -> (max, min); min defaults to 0 as in Celery."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected MAX,MIN as two whole numbers, e.g. --autoscale=10,3",
            param_hint="--autoscale",
        ) from None
    if len(numbers) > 2 or not numbers:
        raise click.BadParameter(f"{value!r}: expected MAX,MIN", param_hint="--autoscale")
    high, low = numbers[0], numbers[1] if len(numbers) == 2 else 0
    if low < 0 or high < low or high < 1:
        raise click.BadParameter(
            f"{value!r}: need MAX >= MIN >= 0 and MAX >= 1 (MAX comes first)",
            param_hint="--autoscale",
        )
    return high, low


def parse_pool(value: str | None) -> str | None:
    if value is None:
        return None
    kind = value.lower()
    if kind in ("eventlet", "gevent"):
        raise click.BadParameter(
            f"celeriac has no {kind} pool. Use -P asyncio for 'async def' tasks and "
            f"many concurrent I/O waits, or -P threads for blocking I/O-bound tasks.",
            param_hint="--pool",
        )
    if kind not in POOLS:
        raise click.BadParameter(
            f"{value!r} is not a pool; choose one of prefork, threads, asyncio, solo.",
            param_hint="--pool",
        )
    return POOLS[kind]


def parse_umask(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(str(value), 8)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an octal umask such as 022", param_hint="--umask"
        ) from None


class Pidfile:
    """A pid lock: refuses to start when its pid is alive; removes a stale file."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def read_pid(self) -> int | None:
        try:
            with open(self.path) as fh:
                return int(fh.read().strip() or 0) or None
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def is_locked(self) -> int | None:
        """The pid holding the file if it is alive, else None (stale files are removed)."""
        pid = self.read_pid()
        if pid is not None and pid != os.getpid() and _alive(pid):
            return pid
        if os.path.exists(self.path):
            logger.warning("Removing stale pidfile %s (pid %s)", self.path, pid)
            self._unlink()
        return None

    def acquire(self) -> None:
        holder = self.is_locked()
        if holder is not None:
            raise click.ClickException(
                f"Pidfile {self.path} exists and process {holder} is still running; "
                f"stop that worker first or pass another --pidfile."
            )
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise click.ClickException(
                f"Pidfile {self.path} was created by another process."
            ) from None
        except OSError as exc:
            raise click.ClickException(
                f"Cannot create pidfile {self.path}: {exc.strerror}"
            ) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")

    def release(self) -> None:
        if self.read_pid() == os.getpid():
            self._unlink()

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a worker of ours (Celery's rule too)
    return True


def drop_privileges(uid: str | None, gid: str | None) -> None:
    """Switch to --uid/--gid (names or numbers); only root may do that."""
    if uid is None and gid is None:
        return
    if os.geteuid() != 0:
        raise click.UsageError("--uid/--gid need the worker to be started as root.")
    import grp
    import pwd

    try:
        user = (
            pwd.getpwuid(int(uid))
            if uid and uid.isdigit()
            else (pwd.getpwnam(uid) if uid else None)
        )
        group_id = (
            (int(gid) if gid.isdigit() else grp.getgrnam(gid).gr_gid)
            if gid
            else (user.pw_gid if user else None)
        )
    except KeyError as exc:
        raise click.BadParameter(f"unknown user or group {exc}") from None
    if group_id is not None:
        os.setgroups([group_id])
        os.setgid(group_id)
    if user is not None:
        if gid is None:
            os.initgroups(user.pw_name, user.pw_gid)
        os.setuid(user.pw_uid)


def detach(logfile: str | None, umask: int | None) -> None:
    """Become a daemon (double fork, new session); only the grandchild returns.

    Stdin reads /dev/null; stdout and stderr go to the logfile if given (so even a crash
    before logging is set up leaves a trace), else to /dev/null. The cwd is kept
    (``--workdir`` was applied already).
    """
    if logfile:
        open(logfile, "a").close()  # fail now, while the user can still see the error
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    if umask is not None:
        os.umask(umask)
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if logfile else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


def work_controller_class() -> type[Any]:
    """The worker class; a function so tests can stand in a recording class."""
    from ..worker.worker import WorkController

    return WorkController


def _conf(app: Any, name: str, default: Any = None) -> Any:
    try:
        value = app.conf.get(name, default)
    except Exception:
        return default
    return default if value is None else value


def _flatten(values: Sequence[list[str]]) -> list[str] | None:
    out = [q for group in values for q in group]
    return out or None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-n",
    "--hostname",
    metavar="NAME",
    help="Node name (default celery@%h). %h expands to the host name, %n to its "
    "first part and %d to the domain, e.g. -n worker1@%h.",
)
@click.option(
    "-l",
    "--loglevel",
    default="WARNING",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    metavar="LEVEL",
    help="Logging level: DEBUG, INFO, WARNING, ERROR, CRITICAL or FATAL (any case).",
)
@click.option(
    "-f",
    "--logfile",
    metavar="PATH",
    help="Log to this file instead of stderr (%n, %h, %i expand as for -n).",
)
@click.option(
    "-Q",
    "--queues",
    multiple=True,
    type=CommaSeparatedList(),
    help="Only consume from these queues (comma separated); default: all "
    "task_queues, or the default queue.",
)
@click.option(
    "-X",
    "--exclude-queues",
    multiple=True,
    type=CommaSeparatedList(),
    help="Do not consume from these queues (comma separated).",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=0),
    metavar="N",
    help="Number of child processes/threads (default: worker_concurrency, or the number of CPUs).",
)
@click.option(
    "-P",
    "--pool",
    metavar="POOL",
    help="Pool: prefork (default; CPU-bound), threads (blocking I/O), asyncio "
    "('async def' tasks) or solo (one task at a time).",
)
@click.option(
    "-D",
    "--detach",
    is_flag=True,
    help="Run in the background as a daemon (default --pidfile %n.pid).",
)
@click.option(
    "--pidfile",
    metavar="PATH",
    help="Write the pid here and refuse to start if that process is alive. "
    "An empty value (--pidfile=) writes none.",
)
@click.option(
    "--prefetch-multiplier",
    type=click.IntRange(min=0),
    metavar="N",
    help="Messages to prefetch per pool slot (worker_prefetch_multiplier).",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    metavar="N",
    help="Replace a pool child after it ran N tasks.",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=1),
    metavar="KIB",
    help="Replace a pool child after its resident memory passes KIB kilobytes.",
)
@click.option(
    "-E",
    "--task-events",
    is_flag=True,
    help="Send task events (for monitors such as `celeriac events`).",
)
@click.option(
    "--autoscale",
    metavar="MAX,MIN",
    help="Grow the pool up to MAX and shrink it down to MIN with the load.",
)
@click.option(
    "-B",
    "--beat",
    is_flag=True,
    help="Also run the beat scheduler in this worker (one per cluster!).",
)
@click.option("--without-heartbeat", is_flag=True, help="Send no worker heartbeat events.")
@click.option("--without-gossip", is_flag=True, help="Accepted for Celery compatibility.")
@click.option("--without-mingle", is_flag=True, help="Accepted for Celery compatibility.")
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECS",
    help="Seconds between worker heartbeats (default 2).",
)
@click.option(
    "-S", "--statedb", metavar="PATH", help="Keep revoked task ids in this file across restarts."
)
@click.option(
    "-O",
    "optimization",
    metavar="PROFILE",
    help="Accepted for Celery compatibility (fair scheduling is the default).",
)
@click.option("--uid", help="Run as this user after start-up (root only).")
@click.option("--gid", help="Run as this group after start-up (root only).")
@click.option("--umask", help="Octal umask for files the worker creates, e.g. 022.")
@click.pass_context
def worker(ctx: click.Context, /, **opts: Any) -> None:
    """Start a worker that runs tasks from the broker's queues.

    \b
    Examples:
      celeriac -A proj worker -l INFO
      celeriac -A proj worker -Q images,video -c 4 -n images@%h
      celeriac -A proj worker -D --pidfile=/run/w1.pid -f /var/log/w1.log
    """
    obj: CLIContext = ctx.obj
    pool = parse_pool(opts["pool"])
    autoscale = parse_autoscale(opts["autoscale"])
    umask = parse_umask(opts["umask"])
    if opts["optimization"]:
        logger.debug("-O %s accepted and ignored", opts["optimization"])
    app = obj.app
    hostname = default_nodename(opts["hostname"])
    logfile = node_format(opts["logfile"], hostname) if opts["logfile"] else None
    pidpattern = opts["pidfile"]
    if pidpattern is None and opts["detach"]:
        pidpattern = DEFAULT_DETACHED_PIDFILE
    pidfile = Pidfile(node_format(pidpattern, hostname)) if pidpattern else None
    if pidfile is not None and (holder := pidfile.is_locked()) is not None:
        raise click.ClickException(
            f"Pidfile {pidfile.path} exists and process {holder} is still running; "
            f"stop that worker first or pass another --pidfile."
        )
    drop_privileges(opts["uid"], opts["gid"])
    if opts["detach"]:
        detach(logfile, umask)
    elif umask is not None:
        os.umask(umask)
    if pidfile is not None:
        pidfile.acquire()
    try:
        controller = work_controller_class()(
            app,
            hostname=hostname,
            queues=_flatten(opts["queues"]),
            exclude_queues=_flatten(opts["exclude_queues"]),
            concurrency=opts["concurrency"] or None,
            pool=pool or parse_pool(str(_conf(app, "worker_pool", "prefork"))) or "prefork",
            loglevel=opts["loglevel"].upper(),
            logfile=logfile,
            prefetch_multiplier=opts["prefetch_multiplier"],
            max_tasks_per_child=opts["max_tasks_per_child"],
            max_memory_per_child=opts["max_memory_per_child"],
            task_events=opts["task_events"] or bool(_conf(app, "worker_send_task_events", False)),
            autoscale=autoscale,
            beat=opts["beat"],
            without_heartbeat=opts["without_heartbeat"],
            heartbeat_interval=opts["heartbeat_interval"],
            statedb=node_format(opts["statedb"], hostname) if opts["statedb"] else None,
        )
        code = controller.run()
    finally:
        if pidfile is not None:
            pidfile.release()
    ctx.exit(int(code or 0))
