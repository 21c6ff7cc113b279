"""``celeriac events``: watch the cluster live, or ``--dump`` every event as a line.

Workers always send heartbeats; task events need ``-E`` on the worker or
``celeriac control enable_events``. Ctrl-C stops either view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

import click

from ..events.dumper import aevdump
from ..events.top import atop
from . import CLIContext

LOG_FORMAT = "[%(asctime)s: %(levelname)s] %(message)s"


async def _run(app: Any, dump: bool, frequency: float) -> None:
    try:
        if dump:
            await aevdump(app, sys.stdout, sys.stderr)
        else:
            await atop(app, frequency=frequency, out=sys.stdout)
    finally:
        await app.aclose()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-d", "--dump", is_flag=True, help="Print every event as it arrives.")
@click.option(
    "-c",
    "--camera",
    metavar="CLASS",
    help="Celery's snapshot camera: not supported (use --dump, or `celeriac dashboard`).",
)
@click.option(
    "-F",
    "--frequency",
    "--freq",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds between redraws of the live view.",
)
@click.option(
    "-r", "--maxrate", metavar="RATE", help="Camera rate limit; accepted for compatibility."
)
@click.option("-l", "--loglevel", default="WARNING", show_default=True, help="Logging level.")
@click.pass_obj
def events(
    obj: CLIContext,
    dump: bool,
    camera: str | None,
    frequency: float,
    maxrate: str | None,
    loglevel: str,
) -> None:
    """Show workers and tasks as their events arrive (top-like), or dump the events.

    \b
    Examples:
      celeriac -A proj control enable_events
      celeriac -A proj events --dump
      celeriac -A proj events
      celeriac -A proj control disable_events
    """
    level = getattr(logging, loglevel.upper(), None)
    if not isinstance(level, int):
        raise click.BadParameter(f"unknown log level {loglevel!r}", param_hint="--loglevel")
    if camera:
        raise click.UsageError(
            f"--camera {camera}: snapshot cameras are not supported by celeriac. "
            "Use `celeriac events --dump`, the live view (`celeriac events`), or "
            "`celeriac dashboard`."
        )
    if frequency <= 0:
        raise click.BadParameter("must be greater than 0", param_hint="--frequency")
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    if maxrate:
        logging.getLogger(__name__).info("--maxrate only applies to cameras; ignored")
    app = obj.app
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(app, dump, frequency))
