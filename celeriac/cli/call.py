"""``celeriac call``: send a task by name, the way ``send_task`` does, and print its id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
import orjson

from . import CLIContext, ParamBase


class JSONValue(ParamBase):
    """A JSON list or object given on the command line."""

    def __init__(self, kind: type[list[Any]] | type[dict[str, Any]]) -> None:
        self.kind = kind
        self.name = "JSON_ARRAY" if kind is list else "JSON_OBJECT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.kind):
            return value
        what = (
            "a JSON list, e.g. '[2, 2]'"
            if self.kind is list
            else "a JSON object, e.g. '{\"x\": 1}'"
        )
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            self.fail(f"{value!r} is not valid JSON ({exc}); expected {what}.", param, ctx)
        if not isinstance(parsed, self.kind):
            self.fail(f"{value!r} is valid JSON but not {what}.", param, ctx)
        return parsed


class ISODateTime(ParamBase):
    name = "ISO8601"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            self.fail(
                f"{value!r} is not an ISO-8601 time such as 2030-01-31T12:00:00+00:00", param, ctx
            )


class ISODateTimeOrFloat(ISODateTime):
    name = "ISO8601|SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return float(value)
        except (TypeError, ValueError):
            return super().convert(value, param, ctx)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name")
@click.option(
    "-a",
    "--args",
    "args",
    type=JSONValue(list),
    default="[]",
    help="Positional arguments as a JSON list, e.g. '[2, 2]'.",
)
@click.option(
    "-k",
    "--kwargs",
    "kwargs",
    type=JSONValue(dict),
    default="{}",
    help="Keyword arguments as a JSON object, e.g. '{\"x\": 1}'.",
)
@click.option("--eta", type=ISODateTime(), help="Run no earlier than this ISO-8601 time.")
@click.option("--countdown", type=float, help="Run no earlier than this many seconds from now.")
@click.option(
    "--expires",
    type=ISODateTimeOrFloat(),
    help="Discard the task if not started by then (ISO-8601 time or seconds).",
)
@click.option("--serializer", help="Serializer for the arguments (json, msgpack, pickle...).")
@click.option("--queue", help="Send to this queue (overrides task routes).")
@click.option("--exchange", help="Send to this exchange.")
@click.option("--routing-key", help="Routing key to publish with.")
@click.pass_context
def call(
    ctx: click.Context, /, name: str, args: list[Any], kwargs: dict[str, Any], **options: Any
) -> None:
    """Send the task NAME to the broker and print its id.

    The task need not be importable here: only its registered name is used.

    \b
    Example:
      celeriac -A proj call proj.tasks.add --args '[2, 2]' --countdown 10
    """
    obj: CLIContext = ctx.obj
    sent = {key: value for key, value in options.items() if value is not None}
    result = obj.app.send_task(name, args=args, kwargs=kwargs, **sent)
    obj.echo(str(result.id))
