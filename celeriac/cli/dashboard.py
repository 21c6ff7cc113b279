"""``celeriac dashboard``: serve the web dashboard (Flower's job) with uvicorn.

Starlette and uvicorn come with the ``dashboard`` extra and are imported only here, so
the rest of the CLI works without them.
"""

from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any

import click

from . import CLIContext

LOG_FORMAT = "[%(asctime)s: %(levelname)s] %(message)s"
MISSING = "The dashboard needs starlette and uvicorn: pip install 'celeriac[dashboard]'"
#: Seconds uvicorn waits for open requests when stopping; live /events streams are
#: ended by us first, so this only bounds a stuck client.
GRACEFUL_SECONDS = 3


def _serve(asgi: Any, dashboard: Any, address: str, port: int, loglevel: str) -> None:
    try:
        import uvicorn
    except ImportError:
        raise click.ClickException(MISSING) from None

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn waits for open responses before shutting down; end the streams.
            dashboard.request_close()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        asgi,
        host=address,
        port=port,
        log_level=loglevel.lower(),
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    Server(config).run()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=5555, show_default=True, help="Port to listen on.")
@click.option(
    "--basic-auth",
    "--basic_auth",
    "basic_auth",
    envvar="CELERIAC_DASHBOARD_AUTH",
    metavar="USER:PASS[,USER:PASS]",
    help="Require HTTP basic auth (also env CELERIAC_DASHBOARD_AUTH).",
)
@click.option(
    "--max-tasks",
    "--max_tasks",
    "max_tasks",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Tasks kept in memory; the least recently updated are forgotten first.",
)
@click.option("-l", "--loglevel", default="INFO", show_default=True, help="Logging level.")
@click.pass_obj
def dashboard(
    obj: CLIContext,
    address: str,
    port: int,
    basic_auth: str | None,
    max_tasks: int,
    loglevel: str,
) -> None:
    """Serve a web dashboard: workers, queues, tasks, live events, /metrics.

    \b
    Workers always send heartbeats; task events need `worker -E` or
    `celeriac control enable_events`.

    \b
    Examples:
      celeriac -A proj dashboard
      celeriac -A proj dashboard --address 0.0.0.0 --port 8080 --basic-auth admin:secret
    """
    level = getattr(logging, loglevel.upper(), None)
    if not isinstance(level, int):
        raise click.BadParameter(f"unknown log level {loglevel!r}", param_hint="--loglevel")
    try:
        from ..dashboard.app import create_app, parse_credentials
    except ImportError:
        raise click.ClickException(MISSING) from None
    credentials = None
    if basic_auth:
        try:
            credentials = parse_credentials(basic_auth)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--basic-auth") from None
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    asgi = create_app(obj.app, basic_auth=credentials, max_tasks=max_tasks)
    _serve(asgi, asgi.state.dashboard, address, port, loglevel)
