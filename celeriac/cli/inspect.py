"""``celeriac inspect``, ``control`` and ``status``: remote control from the shell.

The commands and their arguments come from the worker-side registry
(``celeriac.worker.commands``), so commands users add with ``@inspect_command`` or
``@control_command`` work here too once the app module imports them.
"""

from __future__ import annotations

import difflib
import json
import textwrap
from pprint import pformat
from typing import Any, Literal

import click

from ..control import Control, encode
from ..worker.commands import COMMANDS, Command, lookup
from . import EX_UNAVAILABLE, CLIContext, CommaSeparatedList

Kind = Literal["inspect", "control"]


class NoReplies(click.ClickException):
    exit_code = EX_UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("No nodes replied within time constraint")


class RemoteCommand(click.Command):
    """A click command whose --help lists the registered remote commands of one kind."""

    def __init__(self, *args: Any, kind: Kind, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (f"{cmd.name} {cmd.signature}".strip(), cmd.help)
            for cmd in sorted(COMMANDS.values(), key=lambda c: c.name)
            if cmd.kind == self.kind
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
        super().format_epilog(ctx, formatter)


def find_command(obj: CLIContext, action: str, kind: Kind) -> Command:
    cmd = lookup(action)
    if cmd is None:
        # A custom command may live in a module the app only lists in `include`.
        obj.app.loader_import_default_modules()
        cmd = lookup(action)
    if cmd is None or cmd.kind != kind:
        names = sorted(c.name for c in COMMANDS.values() if c.kind == kind)
        close = difflib.get_close_matches(action, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        other = (
            " (it is a control command: use `celeriac control`)"
            if (cmd is not None and kind == "inspect")
            else ""
        )
        raise click.UsageError(
            f"{action!r} is not an {kind} command{other}.{hint} Choose from: {', '.join(names)}."
        )
    return cmd


def compile_arguments(cmd: Command, values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Turn the positional ARGS into the handler's keyword arguments, typed."""
    rest = list(values)
    out: dict[str, Any] = {}
    for name, convert in cmd.args:
        if not rest:
            break
        raw = rest.pop(0)
        try:
            out[name] = convert(raw)
        except ValueError:
            kind = getattr(convert, "__name__", "value")
            raise click.UsageError(f"{cmd.name}: {name} must be a {kind}, not {raw!r}.") from None
    if cmd.variadic:
        out[cmd.variadic] = rest
        rest = []
    usage = f"{cmd.name} {cmd.signature}".strip()
    if rest:
        raise click.UsageError(f"Too many arguments for {cmd.name}: usage is `{usage}`.")
    missing = [name for name in cmd.required() if name not in out or out[name] == []]
    if missing:
        raise click.UsageError(f"{cmd.name} needs {', '.join(missing)}: usage is `{usage}`.")
    return out


def pretty(value: Any) -> tuple[str, str]:
    """Celery's layout: (status, body) with lists as bullets and dicts as JSON."""
    if isinstance(value, list):
        return "OK", "\n".join(f"* {item}" for item in value) if value else "- empty -"
    if isinstance(value, dict):
        if "ok" in value:
            return "OK", textwrap.indent(pretty(value["ok"])[1], "    ")
        if "error" in value:
            return "ERROR", textwrap.indent(pretty(value["error"])[1], "    ")
        return "OK", json.dumps(value, sort_keys=True, indent=4, default=str)
    if isinstance(value, str):
        return "OK", value
    return "OK", pformat(value)


def render(
    obj: CLIContext, replies: list[dict[str, Any]], *, show_body: bool, as_json: Any = None
) -> None:
    """Print replies (or ``as_json`` when given) then the node count; none is an error."""
    if not replies:
        raise NoReplies()
    if as_json is not None:
        obj.echo(encode(as_json).decode())
        return
    nodes = 0
    for reply in replies:
        for node, value in reply.items():
            nodes += 1
            status, body = pretty(value)
            colour = "green" if status == "OK" else "red"
            obj.echo(
                f"-> {obj.style(node + ':', fg='cyan', bold=True)} {obj.style(status, fg=colour)}"
            )
            if show_body and body:
                obj.echo(textwrap.indent(body, "    "))
    if not obj.quiet:
        obj.echo(f"\n{nodes} {'node' if nodes == 1 else 'nodes'} online.")


def _merge(replies: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for reply in replies:
        merged.update(reply)
    return merged


def _remote_options(fn: Any) -> Any:
    fn = click.option("-j", "--json", "as_json", is_flag=True, help="Print the replies as JSON.")(
        fn
    )
    fn = click.option(
        "-d",
        "--destination",
        type=CommaSeparatedList(),
        metavar="NODES",
        help="Only these workers (comma separated node names).",
    )(fn)
    fn = click.option(
        "-t",
        "--timeout",
        type=click.FloatRange(min=0),
        default=1.0,
        show_default=True,
        help="Seconds to wait for replies.",
    )(fn)
    return fn


_SETTINGS = {"help_option_names": ["-h", "--help"]}


@click.command(cls=RemoteCommand, kind="inspect", context_settings=_SETTINGS)
@click.argument("action")
@click.argument("arguments", nargs=-1)
@_remote_options
@click.pass_context
def inspect(
    ctx: click.Context,
    action: str,
    arguments: tuple[str, ...],
    timeout: float,
    destination: list[str] | None,
    as_json: bool,
) -> None:
    """Ask running workers about their state (nothing is changed).

    \b
    Examples:
      celeriac -A proj inspect active
      celeriac -A proj inspect query_task 4f2c... 9ab1...
      celeriac -A proj inspect stats -d celery@host1 -j
    """
    obj: CLIContext = ctx.obj
    cmd = find_command(obj, action, "inspect")
    kwargs = compile_arguments(cmd, arguments)
    replies = Control(obj.app).broadcast(cmd.name, kwargs, destination, reply=True, timeout=timeout)
    render(obj, replies, show_body=True, as_json=_merge(replies) if as_json else None)


@click.command(cls=RemoteCommand, kind="control", context_settings=_SETTINGS)
@click.argument("action")
@click.argument("arguments", nargs=-1)
@_remote_options
@click.option("--terminate", is_flag=True, help="revoke: also kill the task if it is running.")
@click.option(
    "--signal",
    "signame",
    default="SIGTERM",
    show_default=True,
    help="revoke --terminate: the signal to send.",
)
@click.pass_context
def control(
    ctx: click.Context,
    action: str,
    arguments: tuple[str, ...],
    timeout: float,
    destination: list[str] | None,
    as_json: bool,
    terminate: bool,
    signame: str,
) -> None:
    """Change running workers: rate limits, queues, pool size, events, revokes, shutdown.

    \b
    Examples:
      celeriac -A proj control rate_limit proj.tasks.add 10/m
      celeriac -A proj control add_consumer images -d celery@host1
      celeriac -A proj control revoke --terminate --signal SIGKILL 4f2c...
    """
    obj: CLIContext = ctx.obj
    cmd = find_command(obj, action, "control")
    kwargs = compile_arguments(cmd, arguments)
    if cmd.name == "revoke":
        kwargs.update(terminate=terminate, signal=signame)
    elif terminate:
        raise click.UsageError("--terminate only applies to revoke.")
    replies = Control(obj.app).broadcast(cmd.name, kwargs, destination, reply=True, timeout=timeout)
    render(obj, replies, show_body=True, as_json=replies if as_json else None)


@click.command(context_settings=_SETTINGS)
@_remote_options
@click.pass_context
def status(
    ctx: click.Context, timeout: float, destination: list[str] | None, as_json: bool
) -> None:
    """Ping all workers and list those that answer; exits 69 if none does."""
    obj: CLIContext = ctx.obj
    replies = Control(obj.app).ping(destination, timeout=timeout)
    render(obj, replies, show_body=False, as_json=_merge(replies) if as_json else None)
