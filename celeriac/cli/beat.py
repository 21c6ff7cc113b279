"""``celeriac beat``: send periodic tasks, with Celery's flags.

Several beats may run at once: one leads, the others stand by (see ``celeriac.beat``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click

from . import CLIContext
from .worker import LOG_LEVELS, Pidfile, detach, drop_privileges, parse_umask

logger = logging.getLogger(__name__)

DEFAULT_DETACHED_PIDFILE = "celerybeat.pid"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-D", "--detach", is_flag=True,
    help=f"Run in the background as a daemon (default --pidfile {DEFAULT_DETACHED_PIDFILE}).",
)
@click.option(
    "-s", "--schedule", metavar="PATH",
    help="Accepted for Celery compatibility: celeriac keeps beat state in the broker.",
)
@click.option(
    "-S", "--scheduler", metavar="CLASS",
    help="Scheduler class as module:Class (default: beat_scheduler).",
)
@click.option(
    "--max-interval", type=click.FloatRange(min=0, min_open=True), metavar="SECS",
    help="Longest sleep between scheduling passes (default: beat_max_loop_interval, or 300).",
)
@click.option(
    "-l", "--loglevel", default="WARNING", show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False), metavar="LEVEL",
    help="Logging level: DEBUG, INFO, WARNING, ERROR, CRITICAL or FATAL (any case).",
)
@click.option("-f", "--logfile", metavar="PATH", help="Log to this file instead of stderr.")
@click.option(
    "--pidfile", metavar="PATH",
    help="Write the pid here and refuse to start if that process is alive.",
)
@click.option("--uid", help="Run as this user after start-up (root only).")
@click.option("--gid", help="Run as this group after start-up (root only).")
@click.option("--umask", help="Octal umask for files beat creates, e.g. 022.")
@click.option("--executable", hidden=True, help="Accepted for Celery compatibility; ignored.")
@click.pass_context
def beat(ctx: click.Context, /, **opts: Any) -> None:
    """Start the beat scheduler, which sends periodic tasks when they are due.

    \b
    Examples:
      celeriac -A proj beat -l INFO
      celeriac -A proj beat -D --pidfile=/run/beat.pid -f /var/log/beat.log
    """
    from ..beat import Beat
    from ..exceptions import ImproperlyConfigured
    from ..worker.worker import setup_logging

    obj: CLIContext = ctx.obj
    umask = parse_umask(opts["umask"])
    app = obj.app
    pidpath = opts["pidfile"]
    if pidpath is None and opts["detach"]:
        pidpath = DEFAULT_DETACHED_PIDFILE
    pidfile = Pidfile(pidpath) if pidpath else None
    if pidfile is not None and (holder := pidfile.is_locked()) is not None:
        raise click.ClickException(
            f"Pidfile {pidfile.path} exists and process {holder} is still running; "
            f"stop that beat first or pass another --pidfile."
        )
    try:
        service = Beat(
            app,
            max_interval=opts["max_interval"],
            scheduler=opts["scheduler"],
            schedule=opts["schedule"],
        )
        service.setup()
    except ImproperlyConfigured as exc:
        raise click.ClickException(str(exc)) from None
    drop_privileges(opts["uid"], opts["gid"])
    if opts["detach"]:
        detach(opts["logfile"], umask)
    elif umask is not None:
        os.umask(umask)
    setup_logging(opts["loglevel"], opts["logfile"])
    if pidfile is not None:
        pidfile.acquire()
    try:
        if not obj.quiet and not opts["detach"]:
            obj.echo(service.banner(), err=True)
        code = service.run()
    finally:
        if pidfile is not None:
            pidfile.release()
    ctx.exit(code)
